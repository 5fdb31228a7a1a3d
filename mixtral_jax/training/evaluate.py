"""Perplexity of a checkpoint on held-out text, and what quantizing it costs.

    python -m mixtral_jax.evaluate --checkpoint DIR --data FILE [--data FILE ...]
    python -m mixtral_jax.evaluate --checkpoint DIR --data FILE --quantize int8|int4

Files are read as for training (`.txt` documents, `.jsonl` text or chat
records, whose loss covers only the assistant's answers), packed into rows of
`--seq_len` tokens without shuffling, and every target token is counted once:
perplexity = exp(summed NLL / tokens).

With `--quantize` the float checkpoint and its quantized twin read the same
rows, one model after the other (never both in memory), and the report adds:
  - the perplexity's relative change;
  - top-1 agreement: target tokens whose most likely next token is unchanged;
  - router agreement per layer: tokens whose top-k expert set is unchanged. A
    changed set runs other experts: in a mixture of experts, quantization
    errors act through the router too, not only through the weights.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixtral_jax import cli
from mixtral_jax.checkpoints.load import load, load_tokenizer
from mixtral_jax.parallel import distributed
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.training import data, steps


def perplexity(
    model,
    tokenizer,
    files: Sequence[str],
    *,
    seq_len: int = 2048,
    batch_size: int = 8,
    mesh=None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """{"loss": mean NLL per target token, "perplexity", "tokens"} of `model` on `files`."""
    examples = [data.tokenize(r, tokenizer) for r in data.read_records(files)]
    evaluate = steps.jit_eval(model, mesh or make_mesh())
    result = mean_nll(evaluate, evaluate.place(model), examples, seq_len, batch_size, max_batches)
    if not result["tokens"]:
        raise data.DataError(f"{', '.join(map(str, files))}: no target tokens to evaluate")
    return result


def token_predictions(model, batch: steps.Batch) -> dict[str, jax.Array]:
    """Per token: NLL and weight [B, T], the most likely next token [B, T], whether it
    is a real token [B, T], and the experts every layer chose [L, B, T, k]."""
    out = model.forward(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    logits = out.logits.astype(jnp.float32)
    segments = batch.get("segment_ids")
    return {
        "nll": optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]),
        "weights": batch["weights"].astype(jnp.float32),
        "top1": jnp.argmax(logits, axis=-1).astype(jnp.int32),
        "real": jnp.ones(batch["tokens"].shape, bool) if segments is None else segments != 0,
        "experts": jnp.sort(out.routing.experts, axis=-1).astype(jnp.int32),  # as sets
    }


def predictions(
    model,
    examples: Sequence[data.Example],
    *,
    seq_len: int,
    batch_size: int,
    mesh=None,
    max_batches: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """`token_predictions` of every batch of the packed examples, on the host."""
    mesh = mesh or make_mesh()
    evaluate = steps.jit_eval(model, mesh, fn=token_predictions)
    params = evaluate.place(model)
    batches = data.batches(
        examples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        rows=distributed.host_rows(evaluate.batch_sharding, batch_size),
        shuffle=False,
        keep_last=True,
    )
    for batch in itertools.islice(batches, max_batches):
        out = evaluate(params, distributed.global_batch(batch, evaluate.batch_sharding))
        yield {k: np.asarray(v) for k, v in out.items()}


def agreement(reference: Sequence[dict], candidate: Sequence[dict]) -> dict:
    """How far `candidate`'s predictions (a quantized model's) are from `reference`'s on
    the same batches: losses, perplexities and their relative change, top-1
    agreement over target tokens, and router agreement per layer over real tokens."""

    tokens = sum(float(np.sum(p["weights"])) for p in reference)
    if not tokens:
        raise data.DataError("no target tokens to compare")
    result = {"tokens": tokens}
    for name, preds in (("reference", reference), ("candidate", candidate)):
        loss = sum(float(np.sum(p["nll"] * p["weights"])) for p in preds) / tokens
        result[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    result["perplexity_change"] = (
        result["candidate"]["perplexity"] / result["reference"]["perplexity"] - 1
    )
    same_top1 = sum(
        float(np.sum((r["top1"] == c["top1"]) * r["weights"]))
        for r, c in zip(reference, candidate, strict=True)
    )
    result["top1_agreement"] = same_top1 / tokens
    same_sets = sum(
        np.sum(np.all(r["experts"] == c["experts"], axis=-1) & r["real"], axis=(1, 2))
        for r, c in zip(reference, candidate, strict=True)
    )  # [L]
    real = sum(float(np.sum(r["real"])) for r in reference)
    result["router_agreement"] = [float(x) / real for x in same_sets]
    return result


def compare_quantized(
    directory: str,
    files: Sequence[str],
    scheme: str,
    *,
    group_size: int = 128,
    seq_len: int = 2048,
    batch_size: int = 8,
    dtype=None,
    mesh=None,
    max_batches: int | None = None,
) -> dict:
    """`agreement` of the float checkpoint in `directory` and its `scheme` quantization,
    loaded one after the other into `mesh`."""
    tokenizer = load_tokenizer(directory)
    examples = [data.tokenize(r, tokenizer) for r in data.read_records(files)]
    runs = []
    for quantize in (None, scheme):
        model = load(directory, dtype=dtype, mesh=mesh, quantize=quantize, group_size=group_size)
        kw = dict(seq_len=seq_len, batch_size=batch_size, mesh=mesh, max_batches=max_batches)
        runs.append(list(predictions(model, examples, **kw)))
        del model
    return agreement(*runs)


def mean_nll(
    evaluate: steps.Eval,
    params,
    examples: Sequence[data.Example],
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Loss (mean NLL per target token), perplexity and token count over the examples,
    packed in order; each host reads only its rows."""
    rows = distributed.host_rows(evaluate.batch_sharding, batch_size)
    batches = data.batches(
        examples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        rows=rows,
        shuffle=False,
        keep_last=True,
    )
    nll, tokens = 0.0, 0.0
    for local in itertools.islice(batches, max_batches):
        out = evaluate(params, distributed.global_batch(local, evaluate.batch_sharding))
        nll, tokens = nll + float(out["nll"]), tokens + float(out["tokens"])
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixtral_jax.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--checkpoint", required=True, help="written by tools/convert.py or a training export"
    )
    parser.add_argument("--data", required=True, action="append", help=".txt/.jsonl, repeatable")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_batches", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16")
    parser.add_argument(
        "--quantize",
        default=None,
        help="int8 or int4: compare the checkpoint with its quantization (perplexity change, "
        "top-1 and router agreement)",
    )
    parser.add_argument("--group_size", type=int, default=128, help="int4: inputs per scale")
    args = parser.parse_args(argv)
    distributed.initialize()
    return cli.run(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> None:
    if args.seq_len < 2 or args.batch_size < 1:
        raise ValueError("--seq_len must be at least 2 and --batch_size at least 1")
    start = time.perf_counter()
    # Loaded straight into its shardings on every device, where it is evaluated.
    mesh = make_mesh()
    if args.quantize:
        result = compare_quantized(
            args.checkpoint,
            args.data,
            args.quantize,
            group_size=args.group_size,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            dtype=args.dtype,
            mesh=mesh,
            max_batches=args.max_batches,
        )
        print_agreement(result, args.quantize, time.perf_counter() - start)
        return
    model = load(args.checkpoint, dtype=args.dtype, mesh=mesh)
    result = perplexity(
        model,
        load_tokenizer(args.checkpoint),
        args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        mesh=mesh,
        max_batches=args.max_batches,
    )
    print(
        f"{', '.join(args.data)}: {result['tokens']:,.0f} tokens, loss {result['loss']:.4f}, "
        f"perplexity {result['perplexity']:.3f} ({time.perf_counter() - start:.1f} s)"
    )


def print_agreement(result: dict, scheme: str, seconds: float) -> None:
    """The report of `agreement` as a small table."""
    ref, cand = result["reference"], result["candidate"]
    layers = result["router_agreement"]
    print(f"{result['tokens']:,.0f} target tokens ({seconds:.1f} s)")
    print(f"{'':10} {'loss':>8} {'perplexity':>11}")
    print(f"{'float':10} {ref['loss']:8.4f} {ref['perplexity']:11.3f}")
    print(
        f"{scheme:10} {cand['loss']:8.4f} {cand['perplexity']:11.3f}  "
        f"({result['perplexity_change']:+.2%})"
    )
    print(f"top-1 agreement: {result['top1_agreement']:.2%}")
    print(
        f"router agreement (top-k expert set unchanged): mean {np.mean(layers):.2%}, "
        f"lowest {min(layers):.2%}; per layer: " + " ".join(f"{a:.1%}" for a in layers)
    )

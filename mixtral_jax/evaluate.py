"""Perplexity of a checkpoint on held-out text.

    python -m mixtral_jax.evaluate --checkpoint DIR --data FILE [--data FILE ...]

Files are read as for training (`.txt` documents, `.jsonl` text or chat
records, whose loss covers only the assistant's answers), packed into rows of
`--seq_len` tokens without shuffling, and every target token is counted once:
perplexity = exp(summed NLL / tokens).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Sequence

from mixtral_jax import checkpoint, data, distributed, sharding, steps


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
    evaluate = steps.jit_eval(model, mesh or sharding.make_mesh())
    result = mean_nll(evaluate, evaluate.place(model), examples, seq_len, batch_size, max_batches)
    if not result["tokens"]:
        raise data.DataError(f"{', '.join(map(str, files))}: no target tokens to evaluate")
    return result


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
    args = parser.parse_args(argv)
    distributed.initialize()
    try:
        if args.seq_len < 2 or args.batch_size < 1:
            raise ValueError("--seq_len must be at least 2 and --batch_size at least 1")
        start = time.perf_counter()
        # Loaded straight into its shardings on every device, where it is evaluated.
        mesh = sharding.make_mesh()
        model = checkpoint.load(args.checkpoint, dtype=args.dtype, mesh=mesh)
        tokenizer = checkpoint.load_tokenizer(args.checkpoint)
        result = perplexity(
            model,
            tokenizer,
            args.data,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            mesh=mesh,
            max_batches=args.max_batches,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{', '.join(args.data)}: {result['tokens']:,.0f} tokens, loss {result['loss']:.4f}, "
        f"perplexity {result['perplexity']:.3f} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

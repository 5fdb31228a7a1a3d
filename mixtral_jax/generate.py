"""Text generation: batched prefill, jitted decode steps over a KV cache, sampling.

    python -m mixtral_jax.generate --checkpoint DIR --prompt "def fibonacci(n):" [--quantize int8]

Prompts of different lengths share one batch: they are right-padded, the
padding is its own segment (never attended to, never routed, never cached),
and every row decodes at its own position, so each prompt gets exactly the
tokens it would get alone. The prefill is one jitted call, each decode step
another, with fixed shapes: nothing recompiles from step to step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import attention, cpu_moe, sharding
from mixtral_jax.config import ModelConfig
from mixtral_jax.model import KVCache, LayerPieces, Mixtral, init_cache, layer_pieces, per_layer
from mixtral_jax.sampling import Sampling, sample
from mixtral_jax.tokenizer import Tokenizer

# on_token(row, token id, text piece): called for every generated token.
TokenCallback = Callable[[int, int, str], None]


class Timing(NamedTuple):
    first_token_s: float  # prefill, and its compilation on a first call
    decode_steps: int  # timed steps: all but the first, which may compile
    decode_s: float

    @property
    def steps_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else float("nan")


class Generation(NamedTuple):
    texts: list[str]  # the generated text of each prompt (without the prompt)
    tokens: list[list[int]]  # the generated ids of each prompt, EOS excluded
    prompt_tokens: list[list[int]]
    timing: Timing


def _rules(mesh_rules):
    """The activation sharding rules to trace under, when generating on a mesh."""
    return sharding.use_rules(*mesh_rules) if mesh_rules else contextlib.nullcontext()


_STATIC = ("graphdef", "sampling", "mesh_rules")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def prefill_step(graphdef, params, tokens, lengths, cache: KVCache, key, sampling, mesh_rules):
    """tokens [B, T] right-padded to T; lengths [B] -> first new tokens [B], cache."""
    model = nnx.merge(graphdef, params)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    with _rules(mesh_rules):
        out = model.forward(tokens, positions, segment_ids, cache=cache)
    last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    return sample(last, key, sampling), out.cache


def _decode(
    graphdef,
    params,
    tokens,
    positions,
    cache: KVCache,
    key,
    sampling,
    mesh_rules,
    pieces: LayerPieces | None = None,
):
    """tokens, positions [B] -> next tokens [B], cache. `pieces`: `model.layer_pieces`."""
    model = nnx.merge(graphdef, params)
    with _rules(mesh_rules):
        out = model.forward(tokens[:, None], positions[:, None], cache=cache, pieces=pieces)
    return sample(out.logits[:, 0], key, sampling), out.cache


# XLA:CPU vectorises the kernels it writes itself, a decode step's one-row matrix
# products among them, 256 bits wide by default. 512 made a batch-1 step of
# configs/bench_1024.py 12-19% faster on an AVX-512 CPU (batch 16: 2-7%; the prefill's
# library matmuls: no change). A preference only: LLVM uses no wider vectors than the
# CPU has.
CPU_DECODE_OPTIONS = {"xla_cpu_prefer_vector_width": 512}

_jit_step = functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
decode_step = _jit_step(_decode)
cpu_decode_step = _jit_step(_decode, compiler_options=CPU_DECODE_OPTIONS)  # for XLA:CPU


# Logical axes of the KV cache: like the keys and values of attention, per layer.
CACHE_AXES = KVCache(attention.CACHE_AXES, attention.CACHE_AXES, ("batch", "length"))


def cache_shardings(
    cache: KVCache, mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
) -> KVCache:
    """Where a (possibly abstract) cache lives on `mesh`: split by batch and KV head."""
    return KVCache(
        *(
            sharding.named_sharding(names, a.shape, mesh, rules)
            for names, a in zip(CACHE_AXES, cache, strict=True)
        )
    )


def empty_cache(
    config: ModelConfig,
    batch_size: int,
    max_length: int,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> KVCache:
    """`init_cache`, created in its shardings on `mesh`: no device holds the whole cache."""
    if mesh is None:
        return init_cache(config, batch_size, max_length)
    make = functools.partial(init_cache, config, batch_size, max_length)
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh, rules))()


def generate_tokens(
    model: Mixtral,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> tuple[list[list[int]], Timing]:
    """Generated ids for each prompt (lists of ids), and how long it took.

    A row stops at `eos_id` (not included), when `should_stop(row, ids)` says so,
    or after `max_new_tokens`; the batch stops when every row has. With a `mesh`
    (the model loaded or sharded onto it), activations and the KV cache are
    sharded by `rules` too.
    """
    c = model.config
    sampling = sampling or Sampling()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = int(lengths.max())
    if T + max_new_tokens > c.max_position_embeddings:
        raise ValueError(
            f"the longest prompt ({T} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's max_position_embeddings={c.max_position_embeddings}; shorten the prompt "
            "or ask for fewer tokens"
        )
    bad = [t for p in prompts for t in p if not 0 <= t < c.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {c.vocab_size})")
    B = len(prompts)
    tokens = np.zeros((B, T), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt

    graphdef, params = nnx.split(model)
    # On one CPU device a decode step reads each layer's and expert's weights from
    # buffers of their own (views, no copy): XLA:CPU would copy every slice it takes.
    # The experts, the attention projections and the LM head come packed for the CPU
    # kernels where they apply and the batch is small enough (cpu_moe.py).
    pieces = layer_pieces(model, cpu_moe.suits(c, B)) if mesh is None else None
    platforms = {d.platform for d in jax.tree.leaves(params)[0].devices()}
    step_fn = cpu_decode_step if platforms == {"cpu"} else decode_step
    cache = empty_cache(c, B, T + max_new_tokens, mesh, rules)
    keys = iter(jax.random.split(jax.random.key(seed), max_new_tokens))
    start = time.perf_counter()
    mesh_rules = (mesh, tuple(rules)) if mesh is not None else None
    next_tokens, cache = prefill_step(
        graphdef,
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        cache,
        next(keys),
        sampling,
        mesh_rules,
    )
    if pieces is not None:
        cache = per_layer(cache)  # as the weights: each layer's own buffers
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    marks = []  # when each step's tokens reached the host
    for step in range(max_new_tokens):
        current = next_tokens
        if step < max_new_tokens - 1:
            # The next step is dispatched before this one's tokens are read, so the
            # host's work (streaming, stop checks) overlaps the device's. Past the last
            # row's end, one step is computed for nothing.
            next_tokens, cache = step_fn(
                graphdef,
                params,
                current,
                jnp.asarray(lengths + step),
                cache,
                next(keys),
                sampling,
                mesh_rules,
                pieces,
            )
        ids = np.asarray(current)
        marks.append(time.perf_counter())
        for row in np.flatnonzero(~done):
            token = int(ids[row])
            if token == eos_id:
                done[row] = True
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(int(row), token)
            if should_stop is not None and should_stop(int(row), out[row]):
                done[row] = True
        if done.all():
            break
    timed = marks[1:]  # the first decode step compiles on a first call
    decode_s = timed[-1] - timed[0] if len(timed) > 1 else 0.0
    return out, Timing(marks[0] - start, max(len(timed) - 1, 0), decode_s)


def generate(
    model: Mixtral,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: Sequence[str] = (),
    chat: bool = False,
    on_token: TokenCallback | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Generation:
    """Generates from each prompt (a string or a list of strings).

    chat=True wraps each prompt as one user message in the instruct format.
    Generation of a row ends at EOS, at any of the `stop` strings (cut from the
    text), or after `max_new_tokens`. `on_token(row, id, text piece)` streams;
    a row's pieces concatenate to its text (before the stop-string cut) and never
    split a UTF-8 character that the model completes.
    """
    sampling = Sampling(temperature, top_k, top_p)
    if isinstance(prompts, str):
        prompts = [prompts]
    if any(not isinstance(p, str) or not p for p in prompts) or not prompts:
        raise ValueError("prompts must be non-empty strings")
    prompt_ids = [
        tokenizer.encode_chat([{"role": "user", "content": p}]) if chat else tokenizer.encode(p)
        for p in prompts
    ]
    streams = [tokenizer.stream() for _ in prompts]
    texts = [""] * len(prompts)

    def on_id(row: int, token: int) -> None:
        piece = streams[row].add(token)
        texts[row] += piece
        if on_token is not None:
            on_token(row, token, piece)

    def should_stop(row: int, ids: list[int]) -> bool:
        return any(s in texts[row] for s in stop)

    ids, timing = generate_tokens(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        eos_id=tokenizer.eos_id,
        should_stop=should_stop if stop else None,
        on_token=on_id,
        mesh=mesh,
    )
    final = []
    for row, text in enumerate(texts):
        rest = streams[row].flush()  # an incomplete character at the very end
        if rest and on_token is not None:
            on_token(row, ids[row][-1], rest)
        text += rest
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        final.append(text[:cut])
    return Generation(final, ids, prompt_ids, timing)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixtral_jax.generate",
        description="Generate text with a converted Mixtral checkpoint, streaming to stdout.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a directory written by tools/convert.py or a training export "
        "(default: the small model embedded in the package)",
    )
    parser.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as [INST] ... [/INST]")
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16")
    parser.add_argument(
        "--quantize",
        default=None,
        help="int8 or int4: quantize a float checkpoint's projections and experts as it loads",
    )
    parser.add_argument("--group_size", type=int, default=128, help="int4: inputs per scale")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer.model file, or mistral-v1 / mistral-v3 (default: the checkpoint's)",
    )
    args = parser.parse_args(argv)

    from mixtral_jax import checkpoint

    if args.checkpoint is None:
        args.checkpoint = checkpoint.EMBEDDED
        print(
            "(no --checkpoint: the embedded model, 9 M parameters trained on the Python "
            "standard library; see tools/train_embedded.py)",
            file=sys.stderr,
        )
    try:
        Sampling(args.temperature, args.top_k, args.top_p)
        model = checkpoint.load(
            args.checkpoint, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size
        )
        tokenizer = checkpoint.load_tokenizer(args.tokenizer or args.checkpoint)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    single = len(args.prompt) == 1
    if single:
        print(args.prompt[0], end="", flush=True)

    def on_token(row: int, token: int, piece: str) -> None:
        if single:
            print(piece, end="", flush=True)

    try:
        result = generate(
            model,
            tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            chat=args.chat,
            on_token=on_token,
        )
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    if not single:
        for prompt, text in zip(args.prompt, result.texts, strict=True):
            print(f"{prompt}{text}\n---")
    t = result.timing
    print(
        f"\n[{sum(len(ids) for ids in result.tokens)} tokens; first after {t.first_token_s:.2f} s "
        f"(compilation included); decode {t.steps_per_s * len(args.prompt):.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

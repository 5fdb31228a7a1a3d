"""The serving command, `python -m mixtral_jax.serve`: an OpenAI-compatible HTTP server.

python -m mixtral_jax.serve                                   # the embedded model, :8000
python -m mixtral_jax.serve --checkpoint DIR --max_batch 16 --max_len 4096 --port 8000
python -m mixtral_jax.serve --checkpoint DIR --lora sql=runs/sql/adapters --lora chat=...

Needs the `.[serve]` extra (FastAPI, uvicorn, prometheus-client). SIGTERM or Ctrl-C
stops admitting, lets the requests in flight finish (cancels them after
--shutdown_timeout seconds) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from mixtral_jax import cli
from mixtral_jax.backends.cpu.kernels import default_cache_dir
from mixtral_jax.checkpoints.adapters import load_bank
from mixtral_jax.checkpoints.load import EMBEDDED, load, load_tokenizer
from mixtral_jax.inference.engine import KV_DTYPES, PREFILL_CHUNK, PREFILL_ROWS, Engine
from mixtral_jax.parallel.mesh import make_mesh, parse_mesh
from mixtral_jax.parallel.placement import shard_model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mixtral_jax.serve",
        description="Serve a Mixtral checkpoint over OpenAI's completions and chat API, "
        "with continuous batching and streaming.",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a directory written by tools/convert.py or a training export "
        "(default: the small model embedded in the package)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model_name",
        default=None,
        help="the `model` clients ask for "
        "(default: the checkpoint directory's name, or mixtral-embedded)",
    )
    p.add_argument("--max_batch", type=int, default=16, help="decode slots")
    p.add_argument(
        "--max_len",
        type=int,
        default=None,
        help="longest prompt + answer per slot (default: the model's context, at most 4096)",
    )
    p.add_argument(
        "--prefill_chunk",
        type=int,
        default=PREFILL_CHUNK,
        help="the most prompt tokens prefilled per step: long prompts never stall "
        "decoding for long",
    )
    p.add_argument(
        "--prefill_rows",
        type=int,
        default=PREFILL_ROWS,
        help="the most prompts prefilled together per step, sharing --prefill_chunk "
        "(one call: larger matmuls)",
    )
    p.add_argument(
        "--max_queue",
        type=int,
        default=256,
        help="requests waiting, beyond the free slots, before new ones get 429",
    )
    p.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="a paged KV cache of blocks of this many tokens (e.g. 16): a request holds "
        "the blocks its prompt and max_tokens can fill, not a whole --max_len slot",
    )
    p.add_argument(
        "--kv_blocks",
        type=int,
        default=None,
        help="with --block_size: blocks in the cache's pool (default: as many as "
        "--max_batch slots of --max_len hold); requests wait for free blocks",
    )
    p.add_argument(
        "--kv_dtype",
        default=None,
        choices=[d for d in KV_DTYPES if d],
        help="what the KV cache stores (default: the model's compute dtype); int8 keeps "
        "a scale per key and head, half of bfloat16's memory",
    )
    p.add_argument(
        "--no_prefix_caching",
        action="store_true",
        help="with --block_size: compute every prompt whole, even a prefix cached before",
    )
    p.add_argument(
        "--speculate",
        default=None,
        metavar="ngram:K",
        help="speculative decoding: each step drafts up to K tokens a request from its own "
        "context (prompt lookup) and verifies them in one call; same tokens, greedy or "
        "sampled alike, several a step when the text repeats itself",
    )
    p.add_argument(
        "--speculate_rows",
        type=int,
        default=None,
        help="with --speculate: speculate in steps of at most this many requests "
        "(default: 2 on a CPU, whose larger steps are bound by compute; all elsewhere)",
    )
    p.add_argument(
        "--jump_forward",
        type=int,
        default=0,
        metavar="K",
        help="structured output (response_format, tools): verify up to K tokens the "
        "grammar forces (keys, quotes, brackets) in one step instead of one a step; the "
        "same tokens, in the steps --speculate_rows allows. 8 suits JSON; 0 (default): "
        "off. On, warm-up also compiles the verify steps",
    )
    p.add_argument(
        "--shutdown_timeout",
        type=float,
        default=30.0,
        help="seconds the requests in flight get to finish on SIGTERM",
    )
    p.add_argument("--mesh", default=None, help="e.g. tensor=8: the model sharded over a mesh")
    p.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16")
    p.add_argument("--quantize", default=None, help="int8 or int4, as the checkpoint loads")
    p.add_argument("--group_size", type=int, default=128, help="int4: inputs per scale")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer.model file, or mistral-v1 / mistral-v3 (default: the checkpoint's)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve the LoRA adapters a fine-tuning run saved in DIR (its workdir's "
        "adapters/) as the model NAME; repeat for more (a batch mixes them)",
    )
    p.add_argument(
        "--no_warmup",
        action="store_true",
        help="compile on the first requests instead of before listening",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mixtral_jax.serve`; returns the exit status."""
    args = parser().parse_args(argv)
    return cli.run(lambda: _serve(args), (ValueError, OSError, ImportError))


def _serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from mixtral_jax.inference.server import create_app
    except ImportError as e:
        raise ImportError(
            f"serving needs the .[serve] extra: pip install -e '.[serve]' ({e})"
        ) from None

    # Compiled programs are kept across starts: a restart skips most of the warm-up.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    checkpoint = args.checkpoint or EMBEDDED
    name = args.model_name or (
        "mixtral-embedded" if args.checkpoint is None else Path(args.checkpoint).resolve().name
    )
    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    start = time.perf_counter()
    model = load(
        checkpoint, dtype=args.dtype, mesh=mesh, quantize=args.quantize, group_size=args.group_size
    )
    adapters = lora_flags(args.lora, name)
    if adapters:
        model = load_bank(model, adapters)
        if mesh is not None:  # the bank's factors where the rules put them
            shard_model(model, mesh)
    tokenizer = load_tokenizer(args.tokenizer or checkpoint)
    max_len = args.max_len or min(model.config.max_position_embeddings, 4096)
    engine = Engine(
        model,
        max_batch=args.max_batch,
        max_len=max_len,
        prefill_chunk=args.prefill_chunk,
        prefill_rows=args.prefill_rows,
        max_queue=args.max_queue,
        mesh=mesh,
        block_size=args.block_size,
        kv_blocks=args.kv_blocks,
        prefix_caching=not args.no_prefix_caching,
        kv_dtype=args.kv_dtype,
        speculate=args.speculate,
        speculate_rows=args.speculate_rows,
        jump_forward=args.jump_forward,
    )
    if not args.no_warmup:
        engine.warmup()
    pool = engine.scheduler.pool
    cache = ""
    if pool is not None:
        cache = f", a pool of {pool.num_blocks} KV blocks of {pool.block_size}"
        cache += ", prefix caching" if pool.prefix_caching else ""
    if engine.drafter is not None:
        cache += f", speculating {engine.drafter.k} tokens a step (n-gram)"
    if engine.jump_forward:
        cache += f", jumping forward up to {engine.jump_forward} forced tokens a step"
    if adapters:
        cache += f", LoRA adapters {', '.join(adapters)}"
    print(
        f"serving {name!r} ({model.config.num_layers} layers, {args.max_batch} slots of "
        f"{max_len} tokens{cache}) on http://{args.host}:{args.port}/v1, ready after "
        f"{time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(
        engine, tokenizer, name, adapters=list(adapters), shutdown_timeout=args.shutdown_timeout
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; by then the
    # requests in flight are done, so the process ends as asked, with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    print("server stopped", file=sys.stderr)


def lora_flags(values: Sequence[str], base_name: str) -> dict[str, str]:
    """--lora NAME=DIR values as {NAME: DIR}, in order; ValueError names a bad one."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--lora {value!r}: write NAME=DIR, e.g. sql=runs/sql/adapters")
        if name in adapters or name == base_name:
            raise ValueError(f"--lora {value!r}: the name {name!r} is taken; choose another")
        adapters[name] = directory
    return adapters

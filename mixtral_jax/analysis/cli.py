"""python -m mixtral_jax.routing: the routing analysis of section 5 of the Mixtral paper.

    python -m mixtral_jax.routing --inputs code=mixtral_jax/model/moe.py prose=README.md \\
        --out routing/ [--checkpoint DIR] [--layers 0,15,31] [--mesh tensor=8]

Writes routing.json, expert_shares.png/.svg, locality.md/.csv and per input set
tokens_NAME.html and tokens_NAME_layerN.png into --out (see analysis/routing.py and
analysis/figures.py; the figures need matplotlib, the `.[plots]` extra). A file is a
.txt (one text) or a .jsonl of {"text": ...} / {"messages": [...]} records, each routed
on its own.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mixtral_jax import cli
from mixtral_jax.analysis import figures, routing
from mixtral_jax.checkpoints.load import EMBEDDED, load, load_tokenizer
from mixtral_jax.checkpoints.store import read_config
from mixtral_jax.parallel.mesh import make_mesh, parse_mesh
from mixtral_jax.training import data, steps


def parse_inputs(values: Sequence[str]) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not re.fullmatch(r"[\w.-]+", name) or not file:
            raise ValueError(
                f"--inputs {value!r}: give NAME=FILE, NAME made of letters, digits, '_', '.', '-'"
            )
        if name in inputs:
            raise ValueError(f"--inputs: the name {name!r} is given twice")
        inputs[name] = Path(file)
    return inputs


def parse_layers(value: str | None, num_layers: int) -> list[int]:
    """'0,15,31' -> [0, 15, 31]; default: the first, middle and last layer."""
    if value is None:
        return sorted({0, num_layers // 2, num_layers - 1})
    try:
        layers = [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"--layers {value!r}: give layer numbers separated by commas") from None
    unknown = [layer for layer in layers if not 0 <= layer < num_layers]
    if unknown:
        raise ValueError(
            f"--layers: no layer {unknown[0]}; the model has {num_layers} layers "
            f"(0-{num_layers - 1})"
        )
    return layers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixtral_jax.routing",
        description="Which experts the routers choose: expert shares per layer (the paper's "
        "Figure 7), repeats between consecutive tokens (Table 5), coloured text (Figure 8).",
    )
    parser.add_argument("--checkpoint", default=None, help="default: the embedded model")
    parser.add_argument("--inputs", nargs="+", required=True, metavar="NAME=FILE")
    parser.add_argument("--out", required=True, type=Path, help="directory for the figures")
    parser.add_argument(
        "--layers", default=None, help="layers to draw, e.g. 0,15,31 (default: first, middle, last)"
    )
    parser.add_argument(
        "--seq_len", type=int, default=None, help="tokens per window (default: up to 2048)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward call")
    parser.add_argument("--max_tokens", type=int, default=200_000, help="per input set")
    parser.add_argument("--color_tokens", type=int, default=400, help="tokens drawn in Figure 8")
    parser.add_argument("--mesh", default=None, help="e.g. tensor=8 (default: all devices, fsdp)")
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16")
    args = parser.parse_args(argv)
    return cli.run(lambda: _analyse(args), (ValueError, OSError, ImportError))


def _analyse(args: argparse.Namespace) -> None:
    figures.require_matplotlib()  # before any work, if the extra is missing
    source = args.checkpoint or EMBEDDED
    config, _ = read_config(Path(source))
    if args.seq_len is None:
        args.seq_len = min(2048, config.max_position_embeddings)
    if min(args.seq_len, args.batch_size, args.max_tokens, args.color_tokens) < 1:
        raise ValueError(
            "--seq_len, --batch_size, --max_tokens and --color_tokens must be positive"
        )
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--seq_len {args.seq_len} is longer than the model's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    inputs = parse_inputs(args.inputs)
    layers = parse_layers(args.layers, config.num_layers)
    mesh = make_mesh(**parse_mesh(args.mesh))
    tokenizer = load_tokenizer(source)
    sequences = {}
    for name, path in inputs.items():
        records = data.read_records([path])  # errors name the file: missing, empty, ...
        ids = [data.tokenize(r, tokenizer).ids for r in records]
        sequences[name] = _first_tokens(ids, args.max_tokens)
    # Every window batch must split over the mesh axes that carry the batch.
    steps.check_rows(args.batch_size, steps.batch_sharding(mesh))
    model = load(source, dtype=args.dtype, mesh=mesh)

    everything = [ids for name in sequences for ids in sequences[name]]  # one compilation
    recorded = iter(
        routing.record(
            model, everything, seq_len=args.seq_len, batch_size=args.batch_size, mesh=mesh
        )
    )
    routes = {}
    for name, ids in sequences.items():
        routes[name] = routing.RecordedRoutes.concatenate([next(recorded) for _ in ids])
        print(f"{name}: {routes[name].tokens.size:,} tokens routed", file=sys.stderr)
    c = model.config
    summary = figures.write_report(
        args.out, tokenizer, routes, c.num_experts, c.num_experts_per_tok, layers, args.color_tokens
    )
    markdown, _ = routing.locality_table(summary, layers)
    print(markdown)
    print(f"figures in {args.out}", file=sys.stderr)


def _first_tokens(sequences, limit: int):
    """The sequences, the last one cut, up to `limit` tokens in all."""
    kept, total = [], 0
    for ids in sequences:
        if total >= limit:
            break
        kept.append(ids[: limit - total])
        total += len(kept[-1])
    return kept

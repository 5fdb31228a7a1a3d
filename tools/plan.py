"""Will it fit, and how fast will it go? Compile for a TPU slice on this machine first.

    python tools/plan.py --config configs/mixtral_8x7b.py --topology v5e-8 --mode inference
    python tools/plan.py --config configs/mixtral_8x7b.py --topology v5e-16 --mode lora \
        --batch 16 --seq_len 4096 --mesh fsdp=2,expert=8
    python tools/plan.py --config configs/tiny.py --topology cpu:8 --mode full
    python tools/plan.py --topology v6e-1 --quantize int4      # 8x7B in int4 on one chip
    python tools/plan.py --topology v5e-8 --mode serve --seq_len 4096 --quantize int8
    python tools/plan.py --topology v5p-128 --mode train  # roofline MFU beside MaxText's
    python tools/plan.py --table         # regenerates the tables in docs/tpu-plan.md

The project's own prefill, decode and train steps are compiled with abstract
arrays for the slice's devices (TPU topologies need libtpu: pip install -e
".[tpu]"; `cpu:N` uses N virtual CPU devices) and the compiler's figures are
printed per chip: parameters, optimizer state, KV cache, temporaries and total
against the chip's memory, FLOPs and bytes per step, a roofline time and
tokens/s, the collectives, and a verdict. A plan that does not fit is followed
by the nearest mesh or batch that does. See mixtral_jax/planning/plan.py for the method.

--mode serve plans the server (`python -m mixtral_jax.serve`): --batch slots
(default 16, its --max_batch) of --seq_len tokens (its --max_len), its prefill
call (--prefill_chunk tokens over up to --prefill_rows prompts) and decode step, and then finds the
largest batch of slots that fits, with its decode roofline. With --block_size (the
server's), the cache is a paged pool sized for requests of --mean_len tokens on average
(default 400: prompts of 16-512 and answers of 16-256), and --kv_dtype int8 stores it
in 8 bits: the largest batch is then how many such requests run at once.

--mode train plans training every weight as MaxText benchmarks Mixtral
(configs/pretrain.py: bfloat16 compute, 4k rows, 8 rows per chip) and prints the
step's model FLOPs and its MFU at the roofline time beside MaxText's published
MFU; --mode full and lora print them too.

Without --mesh, the recipe of configs/meshes.py named SLICE:MODE is used when
there is one (e.g. v5e-8:inference), else tensor parallelism over the KV heads
for inference and FSDP over every chip for fine-tuning. Fine-tuning uses
configs/finetune_lora.py or finetune_full.py (--train_config to change it) with
their batch and sequence length unless --batch / --seq_len say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prepare_jax(argv: list[str]) -> None:
    """Before JAX starts: plans never run on a local accelerator, and cpu:N needs N
    virtual devices."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu only compiles here: other processes (another plan) may load it too, and
    # there are no TPU workers to look up (which would fill stderr with warnings).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    text = " ".join(argv)
    match = re.search(r"--topology[= ]cpu:(\d+)", text)
    count = int(match.group(1)) if match else 8 if "--table" in text else None
    if count:
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


_prepare_jax(sys.argv[1:])

from mixtral_jax import cli  # noqa: E402
from mixtral_jax.inference.engine import PREFILL_CHUNK, PREFILL_ROWS  # noqa: E402
from mixtral_jax.model.config import ModelConfig, load_config_file  # noqa: E402
from mixtral_jax.parallel.mesh import parse_mesh  # noqa: E402
from mixtral_jax.planning import plan, report  # noqa: E402
from mixtral_jax.planning.topology import (  # noqa: E402
    CORES_PER_CHIP,
    SHAPES_2D,
    SHAPES_3D,
    TpuSlice,
    get_slice,
)

MARKERS = ("<!-- plan-table:begin -->", "<!-- plan-table:end -->")
SERVE_MARKERS = ("<!-- serve-table:begin -->", "<!-- serve-table:end -->")
CACHE = ROOT / "runs" / "plan_table.jsonl"  # finished rows of --table
TABLE_DOC = ROOT / "docs" / "tpu-plan.md"
GENERATIONS = ("v5p", "v4")  # full fine-tuning: the smallest slice of each that fits
# The table's rows: (config, slice, mode, batch, seq_len); batch None = the training config's.
TABLE = [
    (f"configs/mixtral_{model}.py", slice_, "inference", batch, seq_len)
    for model in ("8x7b", "8x22b")
    for slice_ in ("v5e-8", "v5e-16", "v5p-8", "v4-16")
    for batch in (1, 32)
    for seq_len in (4096, 32768)
] + [
    (f"configs/mixtral_{model}.py", slice_, "lora", None, 4096)
    for model in ("8x7b", "8x22b")
    for slice_ in ("v5e-8", "v5e-16", "v5p-8", "v4-16")
]
# Quantized 8x7B (a 7th field): the largest batch x context found to fit, and QLoRA.
QUANTIZED_TABLE = [
    ("configs/mixtral_8x7b.py", slice_, "inference", batch, seq_len, scheme)
    for slice_, batch, seq_len, scheme in (
        ("v5e-4", 2, 4096, "int8"),
        ("v5e-4", 1, 8192, "int8"),
        ("v5e-8", 1, 4096, "int8"),
        ("v5e-8", 1, 32768, "int8"),
        ("v5e-8", 8, 4096, "int8"),
        ("v6e-1", 1, 4096, "int4"),
    )
] + [("configs/mixtral_8x7b.py", "v5e-8", "lora", 8, 4096, "int8")]  # finetune_qlora.py
# Serving with pages: the tokens a request fills on average, prompt and answer.
MEAN_LEN = 400
# Serving 8x7B: the most slots of 4096 tokens each slice holds (`--table serve`).
SERVE_TABLE = [
    ("configs/mixtral_8x7b.py", slice_, 4096, scheme)
    for slice_ in ("v5e-8", "v6e-8")
    for scheme in (None, "int8")
]


def default_mesh(slice_: TpuSlice, mode: str, config: ModelConfig) -> dict[str, int]:
    recipe = f"{slice_.name}:{'inference' if mode == 'serve' else mode}"
    from configs import meshes

    if recipe in meshes.RECIPES:
        return {k: v for k, v in meshes.RECIPES[recipe].items() if not k.startswith("dcn")}
    return plan.candidates(mode, config, slice_.size)[0]


def model_config(config_file, quantize=None, group_size=128) -> tuple[ModelConfig, str]:
    """The model's config, quantized as asked, and its name in the tables ("8x7B int8")."""
    config = ModelConfig.from_dict(load_config_file(config_file))
    name = Path(config_file).stem.removeprefix("mixtral_").replace("b", "B")
    if quantize:
        config = config.replace(quantization=quantize, quant_group_size=group_size)
        name += f" {quantize}"
    return config, name


def make(
    args_config,
    topology,
    mode,
    batch,
    seq_len,
    mesh,
    train_config,
    hbm_gib,
    costs=True,
    tries=6,
    quantize=None,
    group_size=128,
    **serving,
):
    """(plan, nearest fitting plan or None, whether a search ran); `serving`: the
    server's prefill_rows and prefill_chunk."""
    config, name = model_config(args_config, quantize, group_size)
    slice_ = get_slice(topology, hbm_gib)
    if mode not in ("inference", "serve"):
        train_config = load_config_file(train_config or ROOT / "configs" / plan.TRAIN_CONFIGS[mode])
        rows = train_config.data.batch_size
        batch = batch or (rows * slice_.size if mode == "train" else rows)
        seq_len = seq_len or train_config.data.seq_len
    batch = batch or (16 if mode == "serve" else 1)
    seq_len = seq_len or min(4096, config.max_position_embeddings)
    mesh = parse_mesh(mesh) if mesh else default_mesh(slice_, mode, config)
    if not quantize and train_config and train_config.model.get("quantization"):
        name += f" {train_config.model.quantization}"
    kwargs = dict(mode=mode, seq_len=seq_len, train_config=train_config, name=name, **serving)
    result = plan.make_plan(config, slice_, batch=batch, mesh=mesh, costs=costs, **kwargs)
    nearest = None
    if not result.fits and tries:
        nearest = plan.nearest_fit(result, config, max_compiles=tries, train_config=train_config)
    return result, nearest, not result.fits and tries > 0


def plan_table(fresh: bool = False) -> str:
    """The table's rows. Each finished row is kept in CACHE, so that a run that stops
    (an hour of compiling on 2 cores) resumes where it stopped; `fresh` starts over."""
    if fresh and CACHE.exists():
        CACHE.unlink()
    done = {}
    if CACHE.exists():
        done = {tuple(r["key"]): r["row"] for r in map(json.loads, CACHE.read_text().splitlines())}
    jobs = [("row", *job) for job in TABLE + QUANTIZED_TABLE]
    jobs += [
        ("full", model, generation) for model in ("8x7b", "8x22b") for generation in GENERATIONS
    ]
    rows = [report.TABLE_HEADER]
    start = time.perf_counter()
    for i, job in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}] {' '.join(map(str, job[1:]))}", flush=True)
        if job not in done:
            done[job] = table_row(*job[1:]) if job[0] == "row" else full_row(*job[1:])
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            with CACHE.open("a") as cache:
                cache.write(json.dumps({"key": job, "row": done[job]}) + "\n")
        if done[job]:
            rows.append(done[job])
        print(done[job], f"({time.perf_counter() - start:.0f} s)", flush=True)
    return "\n".join(rows)


def table_row(
    config: str, slice_: str, mode: str, batch: int | None, seq_len: int, quantize=None
) -> str:
    result, _, _ = make(
        config,
        slice_,
        mode,
        batch,
        seq_len,
        None,
        None,
        None,
        costs=False,
        tries=0,
        quantize=quantize,
    )
    if not result.fits:
        print(report.verdict(result), flush=True)
    return report.table_row(result)


def largest_serving(
    config_file,
    topology,
    seq_len,
    mesh=None,
    quantize=None,
    group_size=128,
    hbm_gib=None,
    **serving,
):
    """The plan with the most slots that fits (`plan.largest_batch`), or None."""
    config, name = model_config(config_file, quantize, group_size)
    slice_ = get_slice(topology, hbm_gib)
    mesh = parse_mesh(mesh) if mesh else default_mesh(slice_, "serve", config)

    def tried(p: plan.Plan) -> None:
        state = "fits" if p.fits else "over"
        print(f"  {p.batch} slots: peak {report.gib(p.peak)} per chip, {state}", flush=True)

    return plan.largest_batch(
        config, slice_, seq_len=seq_len, mesh=mesh, name=name, progress=tried, **serving
    )


def serve_table() -> str:
    rows = [report.TABLE_HEADER]
    for config, slice_, seq_len, scheme in SERVE_TABLE:
        print(f"serve {config} {slice_} {seq_len} {scheme or ''}", flush=True)
        largest = largest_serving(config, slice_, seq_len, quantize=scheme)
        if largest is not None:
            rows.append(report.table_row(largest))
            print(rows[-1], flush=True)
    return "\n".join(rows)


def full_row(model: str, generation: str) -> str:
    """Full fine-tuning on the smallest slice of `generation` that fits, with one
    4096-token row per chip in each of the 4 micro-batches; "" when none does."""
    for slice_ in full_slices(generation):
        chips = get_slice(slice_).size
        config = f"configs/mixtral_{model}.py"
        result, _, _ = make(
            config, slice_, "full", 4 * chips, 4096, None, None, None, costs=False, tries=0
        )
        print(f"full {model} {slice_}: {report.verdict(result)}", flush=True)
        if result.fits:
            return report.table_row(result)
    return ""


def full_slices(generation: str) -> list[str]:
    per_chip = CORES_PER_CHIP[generation]
    shapes = SHAPES_3D if per_chip == 2 else SHAPES_2D
    return [f"{generation}-{chips * per_chip}" for chips in sorted(shapes) if chips >= 8]


def write_table(table: str, markers: tuple[str, str] = MARKERS) -> None:
    text = TABLE_DOC.read_text(encoding="utf-8")
    begin, end = (text.find(m) for m in markers)
    if begin < 0 or end < begin:
        raise SystemExit(f"{TABLE_DOC} has no {markers[0]} ... {markers[1]} block to fill")
    text = text[: begin + len(markers[0])] + "\n" + table + "\n" + text[end:]
    TABLE_DOC.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/mixtral_8x7b.py"))
    parser.add_argument("--topology", default="v5e-8", help="v5e-8, v5p:2x2x2, cpu:8, ...")
    parser.add_argument("--mode", default="inference", choices=plan.MODES)
    parser.add_argument("--batch", type=int, default=None, help="rows per step (serve: slots)")
    parser.add_argument("--seq_len", type=int, default=None, help="context / training length")
    parser.add_argument("--mesh", default=None, help="e.g. data=2,tensor=4 (default: see above)")
    parser.add_argument("--train_config", default=None, help="default configs/finetune_MODE.py")
    parser.add_argument("--hbm_gib", type=float, default=None, help="memory per chip (what-if)")
    parser.add_argument("--no_costs", action="store_true", help="memory only: skip cost twins")
    parser.add_argument(
        "--quantize", default=None, help="int8 or int4: plan the weight-quantized model"
    )
    parser.add_argument("--group_size", type=int, default=128, help="int4: inputs per scale")
    parser.add_argument(
        "--prefill_rows", type=int, default=PREFILL_ROWS, help="serve: prompts per prefill call"
    )
    parser.add_argument(
        "--prefill_chunk", type=int, default=PREFILL_CHUNK, help="serve: tokens per prefill call"
    )
    parser.add_argument(
        "--block_size", type=int, default=None, help="serve: a paged KV cache of these blocks"
    )
    parser.add_argument(
        "--mean_len",
        type=int,
        default=MEAN_LEN,
        help="serve with --block_size: the tokens a request fills on average (prompt and "
        "answer), which sizes the pool",
    )
    parser.add_argument(
        "--kv_dtype",
        default=None,
        choices=("int8", "bfloat16"),
        help="serve: what the KV cache stores",
    )
    parser.add_argument(
        "--table",
        nargs="?",
        const="all",
        choices=("all", "serve"),
        help="regenerate docs/tpu-plan.md's tables (all) or its serving table (serve)",
    )
    parser.add_argument("--fresh", action="store_true", help="with --table: ignore kept rows")
    args = parser.parse_args(argv)
    return cli.run(lambda: _plan(args))


def _plan(args: argparse.Namespace) -> None:
    if args.table:
        if args.table == "all":
            write_table(plan_table(args.fresh))
        write_table(serve_table(), SERVE_MARKERS)
        print(f"{TABLE_DOC.relative_to(ROOT)}: plan tables regenerated")
        return
    serving = {}
    if args.mode == "serve":
        serving = dict(
            prefill_rows=args.prefill_rows,
            prefill_chunk=args.prefill_chunk,
            block_size=args.block_size,
            mean_len=args.mean_len,
            kv_dtype=args.kv_dtype,
        )
    start = time.perf_counter()
    result, nearest, searched = make(
        args.config,
        args.topology,
        args.mode,
        args.batch,
        args.seq_len,
        args.mesh,
        args.train_config,
        args.hbm_gib,
        not args.no_costs,
        quantize=args.quantize,
        group_size=args.group_size,
        **serving,
    )
    print(report.report(result, nearest, searched))
    if args.mode == "serve":
        print("the most slots that fit, compiled:", flush=True)
        largest = largest_serving(
            args.config,
            args.topology,
            result.seq_len,
            args.mesh,
            args.quantize,
            args.group_size,
            args.hbm_gib,
            **serving,
        )
        print(report.largest_batch(largest, result))
    print(f"(planned in {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())

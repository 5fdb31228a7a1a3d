"""Plans as text: per-chip memory, costs and collectives of each step, the verdict, and
a row of the table in docs/tpu-plan.md."""

from __future__ import annotations

from mixtral_jax.planning.plan import FULL_MODES, HEADROOM, Plan, Program
from mixtral_jax.planning.topology import Chip, GiB


def gib(n: float) -> str:
    """Bytes in GiB, or MiB / KiB when smaller."""
    for scale, unit in ((GiB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".strip()


# MaxText's published figures (bfloat16, 4k sequences; dropless megablox on v5p,
# the "dropped" recipe at capacity factor on v6e), to set a plan's roofline MFU beside.
MAXTEXT_MFU = "54.9% on v5p-128, 52.6% on v5p-256, 35.2% on v6e-256"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def tokens_per_s(program: Program, chip: Chip) -> float | None:
    seconds = program.seconds(chip)
    return None if seconds is None else program.tokens / seconds


def verdict(plan: Plan, nearest: Plan | None = None, searched: bool = False) -> str:
    share = f"{plan.peak / plan.slice.chip.hbm:.0%}"
    where = f"{gib(plan.peak)} of {gib(plan.slice.chip.hbm)} per chip ({share})"
    if plan.fits:
        return f"fits: peak {where}, in the {plan.peak_step}"
    refused = [p for p in plan.programs if p.exhausted]
    if refused:
        line = f"does not fit: the TPU compiler ran out of memory for the {refused[0].name} "
        line += f"({refused[0].exhausted})"
    elif plan.programs:
        line = f"does not fit: peak {where} in the {plan.peak_step}, over the "
        line += f"{1 - HEADROOM:.0%} a plan may use"
    else:
        line = f"does not fit: parameters, optimizer state and cache alone take {where}"
    if nearest is not None:
        line += (
            f"; fits with mesh {nearest.mesh_text}, batch {nearest.batch} "
            f"(peak {gib(nearest.peak)})"
        )
    elif searched:
        line += "; no tried mesh or smaller batch fits: use a larger slice"
    return line


def report(plan: Plan, nearest: Plan | None = None, searched: bool = False) -> str:
    """The plan as text: per chip memory, costs and collectives of each step, verdict."""
    s, chip = plan.slice, plan.slice.chip
    lines = [
        f"{plan.model} ({_si(plan.num_params)} parameters) · {plan.mode} · {s.name} "
        f"({s.topology}: {s.size} × {chip.name}, {chip.hbm / GiB:.0f} GiB each) · mesh "
        f"{plan.mesh_text} · batch {plan.batch} × {plan.seq_len:,} tokens",
    ]
    names = [p.name for p in plan.programs] or ["(not compiled)"]
    rows = [
        ("parameters", [gib(plan.param_bytes)] + [""] * (len(names) - 1)),
        ("optimizer state", [gib(plan.optimizer_bytes)] + [""] * (len(names) - 1)),
        ("KV cache", [gib(plan.cache_bytes)] + [""] * (len(names) - 1)),
    ]
    if plan.programs:
        progs = plan.programs
        rows += [
            ("temporaries", [gib(p.temporaries) for p in progs]),
            ("total", [gib(p.total) for p in progs]),
            ("FLOPs / step", [_si(p.flops) for p in progs]),
            ("bytes / step", [_si(p.bytes_accessed, "B") for p in progs]),
            ("costs from", [p.cost_source or "-" for p in progs]),
            (
                "roofline step",
                [
                    "-"
                    if p.seconds(chip) is None
                    else f"{p.seconds(chip) * 1e3:.3g} ms ({p.bound(chip)})"
                    for p in progs
                ],
            ),
            ("tokens/s", [_si(tokens_per_s(p, chip)) for p in progs]),
        ]
        if any(p.model_flops for p in progs):
            rows += [
                ("model FLOPs", [_si(p.model_flops) for p in progs]),
                ("MFU at roofline", [_percent(p.mfu(chip)) for p in progs]),
            ]
    width = max(16, *(len(v) + 2 for _, values in rows for v in values))
    lines.append(f"{'per chip':<19}" + "".join(f"{n:<{width}}" for n in names))
    for label, values in rows:
        lines.append(f"  {label:<17}" + "".join(f"{v:<{width}}" for v in values).rstrip())
    for p in plan.programs:
        if p.exhausted:
            lines.append(f"  {p.name}: not compiled, {p.exhausted}")
            continue
        ops = ", ".join(f"{op} {n}" for op, n in p.collectives.items()) or "none"
        lines.append(f"  collectives in {p.name}: {ops}")
    if any(p.mfu(chip) for p in plan.programs) and plan.mode in FULL_MODES:
        lines.append(
            f"  MaxText's published Mixtral 8x7B training MFU, measured: {MAXTEXT_MFU}; "
            "the roofline leaves out communication"
        )
    lines.append("verdict: " + verdict(plan, nearest, searched))
    return "\n".join(lines)


def largest_batch(largest: Plan | None, plan: Plan) -> str:
    """The serving plan's last line: the most slots that fit, and their decode speed."""
    if largest is None:
        return f"largest batch: not one slot of {plan.seq_len:,} tokens fits; use a larger slice"
    decode = next(p for p in largest.programs if p.name == "decode")
    speed = tokens_per_s(decode, largest.slice.chip)
    cache = f", KV cache in {largest.cache}" if largest.cache else ""
    line = (
        f"largest batch: {largest.batch} slots × {largest.seq_len:,} tokens{cache} "
        f"(peak {gib(largest.peak)} per chip, in the {largest.peak_step})"
    )
    return line + (f"; decode roofline {_si(speed)} tokens/s" if speed else "")


COLUMNS = (
    "model",
    "mode",
    "slice",
    "mesh",
    "batch × context",
    "peak per chip",
    "fits",
    "decode (roofline)",
)
TABLE_HEADER = "| " + " | ".join(COLUMNS) + " |\n" + "| --- " * len(COLUMNS) + "|"


def context(seq_len: int) -> str:
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)


def table_row(plan: Plan, nearest: Plan | None = None) -> str:
    """One row of docs/tpu-plan.md's table: peak memory per chip and its step, verdict, decode
    roofline tokens/s."""
    chip = plan.slice.chip
    decode = [p for p in plan.programs if p.name == "decode" and not p.exhausted]
    speed = f"{_si(tokens_per_s(decode[0], chip))} tok/s" if decode and chip.flops else ""
    fits = "yes" if plan.fits else "no"
    if nearest is not None:
        fits += f"; fits with {nearest.mesh_text}, batch {nearest.batch}"
    hbm = f"{chip.hbm / GiB:.0f} GiB"
    if not plan.programs:
        peak = f"> {plan.peak / GiB:.0f} / {hbm} (not compiled)"
    else:
        over = ">" if any(p.exhausted for p in plan.programs) else ""
        peak = f"{over}{plan.peak / GiB:.1f} / {hbm} ({plan.peak_step})"
    return (
        f"| {plan.model} | {plan.mode} | {plan.slice.name} | {plan.mesh_text} | "
        f"{plan.batch} × {context(plan.seq_len)} | {peak} | {fits} | {speed} |"
    )

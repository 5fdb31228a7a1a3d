"""Speed of mixtral_jax next to transformers, on this machine, with the same weights.

    python tools/bench.py                      # prefill + SMoE layer, configs/bench_1024.py
    python tools/bench.py --seq_len 2048 --sections prefill
    python tools/bench.py --sections decode    # generation: batch 1 and 16
    python tools/bench.py --sections quantized # decode with bfloat16, int8, int4 weights
    python tools/bench.py --sections serve     # a load through the server, static, transformers
    python tools/bench.py --sections train     # a training step beside transformers and peft

Every figure is a median over repeats, taken in one run so that the figures
can be compared (machines differ from day to day; compare ratios, not times).
"Active" FLOPs count only the work a perfect sparse model does: k experts per
token, causal attention over (T + 1) / 2 keys on average. Each is also given
as a fraction of the machine's matmul peak, measured first in the same run.
This tool prints figures; no test asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral_jax import Mixtral, ModelConfig  # noqa: E402
from mixtral_jax.backends.cpu.decode import COMPILER_OPTIONS  # noqa: E402
from mixtral_jax.checkpoints import hub, store  # noqa: E402
from mixtral_jax.inference.blocks import BlockPool  # noqa: E402
from mixtral_jax.inference.engine import Engine  # noqa: E402
from mixtral_jax.inference.generate import generate_tokens  # noqa: E402
from mixtral_jax.inference.requests import Request  # noqa: E402
from mixtral_jax.model.config import load_config_file  # noqa: E402
from mixtral_jax.model.kv_cache import blocks_per_row, init_cache  # noqa: E402
from mixtral_jax.model.moe import SparseMoE  # noqa: E402
from mixtral_jax.params import flat_params  # noqa: E402
from mixtral_jax.planning.plan import element_bits, forward_flops  # noqa: E402
from mixtral_jax.quant import quantize  # noqa: E402
from tools import bench_train, serve_load  # noqa: E402
from tools.bench_common import (  # noqa: E402
    header,
    hf_model,
    interleaved,
    load_config,
    matmul_peak,
    row,
    torch_or_none,
)

SECTIONS = ("prefill", "moe", "decode", "quantized", "serve", "train")


def twins(args, config: ModelConfig):
    """transformers' random model and ours with its weights; without torch, (None, ours)."""
    if torch_or_none()[0] is None:
        print("  (torch/transformers not installed: no reference rows)")
        return None, Mixtral(config, rngs=nnx.Rngs(args.seed))
    hf = hf_model(config, args.init_std, args.seed)
    return hf, hub.from_hub_state_dict(hf.state_dict(), config)


def bench_prefill(args, config: ModelConfig, peak: float):
    torch, _ = torch_or_none()
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.seq_len))
    flops = forward_flops(config, args.batch, args.seq_len)
    header(
        f"Prefill, batch {args.batch} x {args.seq_len} tokens, {config.num_layers} layers, "
        f"{config.hidden_size} wide, {config.num_experts} experts "
        f"(top-{config.num_experts_per_tok}), float32"
    )
    fns, logits = {}, {}
    if torch is None:
        print("  (torch/transformers not installed: no reference column)")
        params = nnx.state(Mixtral(config, rngs=nnx.Rngs(args.seed)), nnx.Param)
    else:
        hf = hf_model(config, args.init_std, args.seed)
        params = nnx.state(hub.from_hub_state_dict(hf.state_dict(), config), nnx.Param)
        ids = torch.as_tensor(tokens)

        def hf_forward():
            with torch.no_grad():
                return hf(ids).logits

        fns["transformers (PyTorch, eager)"] = hf_forward
        logits["transformers (PyTorch, eager)"] = hf_forward().numpy()
    ours = {}
    for impl in ("sorted", "dense"):
        model = Mixtral(config.replace(moe_impl=impl), rngs=nnx.Rngs(0))
        nnx.update(model, params)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s).forward(t))
        name = f"mixtral_jax, moe_impl={impl}"
        ids_jax = jnp.asarray(tokens)
        ours[name] = forward(state, ids_jax)
        logits[name] = np.asarray(ours[name].logits)
        fns[name] = lambda f=forward, s=state, i=ids_jax: f(s, i).logits.block_until_ready()
    seconds = interleaved(fns, args.repeats)
    reference = seconds.get("transformers (PyTorch, eager)")
    for name, t in seconds.items():
        row(name, t, tokens.size, flops, peak, reference)
        if reference and name in ours:
            diff = float(np.abs(logits[name] - logits["transformers (PyTorch, eager)"]).max())
            print(f"  {'':<34} max |logits - transformers| = {diff:.1e}")
    out = next(iter(ours.values()))
    uniform = config.num_experts_per_tok / config.num_experts
    load = np.asarray(out.routing.stats.expert_fraction) / uniform
    print(
        f"  routing balance (expert load / uniform): max {load.max():.2f}, min {load.min():.2f}; "
        "the dense dispatch's work grows with the max, the sorted one's does not"
    )


def bench_moe_layer(args, config: ModelConfig, peak: float):
    n_tokens = args.batch * args.seq_len
    D, F, k = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    flops = n_tokens * (2 * 3 * D * F * k + 2 * D * config.num_experts)
    header(f"SMoE layer alone, {n_tokens} tokens, random inputs (balanced routing)")
    x = jnp.asarray(np.random.RandomState(1).randn(args.batch, args.seq_len, D), config.dtype)
    mask = jnp.ones(x.shape[:2], bool)
    reference = SparseMoE(config.replace(moe_impl="sorted"), rngs=nnx.Rngs(0))
    params = nnx.state(reference)
    cases = [("sorted (dropless)", dict(moe_impl="sorted"))]
    for group in (256, 1024):
        for cf in (1.0, 1.25, 2.0, None):
            name = f"dense S={group} cf={cf if cf else 'dropless'}"
            cases.append((name, dict(moe_impl="dense", group_size=group, capacity_factor=cf)))
    fns, outs = {}, {}
    for name, changes in cases:
        layer = SparseMoE(config.replace(**changes), rngs=nnx.Rngs(0))
        nnx.update(layer, params)
        graphdef, state = nnx.split(layer)
        fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x, mask))
        outs[name] = fn(state, x)
        fns[name] = lambda fn=fn, s=state: fn(s, x).y.block_until_ready()
    for name, seconds in interleaved(fns, args.repeats).items():
        row(name, seconds, n_tokens, flops, peak, None)
        dropped = float(outs[name].stats.dropped_fraction)
        if dropped:
            print(f"  {'':<34} dropped {100 * dropped:.2f}% of token choices")


def bandwidth_probe(tries: int = 7) -> Callable[[], float]:
    """A function that reads 1 GiB of float32 and returns the rate, bytes/s: the bound
    for decode. It reads it the fastest of three ways (a sum of everything, a sum over
    the leading axes, vector-matrix products over 64 separate 16 MiB matrices, as a
    decode step does), compiled as a CPU decode step is and chosen here by the median
    of `tries` interleaved reads. Chosen once: the fastest of three reads taken anew
    each time would measure the machine's upward jitter, not its bandwidth."""
    a = jnp.ones((256, 1024, 1024), jnp.float32)
    matrices = [jnp.ones((1024, 4096), jnp.float32) for _ in range(64)]
    x = jnp.ones((1, 1024), jnp.float32)
    jit = functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)  # as decode's
    reads = {
        "sum": (jit(jnp.sum), a),
        "column sum": (jit(lambda a: jnp.sum(a, axis=(0, 1))), a),
        "vector-matrix products": (jit(lambda ms: [x @ m for m in ms]), matrices),
    }

    def rate(name: str) -> float:
        read, arg = reads[name]
        start = time.perf_counter()
        jax.block_until_ready(read(arg))
        return a.nbytes / (time.perf_counter() - start)

    for name in reads:
        rate(name)  # compile
    rates = {name: [] for name in reads}
    for _ in range(tries):
        for name in reads:
            rates[name].append(rate(name))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    fastest = max(medians, key=medians.get)
    print(
        "  read bandwidth probe: "
        + ", ".join(f"{name} {m / 1e9:.1f} GB/s" for name, m in medians.items())
        + f" (medians of {tries}); probing with the {fastest}"
    )
    return functools.partial(rate, fastest)


def matmul_probe() -> Callable[[], float]:
    """A function that times one float32 2048^3 matmul and returns its FLOP/s, for the
    roofline's peak: read beside the bandwidth, as the machine's speed drifts within a
    run. The roofline takes the fastest read (with the run's `peak`): a matmul cannot
    run faster than the machine can, so the fastest read is the least flattering."""
    a = jnp.asarray(np.random.RandomState(0).randn(2048, 2048), jnp.float32)
    square = jax.jit(lambda a: a @ a)
    jax.block_until_ready(square(a))  # compile

    def rate() -> float:
        start = time.perf_counter()
        jax.block_until_ready(square(a))
        return 2 * 2048**3 / (time.perf_counter() - start)

    return rate


def _step_parts(c: ModelConfig, experts: float, batch: int) -> list[tuple[float, float]]:
    """(weights read, multiply-adds) of each part of a decode step of `batch` rows that
    reads `experts` experts per layer: attention, router, experts, LM head, norms."""
    D, H, F, k = c.hidden_size, c.head_dim, c.intermediate_size, c.num_experts_per_tok
    attention = D * H * (2 * c.num_heads + 2 * c.num_kv_heads)
    L, E = c.num_layers, c.num_experts
    return [
        (L * attention, L * batch * attention),
        (L * D * E, L * batch * D * E),
        (L * 3 * D * F * experts, L * batch * k * 3 * D * F),
        (D * c.vocab_size, batch * D * c.vocab_size),
        (L * 2 * D + D, 0),
    ]


def active_weight_bytes(c: ModelConfig, experts: float | None = None) -> float:
    """Bytes of the weights one decode step reads: attention, router, the experts it
    touches (k for one token, or `experts` of them per layer), head."""
    experts = c.num_experts_per_tok if experts is None else experts
    weights = sum(w for w, _ in _step_parts(c, experts, batch=1))
    return weights * jnp.dtype(c.weight_dtype).itemsize


def experts_touched(c: ModelConfig, batch: int) -> float:
    """Expected experts a layer reads in a step of `batch` tokens routed uniformly:
    an expert is skipped only if no token picks it, (1 - k/E)^batch. k at batch 1;
    7.92 of 8 at batch 16 with top-2."""
    E, k = c.num_experts, c.num_experts_per_tok
    return E * (1 - (1 - k / E) ** batch)


def decode_bound(config: ModelConfig, batch: int, bandwidth: float) -> float:
    """Tokens/s of `batch` rows whose steps read their weights at `bandwidth` bytes/s."""
    return batch * bandwidth / active_weight_bytes(config, experts_touched(config, batch))


def decode_roofline(config: ModelConfig, batch: int, bandwidth: float, peak: float) -> float:
    """Tokens/s of `batch` rows whose steps spend on each weight the longer of reading
    it at `bandwidth` bytes/s and of its rows' products at `peak` FLOP/s: the memory
    bound where few rows share a weight (the experts), the compute bound where many do
    (at batch 16 on a 2-core CPU, the attention projections and the LM head). Equals
    `decode_bound` as `peak` grows."""
    itemsize = jnp.dtype(config.weight_dtype).itemsize
    parts = _step_parts(config, experts_touched(config, batch), batch)
    seconds = sum(max(w * itemsize / bandwidth, 2 * macs / peak) for w, macs in parts)
    return batch / seconds


HF_ROW = "transformers generate (eager)"


def bench_decode(args, config: ModelConfig, peak: float):
    """Rounds of transformers' generate and ours, with the read bandwidth and the matmul
    peak probed before, between and after them; medians over the rounds."""
    torch, _ = torch_or_none()
    prompt, new = args.prompt_len, args.new_tokens
    print(
        f"\nDecode: prompt {prompt} tokens, {new} new tokens, greedy. The bound is the bytes "
        "of weights a step reads (every expert some token picks) over the read bandwidth, "
        "probed before and after each run; a run's share of the bound uses the mean of the "
        "two, as the machine's bandwidth moves within seconds. The roofline also gives each "
        "weight's products their time at the matmul peak, where that is the longer"
    )
    probe, flops = bandwidth_probe(), matmul_probe()
    print(
        f"  {'':<34} {'first token':>12} {'decode tok/s':>13} {'of bound':>9} "
        f"{'of roofline':>12} {'vs HF':>6}"
    )
    hf, model = twins(args, config)
    for batch in (1, 16):
        prompts = np.random.RandomState(batch).randint(3, config.vocab_size, (batch, prompt))
        ids = prompts.tolist()

        def hf_generate(n, prompts=prompts, streamer=None):
            with torch.no_grad():
                kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
                return hf.generate(
                    torch.as_tensor(prompts),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    streamer=streamer,
                    **kw,
                )

        def hf_run(batch=batch):  # -> first token s, decode tokens/s
            # Timed as ours is: when each step's tokens reach the streamer (the first
            # put is the prompt), all in one call.
            marks = Marks()
            start = time.perf_counter()
            hf_generate(new, streamer=marks)
            steps = marks.times[1:]
            return steps[0] - start, batch * (len(steps) - 1) / (steps[-1] - steps[0])

        def our_run(ids=ids, batch=batch):
            timing = generate_tokens(model, ids, max_new_tokens=new)[1]
            return timing.first_token_s, batch * timing.steps_per_s

        contenders = {"mixtral_jax generate": our_run}
        if torch is not None:
            contenders = {HF_ROW: hf_run, **contenders}
            hf_generate(2)  # warm up
        our_run()  # compile
        runs = {name: [] for name in contenders}  # (first token s, tokens/s, bandwidth)
        before, peaks = probe(), [peak, flops()]
        for _ in range(args.repeats):
            for name, run in contenders.items():
                first, rate = run()
                after = probe()
                peaks.append(flops())
                runs[name].append((first, rate, (before + after) / 2))
                before = after

        step_bytes = active_weight_bytes(config, experts_touched(config, batch))
        bandwidths = [b for r in runs.values() for _, _, b in r]
        bandwidth = statistics.median(bandwidths)
        bound = decode_bound(config, batch, bandwidth)
        roofline = decode_roofline(config, batch, bandwidth, max(peaks))
        print(
            f"  batch {batch}: a step reads {step_bytes / 1e6:.0f} MB of weights; read "
            f"bandwidth {bandwidth / 1e9:.1f} GB/s "
            f"({min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}): "
            f"at most {bound:.0f} tokens/s; {roofline:.0f} by the roofline at a matmul peak "
            f"of {max(peaks) / 1e9:.0f} GFLOP/s (the fastest of {len(peaks)} reads)"
        )
        rates = {name: statistics.median(rate for _, rate, _ in r) for name, r in runs.items()}
        reference = rates.get(HF_ROW)
        for name, r in runs.items():
            first = statistics.median(f for f, _, _ in r)
            share = statistics.median(run_rate * step_bytes / batch / b for _, run_rate, b in r)
            of_roofline = statistics.median(
                run_rate / decode_roofline(config, batch, b, max(peaks)) for _, run_rate, b in r
            )
            rate = rates[name]
            ratio = f"{rate / reference:5.2f}x" if reference else "    -"
            print(
                f"  {name:<34} {first * 1e3:9.1f} ms {rate:13.1f} {100 * share:8.1f}% "
                f"{100 * of_roofline:11.1f}% {ratio}"
            )
        if reference and batch > 1:
            print(
                f"  {'':<34} 4x transformers would be {4 * reference:.0f} tokens/s, "
                f"{400 * reference / bound:.0f}% of the bound"
            )


class Marks:
    """A transformers streamer that notes when each step's tokens arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_quantized(args, config: ModelConfig, peak: float):
    """Decode tokens/s with the same random weights in bfloat16, int8 and int4 (one
    scale per 128 inputs), computing in the config's dtype."""
    prompt, new = args.prompt_len, args.new_tokens
    base = Mixtral(config.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(args.seed))
    models = {
        "bfloat16": base,
        "int8": quantize.quantize_model(base, "int8"),
        "int4": quantize.quantize_model(base, "int4", 128),
    }
    print(f"\nQuantized weights: decode, prompt {prompt} tokens, {new} new tokens, greedy")
    print(f"  {'':<12} {'weights':>9} {'decode tok/s':>13} {'vs bf16':>8}")
    for batch in (1, 16):
        prompts = np.random.RandomState(batch).randint(3, config.vocab_size, (batch, prompt))
        print(f"  batch {batch}")
        reference = None
        for name, model in models.items():
            generate_tokens(model, prompts.tolist(), max_new_tokens=new)  # compile
            timings = [
                generate_tokens(model, prompts.tolist(), max_new_tokens=new)[1]
                for _ in range(max(1, args.repeats // 2))
            ]
            rate = statistics.median(batch * t.steps_per_s for t in timings)
            reference = reference or rate
            size = sum(element_bits(v.dtype) * v.size for v in flat_params(model).values())
            print(f"  {name:<12} {size / 8e6:6.0f} MB {rate:13.1f} {rate / reference:7.2f}x")


def bench_serve(args, config: ModelConfig, peak: float):
    """One open-loop load (tools/serve_load.py) through `python -m mixtral_jax.serve` over
    HTTP and through static batches of `generate`, alternated over `--serve_rounds`
    rounds (the machine's speed drifts over minutes: each round's ratio compares
    neighbours in time), then once through transformers' `generate`."""
    torch, _ = torch_or_none()
    prompts, answers = (
        tuple(map(int, r.split(","))) for r in (args.serve_prompts, args.serve_answers)
    )
    contenders = set(args.serve_contenders.split(","))
    load = serve_load.make_load(
        args.serve_requests, args.serve_rate, config.vocab_size, prompts, answers, seed=1
    )
    prompt_tokens = sum(len(j.prompt) for j in load)
    answer_tokens = sum(j.max_tokens for j in load)
    print(
        f"\nServe: {len(load)} requests arriving at {args.serve_rate}/s (Poisson), prompts "
        f"{prompts[0]}-{prompts[1]} tokens ({prompt_tokens} in all), answers "
        f"{answers[0]}-{answers[1]} ({answer_tokens}), greedy, {SERVE_BATCH} slots / static "
        f"batches of {SERVE_BATCH}, prefill up to {args.prefill_chunk} tokens of up to "
        f"{args.prefill_rows} prompts a step; {args.serve_rounds} round(s) of the server "
        "and static batches alternated"
    )
    _print_capacity(config, prompts, answers)
    hf, model = twins(args, config)
    compiled = set()

    def ours(jobs):
        prompts, n = [j.prompt for j in jobs], max(j.max_tokens for j in jobs)
        if (shape := (tuple(map(len, prompts)), n)) not in compiled:
            generate_tokens(model, prompts, max_new_tokens=n)  # compiles this batch's shapes
            compiled.add(shape)
        marks = []
        start = time.perf_counter()
        tokens, _ = generate_tokens(
            model,
            prompts,
            max_new_tokens=n,
            on_token=lambda row, _: row or marks.append(time.perf_counter()),
        )
        return tokens, marks[0] - start, list(np.diff(marks))

    rounds, engine = [], []  # per round: {row: (results, makespan)}; the server's figures
    served = _server(args, config, model, load) if "server" in contenders else None
    with served or contextlib.nullcontext() as url:
        probe, flops = (bandwidth_probe(), matmul_probe()) if url else (None, None)
        for _ in range(args.serve_rounds):
            rows = {}
            if url:
                reads = [probe() for _ in range(SERVE_PROBES)]
                peaks = [flops() for _ in range(SERVE_PROBES)]
                before = serve_load.scrape(url)
                results, makespan = serve_load.run_http(url, "bench", load)
                after = serve_load.scrape(url)
                reads += [probe() for _ in range(SERVE_PROBES)]
                peaks += [flops() for _ in range(SERVE_PROBES)]
                rows[SERVER_ROW] = results, makespan
                figures = _engine_figures(before, after, reads, config)
                steps = _steps_by_rows(before, after)
                engine.append((*figures, reads, max([peak, *peaks]), steps))
            if "static" in contenders:
                rows[STATIC_ROW] = serve_load.run_static(ours, load, SERVE_BATCH)
            rounds.append(rows)
    if torch is not None and "transformers" in contenders:

        def transformers_batch(jobs):
            n = max(j.max_tokens for j in jobs)
            T = max(len(j.prompt) for j in jobs)
            ids = torch.zeros((len(jobs), T), dtype=torch.long)
            mask = torch.zeros((len(jobs), T), dtype=torch.long)
            for row, job in enumerate(jobs):  # left-padded, as transformers wants
                ids[row, T - len(job.prompt) :] = torch.as_tensor(job.prompt)
                mask[row, T - len(job.prompt) :] = 1
            marks = Marks()
            start = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                    streamer=marks,
                )
            steps = marks.times[1:]  # the first put is the prompt
            return out[:, T:].tolist(), steps[0] - start, list(np.diff(steps))

        hf_row = serve_load.run_static(transformers_batch, load, SERVE_BATCH)
    else:
        hf_row = None
    print(f"  (x: output tokens/s against {STATIC_ROW!r}, of the same round)")
    serve_load.header()
    ratios, static_rates = [], []
    for i, rows in enumerate(rounds):
        rates = {name: serve_load.output_rate(*row) for name, row in rows.items()}
        for name, (results, makespan) in rows.items():
            label = f"{name} #{i + 1}" if len(rounds) > 1 else name
            serve_load.summarize(label, results, makespan, rates.get(STATIC_ROW))
        if STATIC_ROW in rates:
            static_rates.append(rates[STATIC_ROW])
            if SERVER_ROW in rates:
                ratios.append(rates[SERVER_ROW] / rates[STATIC_ROW])
    if hf_row:
        static = statistics.median(static_rates) if static_rates else None
        serve_load.summarize(HF_ROW + ", static", *hf_row, static)
    if len(ratios) > 1:
        print(
            "  the server against static batches, round by round: "
            + ", ".join(f"{r:.2f}x" for r in ratios)
            + f"; median {statistics.median(ratios):.2f}x"
        )
    for i, figures in enumerate(engine):
        rate, bound, bandwidth, prefill_s, decode_s, reads, round_peak, steps = figures
        roofline = decode_roofline(config, SERVE_BATCH, bandwidth, round_peak)
        of_bound, of_roofline = at_their_rows(steps, decode_s, config, bandwidth, round_peak)
        print(
            f"  round {i + 1}, the server's decode steps: {rate:.1f} tokens/s, "
            f"{100 * rate / bound:.0f}% of the batch-{SERVE_BATCH} decode bound "
            f"({bound:.0f} tokens/s at {bandwidth / 1e9:.1f} GB/s, the median of "
            f"{len(reads)} reads before and after the load, {min(reads) / 1e9:.1f}-"
            f"{max(reads) / 1e9:.1f}), {100 * rate / roofline:.0f}% of its roofline "
            f"({roofline:.0f} tokens/s at a matmul peak of {round_peak / 1e9:.0f} GFLOP/s, the "
            f"fastest of as many reads and the run's first); at the rows its steps had "
            f"({steps.get(SERVE_BATCH, 0):.0f} of {sum(steps.values()):.0f} steps with "
            f"{SERVE_BATCH}), {100 * of_bound:.0f}% of "
            f"the bound and {100 * of_roofline:.0f}% of the roofline; the engine spent "
            f"{prefill_s:.1f} s prefilling {prompt_tokens} prompt tokens "
            f"({prompt_tokens / prefill_s:.0f}/s) and {decode_s:.1f} s decoding"
        )
    if "prefix" in contenders:
        _bench_prefix_caching(args, config, model)
    if "cache" in contenders:
        _bench_cache_kinds(config, model)
    if "speculate" in contenders:
        _bench_speculation()
    if "lora" in contenders:
        _bench_multi_lora(config)
    if "constrained" in contenders:
        _bench_constrained()


def _bench_prefix_caching(args, config: ModelConfig, model) -> None:
    """TTFT of requests sharing a long system prompt, through a paged server with and
    without prefix caching."""
    load = serve_load.shared_prefix_load(
        PREFIX_REQUESTS, args.serve_rate, config.vocab_size, PREFIX_TOKENS, seed=3
    )
    print(
        f"\n  Prefix caching: {len(load)} requests at {args.serve_rate}/s sharing a "
        f"{PREFIX_TOKENS}-token system prompt, then 16-64 tokens of their own, 16 answer "
        f"tokens each; a paged cache of blocks of {PREFIX_BLOCK}"
    )
    serve_load.header()
    p50 = {}
    for name, flags in (("without", ("--no_prefix_caching",)), ("with", ())):
        flags = ("--block_size", str(PREFIX_BLOCK), *flags)
        with _server(args, config, model, load, flags) as url:
            results, makespan = serve_load.run_http(url, "bench", load)
            hits = serve_load.scrape(url).get("prefix_cache_hit_rate", 0.0)
        serve_load.summarize(f"{name} prefix caching", results, makespan, None)
        p50[name] = statistics.median(r.first - r.arrival for r in results)
        print(f"    prefix cache hit rate {100 * hits:.0f}% of prompt tokens")
    print(f"  TTFT p50 {p50['without'] / p50['with']:.1f}x lower with prefix caching")


def _bench_cache_kinds(config: ModelConfig, model) -> None:
    """The engine's decode steps, batch SERVE_BATCH, over each kind of KV cache, in
    alternated rounds: slots, pages, pages in int8 (and bfloat16 where the model
    computes in float32)."""
    kinds = {"slots": {}, "pages": {"block_size": 16}}
    if model.config.compute_dtype != jnp.bfloat16:
        kinds["pages, bfloat16"] = {"block_size": 16, "kv_dtype": "bfloat16"}
    kinds["pages, int8"] = {"block_size": 16, "kv_dtype": "int8"}
    engines = {
        name: Engine(model, max_batch=SERVE_BATCH, max_len=1024, prefill_chunk=512, **kw)
        for name, kw in kinds.items()
    }
    rs = np.random.RandomState(4)
    rates = {name: [] for name in kinds}
    for _ in range(CACHE_ROUNDS):
        for name, engine in engines.items():
            for _ in range(SERVE_BATCH):
                engine.submit(Request(rs.randint(3, config.vocab_size, 512).tolist(), 65))
            before_s, before_rows = engine.busy_seconds["decode"], engine.decode_rows
            engine.run_until_idle()
            steps_s = engine.busy_seconds["decode"] - before_s
            rates[name].append((engine.decode_rows - before_rows) / steps_s)
    print(
        f"\n  Decode steps by KV cache kind ({SERVE_BATCH} rows, prompts of 512, 64 steps; "
        f"tokens/s, {CACHE_ROUNDS} alternated rounds, the first compiling)"
    )
    for name, r in rates.items():
        bytes_per_token = _cache_bytes_per_token(config, kinds[name].get("kv_dtype"))
        print(
            f"    {name:<18} {statistics.median(r[1:]):7.1f} ({', '.join(f'{x:.0f}' for x in r)})"
            f"  {bytes_per_token:,.0f} bytes of cache per token"
        )
    _print_int8_quality()


def _bench_speculation() -> None:
    """Code completion on the embedded model (trained: its drafts mean something),
    SPEC_BATCHES requests at a time, by engines decoding plainly and with n-gram drafts,
    in alternated rounds; the tokens must be the same."""
    from mixtral_jax.checkpoints.load import EMBEDDED, load

    model = load(EMBEDDED)
    prompts = code_prompts(SPEC_PROMPTS, SPEC_PROMPT_TOKENS)
    print(
        f"\n  Speculative decoding ({SPEC_DRAFTER}) on the embedded model: {len(prompts)} "
        f"pieces of code, their first {SPEC_PROMPT_TOKENS} tokens continued by "
        f"{SPEC_ANSWER_TOKENS}, greedy; {SPEC_ROUNDS} alternated rounds, the first compiling"
    )
    for batch in SPEC_BATCHES:
        engines = {
            name: Engine(
                model, max_batch=batch, max_len=1024, speculate=speculate, speculate_rows=batch
            )
            for name, speculate in (("plain", None), (SPEC_DRAFTER, SPEC_DRAFTER))
        }
        rates = {name: [] for name in engines}
        tokens = {}
        for _ in range(SPEC_ROUNDS):
            for name, engine in engines.items():
                tokens[name], rate, per_step = _decode_rate(
                    engine, prompts, batch, SPEC_ANSWER_TOKENS
                )
                rates[name].append(rate)
        plain, spec = (statistics.median(r[1:]) for r in rates.values())
        e = engines[SPEC_DRAFTER]
        print(
            f"    batch {batch:>2}: plain {plain:6.0f} tokens/s, speculating {spec:6.0f} "
            f"({spec / plain:.2f}x{', goal >= 1.5x' if batch == 1 else ''}); "
            f"{per_step:.2f} tokens a row per step, "
            f"{100 * e.accepted_tokens / max(e.drafted_tokens, 1):.0f}% of drafted tokens kept; "
            f"same tokens: {'yes' if tokens['plain'] == tokens[SPEC_DRAFTER] else 'NO'}"
        )


def _bench_constrained() -> None:
    """JSON under a schema against free text on the embedded model: the same prompts and
    the same number of tokens each, CONSTRAINED_BATCHES requests at a time, in
    alternated rounds. The decode steps' time holds the grammar's work: its masks
    before each step, its parser's advance after it. Beside them, where steps may
    speculate, JSON with jump-forward: the forced text verified in one step."""
    from mixtral_jax.checkpoints.load import EMBEDDED, load, load_tokenizer
    from mixtral_jax.inference.grammar import Grammars

    model, tokenizer = load(EMBEDDED), load_tokenizer(EMBEDDED)
    make = Grammars(tokenizer, model.config.vocab_size).json(CONSTRAINED_SCHEMA)
    prompts = [tokenizer.encode(f"records_{i} = ") for i in range(CONSTRAINED_REQUESTS)]
    print(
        f"\n  Structured output on the embedded model: {len(prompts)} requests for a JSON "
        f"array of {CONSTRAINED_ITEMS} records (a schema), against free text of as many "
        f"tokens; greedy, {CONSTRAINED_ROUNDS} alternated rounds, the first compiling; the "
        "overhead is the median of the rounds' own; jump-forward verifies up to "
        f"{CONSTRAINED_JUMP} forced tokens a step"
    )
    for batch in CONSTRAINED_BATCHES:
        engine = Engine(model, max_batch=batch, max_len=1024)
        jumping = Engine(model, max_batch=batch, max_len=1024, jump_forward=CONSTRAINED_JUMP)
        jumps = batch <= jumping.speculate_rows
        rates: dict[str, list[float]] = {"free": [], "json": [], "jump": []}
        lengths: list[int] = []
        same = True
        for _ in range(CONSTRAINED_ROUNDS):
            got, rate, _ = _decode_rate(engine, prompts, batch, 900, make)
            lengths = [len(t) for t in got]
            rates["json"].append(rate)
            rates["free"].append(_decode_rate(engine, prompts, batch, lengths)[1])
            if jumps:
                jumped, rate, _ = _decode_rate(jumping, prompts, batch, 900, make)
                rates["jump"].append(rate)
                same = same and jumped == got
        free, json_ = (statistics.median(r[1:]) for r in (rates["free"], rates["json"]))
        overheads = {name: _overhead(rates["free"], r) for name, r in rates.items() if r}
        valid = all(len(json.loads(tokenizer.decode(t))) == CONSTRAINED_ITEMS for t in got)
        print(
            f"    batch {batch:>2}: free {free:6.0f} tokens/s, JSON {json_:6.0f} "
            f"({100 * overheads['json']:+.1f}% time a token, goal <= +10%); "
            f"{statistics.mean(lengths):.0f} tokens an answer; valid: {'yes' if valid else 'NO'}"
        )
        if jumps:
            kept = jumping.accepted_tokens / max(jumping.verify_steps, 1)
            print(
                f"              JSON with jump-forward {statistics.median(rates['jump'][1:]):6.0f} "
                f"tokens/s ({100 * overheads['jump']:+.1f}% time a token against free text); "
                f"{kept:.1f} forced tokens kept a verifying step; the tokens of "
                f"JSON without it: {'yes' if same else 'NO'}"
            )
        else:
            print(
                f"              (jump-forward: steps of {batch} rows do not speculate on this "
                f"device, whose steps of more than {jumping.speculate_rows} are bound by compute)"
            )


def _overhead(free: list[float], other: list[float]) -> float:
    """The median over rounds (the first, compiling, left out) of the time a token takes
    beyond free text's, from tokens/s."""
    return statistics.median(f / o - 1 for f, o in zip(free[1:], other[1:], strict=True))


def _bench_multi_lora(config: ModelConfig) -> None:
    """Four LoRA adapters served at once, mixed in every batch, against one adapter
    merged into the base: on the embedded model, and on `config`'s shapes (the bench
    model, random weights), whose factors are as small a share of the weights as on
    8x7B. Float32 weights: the merged model is then the bank's adapter 0 exactly, which
    the tokens check. The adapters are configs/finetune_lora.py's: rank 16, alpha 32, on
    attention and experts."""
    from mixtral_jax.checkpoints.load import EMBEDDED, load

    settings = load_config_file(Path(__file__).parents[1] / "configs" / "finetune_lora.py").lora
    targets = tuple(t.strip() for t in settings.targets.split(","))
    prompts = code_prompts(LORA_REQUESTS, LORA_PROMPT_TOKENS)
    print(
        f"\n  Multi-LoRA: {LORA_ADAPTERS} adapters (rank {settings.rank} on "
        f"{', '.join(targets)}) in one bank, the {len(prompts)} requests' adapters taking "
        f"turns, against adapter 0 merged into the base; prompts of {LORA_PROMPT_TOKENS} "
        f"tokens, {LORA_ANSWER_TOKENS} new, greedy; alternated rounds, the first compiling"
    )
    embedded = load(EMBEDDED, dtype="float32")
    shaped = Mixtral(config.replace(dtype="float32", param_dtype="float32"), rngs=nnx.Rngs(0))
    for label, base, batches, rounds in (
        ("the embedded model", embedded, LORA_BATCHES, LORA_ROUNDS),
        (f"{config.hidden_size} wide, random weights", shaped, (16,), LORA_WIDE_ROUNDS),
    ):
        merged, bank = _adapter_bank(base, settings, targets)
        share = _factor_share(bank)
        print(
            f"    {label} ({rounds} rounds; the adapters' factors {100 * share:.1f}% of an "
            "expert's weights each):"
        )
        for batch in batches:
            _multi_lora_rounds(merged, bank, prompts, batch, rounds)


def _adapter_bank(base: Mixtral, settings, targets: tuple[str, ...]):
    """LORA_ADAPTERS random adapters (B no longer zero, as trained ones) saved and loaded
    into a bank on `base`; also adapter 0 merged into it."""
    from mixtral_jax.checkpoints.adapters import load_bank
    from mixtral_jax.model.layers import LoRAParam
    from mixtral_jax.training import lora

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for i in range(LORA_ADAPTERS):
            adapted = lora.add_adapters(
                base, rank=settings.rank, alpha=settings.alpha, targets=targets, seed=i
            )
            state = nnx.state(adapted, LoRAParam)
            leaves, tree = jax.tree.flatten(state)
            keys = jax.random.split(jax.random.key(i), len(leaves))
            noisy = [
                x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)
            ]
            nnx.update(adapted, jax.tree.unflatten(tree, noisy))
            lora.save_adapters(adapted, f"{tmp}/{i}")
            dirs[str(i)] = f"{tmp}/{i}"
            if i == 0:
                merged = lora.merge(adapted)
        return merged, load_bank(base, dirs)


def _factor_share(bank: Mixtral) -> float:
    """One adapter's factors of one expert (w1, w2, w3), as a share of its weights."""
    c = bank.config
    weights = 3 * c.hidden_size * c.intermediate_size
    return 3 * c.lora_rank * (c.hidden_size + c.intermediate_size) / weights


def _multi_lora_rounds(merged: Mixtral, bank: Mixtral, prompts, batch: int, rounds: int) -> None:
    turns = [i % LORA_ADAPTERS for i in range(len(prompts))]
    engines = {
        "merged": (Engine(merged, max_batch=batch, max_len=1024), None),
        "bank": (Engine(bank, max_batch=batch, max_len=1024), turns),
    }
    rates: dict[str, list[float]] = {name: [] for name in engines}
    tokens = {}
    for _ in range(rounds):
        for name, (engine, adapters) in engines.items():
            got, rate, _ = _decode_rate(
                engine, prompts, batch, LORA_ANSWER_TOKENS, adapters=adapters
            )
            tokens[name] = got
            rates[name].append(rate)
    one, mixed = (statistics.median(r[1:]) for r in rates.values())
    ratio = statistics.median(
        b / m for m, b in zip(rates["merged"][1:], rates["bank"][1:], strict=True)
    )
    same = all(tokens["bank"][i] == tokens["merged"][i] for i, a in enumerate(turns) if a == 0)
    print(
        f"      batch {batch:>2}: one merged {one:6.0f} tokens/s, {LORA_ADAPTERS} mixed "
        f"{mixed:6.0f} ({100 * ratio:.0f}% of merged, goal >= 80%); adapter 0's tokens "
        f"as merged: {'yes' if same else 'NO'}"
    )


def _decode_rate(
    engine: Engine,
    prompts: list[list[int]],
    batch: int,
    max_tokens: int | list[int],
    constraint: Callable | None = None,
    adapters: list[int | None] | None = None,
):
    """Every prompt's tokens (up to `max_tokens`, or each its own), and the engine's
    decode steps' tokens per second and tokens a row per step, `batch` requests at a
    time (each constrained by `constraint()` if given, each applying its adapter of
    `adapters` if given)."""
    got: dict[int, list[int]] = {}
    before_s, before_tokens = engine.busy_seconds["decode"], engine.tokens_generated
    before_rows = engine.decode_rows
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for start in range(0, len(prompts), batch):
        for i in range(start, min(start + batch, len(prompts))):
            got[i] = []
            on_output = lambda o, i=i: got[i].extend(o.tokens)  # noqa: E731
            made = constraint() if constraint else None
            adapter = adapters[i] if adapters else None
            engine.submit(
                Request(
                    prompts[i], limits[i], constraint=made, adapter=adapter, on_output=on_output
                )
            )
        engine.run_until_idle()
    # Every token after the first comes from a decode step (the first: the prefill).
    decoded = engine.tokens_generated - before_tokens - len(prompts)
    seconds = engine.busy_seconds["decode"] - before_s
    per_step = decoded / (engine.decode_rows - before_rows)
    return [got[i] for i in range(len(prompts))], decoded / seconds, per_step


def _print_int8_quality() -> None:
    """int8 against bfloat16 caches on the embedded model (trained: its logits mean
    something, where the bench's random weights' do not)."""
    from mixtral_jax.checkpoints.load import EMBEDDED, load

    tokens = code_sample_tokens(QUALITY_TOKENS)
    worst, mean, agree = cache_quality(load(EMBEDDED), tokens, "int8", "bfloat16")
    print(
        f"  int8 cache against bfloat16, the embedded model over {len(tokens)} tokens of code "
        f"(teacher-forced): greedy tokens agree at {100 * agree:.1f}% of positions, logit "
        f"error max {worst:.2f}, mean {mean:.3f}"
    )


def code_prompts(count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of `count` of the package's samples of code (those at
    least that long; repeated if too few)."""
    long_enough = [ids[:length] for ids in code_samples() if len(ids) >= length]
    return [long_enough[i % len(long_enough)] for i in range(count)]


def code_sample_tokens(count: int) -> list[int]:
    """The first `count` tokens of the package's first sample of code, as the embedded
    model's tokenizer reads it."""
    return code_samples()[0][:count]


def code_samples() -> list[list[int]]:
    """The package's samples of code, as the embedded model's tokenizer reads them."""
    from mixtral_jax.checkpoints.load import EMBEDDED, load_tokenizer

    root = Path(__file__).resolve().parents[1]
    lines = (root / "mixtral_jax/assets/sample/eval_code.jsonl").read_text().splitlines()
    tokenizer = load_tokenizer(EMBEDDED)
    return [tokenizer.encode(json.loads(line)["text"]) for line in lines]


def _cache_bytes_per_token(config: ModelConfig, kv_dtype: str | None) -> float:
    """Keys and values of one token in every layer, with int8's scales: a one-slot
    cache's buffers."""
    dtype = None if kv_dtype is None else jnp.dtype(kv_dtype)
    cache = jax.eval_shape(functools.partial(init_cache, config, 1, 1, dtype))
    return sum(a.size * a.dtype.itemsize for a in cache.buffers)


# Prefix caching: requests, shared system prompt tokens, block size. Cache kinds: rounds,
# and the tokens int8's quality is read over.
PREFIX_REQUESTS, PREFIX_TOKENS, PREFIX_BLOCK = 32, 1000, 16
CACHE_ROUNDS, QUALITY_TOKENS = 3, 512
# Speculative decoding: the drafter, code prompts (tokens), answers, rounds.
SPEC_DRAFTER, SPEC_PROMPTS, SPEC_PROMPT_TOKENS, SPEC_ANSWER_TOKENS = "ngram:4", 16, 512, 256
SPEC_ROUNDS, SPEC_BATCHES = 3, (1, 2, 4, 16)
# Structured output: requests, and a schema whose documents have a fixed number of records.
CONSTRAINED_REQUESTS, CONSTRAINED_ITEMS, CONSTRAINED_BATCHES = 16, 24, (1, 16)
CONSTRAINED_ROUNDS = 9
CONSTRAINED_JUMP = 8
LORA_ADAPTERS, LORA_REQUESTS, LORA_PROMPT_TOKENS, LORA_ANSWER_TOKENS = 4, 32, 64, 128
LORA_ROUNDS, LORA_BATCHES = 7, (1, 16)
LORA_WIDE_ROUNDS = 5
CONSTRAINED_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "status": {"enum": ["open", "closed"]},
        },
        "required": ["id", "status"],
        "additionalProperties": False,
    },
    "minItems": CONSTRAINED_ITEMS,
    "maxItems": CONSTRAINED_ITEMS,
}


def cache_quality(
    model: Mixtral, tokens: list[int], kv_dtype: str, reference: str, chunk: int = 16
) -> tuple[float, float, float]:
    """The logits of `tokens` read through a `kv_dtype` cache against a `reference`
    one, teacher-forced (chunked prefill: each chunk of `chunk` tokens attends over the
    cache the chunks before it wrote): (max and mean |logit error|, share of positions
    whose greedy token agrees)."""
    c = model.config
    forward = nnx.jit(
        lambda m, t, p, cache: m.forward(t, p, cache=cache, chunk=True),
    )
    logits = {}
    for dtype in (kv_dtype, reference):
        cache = init_cache(c, 1, len(tokens), jnp.dtype(dtype), chunk)
        outs = []
        for start in range(0, len(tokens) - chunk + 1, chunk):
            ids = jnp.asarray([tokens[start : start + chunk]])
            out = forward(model, ids, jnp.arange(start, start + chunk)[None], cache)
            cache = out.cache
            outs.append(np.asarray(out.logits[0], np.float32))
        logits[dtype] = np.concatenate(outs)
    got, want = logits[kv_dtype], logits[reference]
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    error = np.abs(got - want)
    return float(error.max()), float(error.mean()), agree


def _print_capacity(config: ModelConfig, prompts: tuple, answers: tuple) -> None:
    """Requests of the load's mix that fit at once in one cache memory, as slots and as
    pages (`cache_capacity`)."""
    jobs = serve_load.make_load(CAPACITY_DRAWS, 1.0, config.vocab_size, prompts, answers, seed=2)
    slots, max_len = SERVE_BATCH, CAPACITY_LEN
    print(
        f"  KV cache capacity in the memory of {slots} slots of {max_len} tokens, for prompts "
        f"{prompts[0]}-{prompts[1]} and answers {answers[0]}-{answers[1]} (a request holds the "
        f"blocks its prompt and max_tokens fill; median, min-max of {len(jobs)} draws):"
    )
    for block_size in CAPACITY_BLOCKS:
        counts = cache_capacity(config, jobs, slots, max_len, block_size)
        median = statistics.median(counts)
        print(
            f"    pages of {block_size}: {median:.0f} requests ({min(counts)}-{max(counts)}), "
            f"{median / slots:.1f}x the {slots} slots"
        )


# The capacity figures: the context, blocks tried, requests drawn.
CAPACITY_LEN, CAPACITY_BLOCKS, CAPACITY_DRAWS = 4096, (16, 64), 256


def cache_capacity(
    config: ModelConfig, jobs: list, slots: int, max_len: int, block_size: int
) -> list[int]:
    """How many of `jobs` at once a paged cache of as much memory as `slots` slots of
    `max_len` admits (blocks of `block_size`, the engine's own `BlockPool`), counted
    from each job in turn until the next does not fit. Slots hold `slots`."""
    per_row = blocks_per_row(config, max_len, block_size)
    counts = []
    for first in range(len(jobs)):
        pool, admitted = BlockPool(slots * per_row, block_size, per_row), 0
        for job in itertools.islice(itertools.cycle(jobs), first, first + len(jobs)):
            need = pool.needed(len(job.prompt), job.max_tokens)
            if need > pool.available:
                break
            pool.take(need)
            admitted += 1
        counts.append(admitted)
    return counts


SERVER_ROW = "mixtral_jax serve (continuous)"
STATIC_ROW = "mixtral_jax generate, static"
SERVE_BATCH = 16
# Reads of the bandwidth probe before each load and as many after: the machine's read
# rate moves from moment to moment, and one read would set the bound by chance.
SERVE_PROBES = 7


def _engine_figures(before: dict, after: dict, reads: list[float], config: ModelConfig):
    """From the server's metrics before and after a load: its decode steps' tokens/s,
    the batch-SERVE_BATCH decode bound at the median of the bandwidth `reads`, that
    bandwidth, and the engine's seconds of prefill and of decode."""

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    decode_s = delta('engine_busy_seconds_total{phase="decode"}')
    prefill_s = delta('engine_busy_seconds_total{phase="prefill"}')
    bandwidth = statistics.median(reads)
    bound = decode_bound(config, SERVE_BATCH, bandwidth)
    return delta("decode_rows_total") / decode_s, bound, bandwidth, prefill_s, decode_s


def _steps_by_rows(before: dict, after: dict) -> dict[int, float]:
    """The decode steps a load ran, {rows: steps}, from the server's metrics before and
    after it."""
    steps = {}
    for name, value in after.items():
        match = re.fullmatch(r'decode_steps_total\{rows="(\d+)"\}', name)
        if match and (count := value - before.get(name, 0.0)):
            steps[int(match[1])] = count
    return steps


def at_their_rows(
    steps: dict[int, float], decode_s: float, config: ModelConfig, bandwidth: float, peak: float
) -> tuple[float, float]:
    """The shares of the bound and of the roofline that decode steps of these rows
    ({rows: steps}) reached in `decode_s` seconds, each step's least time taken at its
    own rows: how fast the steps ran, whatever the load left them to compute."""
    bound_s = sum(n * rows / decode_bound(config, rows, bandwidth) for rows, n in steps.items())
    roofline_s = sum(
        n * rows / decode_roofline(config, rows, bandwidth, peak) for rows, n in steps.items()
    )
    return bound_s / decode_s, roofline_s / decode_s


@contextlib.contextmanager
def _server(args, config: ModelConfig, model, load, flags: tuple[str, ...] = ()):
    """`python -m mixtral_jax.serve` on `model` in a process of its own, for `load`
    (with more command-line `flags`); yields its URL once it answers, and stops it
    after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    longest = max(len(j.prompt) + j.max_tokens for j in load)
    max_len = max(longest, min(1024, config.max_position_embeddings))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        store.save(checkpoint, flat_params(model), config)
        command = [
            sys.executable, "-m", "mixtral_jax.serve", "--checkpoint", str(checkpoint),
            "--tokenizer", "mistral-v1", "--port", str(port), "--model_name", "bench",
            "--max_batch", str(SERVE_BATCH), "--max_len", str(max_len),
            "--prefill_chunk", str(args.prefill_chunk), "--prefill_rows", str(args.prefill_rows),
            "--max_queue", str(len(load)), *flags,
        ]  # fmt: skip
        server = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(1)
            yield url
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default=str(Path(__file__).parents[1] / "configs/bench_1024.py")
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--init_std",
        type=float,
        default=0.02,
        help="std of the random weights (transformers' default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sections",
        default="prefill,moe,decode,quantized",
        help=f"comma-separated: {', '.join(SECTIONS)}",
    )
    parser.add_argument("--prompt_len", type=int, default=128, help="decode: prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=32, help="decode: new tokens")
    parser.add_argument("--serve_requests", type=int, default=64, help="serve: requests")
    parser.add_argument("--serve_rate", type=float, default=2.0, help="serve: arrivals per s")
    parser.add_argument("--prefill_chunk", type=int, default=512, help="serve: the server's")
    parser.add_argument("--prefill_rows", type=int, default=4, help="serve: the server's")
    parser.add_argument(
        "--serve_prompts", default="16,512", help="serve: prompt lengths, uniform in [a, b]"
    )
    parser.add_argument(
        "--serve_answers", default="16,256", help="serve: max_tokens, uniform in [a, b]"
    )
    parser.add_argument(
        "--serve_rounds",
        type=int,
        default=3,
        help="serve: rounds of the server and static batches, alternated",
    )
    parser.add_argument(
        "--serve_contenders",
        default="server,static,transformers,prefix,cache,speculate,constrained,lora",
        help="serve: which of server, static (our generate), transformers to run, and "
        "prefix (TTFT with and without prefix caching), cache (decode speed by KV cache), "
        "speculate (n-gram speculative decoding against plain), constrained (JSON under a "
        "schema against free text), lora (4 LoRA adapters mixed against one merged)",
    )
    parser.add_argument("--train_batch", type=int, default=1, help="train: rows per step")
    parser.add_argument(
        "--train_seq_lens", default="1024,2048", help="train: tokens per row, comma-separated"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.seq_len > config.max_position_embeddings:
        parser.error(
            f"--seq_len {args.seq_len} exceeds the config's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.serve_rounds < 1:
        parser.error(f"--serve_rounds {args.serve_rounds}: at least one round")
    if args.new_tokens < 3 and {"decode", "quantized"} & set(sections):
        parser.error(f"--new_tokens {args.new_tokens}: a decode rate needs at least 3 new tokens")

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    # Both contenders' CPU steps move with the allocator (docs/training-speed.md).
    tunables = os.environ.get("GLIBC_TUNABLES")
    print(f"malloc: GLIBC_TUNABLES={tunables}" if tunables else "malloc: the C library's defaults")
    peak, where = matmul_peak(args.repeats)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s float32 ({where})")
    if "prefill" in sections:
        bench_prefill(args, config, peak)
    if "moe" in sections:
        bench_moe_layer(args, config, peak)
    if "decode" in sections:
        bench_decode(args, config, peak)
    if "quantized" in sections:
        bench_quantized(args, config, peak)
    if "serve" in sections:
        bench_serve(args, config, peak)
    if "train" in sections:
        bench_train.bench_train(args, config, peak)


if __name__ == "__main__":
    main()

"""What the sections of tools/bench.py share: timing in alternation, the machine's
matmul peak, the table rows, transformers' twin."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import ModelConfig
from mixtral_jax.model.config import load_config_file


def load_config(path: str) -> ModelConfig:
    return ModelConfig.from_dict(load_config_file(path))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so that drifts in the
    machine's speed hit all of them alike."""
    for fn in fns.values():
        fn()  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def torch_or_none():
    try:
        import torch
        import transformers
    except ImportError:
        return None, None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, transformers


def matmul_peak(repeats: int) -> tuple[float, str]:
    """The fastest float32 square matmul this machine runs (JAX or torch), FLOP/s."""
    best, where = 0.0, ""
    torch, _ = torch_or_none()
    square = jax.jit(lambda a: a @ a)
    for n in (1024, 2048):
        fns = {}
        a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.float32)
        fns[f"jax {n}^3"] = lambda a=a: square(a).block_until_ready()
        if torch is not None:
            t = torch.randn(n, n)
            fns[f"torch {n}^3"] = lambda t=t: t @ t
        for name, seconds in interleaved(fns, repeats).items():
            if 2 * n**3 / seconds > best:
                best, where = 2 * n**3 / seconds, name
    return best, where


def row(name: str, seconds: float, tokens: int, flops: float, peak: float, ref: float | None):
    ratio = f"{ref / seconds:5.2f}x" if ref else "    -"
    print(
        f"  {name:<34} {seconds * 1e3:9.1f} ms {tokens / seconds:9.0f} tok/s "
        f"{flops / seconds / 1e9:7.1f} GFLOP/s {100 * flops / seconds / peak:5.1f}% {ratio}"
    )


def header(title: str):
    print(f"\n{title}")
    print(f"  {'':<34} {'time':>12} {'tokens/s':>15} {'active':>15} {'peak':>6} {'vs HF':>6}")


def hf_model(config: ModelConfig, init_std: float, seed: int):
    torch, transformers = torch_or_none()
    hf_config = transformers.MixtralConfig(**config.to_hf())
    hf_config.initializer_range = init_std
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(hf_config).eval()

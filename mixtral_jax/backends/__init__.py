"""Backends: how a decode step runs on the devices at hand, chosen in one place.

`for_decode` is that place. The plain path (TPU, GPU, any mesh) is the model as
written: stacked weights, scanned layers, one jitted step. On one CPU device the
step instead reads each layer's and expert's weights from buffers of their own and
runs the experts, the attention projections and the LM head on C++ kernels where
they apply (`backends.cpu`). The model never imports a backend: a backend hands it
`model.mixtral.Unstacked` weights and compiler options, and the model reads them.

    cpu/decode.py    the CPU decode path: weights as views, packed copies, per-layer cache
    cpu/kernels.py   the C++ kernels (cpu/csrc/cpu_moe.cc), their build, cache and packing
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from flax import nnx

from mixtral_jax.backends.cpu import decode, kernels
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.mixtral import Mixtral, Unstacked


class Decode(NamedTuple):
    """How `inference.generate` runs a decode step: the options it compiles with, the
    blocks' weights as buffers of their own (or None: the stacked ones) and the cache
    layout they go with; and what its prefill reads (`prefill`)."""

    compiler_options: tuple[tuple[str, Any], ...] = ()
    unstacked: Unstacked | None = None
    # The blocks' weights as views, one buffer per layer and per expert, no kernels
    # (`unstacked` is these, or these with the kernels); None with `unstacked` None.
    views: Unstacked | None = None

    def prefill(self, views: bool = True) -> Unstacked | None:
        """The blocks' weights a prefill reads, or None for the stacked ones: XLA:CPU
        would copy every expert's weights out of the stack first, a second read of every
        weight, which costs a short chunk as much as its work. The experts go to the
        decode step's kernel where it has one (faster than XLA's matmuls at any number
        of rows, and a small program); else, where `views`, to their own buffers, a loop
        unrolled over every expert that compiles about twice as long as the stacked one:
        for a program compiled once and called many times (a server's prefill)."""
        if self.views is None:
            return None
        if isinstance(
            self.unstacked.experts[0], (kernels.PackedExperts, kernels.PackedExpertsLoRA)
        ):
            return self.views._replace(experts=self.unstacked.experts)
        return self.views if views else None

    def cache(self, cache: KVCache) -> KVCache:
        """The cache in the layout the step reads: one buffer per layer with unstacked
        weights (as the weights), as given otherwise."""
        return cache if self.unstacked is None else decode.per_layer(cache)


def for_decode(model: Mixtral, batch: int, mesh: jax.sharding.Mesh | None = None) -> Decode:
    """The decode path for `model`'s devices and a batch of `batch` rows: the CPU's
    (compile options; on one device without a mesh, the weights as views and the
    kernels while the batch is small enough, `cpu.kernels.suits`), else the plain one."""
    if not on_cpu(model):
        return Decode()
    options = _frozen(decode.COMPILER_OPTIONS)
    if mesh is not None:
        return Decode(options)
    views = decode.unstacked(model, pack=False)
    if views is None:
        return Decode(options)
    step = decode.with_kernels(model, views) if kernels.suits(model.config, batch) else views
    return Decode(options, step, views)


def on_cpu(model: Mixtral) -> bool:
    """Whether the model's parameters are on CPU devices (one or a mesh of them)."""
    return {d.platform for d in jax.tree.leaves(nnx.state(model))[0].devices()} == {"cpu"}


def _frozen(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))

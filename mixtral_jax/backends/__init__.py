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
    layout they go with."""

    compiler_options: tuple[tuple[str, Any], ...] = ()
    unstacked: Unstacked | None = None

    def cache(self, cache: KVCache) -> KVCache:
        """The cache in the layout the step reads: one buffer per layer with unstacked
        weights (as the weights), as given otherwise."""
        return cache if self.unstacked is None else decode.per_layer(cache)


def for_decode(model: Mixtral, batch: int, mesh: jax.sharding.Mesh | None = None) -> Decode:
    """The decode path for `model`'s devices and a batch of `batch` rows: the CPU's
    (compile options; on one device without a mesh, the weights as views and the
    kernels while the batch is small enough, `cpu.kernels.suits`), else the plain one."""
    platforms = {d.platform for d in jax.tree.leaves(nnx.state(model))[0].devices()}
    if platforms != {"cpu"}:
        return Decode()
    options = _frozen(decode.COMPILER_OPTIONS)
    if mesh is not None:
        return Decode(options)
    return Decode(options, decode.unstacked(model, kernels.suits(model.config, batch)))


def _frozen(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))

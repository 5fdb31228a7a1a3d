"""How a decode step runs on one CPU device: weights read in place, kernels, options.

XLA:CPU copies a slice of an array before a matmul reads it, so a decode step
over the stacked [L, (E,) ...] parameters reads each weight three times where it
needs it once. Here each layer's and each expert's weights are buffers of their
own instead, views of the stacked parameters' memory (nothing is copied), handed to
the model as `Unstacked`; the KV cache gets one buffer per layer alike. Where the
kernels apply (`kernels.py`), the experts, the attention projections and the LM
head are computed by them from packed copies. The TPU compiler reads a slice in
place: there the stacked, scanned path is the one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from mixtral_jax.backends.cpu import kernels
from mixtral_jax.model import moe
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.mixtral import Mixtral, Unstacked

# XLA:CPU vectorises the kernels it writes itself, a decode step's one-row matrix
# products among them, 256 bits wide by default; 512 reads the weights faster on an
# AVX-512 CPU (docs/cpu-decode.md). A preference only: LLVM uses no wider vectors
# than the CPU has.
COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


class ExpertBuffers(NamedTuple):
    """One layer's experts, each in buffers of its own (w1, w2, w3 with any adapters):
    the model's `moe.ExpertsFn`, each expert multiplying its own sorted rows."""

    experts: tuple[moe.ExpertWeights, ...]

    def __call__(
        self, xs: jax.Array, start: jax.Array, count: jax.Array, mix: jax.Array | None = None
    ) -> jax.Array:
        def expert(e: int) -> moe.ExpertWeights:
            return tuple(w.take((), xs.dtype) for w in self.experts[e])

        return moe.expert_rows(xs, start, count, expert, len(self.experts), True, mix)


def unstacked(model: Mixtral, pack: bool = True) -> Unstacked | None:
    """The blocks' parameters as one buffer per layer and per (layer, expert), views of
    the stacked parameters' memory, so nothing is copied; None unless every one lies
    whole on one CPU device in a dtype numpy can view (not int4). With `pack`, each
    layer's experts are instead a packed copy for the experts' kernel where it applies
    (`kernels.packed_experts`: float32 activations, float weights, no adapters, room
    for the copy, a C++ compiler), and so are the attention projections and the LM
    head for the dense kernel (`kernels.packed_attention`, `packed_lm_head`)."""
    c = model.config
    _, experts, rest = nnx.split(model.layers, nnx.PathContains("experts"), ...)
    hosts = jax.tree.map(_host_view, (experts, rest))
    if any(h is None for h in jax.tree.leaves(hosts, is_leaf=lambda h: h is None)):
        return None
    device = next(iter(jax.tree.leaves(rest)[0].devices()))

    def views(tree, *index):
        return jax.tree.map(lambda h: jax.device_put(h[index], device), tree)

    def expert_buffers() -> tuple[ExpertBuffers, ...]:
        graphdef = nnx.graphdef(model.layers.moe.experts)
        return tuple(
            ExpertBuffers(
                tuple(
                    nnx.merge(graphdef, views(hosts[0], i, e)["moe"]["experts"]).weights()
                    for e in range(c.num_experts)
                )
            )
            for i in range(c.num_layers)
        )

    layers = tuple(views(hosts[1], i) for i in range(c.num_layers))
    plain = Unstacked(layers, expert_buffers())
    return with_kernels(model, plain) if pack else plain


def with_kernels(model: Mixtral, plain: Unstacked) -> Unstacked:
    """`plain` (`unstacked(model, pack=False)`) with the kernels' packed copies where
    they apply: the experts, the attention projections, the LM head."""
    # Packed in this order, each judged against the memory left by the ones before.
    experts = _packed_experts(model) or plain.experts
    lm_head = kernels.packed_lm_head(model.config, model.lm_head[...])
    return Unstacked(plain.layers, experts, _packed_attention(model), lm_head)


@jax.jit
def per_layer(cache: KVCache) -> KVCache:
    """`cache` with one key and one value buffer per layer (a copy, once): a decode step
    over the stacked [L, ...] cache would copy each layer's keys and values, the whole
    cache, on every step."""
    L = cache.k.shape[0]

    def split(a):
        return None if a is None else tuple(a[i] for i in range(L))

    return cache._replace(
        k=split(cache.k),
        v=split(cache.v),
        k_scale=split(cache.k_scale),
        v_scale=split(cache.v_scale),
    )


def _packed_experts(model: Mixtral) -> tuple[kernels.PackedExperts, ...] | None:
    """Every layer's experts packed for the experts' kernel where it applies, else None."""
    experts = model.layers.moe.experts
    if not isinstance(experts.w1, nnx.Param):  # quantized
        return None
    weights = experts.w1[...], experts.w2[...], experts.w3[...]
    return kernels.packed_experts(model.config, *weights)


def _packed_attention(model: Mixtral) -> tuple[kernels.PackedAttention, ...] | None:
    """Every layer's attention projections packed for the dense kernel, else None."""
    attention = model.layers.attention
    projections = [getattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not all(isinstance(p, nnx.Param) for p in projections):  # quantized
        return None
    return kernels.packed_attention(model.config, *(p[...] for p in projections))


def _host_view(a: jax.Array) -> np.ndarray | None:
    """The array's memory as numpy, when it is one CPU buffer numpy reads in place."""
    devices = a.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    host = np.asarray(a)
    return host if host.ctypes.data == a.unsafe_buffer_pointer() else None

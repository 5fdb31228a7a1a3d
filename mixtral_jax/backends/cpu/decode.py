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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.backends.cpu import kernels
from mixtral_jax.model import layers, moe
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
        self, xs: jax.Array, start: jax.Array, count: jax.Array, ids: jax.Array | None = None
    ) -> jax.Array:
        def expert(e: int) -> moe.ExpertWeights:
            return tuple(w.take((), xs.dtype) for w in self.experts[e])

        return moe.expert_rows(xs, start, count, expert, len(self.experts), True, ids)


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


def _packed_experts(model: Mixtral) -> tuple | None:
    """Every layer's experts packed for the experts' kernel where it applies, with their
    bank of adapters where they have one (`kernels.PackedExpertsLoRA`), else None."""
    experts = model.layers.moe.experts
    if not isinstance(experts.w1, nnx.Param):  # quantized
        return None
    weights = experts.w1[...], experts.w2[...], experts.w3[...]
    if not experts.adapted:
        return kernels.packed_experts(model.config, *weights)
    # The kernel applies a bank on all of w1, w2 and w3 (a single adapter: XLA's matmuls).
    adapters = [getattr(experts, f"{name}_lora") for name in ("w1", "w3", "w2")]
    if not (
        model.config.lora_bank and all(adapters) and model.config.lora_rank <= kernels.MAX_LORA_RANK
    ):
        return None
    packed = kernels.packed_experts(model.config, *weights, banked=True)
    if packed is None:
        return None
    # Each layer's a1, b1, a3, b3, a2, b2 [E, J, ...], as the kernel takes them (a copy of
    # the factors only).
    factors = [part[...] for adapter in adapters for part in (adapter.a, adapter.b)]
    return tuple(
        kernels.PackedExpertsLoRA(p.w13, p.w2, tuple(f[layer] for f in factors))
        for layer, p in enumerate(packed)
    )


def _packed_attention(model: Mixtral) -> tuple[kernels.PackedAttention, ...] | None:
    """Every layer's attention projections packed for the dense kernel, with their LoRA
    adapters for `kernels.lora_rows` where they have any, else None."""
    attention = model.layers.attention
    projections = [getattr(attention, name) for name in PROJECTIONS]
    if not all(isinstance(p, nnx.Param) for p in projections):  # quantized
        return None
    packed = kernels.packed_attention(model.config, *(p[...] for p in projections))
    adapters = [getattr(attention, f"{name}_lora") for name in PROJECTIONS]
    if packed is None or not any(adapters):
        return packed
    if model.config.lora_rank > kernels.MAX_LORA_RANK:
        return None
    widths = [p.shape[-2] * p.shape[-1] for p in projections[:3]]  # q, k, v: N H, K H, K H
    return tuple(
        p._replace(adapters=(_qkv_bank(adapters[:3], widths, i), _rows_bank(adapters[3], i)))
        for i, p in enumerate(packed)
    )


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rows_bank(adapter: layers.Adapter | None, layer: int) -> kernels.LoRARows | None:
    """Layer `layer` of an adapter (or of a bank of them) on an attention projection as
    `kernels.lora_rows` takes it, a [J, K, R] and b [J, R, N] (one adapter: J = 1, its
    scale folded into b)."""
    if adapter is None:
        return None
    a, b = (f[...][layer].astype(jnp.float32) for f in (adapter.a, adapter.b))
    if not adapter.bank:
        a, b = a[None], b[None] * adapter.scale
    J, R = a.shape[0], a.shape[-1]
    b = b.reshape(J, R, -1)
    return kernels.LoRARows(a.reshape(J, -1, R), b, ((0, b.shape[-1]),), b.shape[-1])


def _qkv_bank(adapters: list, widths: list[int], layer: int) -> kernels.LoRARows | None:
    """q's, k's and v's adapters as one bank on their side-by-side weight [D, (N + 2K) H],
    a segment of its columns each: their A and their B side by side. One call then
    serves all three; a projection without an adapter has no segment."""
    banks = [_rows_bank(a, layer) for a in adapters]
    present = [i for i, bank in enumerate(banks) if bank is not None]
    if not present:
        return None
    columns = tuple((sum(widths[:i]), sum(widths[: i + 1])) for i in present)
    a = jnp.concatenate([banks[i].a for i in present], axis=-1)
    b = jnp.concatenate([banks[i].b for i in present], axis=-1)
    return kernels.LoRARows(a, b, columns, sum(widths))


def _host_view(a: jax.Array) -> np.ndarray | None:
    """The array's memory as numpy, when it is one CPU buffer numpy reads in place."""
    devices = a.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    host = np.asarray(a)
    return host if host.ctypes.data == a.unsafe_buffer_pointer() else None

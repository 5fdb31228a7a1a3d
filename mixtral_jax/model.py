"""The Mixtral decoder: embedding, L x (attention + SMoE) blocks, final norm, LM head.

The L blocks are built once with `nnx.vmap`, so every block parameter carries
a leading `layers` axis [L, ...]. The forward pass either scans over that axis
(`scan_layers=True`, one compiled block) or unrolls a Python loop over slices
of it; both read the same parameters, so a checkpoint serves either setting.
On a CPU a decode step reads them from `layer_pieces` instead: each layer's and
each expert's weights as a buffer of its own, views of the same memory, and the
experts, attention projections and LM head as packed copies that the CPU kernels
read (`cpu_moe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import cpu_moe, routing
from mixtral_jax.attention import Attention, LayerCache
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import Embed, RMSNorm, param
from mixtral_jax.moe import SparseMoE
from mixtral_jax.sharding import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + moe(norm(h))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.attn_norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, param_dtype=c.weight_dtype, rngs=rngs
        )
        self.attention = Attention(c, rngs=rngs)
        self.moe_norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, param_dtype=c.weight_dtype, rngs=rngs
        )
        self.moe = SparseMoE(c, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        token_mask: jax.Array,
        layer: jax.Array | None = None,
        cache: LayerCache | None = None,
        sorted_: bool = False,
        experts: Sequence[nnx.State] | cpu_moe.PackedExperts | None = None,
        attention: cpu_moe.PackedAttention | None = None,
    ):
        """`layer` indexes expert weights still stacked over layers (sorted dispatch).

        With a cache (inference) the SMoE layer never drops a token. `sorted_`
        forces the sorted dispatch (decode steps; see `Mixtral._run_layers`).
        `experts`: the experts' parameters in buffers of their own (`LayerPieces`),
        used in place of the stacked ones; `attention`: the attention projections
        packed for the CPU kernel, used by a decode step (`LayerPieces`)."""
        attn, kv = self.attention(self.attn_norm(x), positions, segment_ids, cache, attention)
        h = x + attn
        out = self.moe(
            self.moe_norm(h),
            token_mask,
            layer=layer,
            dropless=cache is not None,
            sorted_=sorted_,
            experts=experts,
        )
        return h + out.y, out, kv


class LayerRouting(NamedTuple):
    """What every layer's router did, stacked over layers [L, ...]."""

    stats: routing.RouterStats  # fields [L, E] or [L]
    weights: jax.Array  # [L, B, T, k]
    experts: jax.Array  # [L, B, T, k]


class KVCache(NamedTuple):
    """Every layer's keys and values [L, B, K, S, H] and each slot's key position
    [B, S] (-1: empty). S is the maximum length, or the sliding window if smaller
    (a rolling buffer). Build it with `init_cache`; `per_layer` gives each layer
    buffers of its own (k, v: tuples of L [B, K, S, H] arrays), for CPU decode."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array

    @property
    def length(self) -> int:
        return self.positions.shape[1]


def init_cache(
    config: ModelConfig, batch_size: int, max_length: int, dtype: jnp.dtype | None = None
) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_length` tokens."""
    c = config
    S = max_length if c.sliding_window is None else min(max_length, c.sliding_window)
    shape = (c.num_layers, batch_size, c.num_kv_heads, S, c.head_dim)
    dtype = dtype or c.compute_dtype
    empty = jnp.full((batch_size, S), -1, jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), empty)


@jax.jit
def per_layer(cache: KVCache) -> KVCache:
    """`cache` with one key and one value buffer per layer (a copy, once).

    Why: XLA:CPU copies a slice of an array before a matmul reads it, so a decode step
    over the stacked [L, ...] cache copied each layer's keys and values, the whole
    cache per step (97 ms of a 134 ms step at batch 16 and 4k slots).
    """
    L = cache.k.shape[0]
    return KVCache(
        tuple(cache.k[i] for i in range(L)), tuple(cache.v[i] for i in range(L)), cache.positions
    )


def cache_slots(
    cache: KVCache, positions: jax.Array, token_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Where a call's tokens go in the cache [B, T] (S: not stored) and the slots'
    key positions afterwards [B, S]. Padding is not stored; of a prompt longer
    than a rolling buffer, only the last S tokens are."""
    S = cache.length
    last = jnp.max(jnp.where(token_mask, positions, -1), axis=1, keepdims=True)  # [B, 1]
    keep = token_mask & (positions > last - S)
    slots = jnp.where(keep, positions % S, S)
    rows = jnp.arange(positions.shape[0])[:, None]
    key_positions = cache.positions.at[rows, slots].set(positions, mode="drop")
    return slots, key_positions


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V]
    routing: LayerRouting
    cache: KVCache | None = None  # updated, when one was given

    @property
    def load_balancing_loss(self) -> jax.Array:
        """transformers' auxiliary loss over all layers (k at perfect balance)."""
        s = self.routing.stats
        return routing.load_balancing_loss(s.expert_fraction, s.router_prob)

    @property
    def z_loss(self) -> jax.Array:
        """Router z-loss, averaged over layers."""
        return jnp.mean(self.routing.stats.z_loss)

    @property
    def dropped_fraction(self) -> jax.Array:
        """Fraction of token choices dropped for lack of capacity, over all layers."""
        return jnp.mean(self.routing.stats.dropped_fraction)


class Mixtral(nnx.Module):
    """Mixtral causal LM. `model(tokens)` -> logits; `model.forward(tokens)` adds routing."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = Embed(
            c.vocab_size,
            c.hidden_size,
            std=c.initializer_range,
            param_dtype=c.weight_dtype,
            rngs=rngs,
        )

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(c, rngs=rngs)

        self.layers = make_blocks(rngs)
        self.final_norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, param_dtype=c.weight_dtype, rngs=rngs
        )
        self.lm_head = param(
            rngs,
            (c.hidden_size, c.vocab_size),
            ("embed", "vocab"),
            c.weight_dtype,
            nnx.initializers.normal(c.initializer_range),
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """tokens: int [B, T] -> logits [B, T, V] (in the compute dtype)."""
        return self.forward(tokens, positions, segment_ids).logits

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        pieces: LayerPieces | None = None,
    ) -> ModelOutput:
        """Logits and each layer's routing (and the updated cache).

        tokens: int [B, T]. positions: int [B, T], default 0..T-1.
        segment_ids: int [B, T]; tokens attend only within their segment and
        segment 0 marks padding, which routing statistics and expert capacity
        ignore. Default: one segment per row, no padding.
        cache: with T > 1, a prefill into an empty cache (`init_cache`); with
        T = 1, a decode step that attends over the cache. Positions must stay
        below the cache length unless the cache is a sliding window's buffer.
        pieces: `layer_pieces(self)`, the blocks' parameters in buffers of their
        own; a decode step then reads them instead of slicing the stacked ones.
        """
        c = self.config
        _check_inputs(c, tokens, positions, segment_ids)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        token_mask = jnp.ones((B, T), bool) if segment_ids is None else segment_ids != 0

        x = constrain(self.embed(tokens, c.compute_dtype), ("batch", "length", "embed"))
        kv, slots, key_positions = None, None, None
        if cache is not None:
            slots, key_positions = cache_slots(cache, positions, token_mask)
            kv = (cache.k, cache.v)
        x, (stats, weights, experts), kv = self._run_layers(
            x, positions, segment_ids, token_mask, kv, slots, key_positions, pieces
        )
        x = self.final_norm(x)
        if pieces is not None and pieces.lm_head is not None and T == 1:
            logits = cpu_moe.dense(x[:, 0], pieces.lm_head, c.vocab_size)[:, None]
        else:
            logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(x.dtype))
        logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = None if cache is None else KVCache(*kv, key_positions)
        return ModelOutput(logits, LayerRouting(stats, weights, experts), new_cache)

    def _run_layers(self, x, positions, segment_ids, token_mask, kv, slots, key_positions, pieces):
        c = self.config
        # The sorted dispatch reads each expert's weights at [layer, expert] itself:
        # slicing a whole layer out first would copy every expert's weights (XLA:CPU
        # copies a dynamic slice that feeds a matmul), once more than needed.
        # A decode step (one token per row) uses the sorted dispatch, which reads
        # only the chosen experts' weights.
        decode = kv is not None and x.shape[1] == 1
        sorted_ = c.moe_impl == "sorted" or decode
        keep_stacked = nnx.PathContains("experts") if sorted_ else nnx.Not(...)
        graphdef, stacked, params = nnx.split(self.layers, keep_stacked, ...)

        def block(carry, scanned, experts=None, attention=None):
            x, kv = carry  # kv: every layer's [L, ...] buffers, or this layer's own
            layer_params, layer = scanned
            module = nnx.merge(graphdef, stacked, layer_params)
            cache = None if kv is None else LayerCache(*kv, layer, slots, key_positions)
            x, out, kv = module(
                x,
                positions,
                segment_ids,
                token_mask,
                layer=layer,
                cache=cache,
                sorted_=decode,
                experts=experts,
                attention=attention,
            )
            return (x, kv), (out.stats, out.weights, out.experts)

        if c.remat_policy != "none":
            block = jax.checkpoint(block, policy=_REMAT_POLICIES[c.remat_policy])
        own_buffers = decode and pieces is not None
        per_layer_cache = kv is not None and isinstance(kv[0], tuple)
        # The cache is carried from layer to layer, not scanned over: each layer writes
        # its keys in place, so a step never copies the whole cache.
        if c.scan_layers and not own_buffers and not per_layer_cache:
            (x, kv), routes = jax.lax.scan(block, (x, kv), (params, jnp.arange(c.num_layers)))
            return x, routes, kv
        outs, layer_kv = [], []
        for i in range(c.num_layers):
            packed = None
            if own_buffers:
                scanned, experts = (pieces.layers[i], i), pieces.experts[i]
                packed = None if pieces.attention is None else pieces.attention[i]
            else:
                scanned, experts = (jax.tree.map(lambda p, i=i: p[i], params), i), None
            if per_layer_cache:
                (x, kv_i), out = block((x, (kv[0][i], kv[1][i])), scanned, experts, packed)
                layer_kv.append(kv_i)
            else:
                (x, kv), out = block((x, kv), scanned, experts, packed)
            outs.append(out)
        if per_layer_cache:
            kv = tuple(tuple(a) for a in zip(*layer_kv, strict=True))
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs), kv


class LayerPieces(NamedTuple):
    """The blocks' parameters in buffers of their own (`layer_pieces`): layers[l] holds
    layer l's attention, norms and router; experts[l] layer l's experts, one state per
    expert, or all of them packed for the CPU kernel (`cpu_moe`); attention[l] and
    lm_head, where given, layer l's projections and the LM head packed for it."""

    layers: tuple[nnx.State, ...]
    experts: tuple[tuple[nnx.State, ...] | cpu_moe.PackedExperts, ...]
    # Packed for the CPU kernel (`cpu_moe.dense`) where it applies, else None:
    attention: tuple[cpu_moe.PackedAttention, ...] | None = None
    lm_head: jax.Array | None = None


def layer_pieces(model: Mixtral, pack: bool = True) -> LayerPieces | None:
    """The blocks' parameters as one buffer per layer and per (layer, expert), views of
    the stacked [L, (E,) ...] parameters' memory, so nothing is copied; None unless
    every one lies whole on one CPU device in a dtype numpy can view (not int4).
    With `pack`, each layer's experts are instead a packed copy for the CPU
    kernel where it applies (`cpu_moe.packed_experts`: float32 activations, float
    weights, no adapters, room for the copy, a C++ compiler), and so are the attention
    projections and the LM head (`cpu_moe.packed_attention`, `packed_lm_head`).

    Why: XLA:CPU copies a slice of an array before a matmul reads it, so a decode step
    over stacked parameters reads each weight three times where it needs it once. The
    TPU compiler reads a slice in place; there the stacked, scanned path is the one.
    """
    c = model.config
    _, experts, rest = nnx.split(model.layers, nnx.PathContains("experts"), ...)
    hosts = jax.tree.map(_host_view, (experts, rest))
    if any(h is None for h in jax.tree.leaves(hosts, is_leaf=lambda h: h is None)):
        return None
    device = next(iter(jax.tree.leaves(rest)[0].devices()))

    def views(tree, *index):
        return jax.tree.map(lambda h: jax.device_put(h[index], device), tree)

    def expert_views():
        L, E = c.num_layers, c.num_experts
        return tuple(tuple(views(hosts[0], i, e) for e in range(E)) for i in range(L))

    layers = tuple(views(hosts[1], i) for i in range(c.num_layers))
    if not pack:
        return LayerPieces(layers, expert_views())
    # Packed in this order, each judged against the memory left by the ones before.
    experts = _packed_experts(model) or expert_views()
    lm_head = cpu_moe.packed_lm_head(c, model.lm_head[...])
    return LayerPieces(layers, experts, _packed_attention(model), lm_head)


def _packed_experts(model: Mixtral) -> tuple[cpu_moe.PackedExperts, ...] | None:
    """Every layer's experts packed for `cpu_moe`'s kernel where it applies, else None."""
    experts = model.layers.moe.experts
    if not isinstance(experts.w1, nnx.Param):  # quantized
        return None
    weights = experts.w1[...], experts.w2[...], experts.w3[...]
    return cpu_moe.packed_experts(model.config, *weights)


def _packed_attention(model: Mixtral) -> tuple[cpu_moe.PackedAttention, ...] | None:
    """Every layer's attention projections packed for `cpu_moe.dense`, else None."""
    attention = model.layers.attention
    projections = [getattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not all(isinstance(p, nnx.Param) for p in projections):  # quantized
        return None
    return cpu_moe.packed_attention(model.config, *(p[...] for p in projections))


def _host_view(a: jax.Array) -> np.ndarray | None:
    """The array's memory as numpy, when it is one CPU buffer numpy reads in place."""
    devices = a.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    host = np.asarray(a)
    return host if host.ctypes.data == a.unsafe_buffer_pointer() else None


def with_config(model: Mixtral, config: ModelConfig, seed: int = 0) -> Mixtral:
    """`model`'s parameters in a model built for `config`: e.g. other execution
    settings (dtype, remat, capacity factor) or added LoRA adapters. Parameters
    the new config adds are initialised from `seed`; the others are shared, not
    copied, and no other parameter is ever allocated."""

    def build():
        return Mixtral(config, rngs=nnx.Rngs(seed))

    rebuilt = nnx.eval_shape(build)
    old = nnx.state(model, nnx.Param)
    new = nnx.state(rebuilt, nnx.Param)
    old_paths = {keys for keys, _ in nnx.to_flat_state(old)}
    new_paths = {keys for keys, _ in nnx.to_flat_state(new)}
    if not old_paths <= new_paths:
        raise ValueError(f"the new config drops parameters {sorted(old_paths - new_paths)[:3]}")
    if new_paths - old_paths:
        # Under jit the other initialisers are dead code: only the new parameters are made.
        added = jax.jit(lambda: nnx.state(build(), lambda path, _: tuple(path) not in old_paths))()
        nnx.update(rebuilt, added)
    nnx.update(rebuilt, old)
    return rebuilt


def _check_inputs(c: ModelConfig, tokens, positions, segment_ids) -> None:
    """Shape checks always; value checks when the tokens are concrete (not traced)."""
    if tokens.ndim != 2:
        raise ValueError(
            f"tokens must have shape [batch, length], got shape {tuple(tokens.shape)}; "
            "add a batch axis with tokens[None] for a single sequence"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    B, T = tokens.shape
    if c.max_position_embeddings < T:
        raise ValueError(
            f"sequence length {T} exceeds config.max_position_embeddings="
            f"{c.max_position_embeddings}; truncate the input or raise the limit in the config"
        )
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr is not None and tuple(arr.shape) != (B, T):
            raise ValueError(f"{name} must have the shape of tokens {(B, T)}, got {arr.shape}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        if lo < 0 or hi >= c.vocab_size:
            bad = hi if hi >= c.vocab_size else lo
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {c.vocab_size}); "
                "was the text encoded with this model's tokenizer?"
            )

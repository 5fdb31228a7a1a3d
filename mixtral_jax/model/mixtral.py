"""The Mixtral decoder: embedding, L x (attention + SMoE) blocks, final norm, LM head.

The L blocks are built once with `nnx.vmap`, so every block parameter carries
a leading `layers` axis [L, ...]. The forward pass either scans over that axis
(`scan_layers=True`, one compiled block) or unrolls a Python loop over slices
of it; both read the same parameters, so a checkpoint serves either setting.

A decode step may instead be handed the blocks' weights as buffers of their own
(`Unstacked`, a backend's: `backends.cpu`), which it then reads in a loop in place
of slicing the stacked ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model import moe, routing
from mixtral_jax.model.attention import Attention, Projections
from mixtral_jax.model.config import REMAT_POLICIES, ModelConfig
from mixtral_jax.model.kv_cache import KVCache, LayerCache, cache_slots
from mixtral_jax.model.layers import Embed, RMSNorm, param
from mixtral_jax.model.moe import SparseMoE
from mixtral_jax.parallel.rules import constrain
from mixtral_jax.params import Path, flat_params


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
        *,
        moe_impl: str,
        layer: jax.Array | None = None,
        cache: LayerCache | None = None,
        experts_fn: moe.ExpertsFn | None = None,
        projections: Projections | None = None,
        chunk: bool = False,
        lora_ids: jax.Array | None = None,
    ):
        """`moe_impl`: the SMoE dispatch; `layer` indexes expert weights still stacked
        over layers. With a cache (inference) the SMoE layer never drops a token.
        `experts_fn`, `projections`: a decode step's experts and attention projections
        as functions, in place of this block's weights (`Unstacked`). `chunk`: the
        tokens continue the cached ones (`Mixtral.forward`). `lora_ids` [B, T]: each
        token's adapter of a bank (-1: none)."""
        attn, kv = self.attention(
            self.attn_norm(x), positions, segment_ids, cache, projections, chunk, lora_ids
        )
        h = x + attn
        out = self.moe(
            self.moe_norm(h),
            token_mask,
            layer,
            impl=moe_impl,
            dropless=cache is not None,
            experts_fn=experts_fn,
            lora_ids=lora_ids,
        )
        return h + out.y, out, kv


class LayerRouting(NamedTuple):
    """What every layer's router did, stacked over layers [L, ...]."""

    stats: routing.RouterStats  # fields [L, E] or [L]
    weights: jax.Array  # [L, B, T, k]
    experts: jax.Array  # [L, B, T, k]


class Unstacked(NamedTuple):
    """The blocks' weights as buffers of their own, which a call then reads in a loop in
    place of slicing the stacked [L, ...] parameters (a backend makes them:
    `backends.cpu`, where XLA copies every slice it takes before a matmul reads it, a
    second read of every weight that costs a short prefill about as much as its work).
    With `attention` or `lm_head`, which compute rows (a token each), only calls over a
    cache can use them: a decode step, or a chunk (a speculative step's draft).

    layers[l]: layer l's parameters, but the experts' (whose stacked parameters stay in
    the module, unread); experts[l]: its experts as a function of the rows sorted by
    expert (`moe.ExpertsFn`); attention[l]: its projections as functions, or None for
    the einsums; lm_head: x [R, D] -> logits [R, V], or None for the einsum."""

    layers: tuple[nnx.State, ...]
    experts: tuple[moe.ExpertsFn, ...]
    attention: tuple[Projections, ...] | None = None
    lm_head: Callable[[jax.Array], jax.Array] | None = None

    @property
    def takes_any_length(self) -> bool:
        """Whether a call of more than one token per row (a prefill) can use these."""
        return self.attention is None and self.lm_head is None


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
        unstacked: Unstacked | None = None,
        chunk: bool = False,
        logits_at: jax.Array | None = None,
        differentiable: bool = False,
        adapter_ids: jax.Array | None = None,
    ) -> ModelOutput:
        """Logits and each layer's routing (and the updated cache).

        tokens: int [B, T]. positions: int [B, T], default 0..T-1.
        segment_ids: int [B, T]; tokens attend only within their segment and
        segment 0 marks padding, which routing statistics and expert capacity
        ignore. Default: one segment per row, no padding.
        cache: with T > 1, a prefill into an empty cache (`kv_cache.init_cache`, or
        paged: `init_paged_cache`, its rows' block tables set); with T = 1, a decode
        step that attends over the cache. Positions must stay
        below the cache length unless the cache is a sliding window's buffer.
        unstacked: the blocks in buffers of their own (`Unstacked`), read in place of
        the stacked layers: a call's over a cache, or, without kernels of rows, any call's.
        chunk: with a cache, T > 1 tokens that continue what each row's cache holds (a
        chunk of a prompt, prefilled piece by piece): they attend over the cache, their
        own keys included, instead of only among themselves.
        logits_at: int [B], one index into T per row: only there are logits computed
        (logits [B, 1, V]), as a prefill needs the last prompt token's alone; the LM
        head is a large share of a short prompt's work.
        differentiable: the call will be differentiated (a train step). The sorted
        dispatch then computes its rows with `moe.trainable_rows`, whose backward pass
        keeps its activations once (differentiated, its loops would keep a copy per
        piece); like a forward-only call, it reads the stacked experts in place.
        adapter_ids: int [B], for a model with a bank of J adapters (`config.lora_bank`):
        the adapter each row applies, -1 for none (the base model). Default: none.
        """
        c = self.config
        _check_inputs(c, tokens, positions, segment_ids)
        B, T = tokens.shape
        decode = cache is not None and T == 1
        if unstacked is not None and not (decode or chunk) and not unstacked.takes_any_length:
            raise ValueError(
                "these unstacked weights carry kernels of rows (attention, LM head), which "
                "are for calls over a cache (a decode step, a chunk); a prefill takes views "
                "without them"
            )
        if chunk and cache is None:
            raise ValueError("a chunk continues the sequences in a cache; pass the cache")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        token_mask = jnp.ones((B, T), bool) if segment_ids is None else segment_ids != 0
        ids = None  # [B, T]: each token's adapter of the bank (`layers.Adapter`)
        if adapter_ids is not None:
            if not c.lora_bank:
                raise ValueError("adapter_ids choose among a bank of adapters: this model has none")
            ids = jnp.broadcast_to(jnp.asarray(adapter_ids, jnp.int32)[:, None], (B, T))
        elif c.lora_bank:
            ids = jnp.full((B, T), -1, jnp.int32)

        x = constrain(self.embed(tokens, c.compute_dtype), ("batch", "length", "embed"))
        kv, slots, key_positions, blocks = None, None, None, None
        if cache is not None:
            slots, key_positions = cache_slots(cache, positions, token_mask)
            kv, blocks = cache.buffers, cache.blocks
        # Unstacked experts are the sorted dispatch's rows (`moe.ExpertsFn`).
        moe_impl = moe.DECODE_IMPL if decode or unstacked is not None else c.moe_impl
        inputs = (positions, segment_ids, token_mask, slots, key_positions, blocks, ids)
        x, (stats, weights, experts), kv = self._run_layers(
            x, kv, inputs, moe_impl, unstacked, chunk, differentiable
        )
        if logits_at is not None:  # [B, 1, D]: one position's hidden state per row
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.final_norm(x)
        if unstacked is not None and unstacked.lm_head is not None:
            B, T, D = x.shape
            logits = unstacked.lm_head(x.reshape(B * T, D)).reshape(B, T, -1)
        else:
            logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(x.dtype))
        logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = None if cache is None else KVCache(*kv[:2], key_positions, blocks, *kv[2:])
        return ModelOutput(logits, LayerRouting(stats, weights, experts), new_cache)

    def _run_layers(
        self,
        x,
        kv,
        inputs,
        moe_impl: str,
        unstacked: Unstacked | None,
        chunk: bool = False,
        differentiable: bool = False,
    ):
        """x through every block: scanned over the stacked parameters, or in a Python
        loop over their slices or over a backend's `unstacked` buffers (each layer's
        cache given alone when the cache is one buffer per layer)."""
        c = self.config
        # The sorted dispatch reads each expert's weights at [layer, expert] itself: slicing
        # a whole layer out first would copy every expert's weights (XLA:CPU copies a
        # dynamic slice that feeds a matmul), once more than needed. Differentiated, each
        # layer's slice still rides along, unread, to take its gradients
        # (`moe.trainable_rows`); experts with adapters or quantized ones are sliced and
        # differentiated through the loops.
        trains_in_place = differentiable and self.layers.moe.experts.trainable_in_place
        reads_in_place = moe_impl == "sorted" and (trains_in_place or not differentiable)
        keep_stacked = nnx.PathContains("experts") if reads_in_place else nnx.Not(...)
        graphdef, stacked, params = nnx.split(self.layers, keep_stacked, ...)
        own = stacked if reads_in_place and trains_in_place else None  # [L, ...] or None
        block = self._block(graphdef, stacked, moe_impl, inputs, chunk)
        per_layer_cache = kv is not None and isinstance(kv[0], tuple)
        if unstacked is not None:
            attention = unstacked.attention or (None,) * c.num_layers
            layers = [
                ((unstacked.layers[i], i, None), unstacked.experts[i], attention[i])
                for i in range(c.num_layers)
            ]
        elif c.scan_layers and not per_layer_cache:
            # The cache is carried from layer to layer, not scanned over: each layer
            # writes its keys in place, so a step never copies the whole cache.
            scanned = (params, jnp.arange(c.num_layers), own)
            (x, kv), routes = jax.lax.scan(block, (x, kv), scanned)
            return x, routes, kv
        else:
            layers = [((_layer(params, i), i, _layer(own, i)),) for i in range(c.num_layers)]
        outs, layer_kv = [], []
        for i, args in enumerate(layers):
            if per_layer_cache:
                (x, kv_i), out = block((x, tuple(a[i] for a in kv)), *args)
                layer_kv.append(kv_i)
            else:
                (x, kv), out = block((x, kv), *args)
            outs.append(out)
        if per_layer_cache:
            kv = tuple(tuple(a) for a in zip(*layer_kv, strict=True))
        return x, _stack(outs), kv

    def _block(self, graphdef, stacked, moe_impl, inputs, chunk: bool = False):
        """One block as a function of (x, kv) and (its parameters, its layer index, its
        slice of the stacked experts when they are trained in place or None), and
        optionally its experts and attention projections as functions (`Unstacked`)."""
        positions, segment_ids, token_mask, slots, key_positions, blocks, ids = inputs

        def block(carry, scanned, experts_fn=None, projections=None):
            x, kv = carry  # kv: every layer's [L, ...] buffers, or this layer's own
            # (KVCache.buffers: keys, values, an int8 cache's scales)
            layer_params, layer, own = scanned  # own: the layer's slice of `stacked`
            module = nnx.merge(graphdef, stacked, layer_params)
            if own is not None:
                own_experts = nnx.merge(graphdef, own, layer_params).moe.experts
                experts_fn = module.moe.experts.trainable_rows_fn(own_experts, layer)
            cache = None
            if kv is not None:
                cache = LayerCache(*kv[:2], layer, slots, key_positions, blocks, *kv[2:])
            x, out, kv = module(
                x,
                positions,
                segment_ids,
                token_mask,
                moe_impl=moe_impl,
                layer=layer if jax.tree.leaves(stacked) else None,
                cache=cache,
                experts_fn=experts_fn,
                projections=projections,
                chunk=chunk,
                lora_ids=ids,
            )
            return (x, kv), (out.stats, out.weights, out.experts)

        policy = self.config.remat_policy
        return block if policy == "none" else jax.checkpoint(block, policy=REMAT_POLICIES[policy])


def _layer(tree, i: int):
    """Layer i's slice of every [L, ...] array in `tree`."""
    return jax.tree.map(lambda a: a[i], tree)


def _stack(outs: list) -> tuple:
    """Per-layer outputs -> the same structure stacked over layers [L, ...]."""
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def param_structs(config: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
    """Shape and dtype of every parameter of a model of `config`, by path, without
    allocating the model."""
    abstract = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    return {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in flat_params(abstract).items()}


def param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shapes of every parameter of a model of `config`, by path, without allocating it."""
    return {path: tuple(s.shape) for path, s in param_structs(config).items()}


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

"""Grouped-query attention with RoPE, causal and optional sliding-window masks.

N query heads share K key/value heads in groups of G = N / K: query head
n = k * G + g reads KV head k, as the reference's `repeat_kv` does.

With a KV cache (`kv_cache.LayerCache`), a call of T > 1 tokens is a prefill: it
attends within itself, as without a cache, and writes its keys and values into
the cache slots it is given. A call of one token per row is a decode step: it
writes its key and value, then attends over the cache, where each slot's key
position (-1: empty) decides what it may see. A `chunk` of a prompt whose earlier
tokens are already cached (chunked prefill, a serving engine's) does the same with
T tokens. With a sliding window the cache is a rolling buffer of W slots (position
p lives in slot p mod W; a chunk of T needs W + T - 1 of them).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model.config import ModelConfig
from mixtral_jax.model.kv_cache import (
    CACHE_AXES,
    POOL_AXES,
    LayerCache,
    dequantize,
    gather_rows,
    paged_slots,
    quantize,
)
from mixtral_jax.model.layers import apply_rope, attach_adapters, project, weight
from mixtral_jax.parallel.rules import constrain

# A large finite negative instead of -inf: a fully masked row (a padding
# query) then softmaxes to a harmless uniform row instead of NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


# Queries are processed in blocks of this many rows; a block reads only the keys
# up to its last query (and from its window's start), so the causal half of the
# score matrix is mostly never computed. At most MAX_BLOCKS blocks per call.
BLOCK = 256
MAX_BLOCKS = 8


def attention_mask(
    segment_ids: jax.Array | None,
    sliding_window: int | None,
    queries: tuple[int, int],
    keys: tuple[int, int],
) -> jax.Array:
    """Boolean mask [B or 1, 1, 1, Tq, Sk]: query t may attend to key s.

    queries/keys are [start, stop) index ranges of the sequence. Causal by index
    (key s <= query t); within `sliding_window` when set (t - s < W, the
    reference's window); within the same segment when `segment_ids` [B, T] are
    given (packed documents never see each other, padding sees only padding).
    """
    t = jnp.arange(*queries)[:, None]
    s = jnp.arange(*keys)[None, :]
    mask = s <= t
    if sliding_window is not None:
        mask &= t - s < sliding_window
    mask = mask[None, None, None]  # [1, 1, 1, Tq, Sk]
    if segment_ids is not None:
        q_seg = segment_ids[:, queries[0] : queries[1], None]
        same = q_seg == segment_ids[:, None, keys[0] : keys[1]]  # [B, Tq, Sk]
        mask = mask & same[:, None, None]
    return mask


def query_blocks(length: int, sliding_window: int | None) -> list[tuple[tuple, tuple]]:
    """(query range, key range) pairs that cover the causal (windowed) mask."""
    block = max(BLOCK, -(-length // MAX_BLOCKS))
    blocks = []
    for q0 in range(0, length, block):
        q1 = min(q0 + block, length)
        k0 = 0 if sliding_window is None else max(0, q0 - sliding_window + 1)
        blocks.append(((q0, q1), (k0, q1)))
    return blocks


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_axes: str = "BSKH"
) -> jax.Array:
    """q [B, T, K, G, H], k/v [B, S, K, H] (or in the order `kv_axes` names), mask
    broadcast to [B, K, G, T, S] -> [B, T, K, G, H]; scores and softmax in float32."""
    scores = jnp.einsum(f"BTKGH,{kv_axes}->BKGTS", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1).astype(q.dtype)
    # Probabilities on the left, contracting their minor S: XLA:CPU otherwise
    # computes V^T P with a slow batched-matmul kernel.
    out = jnp.einsum(f"BKGTS,{kv_axes}->BKGTH", probs, v)
    return out.transpose(0, 3, 1, 2, 4)


def cached_attention_mask(
    query_positions: jax.Array, key_positions: jax.Array, sliding_window: int | None
) -> jax.Array:
    """[B, 1, 1, T, S]: a query at position t sees a stored key at s <= t (t - s < W)."""
    t = query_positions[:, :, None]  # [B, T, 1]
    s = key_positions[:, None, :]  # [B, 1, S]
    mask = (s >= 0) & (s <= t)
    if sliding_window is not None:
        mask &= t - s < sliding_window
    return mask[:, None, None]


# The projections' einsums (also what their LoRA adapters are derived from).
SPECS = {
    "q_proj": "BTD,DNH->BTNH",
    "k_proj": "BSD,DKH->BSKH",
    "v_proj": "BSD,DKH->BSKH",
    "o_proj": "BTNH,NHD->BTD",
}
AXES = {
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
}


class Projections(Protocol):
    """One layer's projections and attention as functions of a decode step's rows, used
    in place of the einsums (a backend's: `backends.cpu` computes them with its
    kernels)."""

    def qkv(self, x: jax.Array, ids: jax.Array | None = None) -> jax.Array:
        """x [B, D] -> q, k and v side by side [B, (N + 2K) H], their LoRA adapters'
        terms included (`ids` [B]: each row's adapter of a bank, -1 for none)."""

    def attend(
        self,
        q: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        blocks: jax.Array,
        query_positions: jax.Array,
        key_positions: jax.Array,
        sliding_window: int | None,
        key_scales: jax.Array | None = None,
        value_scales: jax.Array | None = None,
    ) -> jax.Array:
        """q [B, K, T G, H] (scaled) over the cache's keys and values, blocks
        [N, K, bs, H] that each row's table [B, M] lists in order of its S = M bs slots
        (contiguous rows: N = B, bs = S, row b's table [b]), those at key positions
        [B, S] the row's query t at query_positions [B, T] sees (as
        `cached_attention_mask`) with its heads [t G, (t + 1) G) -> [B, K, T G, H]. An
        int8 cache's keys and values come with their scales [N, K, bs]."""

    def o(self, x: jax.Array, ids: jax.Array | None = None) -> jax.Array:
        """The attention's output [B, N H] -> [B, D], its adapter's term included."""


class Attention(nnx.Module):
    """Multi-head attention with N query heads and K key/value heads."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = weight(rngs, c, "q_proj", (D, N, H), SPECS, AXES)
        self.k_proj = weight(rngs, c, "k_proj", (D, K, H), SPECS, AXES)
        self.v_proj = weight(rngs, c, "v_proj", (D, K, H), SPECS, AXES)
        self.o_proj = weight(rngs, c, "o_proj", (N, H, D), SPECS, AXES)
        attach_adapters(self, c, SPECS, AXES, rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        cache: LayerCache | None = None,
        projections: Projections | None = None,
        chunk: bool = False,
        lora_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [B, T, D], positions: [B, T], segment_ids: [B, T] or None -> [B, T, D],
        and the updated cache keys and values (shaped as given) when a cache is given.
        `projections`: this layer's projections as functions of rows, which a call
        that attends over the cache (a decode step, or a chunk: each token then a row of
        its own) uses in place of the einsums. `chunk`: the T tokens continue what the
        cache holds and attend over it, as a decode step does. `lora_ids` [B, T]: each
        token's adapter of a bank (-1: none; `layers.Adapter`)."""
        c = self.config
        dtype = x.dtype
        B, T, D = x.shape
        N, K, G, H = c.num_heads, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        if projections is not None and (cache is None or not (T == 1 or chunk)):
            raise ValueError("projections replace the einsums of calls that attend over a cache")

        if projections is None:
            q = project(SPECS["q_proj"], x, self.q_proj, self.q_proj_lora, lora_ids)
            k = project(SPECS["k_proj"], x, self.k_proj, self.k_proj_lora, lora_ids)
            v = project(SPECS["v_proj"], x, self.v_proj, self.v_proj_lora, lora_ids)
        else:  # q, k and v in one call: [B T, D] -> [B T, (N + 2K) H]
            rows_ids = None if lora_ids is None else lora_ids.reshape(B * T)
            qkv = projections.qkv(x.reshape(B * T, D), rows_ids)
            q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
            q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        q = constrain(apply_rope(q, positions, c.rope_theta), ("batch", "length", "heads", None))
        k = constrain(apply_rope(k, positions, c.rope_theta), ("batch", "length", "kv_heads", None))
        v = constrain(v, ("batch", "length", "kv_heads", None))
        q = q.reshape(B, T, K, G, H) * jnp.asarray(H**-0.5, dtype)

        kv = None
        if cache is not None:
            # Every axis but H indexed (B, K, T), H the one window: a slice among the
            # indices made the TPU compiler copy the whole cache to scatter into it.
            rows, heads = jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None]
            own = cache.k.ndim == 4  # the layer's own buffers, not every layer's
            if cache.blocks is None:
                at = (rows, heads, cache.slots[:, None, :])
            else:  # a paged cache: [N, K, bs, H] blocks, each row's through its table
                pool, bs = cache.k.shape[-4], cache.k.shape[-2]
                page, offset = paged_slots(cache.blocks, cache.slots, bs, pool)
                at = (page[:, None, :], heads, offset[:, None, :])
            at = at if own else (cache.layer, *at)
            new_keys, new_values = (a.swapaxes(1, 2) for a in (k, v))  # [B, K, T, H]
            quantized = cache.k_scale is not None  # int8, a scale per key (value) and head
            if quantized:
                (new_keys, key_scales), (new_values, value_scales) = map(
                    quantize, (new_keys, new_values)
                )
            k_all = cache.k.at[at].set(new_keys.astype(cache.k.dtype), mode="drop")
            v_all = cache.v.at[at].set(new_values.astype(cache.v.dtype), mode="drop")
            axes = CACHE_AXES.k if cache.blocks is None else POOL_AXES
            axes = axes[1:] if own else axes
            kv = constrain(k_all, axes), constrain(v_all, axes)
            if quantized:
                kv += tuple(
                    constrain(a.at[at].set(scales, mode="drop"), axes[:-1])
                    for a, scales in ((cache.k_scale, key_scales), (cache.v_scale, value_scales))
                )
            if T == 1 or chunk:  # decode, or a prompt's chunk: attend over the cache
                keys, values, *scales = (a if own else a[cache.layer] for a in kv)
                if projections is not None:  # each query reads only the keys it sees
                    blocks = cache.blocks
                    if blocks is None:  # row b's slots are block b
                        blocks = jnp.arange(B, dtype=jnp.int32)[:, None]
                    # A row's T queries side by side as heads of its kv heads: each key
                    # (this call's too, written above) is read once for all of them.
                    out = projections.attend(
                        q.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H), keys, values,
                        blocks, positions, cache.key_positions, c.sliding_window, *scales,
                    )  # fmt: skip
                    out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
                    out = projections.o(out.reshape(B * T, N * H).astype(dtype), rows_ids)
                    return constrain(out.reshape(B, T, D), ("batch", "length", "embed")), kv
                if quantized:
                    keys, values = (
                        dequantize(a, s, dtype) for a, s in zip((keys, values), scales, strict=True)
                    )
                keys, values = keys.astype(dtype), values.astype(dtype)
                if cache.blocks is not None:  # [B, K, S, H]: each row's blocks in order
                    keys, values = (gather_rows(a, cache.blocks) for a in (keys, values))
                mask = cached_attention_mask(positions, cache.key_positions, c.sliding_window)
                out = _attend(q, keys, values, mask, kv_axes="BKSH")
                return self._project(out.reshape(B, T, K * G, H), lora_ids), kv

        outs = []
        for (q0, q1), (k0, k1) in query_blocks(T, c.sliding_window):
            mask = attention_mask(segment_ids, c.sliding_window, (q0, q1), (k0, k1))
            outs.append(_attend(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], mask))
        out = jnp.concatenate(outs, axis=1).reshape(B, T, K * G, H)
        return self._project(out, lora_ids), kv

    def _project(self, out: jax.Array, lora_ids: jax.Array | None) -> jax.Array:
        """[B, T, N, H] -> [B, T, D]."""
        out = project(SPECS["o_proj"], out, self.o_proj, self.o_proj_lora, lora_ids)
        return constrain(out, ("batch", "length", "embed"))

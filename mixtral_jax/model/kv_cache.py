"""The KV cache as the model reads and writes it: keys, values and each slot's position.

A cache holds every layer's keys and values, heads before slots, and the key
position each slot holds (-1: empty). A prefill writes a prompt's keys into it; a
decode step writes one key per row, then attends over the slots. With a sliding
window the cache is a rolling buffer of W slots: position p lives in slot p mod W.

The keys and values of all layers are one [L, B, K, S, H] array each, or (a
backend's choice, `backends.cpu`) a tuple of L [B, K, S, H] arrays, one buffer per
layer; the model reads and writes either.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mixtral_jax.model.config import ModelConfig


class KVCache(NamedTuple):
    """Every layer's keys and values [L, B, K, S, H] (or L buffers [B, K, S, H]) and each
    slot's key position [B, S] (-1: empty). S is the maximum length, or the sliding
    window if smaller (a rolling buffer). Build it with `init_cache`."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array

    @property
    def length(self) -> int:
        return self.positions.shape[1]


# Logical axes of the cache. Heads before slots: a decode step's attention is then a
# matmul per (row, head) over the stored [S, H] keys, which XLA:CPU reads in place;
# with [B, S, K, H] it transposed every layer's keys on every step.
CACHE_AXES = KVCache(
    k=("layers", "batch", "kv_heads", "length", None),
    v=("layers", "batch", "kv_heads", "length", None),
    positions=("batch", "length"),
)


class LayerCache(NamedTuple):
    """The KV cache as one layer's call sees it: every layer's buffers, written in
    place at `layer`, or this layer's own (a decode step then moves only its own keys,
    never the whole cache)."""

    k: jax.Array  # [L, B, K, S, H], or [B, K, S, H]: this layer's buffer of its own
    v: jax.Array  # as k
    layer: int | jax.Array  # which layer's slots this call writes and reads (of [L, ...])
    slots: jax.Array  # [B, T] int32: where this call's tokens go; S = not stored
    key_positions: jax.Array  # [B, S] int32: the position of each slot's key after
    # this call's writes, -1 where empty


def init_cache(
    config: ModelConfig,
    batch_size: int,
    max_length: int,
    dtype: jnp.dtype | None = None,
    chunk: int = 1,
) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_length` tokens. With a
    sliding window, a rolling buffer that also holds the window of the first of `chunk`
    tokens written at once and attending over it (chunked prefill)."""
    c = config
    S = max_length if c.sliding_window is None else min(max_length, c.sliding_window + chunk - 1)
    shape = (c.num_layers, batch_size, c.num_kv_heads, S, c.head_dim)
    dtype = dtype or c.compute_dtype
    empty = jnp.full((batch_size, S), -1, jnp.int32)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), empty)


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

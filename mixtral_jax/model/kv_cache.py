"""The KV cache as the model reads and writes it: keys, values and each slot's position.

A cache holds every layer's keys and values, heads before slots, and the key
position each slot holds (-1: empty). A prefill writes a prompt's keys into it; a
decode step writes one key per row, then attends over the slots. With a sliding
window the cache is a rolling buffer of W slots: position p lives in slot p mod W.

The keys and values of all layers are one [L, B, K, S, H] array each, or (a
backend's choice, `backends.cpu`) a tuple of L [B, K, S, H] arrays, one buffer per
layer; the model reads and writes either.

Paged (`init_paged_cache`, a serving engine's): the keys and values are a pool of N
blocks of `block_size` slots, [L, N, K, block_size, H] (or L [N, K, block_size, H]),
and each row's block table [B, M] says which block holds its slots
[m * block_size, (m + 1) * block_size): row b's slot s is slot s mod block_size of
block blocks[b, s // block_size]. Rows see their S = M * block_size slots as above
(positions, the rolling buffer), so a row holds memory only for the blocks it was
given, and rows may share blocks. A table entry of N (or more) is no block: nothing is
written there, and the row's positions must say its slots are empty.
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
    blocks: jax.Array | None = None  # [B, M] int32: a paged cache's block table
    # An int8 cache's scales, one per stored key (value) and head: k and v without H.
    k_scale: jax.Array | tuple[jax.Array, ...] | None = None
    v_scale: jax.Array | tuple[jax.Array, ...] | None = None

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def buffers(self) -> tuple:
        """What each layer reads and writes: (k, v), and an int8 cache's scales."""
        return (self.k, self.v) + (() if self.k_scale is None else (self.k_scale, self.v_scale))


# Logical axes of the cache. Heads before slots: a decode step's attention is then a
# matmul per (row, head) over the stored [S, H] keys, which XLA:CPU reads in place;
# with [B, S, K, H] it transposed every layer's keys on every step.
CACHE_AXES = KVCache(
    k=("layers", "batch", "kv_heads", "length", None),
    v=("layers", "batch", "kv_heads", "length", None),
    positions=("batch", "length"),
    blocks=("batch", None),
    k_scale=("layers", "batch", "kv_heads", "length"),
    v_scale=("layers", "batch", "kv_heads", "length"),
)
# A paged cache's pool [L, N, K, bs, H]: split by KV head only, every device holding
# all its blocks, as any row may read any block.
POOL_AXES = ("layers", None, "kv_heads", None, None)


def cache_axes(cache: KVCache) -> KVCache:
    """The logical axes of `cache`'s arrays (None where it has none)."""
    axes = CACHE_AXES
    if cache.blocks is not None:
        scales = POOL_AXES[:-1]
        axes = axes._replace(k=POOL_AXES, v=POOL_AXES, k_scale=scales, v_scale=scales)
    return KVCache(*(a if x is not None else None for a, x in zip(axes, cache, strict=True)))


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
    blocks: jax.Array | None = None  # [B, M] int32: a paged cache's block table
    k_scale: jax.Array | None = None  # an int8 cache's scales, shaped as k without H
    v_scale: jax.Array | None = None


def row_length(config: ModelConfig, max_length: int, chunk: int = 1) -> int:
    """The slots a row of the cache needs: `max_length`, or with a sliding window a
    rolling buffer that also holds the window of the first of `chunk` tokens written at
    once and attending over it (chunked prefill)."""
    W = config.sliding_window
    return max_length if W is None else min(max_length, W + chunk - 1)


def init_cache(
    config: ModelConfig,
    batch_size: int,
    max_length: int,
    dtype: jnp.dtype | None = None,
    chunk: int = 1,
) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_length` tokens (a
    rolling buffer with a sliding window: `row_length`). `dtype` int8 stores keys and
    values in 8 bits with a float32 scale each (`quantize`)."""
    c = config
    S = row_length(c, max_length, chunk)
    shape = (c.num_layers, batch_size, c.num_kv_heads, S, c.head_dim)
    empty = jnp.full((batch_size, S), -1, jnp.int32)
    return _buffers(shape, dtype or c.compute_dtype, empty)


def _buffers(shape: tuple, dtype, positions: jax.Array, blocks: jax.Array | None = None):
    """Zeroed keys and values of `shape`, with scales if `dtype` is int8."""
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    if jnp.dtype(dtype) != jnp.int8:
        return KVCache(k, v, positions, blocks)
    scales = jnp.zeros(shape[:-1], jnp.float32)
    return KVCache(k, v, positions, blocks, scales, scales)


def blocks_per_row(config: ModelConfig, max_length: int, block_size: int, chunk: int = 1) -> int:
    """M: the blocks that hold one row's `row_length` slots."""
    return -(-row_length(config, max_length, chunk) // block_size)


def init_paged_cache(
    config: ModelConfig,
    batch_size: int,
    max_length: int,
    num_blocks: int,
    block_size: int,
    dtype: jnp.dtype | None = None,
    chunk: int = 1,
) -> KVCache:
    """An empty paged cache: a pool of `num_blocks` blocks of `block_size` slots, and
    `batch_size` rows of M = `blocks_per_row` blocks, their tables all unassigned (N)."""
    c = config
    M = blocks_per_row(c, max_length, block_size, chunk)
    shape = (c.num_layers, num_blocks, c.num_kv_heads, block_size, c.head_dim)
    empty = jnp.full((batch_size, M * block_size), -1, jnp.int32)
    table = jnp.full((batch_size, M), num_blocks, jnp.int32)
    return _buffers(shape, dtype or c.compute_dtype, empty, table)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys or values [..., H] as int8 [..., H] and a float32 scale per vector [...]:
    symmetric, the largest magnitude at 127."""
    scale = jnp.max(jnp.abs(x), axis=-1).astype(jnp.float32) / 127
    q = jnp.round(x.astype(jnp.float32) / jnp.where(scale == 0, 1, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def paged_slots(
    blocks: jax.Array, slots: jax.Array, block_size: int, num_blocks: int
) -> tuple[jax.Array, jax.Array]:
    """Where slots [B, T] of rows with block tables [B, M] live in a pool of
    `num_blocks` blocks: (block [B, T], slot within it [B, T]). A slot past the row's
    end (not stored) or in no block gets block `num_blocks`, where writes drop."""
    M = blocks.shape[1]
    page = jnp.take_along_axis(blocks, jnp.minimum(slots // block_size, M - 1), axis=1)
    page = jnp.where((slots < M * block_size) & (page >= 0), page, num_blocks)
    return jnp.minimum(page, num_blocks), slots % block_size


def gather_rows(pool: jax.Array, blocks: jax.Array) -> jax.Array:
    """A layer's pool [N, K, bs, H] read through block tables [B, M] -> each row's
    slots [B, K, M * bs, H]. An entry past the pool reads its last block (its slots
    are empty by their positions, so never attended)."""
    x = jnp.take(pool, blocks, axis=0, mode="clip")  # [B, M, K, bs, H]
    B, M, K, bs, H = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(B, K, M * bs, H)


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

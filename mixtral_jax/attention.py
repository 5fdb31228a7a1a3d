"""Grouped-query attention with RoPE, causal and optional sliding-window masks.

N query heads share K key/value heads in groups of G = N / K: query head
n = k * G + g reads KV head k, as the reference's `repeat_kv` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import apply_rope, param

# A large finite negative instead of -inf: a fully masked row (a padding
# query) then softmaxes to a harmless uniform row instead of NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    segment_ids: jax.Array | None, length: int, sliding_window: int | None
) -> jax.Array:
    """Boolean mask [B or 1, 1, 1, T, S]: query t may attend to key s.

    Causal by index (key s <= query t); within `sliding_window` when set
    (t - s < W, the reference's window); within the same segment when
    `segment_ids` [B, T] are given (packed documents never see each other).
    """
    t = jnp.arange(length)[:, None]
    s = jnp.arange(length)[None, :]
    mask = s <= t
    if sliding_window is not None:
        mask &= t - s < sliding_window
    mask = mask[None, None, None]  # [1, 1, 1, T, S]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
        mask = mask & same[:, None, None]
    return mask


class Attention(nnx.Module):
    """Multi-head attention with N query heads and K key/value heads."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = nnx.initializers.normal(c.initializer_range)
        dt = c.weight_dtype
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), dt, init)
        self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dt, init)
        self.v_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dt, init)
        self.o_proj = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), dt, init)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, T, D], positions: [B, T], mask: from `attention_mask` -> [B, T, D]."""
        c = self.config
        dtype = x.dtype
        B, T, _ = x.shape
        K, G, H = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim

        q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dtype))
        k = jnp.einsum("BSD,DKH->BSKH", x, self.k_proj[...].astype(dtype))
        v = jnp.einsum("BSD,DKH->BSKH", x, self.v_proj[...].astype(dtype))
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k, positions, c.rope_theta)

        q = q.reshape(B, T, K, G, H) * jnp.asarray(H**-0.5, dtype)
        scores = jnp.einsum(
            "BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32
        )  # [B, K, G, T, S], float32
        scores = jnp.where(mask, scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, K * G, H)
        return jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...].astype(dtype))

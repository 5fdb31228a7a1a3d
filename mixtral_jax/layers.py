"""Small building blocks: parameters with logical axes, RMSNorm, embeddings, RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: jnp.dtype,
    init: nnx.Initializer,
) -> nnx.Param:
    """A parameter whose `out_sharding` metadata holds *logical* axis names.

    Modules never mention devices: `mixtral_jax.sharding` maps these names to
    mesh axes by rules from the config, so placement is metadata only here.
    """
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in float32 like the reference."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), param_dtype, nnx.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # The reference casts back before scaling; bf16 results depend on that order.
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(
        self, vocab_size: int, dim: int, *, std: float, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.embedding = param(
            rngs, (vocab_size, dim), ("vocab", "embed"), param_dtype, nnx.initializers.normal(std)
        )

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)  # [B, T, D]


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the Hub's "rotate half" layout.

    x: [B, T, N, H]; positions: [B, T] integer positions (explicit, so that
    packed, padded and cached sequences rotate by their true position).
    Dimension i of the first half pairs with dimension i + H/2.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)

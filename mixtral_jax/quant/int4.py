"""int4 as stored on disk: two values per byte along the last axis.

numpy and Orbax have no 4-bit type, so a checkpoint holds int4 weights packed in
uint8 (`checkpoints.store` packs on save and unpacks on restore, on the device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pack_int4(values: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """int4 [..., 2n] -> uint8 [..., n]: element 2i in the low nibble, 2i + 1 in the
    high. Device arrays are packed where they lie."""
    xp = jnp if isinstance(values, jax.Array) else np
    v = values.astype(xp.int8).astype(xp.uint8)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_int4`, on the device: uint8 [..., n] -> int4 [..., 2n]."""
    low = ((packed & 0x0F) ^ 8).astype(jnp.int8) - 8  # sign-extend a nibble
    high = ((packed >> 4) ^ 8).astype(jnp.int8) - 8
    both = jnp.stack([low, high], axis=-1)  # [..., n, 2]
    return both.reshape(*packed.shape[:-1], 2 * packed.shape[-1]).astype(jnp.int4)

"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions of [B, V] logits and a PRNG key; the parameters are static, so
each setting compiles once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k / top_p None means no cut."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1
        ):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def allowed(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """[B, V] bool: the tokens that top-k and top-p leave to draw from.

    top-k keeps the k most likely (ties at the k-th value are all kept); top-p
    keeps the smallest set of most likely tokens whose probability reaches p
    (always at least the most likely one).
    """
    keep = jnp.ones(logits.shape, bool)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]  # [B, 1]
        keep &= logits >= kth
    if sampling.top_p is not None and sampling.top_p < 1:
        probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
        order = jnp.argsort(-probs, axis=-1)
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of better tokens
        sorted_keep = before < sampling.top_p
        keep &= jnp.zeros_like(keep).at[jnp.arange(keep.shape[0])[:, None], order].set(sorted_keep)
    return keep


def argmax(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] int32, as `jnp.argmax` (the first maximum; a NaN counts as one).

    Two plain reductions: XLA:CPU runs argmax's (value, index) reduction several times
    slower than a max and a min over the vocabulary (docs/cpu-decode.md)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] -> next tokens [B] int32."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return argmax(logits)
    logits = logits / sampling.temperature
    logits = jnp.where(allowed(logits, sampling), logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

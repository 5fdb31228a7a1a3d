"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions of [B, V] logits. `sample` takes one PRNG key and static parameters
(each setting compiles once), as `generate` uses; `sample_rows` takes each row's
own parameters and seed as arrays, as a serving batch of unrelated requests needs.
`logprobs` gives what OpenAI's API reports of a token.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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
    B = logits.shape[0]
    top_k = jnp.full((B,), sampling.top_k or 0, jnp.int32)
    top_p = jnp.full((B,), 1.0 if sampling.top_p is None else sampling.top_p, jnp.float32)
    return allowed_rows(logits, top_k, top_p)


def allowed_rows(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`allowed` with each row's own cut: top_k [B] (0: none), top_p [B] (1: none)."""
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)  # [B, V] most likely first
    ordered = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]
    keep = logits >= kth
    # top-p over what top-k kept, in the same order (softmax keeps it).
    probs = jax.nn.softmax(jnp.where(ordered >= kth, ordered, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of better tokens
    sorted_keep = (before < top_p[:, None]) | (top_p[:, None] >= 1)
    rows = jnp.arange(logits.shape[0])[:, None]
    return keep & jnp.zeros_like(keep).at[rows, order].set(sorted_keep)


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


class RowSampling(NamedTuple):
    """Each row's own sampling, as arrays [B]: a serving batch mixes requests.

    A row draws with the key `fold_in(key(seed), step)`, `step` being how many tokens
    its request has drawn, so a seeded request gets the same tokens whatever shares
    its batch. `allowed` [B, ceil(V / 32)] is a bitmask of the tokens a row may draw
    (`constrain`; a grammar's, `grammar.fill_masks`); None or all ones: any. A verify
    step's is [B, T, ceil(V / 32)], a mask for each position of a row's draft."""

    temperature: jax.Array  # float32; 0: greedy
    top_k: jax.Array  # int32; 0: no cut
    top_p: jax.Array  # float32; 1: no cut
    seed: jax.Array  # uint32
    step: jax.Array  # int32
    allowed: jax.Array | None = None  # int32 bits; -1 (all ones): every token


def constrain(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """logits [B, ..., V] with the tokens not set in `allowed` [B, W] (bit t % 32 of
    word t // 32), or one mask a position [B, T, W] for logits [B, T, V], at -inf. A
    batch without a constrained row is left as it is."""
    if allowed is None:
        return logits
    V = logits.shape[-1]

    def mask(logits):
        bits = (allowed[..., None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [.., W, 32]
        ok = bits.reshape(allowed.shape[:-1] + (-1,))[..., :V].astype(bool)
        ok = ok.reshape(allowed.shape[:-1] + (1,) * (logits.ndim - allowed.ndim) + (V,))
        return jnp.where(ok, logits, -jnp.inf)

    return jax.lax.cond(jnp.any(allowed != -1), mask, lambda logits: logits, logits)


def sample_rows(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """logits [B, V] -> next tokens [B] int32, each row by its own `RowSampling`."""
    logits = constrain(logits.astype(jnp.float32), rows.allowed)
    greedy = argmax(logits)
    drawing = rows.temperature > 0

    def draw(logits):
        scaled = logits / jnp.where(drawing, rows.temperature, 1.0)[:, None]

        def cut(scaled):
            return jnp.where(allowed_rows(scaled, rows.top_k, rows.top_p), scaled, -jnp.inf)

        # Cuts sort the vocabulary: only when a drawing row asks for one.
        cutting = jnp.any(drawing & ((rows.top_k > 0) | (rows.top_p < 1)))
        scaled = jax.lax.cond(cutting, cut, lambda scaled: scaled, scaled)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(rows.seed, rows.step)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(drawing, drawn, greedy)

    # An all-greedy batch (the common case) never sorts the vocabulary.
    return jax.lax.cond(jnp.any(drawing), draw, lambda _: greedy, logits)


class Logprobs(NamedTuple):
    """Log-probabilities under the model's distribution (before temperature and cuts),
    as OpenAI's API reports them."""

    chosen: jax.Array  # [...] of the token given
    top_ids: jax.Array  # [..., n] the n most likely tokens, best first
    top: jax.Array  # [..., n] their log-probabilities


def logprobs(logits: jax.Array, tokens: jax.Array, n: int) -> Logprobs:
    """logits [..., V], tokens [...] -> the tokens' log-probabilities and the top `n`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    top, top_ids = jax.lax.top_k(log_probs, n)
    return Logprobs(chosen, top_ids.astype(jnp.int32), top)

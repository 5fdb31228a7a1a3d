"""Speculative decoding without a second model: prompt-lookup (n-gram) drafts, verified
in one forward.

    drafter = Ngram.parse("ngram:4")        # up to 4 drafted tokens a step
    draft = drafter.propose(prompt + generated, limit)   # host side, plain Python
    tokens, count = accept(logits, drafts, lengths, rows)  # in the verify call

A request's next tokens often repeat its context (code, quotes, edits, JSON keys):
the drafter finds the context's newest earlier occurrence of its last n tokens and
proposes the tokens that followed it. The engine feeds the last token and the draft
[d1..dk] in one call (k + 1 positions, each attending over the cache and those before
it) and `accept` keeps the longest run the model agrees with, plus one token of its
own: a step gives 1 to k + 1 tokens for about the cost of one. A request under a
grammar drafts what the grammar forces next instead (`grammar.Constraint.draft`: the
keys, quotes and brackets a schema fixes), each position checked under the grammar's
mask there: jump-forward decoding that keeps the model's own tokens.

Acceptance is exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023) with a
draft that is one token for sure (q = 1 on it): draft d at position j is kept with
probability p_j(d), p_j being the distribution the row samples from (temperature,
top-k, top-p applied); the first rejected position draws from p_j with d removed; if
every draft is kept, the last position draws from p_k. Each emitted token is thus
distributed as plain sampling would give it. A greedy row's p_j is one-hot at the
argmax: it keeps drafts equal to the argmax and emits the argmax, the tokens plain
greedy decoding gives.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.inference.sampling import RowSampling, allowed_rows, argmax, constrain

# The longest drafts a step may verify: its call computes draft + 1 positions a row.
MAX_DRAFT = 16


@dataclasses.dataclass(frozen=True)
class Ngram:
    """Prompt-lookup drafts of `k` tokens, matching the context's last `max_n` tokens
    down to its last `min_n` (longer matches predict better)."""

    k: int
    max_n: int = 3
    min_n: int = 2  # a lone token's match drafts poorly: the step is better spent plain

    def __post_init__(self):
        if not 1 <= self.k <= MAX_DRAFT:
            raise ValueError(f"ngram drafts 1 to {MAX_DRAFT} tokens a step, not {self.k}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"ngram needs 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")

    def widths(self) -> tuple[int, ...]:
        """The widths a verify call compiles for (`widths`)."""
        return widths(self.k)

    @classmethod
    def parse(cls, spec: str) -> Ngram:
        """'ngram:K' (K drafted tokens a step)."""
        match = re.fullmatch(r"ngram:(\d+)", spec.strip())
        if match is None:
            raise ValueError(
                f"--speculate {spec!r} is not understood; give ngram:K, e.g. ngram:4 "
                "(prompt-lookup drafts of up to K tokens)"
            )
        return cls(int(match.group(1)))

    def propose(self, context: list[int] | np.ndarray, limit: int | None = None) -> list[int]:
        """min(k, limit) tokens copied from after the newest earlier occurrence of the
        context's last n tokens (n from max_n down to min_n), the copy running on into
        what it copies (a match p tokens back drafts the period-p loop); [] when none
        occurs."""
        k = self.k if limit is None else min(self.k, limit)
        context = np.asarray(context)
        L = len(context)
        if k < 1:
            return []
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            # Every earlier window of n tokens [i, i + n), i + n < L: something follows it.
            windows = np.lib.stride_tricks.sliding_window_view(context[: L - 1], n)
            hits = np.flatnonzero((windows == context[L - n :]).all(axis=1))
            if hits.size:
                copied = context[int(hits[-1]) + n :].tolist()
                period = len(copied)  # how far back the match is
                return [copied[j % period] for j in range(k)]
        return []


def widths(k: int) -> tuple[int, ...]:
    """The widths a verify call of drafts up to `k` tokens compiles for, tokens a row (a
    draft and the token before it): 2, 3, 5, 9, .. up to k + 1. A short draft's call
    costs less."""
    widths, w = {k + 1}, 2
    while w < k + 1:
        widths.add(w)
        w = 2 * w - 1
    return tuple(sorted(widths))


def accept(
    logits: jax.Array, drafts: jax.Array, lengths: jax.Array, rows: RowSampling
) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling of each row's draft (module docstring).

    logits [B, T, V]: position j's logits predict the token after input j (input 0 is
    the row's last token, inputs 1..T-1 its draft). drafts [B, T - 1], lengths [B]: the
    first lengths[b] are real. rows: each row's sampling, `step` the tokens it has drawn,
    `allowed` one mask a position [B, T, W] (a grammar's along its draft) or a row [B, W].
    Returns tokens [B, T] and count [B]: the row emits tokens[b, :count[b]], its kept
    drafts and one token drawn by the model (1 <= count <= lengths + 1).
    """
    B, T, V = logits.shape
    logits = constrain(logits.astype(jnp.float32), rows.allowed)
    greedy = argmax(logits.reshape(B * T, V)).reshape(B, T)
    index = jnp.arange(T - 1)
    real = index < lengths[:, None]  # [B, T - 1]
    drawing = rows.temperature > 0  # rows that sample; the others are greedy

    def draw(logits):
        scaled = logits / jnp.where(drawing, rows.temperature, 1.0)[:, None, None]
        flat = scaled.reshape(B * T, V)

        def cut(flat):
            top_k, top_p = jnp.repeat(rows.top_k, T), jnp.repeat(rows.top_p, T)
            return jnp.where(allowed_rows(flat, top_k, top_p), flat, -jnp.inf)

        # Cuts sort the vocabulary: only when a drawing row asks for one.
        cutting = jnp.any(drawing & ((rows.top_k > 0) | (rows.top_p < 1)))
        flat = jax.lax.cond(cutting, cut, lambda flat: flat, flat)
        probs = jax.nn.softmax(flat, axis=-1).reshape(B, T, V)
        # Position j uses the key plain sampling would for the row's (step + j)-th token,
        # split: one uniform to judge the draft, one draw for what replaces it.
        steps = rows.step[:, None] + jnp.arange(T)
        keys = jax.vmap(jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n)))(
            jnp.broadcast_to(rows.seed[:, None], (B, T)), steps
        )
        judge, replace = jnp.moveaxis(jax.vmap(jax.vmap(jax.random.split))(keys), 2, 0)
        u = jax.vmap(jax.vmap(jax.random.uniform))(judge)[:, :-1]  # [B, T - 1]
        p_draft = jnp.take_along_axis(probs[:, :-1], drafts[..., None], axis=-1)[..., 0]
        kept = u < p_draft
        # Where a draft is rejected, p without it; past the draft (and at the end), p.
        removed = jax.nn.one_hot(drafts, V, dtype=bool) & real[..., None]
        residual = jnp.where(jnp.pad(removed, ((0, 0), (0, 1), (0, 0))), 0.0, probs)
        # (A draft holding all the mass is never rejected but for rounding: then p.)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, probs)
        drawn = jax.vmap(jax.vmap(jax.random.categorical))(replace, jnp.log(residual))
        return kept, drawn.astype(jnp.int32)

    matches = drafts == greedy[:, :-1]
    # An all-greedy batch (the common case) never sorts the vocabulary.
    kept, drawn = jax.lax.cond(jnp.any(drawing), draw, lambda _: (matches, greedy), logits)
    kept = jnp.where(drawing[:, None], kept, matches) & real
    drawn = jnp.where(drawing[:, None], drawn, greedy)
    # The drafts kept: those before the first one rejected (or past the draft).
    run = jnp.argmin(jnp.pad(kept, ((0, 0), (0, 1))), axis=1).astype(jnp.int32)
    ends = jnp.take_along_axis(drawn, run[:, None], axis=1)  # [B, 1] the model's token
    padded = jnp.pad(drafts, ((0, 0), (0, 1)))
    tokens = jnp.where(jnp.arange(T) < run[:, None], padded, ends)
    return tokens.astype(jnp.int32), run + 1

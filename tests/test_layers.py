"""RMSNorm, RoPE and the attention mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.model.attention import attention_mask, query_blocks
from mixtral_jax.model.layers import RMSNorm, apply_rope


def test_rms_norm_against_numpy():
    norm = RMSNorm(6, eps=1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.arange(1.0, 7.0)
    x = np.random.RandomState(0).randn(2, 3, 6).astype(np.float32)
    expected = (
        np.arange(1.0, 7.0)
        * x
        / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    )
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5)


def test_rope_matches_the_rotate_half_formula():
    rng = np.random.RandomState(1)
    x = rng.randn(2, 5, 3, 8)
    positions = rng.randint(0, 1000, (2, 5))
    inv_freq = 1.0 / (1e4 ** (np.arange(0, 8, 2) / 8))
    angles = np.concatenate([positions[..., None] * inv_freq] * 2, -1)[:, :, None]
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    expected = x * np.cos(angles) + rotate_half * np.sin(angles)
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 1e4)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.RandomState(2)
    q, k = (jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32) for _ in range(2))

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), 1e6)
        rk = apply_rope(k, jnp.array([[pk]]), 1e6)
        return float(jnp.sum(rq * rk))

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_causal_and_sliding_window_mask(window):
    mask = np.asarray(attention_mask(None, window, (0, 6), (0, 6)))[0, 0, 0]
    t, s = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    expected = (s <= t) & ((t - s < window) if window else True)
    np.testing.assert_array_equal(mask, expected)
    assert mask.diagonal().all()  # every token sees itself


def test_segments_do_not_see_each_other():
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(attention_mask(segments, None, (0, 6), (0, 6)))[0, 0, 0]
    assert mask[3, 2] and not mask[2, 1] and not mask[4, 0]
    assert not mask[5, :5].any()  # padding attends to nothing real


@pytest.mark.parametrize("length,window", [(5, None), (1000, None), (1000, 300), (5000, 64)])
def test_query_blocks_cover_every_allowed_pair(length, window):
    """Every (query, key) the mask allows lies in exactly one block's ranges."""
    blocks = query_blocks(length, window)
    assert len(blocks) <= 8
    covered_queries = sorted(q for (q0, q1), _ in blocks for q in range(q0, q1))
    assert covered_queries == list(range(length))
    for (q0, q1), (k0, k1) in blocks:
        assert k1 == q1  # no key after the block's last query
        first_allowed = 0 if window is None else max(0, q0 - window + 1)
        assert k0 <= first_allowed

"""Routing math against plain NumPy and transformers' aux loss."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.model.routing import (
    dispatch_and_combine,
    expert_capacity,
    load_balancing_loss,
    route,
    router_stats,
)


def numpy_route(logits: np.ndarray, k: int):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(probs, experts, -1)
    return probs, top / top.sum(-1, keepdims=True), experts


def numpy_assign(experts: np.ndarray, mask: np.ndarray, num_experts: int, capacity: int):
    """The priority rule as a loop: choice rank first, then token position.

    Returns slot [G, S, k] (-1 where dropped or padding).
    """
    G, S, k = experts.shape
    slot = -np.ones((G, S, k), int)
    for g in range(G):
        used = np.zeros(num_experts, int)
        for r in range(k):
            for s in range(S):
                if not mask[g, s]:
                    continue
                e = experts[g, s, r]
                if used[e] < capacity:
                    slot[g, s, r] = used[e]
                used[e] += 1
    return slot


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_is_the_renormalised_top_k_softmax(k):
    logits = np.random.RandomState(k).randn(5, 7, 8).astype(np.float32) * 3
    probs, weights, experts = numpy_route(logits.astype(np.float64), k)
    r = route(jnp.asarray(logits), k)
    np.testing.assert_array_equal(r.experts, experts)
    np.testing.assert_allclose(r.weights, weights, rtol=1e-6)
    np.testing.assert_allclose(r.probs, probs, rtol=1e-5)
    np.testing.assert_allclose(np.sum(r.weights, -1), 1.0, rtol=1e-6)


def test_route_breaks_ties_towards_the_lower_expert():
    r = route(jnp.array([[0.0, 1.0, 1.0, 1.0]]), 2)
    np.testing.assert_array_equal(r.experts, [[1, 2]])


@pytest.mark.parametrize(
    "S,E,k,cf,expected",
    [
        (64, 8, 2, 1.0, 16),
        (64, 8, 2, 1.25, 20),
        (10, 8, 2, 1.0, 3),
        (64, 8, 2, 4.0, 64),
        (64, 8, 2, 100.0, 64),
        (64, 8, 2, None, 64),
        (4, 8, 1, 0.01, 1),
    ],
)
def test_expert_capacity(S, E, k, cf, expected):
    assert expert_capacity(S, E, k, cf) == expected


@pytest.mark.parametrize("capacity", [1, 3, 6, 40])
def test_dispatch_follows_the_priority_rule_of_the_numpy_loop(capacity):
    rng = np.random.RandomState(capacity)
    G, S, E, k = 3, 40, 8, 2
    # A skewed router so that some experts overflow.
    logits = rng.randn(G, S, E).astype(np.float32) + np.linspace(0, 2, E)
    mask = rng.rand(G, S) > 0.2
    routes = route(jnp.asarray(logits), k)
    d = dispatch_and_combine(routes, jnp.asarray(mask), E, capacity)

    slot = numpy_assign(np.asarray(routes.experts), mask, E, capacity)
    expected = np.zeros((G, S, E, capacity), bool)
    expected_combine = np.zeros((G, S, E, capacity), np.float32)
    for g, s, r in zip(*np.nonzero(slot >= 0), strict=False):
        e = routes.experts[g, s, r]
        expected[g, s, e, slot[g, s, r]] = True
        expected_combine[g, s, e, slot[g, s, r]] = routes.weights[g, s, r]
    np.testing.assert_array_equal(d.dispatch, expected)
    np.testing.assert_allclose(d.combine, expected_combine)
    np.testing.assert_array_equal(d.kept, slot >= 0)
    # Every slot holds at most one token.
    assert np.asarray(d.dispatch).sum(axis=1).max() <= 1


def test_router_stats_and_losses_against_numpy():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 16, 4).astype(np.float32)
    mask = rng.rand(2, 16) > 0.3
    routes = route(jnp.asarray(logits), 2)
    kept = jnp.asarray(rng.rand(2, 16, 2) > 0.1)
    stats = router_stats(jnp.asarray(logits), routes, kept, jnp.asarray(mask))

    probs, _, experts = numpy_route(logits.astype(np.float64), 2)
    m = mask.astype(float)
    fraction = np.array([((experts == e).any(-1) * m).sum() for e in range(4)]) / m.sum()
    prob = (probs * m[..., None]).sum((0, 1)) / m.sum()
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(stats.expert_fraction, fraction, rtol=1e-6)
    np.testing.assert_allclose(stats.router_prob, prob, rtol=1e-5)
    np.testing.assert_allclose(stats.z_loss, (lse**2 * m).sum() / m.sum(), rtol=1e-5)
    dropped = ((~np.asarray(kept)) * m[..., None]).sum() / (m.sum() * 2)
    np.testing.assert_allclose(stats.dropped_fraction, dropped, rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(stats.expert_fraction)), 2.0, rtol=1e-6)


def test_load_balancing_loss_is_k_at_perfect_balance():
    E, k = 8, 2
    fraction = jnp.full((E,), k / E)
    prob = jnp.full((E,), 1 / E)
    np.testing.assert_allclose(load_balancing_loss(fraction, prob), k, rtol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("with_mask", [False, True])
def test_load_balancing_loss_equals_transformers_over_stacked_layers(with_mask):
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    rng = np.random.RandomState(1)
    L, B, T, E, k = 3, 2, 11, 8, 2
    logits = rng.randn(L, B, T, E).astype(np.float32) * 2
    mask = (rng.rand(B, T) > 0.3) if with_mask else np.ones((B, T), bool)

    per_layer = [
        router_stats(
            jnp.asarray(logits[l]),
            route(jnp.asarray(logits[l]), k),
            jnp.ones((B, T, k), bool),
            jnp.asarray(mask),
        )
        for l in range(L)
    ]
    ours = load_balancing_loss(
        jnp.stack([s.expert_fraction for s in per_layer]),
        jnp.stack([s.router_prob for s in per_layer]),
    )
    ref = mixtral.load_balancing_loss_func(
        tuple(torch.as_tensor(logits[l].reshape(B * T, E)) for l in range(L)),
        E,
        k,
        torch.as_tensor(mask.astype(np.int64)) if with_mask else None,
    )
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)

"""The SMoE layer against a plain NumPy loop, and the exactness of dropless dispatch."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.model.moe import DROPLESS_LADDER, SparseMoE
from mixtral_jax.model.routing import expert_capacity, expert_load, route
from mixtral_jax.params import flat_params, set_params
from tests.test_routing import numpy_assign, numpy_route


def layer(**changes) -> SparseMoE:
    cfg = ModelConfig.from_dict(tiny.get_config()).replace(initializer_range=0.3, **changes)
    return SparseMoE(cfg, rngs=nnx.Rngs(0))


def numpy_moe(moe: SparseMoE, x: np.ndarray, mask: np.ndarray, capacity: int):
    """The layer written as loops over groups, choices and tokens, in float64."""
    c = moe.config
    B, T, D = x.shape
    S = min(c.group_size, B * T) if c.moe_impl == "dense" else B * T
    G = -(-B * T // S)
    flat_x = np.zeros((G * S, D))
    flat_x[: B * T] = x.reshape(-1, D)
    flat_mask = np.zeros(G * S, bool)
    flat_mask[: B * T] = mask.reshape(-1)
    gate, w1, w2, w3 = (
        np.asarray(a, np.float64)
        for a in (moe.gate[...], moe.experts.w1[...], moe.experts.w2[...], moe.experts.w3[...])
    )

    _, weights, experts = numpy_route((flat_x @ gate).reshape(G, S, -1), c.num_experts_per_tok)
    slot = numpy_assign(experts, flat_mask.reshape(G, S), c.num_experts, capacity)
    y = np.zeros((G, S, D))
    for g, s, r in zip(*np.nonzero(slot >= 0), strict=False):
        e, xs = experts[g, s, r], flat_x[g * S + s]
        h = xs @ w1[e]
        y[g, s] = y[g, s] + weights[g, s, r] * ((h / (1 + np.exp(-h))) * (xs @ w3[e])) @ w2[e]
    choices = flat_mask.sum() * c.num_experts_per_tok
    dropped = (choices - (slot >= 0).sum()) / choices
    return y.reshape(-1, D)[: B * T].reshape(B, T, D), experts, dropped


@pytest.mark.parametrize(
    "moe_impl,capacity_factor,group_size,batch,length",
    [
        ("dense", 0.5, 16, 2, 24),
        ("dense", 1.0, 64, 3, 20),
        ("dense", 0.25, 7, 1, 30),
        ("dense", None, 16, 2, 24),
        ("sorted", None, 16, 2, 24),
        ("sorted", None, 16, 1, 1),  # one decoded token
        ("sorted", None, 16, 3, 700),  # several full tiles per expert
    ],
)
def test_layer_equals_the_numpy_loop_including_drops(
    moe_impl, capacity_factor, group_size, batch, length
):
    moe = layer(moe_impl=moe_impl, capacity_factor=capacity_factor, group_size=group_size)
    rng = np.random.RandomState(group_size)
    x = rng.randn(batch, length, moe.config.hidden_size).astype(np.float32)
    mask = rng.rand(batch, length) > 0.15

    out = moe(jnp.asarray(x), jnp.asarray(mask))
    S = min(group_size, batch * length) if moe_impl == "dense" else batch * length
    capacity = expert_capacity(S, 8, 2, capacity_factor)
    y, experts, dropped = numpy_moe(moe, x, mask, capacity)

    np.testing.assert_allclose(np.asarray(out.y)[mask], y[mask], atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(float(out.stats.dropped_fraction), dropped, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(out.experts).reshape(-1, 2)[: batch * length],
        experts.reshape(-1, 2)[: batch * length],
    )
    if capacity_factor is not None and capacity_factor < 1:
        assert dropped > 0, "this case is meant to overflow some expert"
    if capacity_factor is None:
        assert dropped == 0


def test_dropped_choices_keep_the_residual_only():
    """With capacity 1 per expert most tokens lose all experts: their output is exactly 0."""
    moe = layer(capacity_factor=0.01, group_size=64)
    x = jnp.asarray(np.random.RandomState(0).randn(1, 64, moe.config.hidden_size), jnp.float32)
    out = moe(x, jnp.ones((1, 64), bool))
    untouched = np.all(np.asarray(out.y) == 0, axis=-1)
    assert untouched.sum() >= 64 - 8  # at most E tokens find a slot
    assert float(out.stats.dropped_fraction) > 0.8


def routed_input(moe: SparseMoE, scenario: str, shape=(2, 32)) -> jax.Array:
    """Inputs whose router logits are chosen: x = logits @ pinv(gate) (D > E, so exact).

    balanced: token t prefers experts t % E and (t + 1) % E, every expert gets
    k S / E choices; random: unbiased noise; skewed: most tokens want expert 0;
    collapsed: every token wants experts 0 and 1.
    """
    E = moe.config.num_experts
    rng = np.random.RandomState(0)
    t = np.arange(np.prod(shape))
    logits = rng.randn(t.size, E)
    if scenario == "balanced":
        logits = 0.1 * logits + 5 * np.eye(E)[t % E] + 3 * np.eye(E)[(t + 1) % E]
    elif scenario == "skewed":
        logits[:, 0] += 2.5
    elif scenario == "collapsed":
        logits[:, :2] += 20
    x = logits @ np.linalg.pinv(np.asarray(moe.gate[...], np.float64))
    return jnp.asarray(x.reshape(*shape, -1), jnp.float32)


SCENARIOS = ("balanced", "random", "skewed", "collapsed")


@pytest.mark.parametrize("moe_impl", ["dense", "sorted"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dropless_is_exact_however_the_router_balances(scenario, moe_impl):
    moe = layer(moe_impl=moe_impl, capacity_factor=None, group_size=32)
    x = routed_input(moe, scenario)
    mask = jnp.ones(x.shape[:2], bool)
    out = moe(x, mask)

    full = layer(capacity_factor=4.0, group_size=32)  # cf = E/k: C = S, nothing can drop
    nnx.update(full, nnx.state(moe))
    # Same math; only float32 summation order differs between capacities.
    np.testing.assert_allclose(out.y, full(x, mask).y, atol=1e-5, rtol=1e-5)
    assert float(out.stats.dropped_fraction) == 0.0


def test_the_ladder_scenarios_reach_every_capacity():
    """Guards the test above: its inputs must exercise the cheap and the fallback branches."""
    moe = layer(capacity_factor=None, group_size=32)
    S, E, k = 32, 8, 2
    ladder = sorted({expert_capacity(S, E, k, cf) for cf in DROPLESS_LADDER} | {S})
    picked = []
    for scenario in SCENARIOS:
        logits = jnp.einsum("BTD,DE->BTE", routed_input(moe, scenario), moe.gate[...])
        routes = route(logits.reshape(-1, S, E), k)
        fullest = int(expert_load(routes.experts, jnp.ones((2, S), bool), E).max())
        picked.append(int(np.searchsorted(ladder, fullest)))
    assert picked[0] == 0, picked  # balanced: C = k S / E
    assert picked[-1] == len(ladder) - 1, picked  # collapsed: C = S
    assert len(set(picked)) >= 3, picked


@pytest.mark.parametrize("moe_impl", ["dense", "sorted"])
def test_dropless_layer_is_the_same_under_jit(moe_impl):
    moe = layer(moe_impl=moe_impl, capacity_factor=None, group_size=16)
    x = routed_input(moe, "skewed", shape=(2, 24))
    mask = jnp.ones(x.shape[:2], bool)
    eager = moe(x, mask)
    jitted = nnx.jit(lambda m, x: m(x, mask))(moe, x)
    np.testing.assert_allclose(jitted.y, eager.y, atol=1e-6)


def test_sorted_dispatch_is_differentiable_and_matches_dense_gradients():
    dense = layer(capacity_factor=4.0, group_size=64)  # C = S: exact
    sorted_ = layer(moe_impl="sorted")
    nnx.update(sorted_, nnx.state(dense))
    x = routed_input(dense, "skewed", shape=(2, 32))
    mask = jnp.ones(x.shape[:2], bool)

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x, mask).y))

    g_dense = nnx.grad(loss, argnums=(0, 1))(dense, x)
    g_sorted = nnx.grad(loss, argnums=(0, 1))(sorted_, x)
    sorted_grads = flat_params(g_sorted[0])
    for path, a in flat_params(g_dense[0]).items():
        np.testing.assert_allclose(sorted_grads[path], a, atol=1e-5, rtol=1e-4, err_msg=str(path))
    np.testing.assert_allclose(g_sorted[1], g_dense[1], atol=1e-5, rtol=1e-4)


def test_dropless_dense_training_holds_only_the_taken_capacity_for_the_backward_pass():
    """The ladder's `switch` would keep every branch's activations for the backward pass
    (2.4x those of C = S here); rematerialised, only the inputs are kept."""
    x = jnp.ones((2, 64, 48), jnp.float32)
    mask = jnp.ones(x.shape[:2], bool)

    def temporaries(moe):
        graphdef, params = nnx.split(moe)

        def loss(params, x):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x, mask).y))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    widest = temporaries(layer(capacity_factor=4.0, group_size=128))  # C = S, one branch
    dropless = temporaries(layer(capacity_factor=None, group_size=128))
    assert dropless < 1.3 * widest, (dropless, widest)


def test_a_train_step_through_the_sorted_dispatch_keeps_its_activations_once():
    """Differentiated as a train step does (`differentiable=True`), the sorted dispatch
    needs about the memory of the exact dense one; read in place and differentiated
    through its loops, it kept a copy of the rows per piece."""
    config = ModelConfig.from_dict(tiny.get_config()).replace(group_size=256)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 128)))

    def temporaries(moe_impl, capacity_factor, differentiable):
        model = Mixtral(
            config.replace(moe_impl=moe_impl, capacity_factor=capacity_factor), rngs=nnx.Rngs(0)
        )
        graphdef, params = nnx.split(model)

        def loss(params, tokens):
            out = nnx.merge(graphdef, params).forward(tokens, differentiable=differentiable)
            return jnp.mean(out.logits)

        compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    exact_dense = temporaries("dense", 4.0, True)  # C = S
    trained = temporaries("sorted", None, True)
    in_place = temporaries("sorted", None, False)
    assert trained < 1.5 * exact_dense, (trained, exact_dense)
    assert in_place > 3 * trained, (in_place, trained)


@pytest.mark.parametrize(
    "changes", [{}, dict(scan_layers=False), dict(remat_policy="full")], ids=str
)
def test_a_train_step_through_the_sorted_dispatch_gets_the_exact_dense_gradients(changes):
    """Differentiated as a train step does, the sorted dispatch reads the stacked experts
    in place and hands each layer's gradients back through that layer's slice: every
    gradient is the exact dense dispatch's, scanned, looped or rematerialised."""
    config = ModelConfig.from_dict(tiny.get_config()).replace(initializer_range=0.3, **changes)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (2, 24)))

    def grads(moe_impl, capacity_factor):
        cfg = config.replace(moe_impl=moe_impl, capacity_factor=capacity_factor)
        model = Mixtral(cfg, rngs=nnx.Rngs(0))

        def loss(model):
            out = model.forward(tokens, differentiable=True)
            return jnp.mean(jnp.sin(out.logits)) + 0.1 * out.load_balancing_loss

        return flat_params(nnx.grad(loss)(model))

    exact = grads("dense", 4.0)  # C = S
    trained = grads("sorted", None)
    assert np.linalg.norm(exact[("layers", "moe", "experts", "w2")][1]) > 0  # both layers
    for path, g in exact.items():
        np.testing.assert_allclose(trained[path], g, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_a_train_step_through_the_sorted_dispatch_slices_no_layer_of_experts():
    """XLA:CPU copies a dynamic slice that feeds a matmul. Scanned over the layers, the
    dense dispatch slices each layer's experts [E, D, F] out of the stack (the control);
    the sorted one reads each expert at [layer, e] forward and backward, and slices none."""
    config = ModelConfig.from_dict(tiny.get_config())
    E, D, F = config.num_experts, config.hidden_size, config.intermediate_size
    a_layer = re.compile(rf"= f32\[{E},(?:{D},{F}|{F},{D})\]")  # one layer's experts
    tokens = jnp.zeros((1, 32), jnp.int32)

    def layer_slices(moe_impl, capacity_factor):
        cfg = config.replace(moe_impl=moe_impl, capacity_factor=capacity_factor)
        graphdef, params = nnx.split(Mixtral(cfg, rngs=nnx.Rngs(0)))

        def loss(params, tokens):
            out = nnx.merge(graphdef, params).forward(tokens, differentiable=True)
            return jnp.mean(out.logits)

        hlo = jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text()
        lines = hlo.splitlines()
        return [x for x in lines if a_layer.search(x) and re.search(r"dynamic[-_]slice", x)]

    assert layer_slices("dense", 1.0), "the control: the scan slices the dense dispatch's experts"
    assert layer_slices("sorted", None) == []


def test_sorted_dispatch_reads_only_the_chosen_experts():
    """One token, top-2: weights of unchosen experts are never read (NaN there stays out)."""
    moe = layer(moe_impl="sorted")
    x = routed_input(moe, "random", shape=(1, 1))
    out = moe(x, jnp.ones((1, 1), bool))
    chosen = set(np.asarray(out.experts).ravel().tolist())
    # Poison the unchosen experts: a NaN read anywhere would reach the output.
    unchosen = np.array([e not in chosen for e in range(moe.config.num_experts)])
    poison = {
        path: jnp.where(unchosen[:, None, None], jnp.nan, w)
        for path, w in flat_params(moe).items()
        if path[0] == "experts"
    }
    set_params(moe, poison)
    poisoned = moe(x, jnp.ones((1, 1), bool))
    assert np.isfinite(np.asarray(poisoned.y)).all()
    np.testing.assert_allclose(poisoned.y, out.y, atol=1e-6)

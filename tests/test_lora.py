"""LoRA: adapters start as a no-op, train alone, and merge into the same function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.backends.cpu import kernels
from mixtral_jax.backends.cpu.decode import per_layer, unstacked
from mixtral_jax.checkpoints.adapters import load_bank
from mixtral_jax.model.config import ConfigError
from mixtral_jax.model.kv_cache import init_cache
from mixtral_jax.model.layers import Adapter, LoRAParam
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.params import flat_params
from mixtral_jax.training import lora, steps

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")


@pytest.fixture(scope="module")
def base():
    # Capacity E / k: every token fits, one dispatch to compile instead of the ladder.
    config = ModelConfig.from_dict(tiny.get_config()).replace(capacity_factor=4.0)
    return Mixtral(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.RandomState(0).randint(0, 211, (2, 11)))


@nnx.jit
def logits(model: Mixtral, tokens: jax.Array) -> jax.Array:
    return model(tokens)


@nnx.jit
def prefill_then_decode(model: Mixtral, tokens: jax.Array, pieces=None) -> jax.Array:
    """Logits of the last token from a decode step after a prefill of the others; the
    step reads `pieces` (`backends.cpu.decode.unstacked`) when given."""
    cache = init_cache(model.config, tokens.shape[0], 16, jnp.float32)
    out = model.forward(tokens[:, :-1], cache=cache)
    positions = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
    cache = out.cache if pieces is None else per_layer(out.cache)
    return model.forward(tokens[:, -1:], positions, cache=cache, unstacked=pieces).logits[:, 0]


def perturbed(model: Mixtral, seed: int = 1) -> Mixtral:
    """`model` with random, non-zero B factors (a fresh adapter's B is 0)."""
    key = jax.random.key(seed)
    adapters = nnx.state(model, LoRAParam)
    keys = jax.random.split(key, len(jax.tree.leaves(adapters)))
    noisy = jax.tree.unflatten(
        jax.tree.structure(adapters),
        [
            x + 0.2 * jax.random.normal(k, x.shape)
            for x, k in zip(jax.tree.leaves(adapters), keys, strict=True)
        ],
    )
    nnx.update(model, noisy)
    return model


def test_adapter_factors_follow_the_weights_einsum():
    rngs = nnx.Rngs(0)
    kw = dict(rank=3, alpha=6.0, param_dtype=jnp.float32, rngs=rngs)
    q = Adapter("BTD,DNH->BTNH", (8, 4, 5), ("embed", "heads", "head_dim"), **kw)
    assert q.a.shape == (8, 3) and q.b.shape == (3, 4, 5)
    o = Adapter("BTNH,NHD->BTD", (4, 5, 8), ("heads", "head_dim", "embed"), **kw)
    assert o.a.shape == (4, 5, 3) and o.b.shape == (3, 8)
    w2 = Adapter("EGCF,EFD->EGCD", (6, 7, 8), ("expert", "mlp", "embed"), **kw)
    assert w2.a.shape == (6, 7, 3) and w2.b.shape == (6, 3, 8)
    assert w2.b.get_metadata()["out_sharding"] == ("expert", None, "embed")
    # The factored form equals the dense update applied as a weight.
    nnx.update(w2, {"b": jax.random.normal(jax.random.key(0), (6, 3, 8))})
    x = jax.random.normal(jax.random.key(1), (6, 2, 5, 7))
    np.testing.assert_allclose(
        w2(x), jnp.einsum("EGCF,EFD->EGCD", x, w2.delta()), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(w2.scale, 2.0)


def test_fresh_adapters_leave_the_model_unchanged_and_share_its_weights(base, tokens):
    adapted = lora.add_adapters(base, rank=4, alpha=8.0, targets=ALL)
    for path, value in flat_params(nnx.state(adapted, nnx.Not(LoRAParam))).items():
        assert value is flat_params(base)[path]  # shared, not copied
    assert adapted.config.lora_rank == 4
    assert adapted.layers.moe.experts.w1_lora.a.shape == (2, 8, 48, 4)  # [L, E, D, R]
    np.testing.assert_array_equal(logits(adapted, tokens), logits(base, tokens))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_adapters(adapted, rank=2, alpha=1.0, targets=("w1",))


@pytest.mark.parametrize("targets", [ALL, ("v_proj", "w2")])
def test_merged_model_computes_the_adapted_function(base, tokens, targets):
    adapted = perturbed(lora.add_adapters(base, rank=4, alpha=8.0, targets=targets))
    merged = lora.merge(adapted)
    assert merged.config.lora_rank == 0 and not jax.tree.leaves(nnx.state(merged, LoRAParam))
    expected = logits(adapted, tokens)
    assert float(jnp.max(jnp.abs(expected - logits(base, tokens)))) > 1e-2  # adapters act
    np.testing.assert_allclose(logits(merged, tokens), expected, atol=2e-5)
    # Prefill with a cache, then a decode step (the sorted dispatch), with the experts
    # sliced from the stacked weights and with each in its own buffer.
    for pieces in (None, unstacked(adapted)):
        decoded = prefill_then_decode(adapted, tokens, pieces)
        np.testing.assert_allclose(decoded, expected[:, -1], atol=2e-5)


def test_sorted_and_dense_dispatch_agree_with_adapters(base, tokens):
    adapted = perturbed(lora.add_adapters(base, rank=4, alpha=8.0, targets=("w1", "w2", "w3")))
    config = adapted.config.replace(moe_impl="sorted", capacity_factor=None)
    sorted_model = Mixtral(config, rngs=nnx.Rngs(0))
    nnx.update(sorted_model, nnx.state(adapted))
    np.testing.assert_allclose(logits(sorted_model, tokens), logits(adapted, tokens), atol=2e-5)


def test_lora_trains_only_the_adapters(base, tokens):
    adapted = lora.add_adapters(base, rank=4, alpha=8.0, targets=ALL)
    before = {p: np.asarray(v) for p, v in flat_params(adapted).items()}
    mesh = make_mesh(devices=jax.devices()[:1])
    train_step = steps.jit_train_step(adapted, optax.adam(1e-2), mesh, trainable=LoRAParam)
    state = train_step.init(adapted)
    assert {p[-1] for p in flat_params(state.params)} == {"a", "b"}
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses = []
    for _ in range(4):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    after = flat_params(train_step.model(state))
    changed = {p for p in before if not np.array_equal(before[p], np.asarray(after[p]))}
    assert changed and all(p[-2].endswith("_lora") for p in changed)
    assert {p for p in before if p[-1] == "b"} <= changed


def test_bad_lora_configs_are_named():
    values = tiny.get_config().to_dict()
    with pytest.raises(ConfigError, match="lora_targets has \\['w4'\\]"):
        ModelConfig.from_dict({**values, "lora_rank": 4, "lora_targets": ("w4",)})
    with pytest.raises(ConfigError, match="lora_targets is empty"):
        ModelConfig.from_dict({**values, "lora_rank": 4})
    # A comma-separated string, as a command line gives it.
    config = ModelConfig.from_dict({**values, "lora_rank": 2, "lora_targets": "w1, q_proj"})
    assert config.lora_targets == ("w1", "q_proj")


def test_saved_adapters_load_back_onto_the_base(base, tokens, tmp_path):
    adapted = perturbed(lora.add_adapters(base, rank=4, alpha=8.0, targets=ALL))
    lora.save_adapters(adapted, tmp_path / "adapters")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        lora.ADAPTER_CONFIG,
        lora.ADAPTER_FACTORS,
    ]
    loaded = lora.load_adapters(base, tmp_path / "adapters")
    np.testing.assert_array_equal(
        np.asarray(logits(loaded, tokens)), np.asarray(logits(adapted, tokens))
    )
    lora.save_adapters(adapted, tmp_path / "adapters")  # replaced whole
    with pytest.raises(
        ValueError, match="trained on a base with hidden_size=48; this model has 32"
    ):
        other = Mixtral(base.config.replace(hidden_size=32, head_dim=8), rngs=nnx.Rngs(0))
        lora.load_adapters(other, tmp_path / "adapters")
    with pytest.raises(ValueError, match="holds no adapters"):
        lora.load_adapters(base, tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        lora.save_adapters(base, tmp_path / "none")


@pytest.fixture(scope="module")
def saved_adapters(base, tmp_path_factory):
    """Three adapters of different ranks, alphas and targets, saved as training saves
    them, and each adapted model."""
    root = tmp_path_factory.mktemp("adapters")
    kinds = [(4, 8.0, ALL), (2, 1.0, ("q_proj", "w2")), (3, 6.0, ("v_proj", "o_proj", "w1", "w3"))]
    dirs, models = {}, {}
    for i, (rank, alpha, targets) in enumerate(kinds):
        name = f"adapter{i}"
        adapted = perturbed(lora.add_adapters(base, rank=rank, alpha=alpha, targets=targets), i)
        lora.save_adapters(adapted, root / name)
        dirs[name], models[name] = root / name, adapted
    return dirs, models


def test_a_bank_applies_each_rows_own_adapter(base, saved_adapters):
    dirs, models = saved_adapters
    bank = load_bank(base, dirs)
    c = bank.config
    assert (c.lora_bank, c.lora_rank, set(c.lora_targets)) == (3, 4, set(ALL))
    assert bank.layers.moe.experts.w1_lora.a.shape == (2, 8, 3, 48, 4)  # [L, E, J, D, R]
    assert bank.layers.attention.q_proj_lora.b.shape[1:3] == (3, 4)  # [L, J, R, N, H]
    for path, value in flat_params(nnx.state(bank, nnx.Not(LoRAParam))).items():
        assert value is flat_params(base)[path]  # shared, not copied
    # Rows of every adapter and of none in one call: each row as its own model computes.
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 211, (4, 9)))
    ids = jnp.asarray([2, -1, 0, 1])
    wanted = [models["adapter2"], base, models["adapter0"], models["adapter1"]]
    expected = jnp.stack([logits(m, tokens[i : i + 1])[0] for i, m in enumerate(wanted)])
    for impl in ("dense", "sorted"):
        banked = Mixtral(c.replace(moe_impl=impl, capacity_factor=None), rngs=nnx.Rngs(0))
        nnx.update(banked, nnx.state(bank))
        got = nnx.jit(lambda m, t, i: m.forward(t, adapter_ids=i).logits)(banked, tokens, ids)
        np.testing.assert_allclose(got, expected, atol=3e-5)
    # A decode step after a prefill, with the experts and projections in buffers of
    # their own and on the CPU kernels where they apply (the projections' adapters are
    # added beside the kernels; the experts' kernel applies each row's own).
    with_kernels = unstacked(bank)
    if kernels.available():
        assert with_kernels.attention is not None
        assert isinstance(with_kernels.experts[0], kernels.PackedExpertsLoRA)
    for pieces in (None, unstacked(bank, pack=False), with_kernels):

        @nnx.jit
        def step(model, tokens, ids, pieces=pieces):
            cache = init_cache(model.config, tokens.shape[0], 16, jnp.float32)
            out = model.forward(tokens[:, :-1], cache=cache, adapter_ids=ids)
            cache = out.cache if pieces is None else per_layer(out.cache)
            positions = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
            out = model.forward(
                tokens[:, -1:], positions, cache=cache, unstacked=pieces, adapter_ids=ids
            )
            return out.logits[:, 0]

        np.testing.assert_allclose(step(bank, tokens, ids), expected[:, -1], atol=3e-5)


def test_bad_banks_are_named(base, saved_adapters, tmp_path):
    dirs, models = saved_adapters
    with pytest.raises(ValueError, match="at least one adapter"):
        load_bank(base, {})
    with pytest.raises(ValueError, match="holds no adapters"):
        load_bank(base, {"x": tmp_path})
    with pytest.raises(ValueError, match="already has LoRA"):
        load_bank(models["adapter0"], dirs)
    with pytest.raises(ValueError, match="this model has none"):
        base.forward(jnp.zeros((1, 3), jnp.int32), adapter_ids=jnp.zeros((1,), jnp.int32))

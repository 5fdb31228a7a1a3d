"""The model against transformers' MixtralForCausalLM (the reference), and its boundary checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.params import flat_params
from tests.reference import hf_forward, hf_twin, top_k_without_ties

LOGIT_TOL = 1e-4  # float32, max abs difference
# bfloat16 compute against the float32 reference: mean abs logit error relative to
# the logits' std. Measured 0.007-0.035 over four seeds, as close as transformers'
# own bfloat16 model (0.015-0.033); the max error is larger (up to 0.37 of the
# largest logit, for both) where a near-tie in the router picks another expert.
BF16_MEAN_REL_TOL = 0.05


def config(**changes) -> ModelConfig:
    return ModelConfig.from_dict(tiny.get_config()).replace(**changes)


# (name, config changes, sequence length). Between them: GQA ratios 1, 2, 4 and 8,
# 4 and 8 experts, top-1 and top-2, head_dims that are not hidden/heads, a
# vocabulary that is not a multiple of 128, sliding windows shorter than the
# sequence, groups that split the batch unevenly (padding inside the SMoE), both
# dispatch implementations, the unrolled layer loop and rematerialisation.
PARITY_CASES = [
    ("gqa2_e8_top2", dict(), 37),
    (
        "gqa1_e4_top1",
        dict(num_heads=4, num_kv_heads=4, head_dim=12, num_experts=4, num_experts_per_tok=1),
        29,
    ),
    (
        "gqa4_e8_top1_window",
        dict(
            num_heads=8,
            num_kv_heads=2,
            head_dim=6,
            num_experts_per_tok=1,
            sliding_window=8,
            scan_layers=False,
        ),
        41,
    ),
    (
        "gqa8_e4_top2_window",
        dict(
            num_heads=8,
            num_kv_heads=1,
            head_dim=8,
            num_experts=4,
            sliding_window=5,
            num_layers=3,
            remat_policy="full",
        ),
        33,
    ),
    ("groups_of_16", dict(group_size=16, vocab_size=300), 37),
    ("sorted_dispatch", dict(moe_impl="sorted"), 37),
    (
        "sorted_e4_top1_window",
        dict(
            moe_impl="sorted",
            num_experts=4,
            num_experts_per_tok=1,
            sliding_window=6,
            scan_layers=False,
        ),
        23,
    ),
]


@pytest.mark.parity
@pytest.mark.parametrize("name,changes,length", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_logits_router_and_aux_loss_match_transformers(name, changes, length):
    cfg = config(**changes)
    hf, model = hf_twin(cfg, seed=len(name))
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, length))

    ref_logits, ref_router, ref_aux = hf_forward(hf, tokens)
    out = model.forward(jnp.asarray(tokens))

    assert ref_logits.std() > 0.3, "reference logits too small for the tolerance to mean anything"
    diff = np.abs(np.asarray(out.logits) - ref_logits).max()
    print(f"{name}: max abs logit diff {diff:.2e} (logit std {ref_logits.std():.2f})")
    assert diff <= LOGIT_TOL

    k = cfg.num_experts_per_tok
    ref_top, clear = top_k_without_ties(ref_router.reshape(cfg.num_layers, *tokens.shape, -1), k)
    ours = np.asarray(out.routing.experts)
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(ours[clear], ref_top[clear])
    np.testing.assert_allclose(float(out.load_balancing_loss), ref_aux, rtol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("moe_impl", ["dense", "sorted"])
def test_padding_is_left_out_of_logits_and_aux_loss_like_transformers(moe_impl):
    cfg = config(moe_impl=moe_impl)
    hf, model = hf_twin(cfg, seed=3)
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (3, 24))
    lengths = np.array([24, 17, 9])
    attention_mask = (np.arange(24)[None] < lengths[:, None]).astype(np.int64)

    ref_logits, _, ref_aux = hf_forward(hf, tokens, attention_mask)
    out = model.forward(jnp.asarray(tokens), segment_ids=jnp.asarray(attention_mask))

    real = attention_mask.astype(bool)
    assert np.abs(np.asarray(out.logits)[real] - ref_logits[real]).max() <= LOGIT_TOL
    np.testing.assert_allclose(float(out.load_balancing_loss), ref_aux, rtol=1e-5)


@pytest.mark.parity
def test_bfloat16_compute_stays_as_close_to_float32_as_transformers_bfloat16():
    torch = pytest.importorskip("torch")
    cfg = config()
    hf, model32 = hf_twin(cfg, seed=5)
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 40))
    ref_logits, _, _ = hf_forward(hf, tokens)
    hf_bf16_logits, _, _ = hf_forward(hf.to(torch.bfloat16), tokens)

    bf16 = Mixtral(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, jax.tree.map(lambda p: p.astype(jnp.bfloat16), nnx.state(model32, nnx.Param)))
    logits = np.asarray(bf16(jnp.asarray(tokens)).astype(jnp.float32))

    def mean_rel(x):
        return np.abs(x - ref_logits).mean() / ref_logits.std()

    print(
        f"bfloat16 mean rel error: ours {mean_rel(logits):.4f}, "
        f"transformers {mean_rel(hf_bf16_logits):.4f}"
    )
    assert mean_rel(logits) <= BF16_MEAN_REL_TOL
    assert mean_rel(logits) <= 1.5 * mean_rel(hf_bf16_logits)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).mean() > 0.9


def test_jit_and_eager_agree():
    cfg = config(group_size=16)
    model = Mixtral(cfg, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 30)))
    eager = model.forward(tokens)
    jitted = nnx.jit(lambda m, t: m.forward(t))(model, tokens)
    np.testing.assert_allclose(jitted.logits, eager.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(jitted.routing.experts, eager.routing.experts)


def test_scan_unrolled_and_remat_give_the_same_logits():
    cfg = config()
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 16)))
    reference = Mixtral(cfg, rngs=nnx.Rngs(2))(tokens)
    for changes in (
        dict(scan_layers=False),
        dict(remat_policy="full"),
        dict(remat_policy="save_dots", scan_layers=False),
    ):
        other = Mixtral(cfg.replace(**changes), rngs=nnx.Rngs(2))(tokens)
        np.testing.assert_allclose(other, reference, atol=1e-5, rtol=1e-5, err_msg=str(changes))


def test_gradients_flow_through_remat_and_scan():
    cfg = config(remat_policy="full")
    model = Mixtral(cfg, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 12)))

    def loss(m):
        out = m.forward(tokens)
        return jnp.mean(out.logits**2) + 0.01 * out.load_balancing_loss

    grads = nnx.grad(loss)(model)
    norms = {k: float(jnp.linalg.norm(v)) for k, v in flat_params(grads).items()}
    assert all(np.isfinite(n) for n in norms.values())
    assert norms[("layers", "moe", "gate")] > 0  # the aux loss reaches the router
    assert norms[("layers", "moe", "experts", "w2")] > 0


@pytest.fixture(scope="module")
def small_model() -> Mixtral:
    """Built when the first bad-input test runs, not when the tests are collected."""
    return Mixtral(config(max_position_embeddings=32), rngs=nnx.Rngs(0))


class TestBadInputs:
    @pytest.fixture(autouse=True)
    def _model(self, small_model):
        self.model = small_model

    def test_token_id_outside_vocabulary(self):
        with pytest.raises(ValueError, match=r"token id 211 is outside the vocabulary \[0, 211\)"):
            self.model(jnp.array([[1, 2, 211]]))
        with pytest.raises(ValueError, match="token id -1"):
            self.model(jnp.array([[1, -1]]))

    def test_sequence_longer_than_the_configured_maximum(self):
        with pytest.raises(ValueError, match="sequence length 33 exceeds config.max_position"):
            self.model(jnp.zeros((1, 33), jnp.int32))

    @pytest.mark.parametrize("shape", [(5,), (1, 2, 3)])
    def test_wrong_rank(self, shape):
        with pytest.raises(ValueError, match=r"tokens must have shape \[batch, length\]"):
            self.model(jnp.zeros(shape, jnp.int32))

    def test_float_tokens(self):
        with pytest.raises(ValueError, match="integer ids"):
            self.model(jnp.zeros((1, 4), jnp.float32))

    def test_positions_of_the_wrong_shape(self):
        with pytest.raises(ValueError, match="positions must have the shape of tokens"):
            self.model(jnp.zeros((1, 4), jnp.int32), positions=jnp.zeros((1, 5), jnp.int32))


@pytest.mark.parity
@pytest.mark.parametrize("window", [None, 5, 13])
def test_blocked_attention_matches_transformers(monkeypatch, window):
    """Queries in blocks of 8 (the default 256 exceeds these test lengths): block edges,
    windows that cross them and padding all keep the reference's logits."""
    from mixtral_jax.model import attention

    monkeypatch.setattr(attention, "BLOCK", 8)
    cfg = config(sliding_window=window)
    hf, model = hf_twin(cfg, seed=7)
    tokens = np.random.RandomState(8).randint(0, cfg.vocab_size, (2, 45))
    attention_mask = np.ones_like(tokens)
    attention_mask[1, 30:] = 0
    assert len(attention.query_blocks(45, window)) == 6

    ref_logits, _, _ = hf_forward(hf, tokens, attention_mask)
    out = model.forward(jnp.asarray(tokens), segment_ids=jnp.asarray(attention_mask))
    real = attention_mask.astype(bool)
    assert np.abs(np.asarray(out.logits)[real] - ref_logits[real]).max() <= LOGIT_TOL

"""Configs: the published sizes, validation that names the field, HF translation."""

from __future__ import annotations

import math

import pytest

from configs import mixtral_8x7b, mixtral_8x22b, tiny
from mixtral_jax import ConfigError, ModelConfig
from mixtral_jax.model.mixtral import param_shapes


def test_8x7b_is_the_published_architecture():
    c = ModelConfig.from_dict(mixtral_8x7b.get_config())
    assert (c.hidden_size, c.intermediate_size, c.num_layers) == (4096, 14336, 32)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (32, 8, 128, 32000)
    assert (c.num_experts, c.num_experts_per_tok) == (8, 2)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e6, 1e-5, 32768)
    assert c.sliding_window is None


def test_8x22b_is_the_published_architecture():
    c = ModelConfig.from_dict(mixtral_8x22b.get_config())
    assert (c.hidden_size, c.intermediate_size, c.num_layers) == (6144, 16384, 56)
    assert (c.num_heads, c.num_kv_heads, c.vocab_size) == (48, 8, 32768)
    assert (c.rope_theta, c.max_position_embeddings) == (1e6, 65536)


def parameter_count(c: ModelConfig) -> int:
    D, F, E, L, V = c.hidden_size, c.intermediate_size, c.num_experts, c.num_layers, c.vocab_size
    attention = D * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    return L * (attention + E * 3 * D * F + D * E + 2 * D) + 2 * V * D + D


def test_8x7b_has_46_7_billion_parameters():
    c = ModelConfig.from_dict(mixtral_8x7b.get_config())
    shapes = param_shapes(c)
    total = sum(math.prod(s) for s in shapes.values())
    assert total == parameter_count(c)
    assert abs(total / 1e9 - 46.7) < 0.05


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(num_heads=5, num_kv_heads=5, head_dim=None), "num_heads"),  # 48 % 5 != 0
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(head_dim=7), "head_dim"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=2.5), "num_layers"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rms_norm_eps=-1e-5), "rms_norm_eps"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(dtype="float8"), "dtype"),
        (dict(remat_policy="sometimes"), "remat_policy"),
        (dict(group_size=0), "group_size"),
    ],
)
def test_impossible_values_name_the_field(changes, field):
    values = tiny.get_config().to_dict()
    values.update(changes)
    with pytest.raises(ConfigError, match=rf"config\.{field}"):
        ModelConfig.from_dict(values)


def test_unknown_field_suggests_the_right_name():
    values = tiny.get_config().to_dict()
    values["num_expert"] = 8
    with pytest.raises(ConfigError, match="'num_expert' \\(did you mean 'num_experts'\\?\\)"):
        ModelConfig.from_dict(values)


def test_missing_field_is_named():
    values = tiny.get_config().to_dict()
    del values["vocab_size"]
    with pytest.raises(ConfigError, match="missing required field\\(s\\): vocab_size"):
        ModelConfig.from_dict(values)


def test_head_dim_defaults_to_hidden_over_heads():
    values = tiny.get_config().to_dict()
    values["head_dim"] = None
    assert ModelConfig.from_dict(values).head_dim == 48 // 4


def test_replace_validates_again():
    c = ModelConfig.from_dict(tiny.get_config())
    with pytest.raises(ConfigError, match="config.num_experts_per_tok"):
        c.replace(num_experts_per_tok=20)


def test_hf_config_round_trip():
    c = ModelConfig.from_dict(mixtral_8x7b.get_config())
    back = ModelConfig.from_hf(c.to_hf(), dtype=c.dtype, param_dtype=c.param_dtype)
    assert back == c


def test_hf_config_from_transformers_5_rope_parameters():
    hf = ModelConfig.from_dict(tiny.get_config()).to_hf()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert ModelConfig.from_hf(hf).rope_theta == 5e5
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5}
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        ModelConfig.from_hf(hf)


def test_hf_config_of_another_model_is_refused():
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ModelConfig.from_hf({"model_type": "llama"})

"""The Hugging Face <-> parameter mapping: both transformers layouts, exact round trips, errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from configs import tiny
from mixtral_jax import ModelConfig
from mixtral_jax.checkpoints.hub import WeightError, params_from_hub, params_to_hub
from mixtral_jax.model.mixtral import param_shapes
from tests.reference import hf_twin, torch_and_transformers

CONFIG = ModelConfig.from_dict(tiny.get_config())


def random_hub_tensors(config=CONFIG, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    params = {p: rng.randn(*s).astype(dtype) for p, s in param_shapes(config).items()}
    return dict(params_to_hub(params, config))


def test_hub_round_trip_is_bit_exact_in_bfloat16():
    tensors = random_hub_tensors(dtype=ml_dtypes.bfloat16)
    params = params_from_hub(tensors.items(), CONFIG, dtype=ml_dtypes.bfloat16)
    back = dict(params_to_hub(params, CONFIG))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key].view(np.uint16), value.view(np.uint16), err_msg=key)


def test_hub_keys_and_shapes_are_the_ones_transformers_saves(tmp_path):
    torch, transformers = torch_and_transformers()
    from safetensors.numpy import load_file

    hf, _ = hf_twin(CONFIG)
    hf.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    ours = random_hub_tensors()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in saved.items()}


@pytest.mark.parity
def test_fused_in_memory_and_saved_hub_layouts_give_the_same_parameters(tmp_path):
    torch, transformers = torch_and_transformers()
    from safetensors.numpy import load_file

    hf, _ = hf_twin(CONFIG)
    fused = hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in fused), "transformers 5 fused layout"
    hf.save_pretrained(tmp_path)
    hub = load_file(str(tmp_path / "model.safetensors"))
    assert any(".experts.0.w1.weight" in k for k in hub)

    from_fused = params_from_hub(fused.items(), CONFIG)
    from_hub = params_from_hub(hub.items(), CONFIG)
    for path in from_fused:
        np.testing.assert_array_equal(from_fused[path], from_hub[path], err_msg=str(path))
    # Back to the Hub layout, bit for bit.
    for key, value in params_to_hub(from_fused, CONFIG):
        np.testing.assert_array_equal(value, hub[key], err_msg=key)


def test_missing_tensor_is_named():
    tensors = random_hub_tensors()
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(
        WeightError,
        match=r"missing 1 tensor\(s\): model\.layers\.1\.block_sparse_moe"
        r"\.experts\.3\.w2\.weight",
    ):
        params_from_hub(tensors.items(), CONFIG)


def test_unexpected_tensor_is_named():
    tensors = random_hub_tensors()
    tensors["model.layers.0.mlp.shared_expert.weight"] = np.zeros(3)
    with pytest.raises(WeightError, match="unexpected tensor 'model.layers.0.mlp.shared_expert"):
        params_from_hub(tensors.items(), CONFIG)


def test_layer_beyond_the_config_is_named():
    tensors = random_hub_tensors()
    tensors["model.layers.7.input_layernorm.weight"] = np.ones(CONFIG.hidden_size, np.float32)
    with pytest.raises(
        WeightError, match="layers.7.input_layernorm.weight: layer 7 does not exist"
    ):
        params_from_hub(tensors.items(), CONFIG)


def test_shape_that_disagrees_with_the_config_is_named():
    tensors = random_hub_tensors()
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((30, 48), np.float32)
    with pytest.raises(
        WeightError,
        match=r"k_proj.weight: shape \(30, 48\) does not match the "
        r"config, which implies \(20, 48\)",
    ):
        params_from_hub(tensors.items(), CONFIG)


def test_the_same_weights_twice_are_refused():
    tensors = list(random_hub_tensors().items())
    fused_gate = (
        "model.layers.0.mlp.gate.weight",
        dict(tensors)["model.layers.0.block_sparse_moe.gate.weight"],
    )
    with pytest.raises(WeightError, match="already given by model.layers.0.block_sparse_moe"):
        params_from_hub(tensors + [fused_gate], CONFIG)

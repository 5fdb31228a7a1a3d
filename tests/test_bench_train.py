"""tools/bench.py's training contenders compute the same thing: our step and
transformers' from the same weights and batch give the same loss and gradients, and
our LoRA adapters the same gradients as peft's."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import ModelConfig
from mixtral_jax.checkpoints import hub
from mixtral_jax.model.layers import LoRAParam
from mixtral_jax.params import flat_params
from mixtral_jax.training import steps
from tests.reference import hf_twin, torch_and_transformers
from tools import bench_train

# Longer than a dense group would drop nothing at cf 1.25 on these few tokens; the
# reference is dropless, so ours is compared dropless (both dispatches).
CONFIG = ModelConfig.from_dict(tiny.get_config()).replace(
    router_aux_loss_coef=0.02, router_z_loss_coef=0.0, dtype="float32", param_dtype="float32"
)


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, CONFIG.vocab_size, (2, 24))


def our_loss_and_grads(model, batch, trainable=nnx.Param):
    graphdef, params, rest = nnx.split(model, trainable, ...)

    def loss(params, batch):
        return steps.loss_fn(nnx.merge(graphdef, params, rest), batch)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    return float(value), {p: np.asarray(g) for p, g in flat_params(grads).items()}


def assert_relative(ours: np.ndarray, reference: np.ndarray, path, tol=1e-3):
    scale = np.abs(reference).max()
    assert scale > 0, f"{path}: the reference gradient is zero; the check would prove nothing"
    error = np.abs(ours - reference).max() / scale
    assert error <= tol, f"{path}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("moe_impl", ["sorted", "dense"])
def test_a_full_step_has_transformers_loss_and_gradients(ids, moe_impl):
    torch, _ = torch_and_transformers()
    hf, model = hf_twin(CONFIG.replace(moe_impl=moe_impl))
    hf.train()
    loss = bench_train.hf_loss(hf, torch.as_tensor(ids))
    loss.backward()
    value, grads = our_loss_and_grads(model, bench_train.batch_of(ids))
    assert abs(value - float(loss.detach())) <= 1e-4, (value, float(loss.detach()))
    # transformers' gradients, through the one key table, in our layout.
    reference = flat_params(
        hub.from_hub_state_dict({n: p.grad for n, p in hf.named_parameters()}, model.config)
    )
    assert set(grads) == set(reference)
    for path, g in grads.items():
        assert_relative(g, np.asarray(reference[path]), path)


def test_lora_loss_and_gradients_match_peft(ids):
    torch, _ = torch_and_transformers()
    pytest.importorskip("peft")
    hf, base = hf_twin(CONFIG.replace(moe_impl="sorted"))
    hf.train()
    peft_model = bench_train.peft_twin(hf, rank=4, alpha=8.0)
    ours = bench_train.our_lora_twin(base, peft_model, CONFIG, rank=4, alpha=8.0)
    loss = bench_train.hf_loss(peft_model, torch.as_tensor(ids))
    loss.backward()
    value, grads = our_loss_and_grads(ours, bench_train.batch_of(ids), trainable=LoRAParam)
    assert abs(value - float(loss.detach())) <= 1e-4, (value, float(loss.detach()))
    reference = bench_train.peft_adapters(peft_model, CONFIG, grads=True)
    assert set(grads) == set(reference)
    experts = ("layers", "moe", "experts")
    for path, g in grads.items():
        if path[:3] == experts and path[3] in ("w1_lora", "w3_lora") and path[4] == "a":
            continue  # peft's one fused A: checked below as the sum of ours
        assert_relative(g, reference[path], path)
    # w1 and w3 share peft's gate_up A; its gradient is the sum of theirs.
    fused = grads[(*experts, "w1_lora", "a")] + grads[(*experts, "w3_lora", "a")]
    assert_relative(fused, reference[(*experts, "w1_lora", "a")], "gate_up A")

"""Sharded models on 8 virtual CPU devices equal the single-device model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_jax.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from configs import tiny
from mixtral_jax import Mixtral, ModelConfig, sharding
from mixtral_jax.weights import flat_params

assert len(jax.devices()) == 8
config = ModelConfig.from_dict(tiny.get_config()).replace(
    hidden_size=64, intermediate_size=64, num_heads=8, num_kv_heads=8, head_dim=8,
    vocab_size=256, moe_impl=sys.argv[1])
tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (8, 16)))

def loss(model, tokens):
    out = model.forward(tokens)
    return jnp.mean(out.logits ** 2) + 0.01 * out.load_balancing_loss

reference = Mixtral(config, rngs=nnx.Rngs(0))
ref_logits = np.asarray(reference(tokens))
ref_grads = {k: np.asarray(v) for k, v in flat_params(nnx.grad(loss)(reference, tokens)).items()}
results = {}
for shape in json.loads(sys.argv[2]):
    mesh = sharding.make_mesh(*shape)
    model = Mixtral(config, rngs=nnx.Rngs(0))
    sharding.shard_model(model, mesh)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    sharded_tokens = jax.device_put(tokens, batch)
    logits = nnx.jit(lambda m, t: m(t))(model, sharded_tokens)
    grads = flat_params(nnx.jit(nnx.grad(loss))(model, sharded_tokens))
    w1 = model.layers.moe.experts.w1[...]
    results[str(list(shape))] = {
        "logits": float(np.abs(np.asarray(logits) - ref_logits).max()),
        "grads": max(float(np.abs(np.asarray(g) - ref_grads[k]).max()) for k, g in grads.items()),
        "w1_spec": [str(a) for a in w1.sharding.spec] + ["None"] * (4 - len(w1.sharding.spec)),
    }
print(json.dumps(results))
"""

MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 8, 1), (1, 1, 1, 8), (2, 2, 2, 1), (2, 1, 2, 2)]


def test_logits_and_gradients_match_one_device_on_every_mesh():
    """(data, fsdp, tensor, expert) meshes; a subprocess, as the device-count flag must
    be set before JAX starts."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, "dense", json.dumps(MESHES)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(results) == len(MESHES)
    for shape, r in results.items():
        assert r["logits"] <= 1e-5, (shape, r)
        assert r["grads"] <= 1e-5, (shape, r)
    # The rules split the experts' w1 [L, E, D, F] = (layers, expert, embed, mlp).
    assert results["[1, 1, 1, 8]"]["w1_spec"] == ["None", "expert", "None", "None"]
    assert results["[1, 8, 1, 1]"]["w1_spec"] == ["None", "None", "fsdp", "None"]
    assert results["[1, 1, 8, 1]"]["w1_spec"] == ["None", "None", "None", "tensor"]
    assert results["[2, 1, 2, 2]"]["w1_spec"] == ["None", "expert", "None", "tensor"]


@pytest.mark.parametrize(
    "sizes,message",
    [
        (dict(fsdp=-1, tensor=-1), "at most one axis can take the rest"),
        (dict(fsdp=3), "need a multiple of 3 devices"),
        (dict(fsdp=1), "set one axis to -1"),
        (dict(expert=0), "mesh axis 'expert' has size 0"),
    ],
)
def test_impossible_meshes_name_the_axis(sizes, message):
    import jax

    devices = jax.devices() * 4  # four entries: enough for the arithmetic to be checked
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes, devices=devices)

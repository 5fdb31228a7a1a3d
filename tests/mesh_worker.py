"""Runs the tiny model on 8 virtual CPU devices; `test_sharding.py` starts it in a
subprocess, as the device-count flag must be set before JAX starts.

    python -m tests.mesh_worker '[[1, 1, 8, 1], ...]' '[[8, 1, 1, 1], ...]'
        -> one JSON line: results of the meshes to run, specs of the meshes to read
"""

from __future__ import annotations

import json
import os
import sys

from tests import xla_flags  # noqa: E402

if __name__ == "__main__":  # before JAX starts; a module that imports this keeps its devices
    os.environ["XLA_FLAGS"] = xla_flags(8)
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import tiny  # noqa: E402
from mixtral_jax import Mixtral, ModelConfig  # noqa: E402
from mixtral_jax.parallel.mesh import make_mesh  # noqa: E402
from mixtral_jax.parallel.placement import param_shardings, shard_model  # noqa: E402
from mixtral_jax.parallel.rules import DEFAULT_RULES  # noqa: E402
from mixtral_jax.params import flat_params  # noqa: E402
from mixtral_jax.training import steps  # noqa: E402


def tiny_config() -> ModelConfig:
    """Dimensions that 8 devices divide; 8 token groups of 16, so `expert` can split them.

    Dropless, as at inference; the train steps use capacity factor 2, as in training
    (and it compiles one dispatch instead of the dropless ladder's five)."""
    return ModelConfig.from_dict(tiny.get_config()).replace(
        hidden_size=64,
        intermediate_size=64,
        num_heads=8,
        num_kv_heads=8,
        head_dim=8,
        vocab_size=256,
        group_size=16,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )


def batch(rows: int = 8) -> dict:
    tokens = np.random.RandomState(0).randint(0, 256, (rows, 17))
    return {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


def main(meshes: list[list[int]]) -> dict:
    assert len(jax.devices()) == 8
    config, data = tiny_config(), batch()
    train_config = config.replace(capacity_factor=2.0)
    ref_logits = np.asarray(Mixtral(config, rngs=nnx.Rngs(0))(data["tokens"]))
    reference = Mixtral(train_config, rngs=nnx.Rngs(0))
    ref_loss, ref_grads = nnx.value_and_grad(lambda m: steps.loss_fn(m, data)[0])(reference)
    ref_grads = {p: np.asarray(g) for p, g in flat_params(ref_grads).items()}
    ref_params = {p: np.asarray(v) for p, v in flat_params(reference).items()}
    results = {}
    for shape in meshes:
        mesh = make_mesh(*shape)
        model = Mixtral(config, rngs=nnx.Rngs(0))
        forward = steps.jit_forward(model, mesh)
        compiled = forward.fn.lower(forward.params, data["tokens"], None, None).compile()
        logits = compiled(forward.params, data["tokens"], None, None)
        # SGD with rate 1: the step's change of every parameter is minus its gradient.
        train_model = Mixtral(train_config, rngs=nnx.Rngs(0))
        train_step = steps.jit_train_step(train_model, optax.sgd(1.0), mesh)
        state = train_step.init(train_model)
        state, metrics = train_step(state, data)
        new = flat_params(state.params)
        grads = {p: ref_params[p] - np.asarray(v) for p, v in new.items()}
        expected = param_shardings(model, mesh)
        results[json.dumps(shape)] = {
            "logits": float(np.abs(np.asarray(logits) - ref_logits).max()),
            "loss": abs(float(metrics["loss"]) - float(ref_loss)),
            "grads": max(float(np.abs(g - ref_grads[p]).max()) for p, g in grads.items()),
            "shardings_follow_rules": all(v.sharding == expected[p] for p, v in new.items()),
            "all_to_all": compiled.as_text().count("all-to-all("),
        }
    return results


def specs(meshes: list[list[int]]) -> dict:
    """Each parameter's partition spec on each mesh (nothing is compiled)."""
    model = nnx.eval_shape(lambda: Mixtral(tiny_config(), rngs=nnx.Rngs(0)))
    results = {}
    for shape in meshes:
        rules = param_shardings(model, make_mesh(*shape))
        results[json.dumps(shape)] = {".".join(p): str(tuple(s.spec)) for p, s in rules.items()}
    return results


def optimizer_state_shardings() -> dict:
    """AdamW's moments on an FSDP mesh: sharded like their parameters."""
    model = Mixtral(tiny_config().replace(capacity_factor=2.0), rngs=nnx.Rngs(0))
    mesh = make_mesh(fsdp=8)
    train_step = steps.jit_train_step(model, optax.adamw(1e-3), mesh)
    state, _ = train_step(train_step.init(model), batch())
    params = flat_params(state.params)
    adam = state.opt_state[0]
    moments = {
        **{("mu", *p): v for p, v in flat_params(adam.mu).items()},
        **{("nu", *p): v for p, v in flat_params(adam.nu).items()},
    }
    return {
        "moments_like_params": all(
            v.sharding == params[p[1:]].sharding for p, v in moments.items()
        ),
        "num_moments": len(moments),
        "w1_mu_spec": str(
            tuple(flat_params(adam.mu)[("layers", "moe", "experts", "w1")].sharding.spec)
        ),
    }


def other_rules() -> float:
    """Different rules, same modules: experts split over their MLP dimension by tensor and
    expert together (no expert parallelism), heads not split at all."""
    rules = dict(DEFAULT_RULES)
    rules.update(mlp=("tensor", "expert"), expert=None, heads=None, kv_heads=None)
    mesh = make_mesh(data=2, tensor=2, expert=2, fsdp=1)
    config, data = tiny_config(), batch()
    model = Mixtral(config, rngs=nnx.Rngs(0))
    forward = steps.jit_forward(model, mesh, rules=tuple(rules.items()))
    w1 = flat_params(forward.params)[("layers", "moe", "experts", "w1")]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, None, None, ("tensor", "expert"))
    logits = forward(forward.params, data["tokens"])
    return float(np.abs(np.asarray(logits) - np.asarray(model(data["tokens"]))).max())


def sharded_generation() -> dict:
    """Greedy generation on a tensor=4 x data=2 mesh (KV cache split by KV head) equals
    the single-device tokens."""
    from mixtral_jax.inference.generate import generate_tokens

    config = tiny_config()
    prompts = [[1, 17, 42, 99, 5], [1, 150], [1, 33, 34], [1, 7, 7, 7, 7, 7]]
    expected, _ = generate_tokens(Mixtral(config, rngs=nnx.Rngs(0)), prompts, max_new_tokens=8)
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    model = Mixtral(config, rngs=nnx.Rngs(0))
    shard_model(model, mesh)
    got, _ = generate_tokens(model, prompts, max_new_tokens=8, mesh=mesh)
    return {"same_tokens": got == expected, "tokens": len(got[0])}


def sharded_lora() -> dict:
    """A LoRA step with two accumulated micro-batches on fsdp=4 x expert=2 equals the
    same step on one device; the frozen base keeps its rule shardings."""
    from mixtral_jax.model.layers import LoRAParam
    from mixtral_jax.training import lora

    base = Mixtral(tiny_config().replace(capacity_factor=2.0), rngs=nnx.Rngs(0))
    model = lora.add_adapters(base, rank=4, alpha=8.0, targets=("q_proj", "o_proj", "w1", "w2"))
    adapters = nnx.state(model, LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: x + 0.1, adapters))  # B != 0: every factor learns
    updates = []
    one_device = make_mesh(devices=jax.devices()[:1])
    for mesh in (one_device, make_mesh(fsdp=4, expert=2)):
        step = steps.jit_train_step(model, optax.sgd(1.0), mesh, trainable=LoRAParam, accumulate=2)
        state, metrics = step(step.init(model), batch(16))  # 8 shards x 2 micro-batches
        updates.append({p: np.asarray(v) for p, v in flat_params(state.params).items()})
        frozen_spec = flat_params(step.frozen)[("layers", "moe", "experts", "w1")].sharding.spec
    return {
        "max_diff": max(float(np.abs(v - updates[0][p]).max()) for p, v in updates[1].items()),
        "trained": sorted({p[-2] for p in updates[0]}),
        "frozen_w1_spec": str(tuple(frozen_spec)),
    }


def sharded_routing() -> dict:
    """The routing analysis on a data=2 x tensor=4 mesh records the single-device routes."""
    from mixtral_jax.analysis import routing as analysis

    model = Mixtral(tiny_config(), rngs=nnx.Rngs(0))
    sequences = [list(range(1, 40)), [1, 5, 9], list(range(100, 130))]
    expected = analysis.record(model, sequences, seq_len=16, batch_size=2)
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    shard_model(model, mesh)
    got = analysis.record(model, sequences, seq_len=16, batch_size=4, mesh=mesh)
    return {
        "same_experts": all(
            (a.experts == b.experts).all() for a, b in zip(got, expected, strict=True)
        ),
        "weights_diff": max(
            float(np.abs(a.weights - b.weights).max()) for a, b in zip(got, expected, strict=True)
        ),
    }


if __name__ == "__main__":
    out = main(json.loads(sys.argv[1]))
    out["specs"] = specs(json.loads(sys.argv[2]))
    out["adam"] = optimizer_state_shardings()
    out["other_rules"] = other_rules()
    out["generation"] = sharded_generation()
    out["lora"] = sharded_lora()
    out["routing"] = sharded_routing()
    print(json.dumps(out))

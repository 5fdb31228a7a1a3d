"""Sharded models on 8 virtual CPU devices equal the single-device model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from configs import meshes
from configs.meshes import RECIPES
from mixtral_jax.parallel.mesh import MeshConfig, make_mesh, parse_mesh
from mixtral_jax.parallel.rules import partition_spec
from tests import run_worker

ROOT = Path(__file__).resolve().parents[1]

# (data, fsdp, tensor, expert). Each axis alone would cost a compile per mesh; data and
# fsdp run inside the mixed meshes (and fsdp=8 alone in the optimizer-state check).
MESHES = [(1, 1, 8, 1), (1, 1, 1, 8), (2, 2, 2, 1), (2, 1, 2, 2)]
SPEC_MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), *MESHES]  # read, not compiled


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    return run_worker("tests.mesh_worker", json.dumps(MESHES), json.dumps(SPEC_MESHES))


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_logits_and_gradients_match_one_device(mesh_results, mesh):
    """The jitted forward's logits, and the jitted train step's loss and gradients."""
    r = mesh_results[json.dumps(list(mesh))]
    assert r["logits"] <= 1e-5, r
    assert r["loss"] <= 1e-5, r
    assert r["grads"] <= 1e-5, r
    assert r["shardings_follow_rules"], r


def test_parameters_are_split_as_the_rules_say(mesh_results):
    specs = {m: mesh_results["specs"][json.dumps(list(m))] for m in SPEC_MESHES}
    # w1 [L, E, D, F] = (layers, expert, embed, mlp)
    w1 = "layers.moe.experts.w1"
    assert specs[(1, 1, 1, 8)][w1] == "(None, 'expert', None, None)"
    assert specs[(1, 8, 1, 1)][w1] == "(None, None, 'fsdp', None)"
    assert specs[(1, 1, 8, 1)][w1] == "(None, None, None, 'tensor')"
    assert specs[(2, 1, 2, 2)][w1] == "(None, 'expert', None, 'tensor')"
    # Tensor parallelism splits heads; the router is never split by expert.
    assert specs[(1, 1, 8, 1)]["layers.attention.q_proj"] == "(None, None, 'tensor', None)"
    assert specs[(1, 1, 8, 1)]["layers.attention.o_proj"] == "(None, 'tensor', None, None)"
    assert specs[(1, 1, 1, 8)]["layers.moe.gate"] == "(None, None, None)"
    # Data parallelism replicates everything.
    assert all(
        set(s[1:-1].replace(",", " ").split()) == {"None"} for s in specs[(8, 1, 1, 1)].values()
    )


def test_expert_parallelism_moves_tokens_with_all_to_all(mesh_results):
    """With expert > 1, each of the 2 layers sends tokens to experts and back with
    all-to-alls; without, the compiler finds at most a stray one elsewhere."""
    counts = {m: mesh_results[json.dumps(list(m))]["all_to_all"] for m in MESHES}
    for mesh, count in counts.items():
        assert (count >= 4) == (mesh[3] > 1), counts
    assert counts[(1, 1, 8, 1)] == 0, counts


def test_the_same_modules_run_under_other_rules(mesh_results):
    assert mesh_results["other_rules"] <= 1e-5


def test_generation_on_a_mesh_gives_the_single_device_tokens(mesh_results):
    assert mesh_results["generation"] == {"same_tokens": True, "tokens": 8}


def test_a_sharded_lora_step_with_accumulation_equals_one_device(mesh_results):
    result = mesh_results["lora"]
    assert result["max_diff"] < 1e-5, result
    assert result["trained"] == ["o_proj_lora", "q_proj_lora", "w1_lora", "w2_lora"]
    assert result["frozen_w1_spec"] == "(None, 'expert', 'fsdp', None)"


def test_fsdp_shards_optimizer_state_like_parameters(mesh_results):
    adam = mesh_results["adam"]
    assert adam["moments_like_params"] and adam["num_moments"] == 26
    assert adam["w1_mu_spec"] == "(None, None, 'fsdp', None)"


def test_rules_skip_axes_that_do_not_divide_or_are_taken():
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=_fake_devices(8))
    # batch takes data and fsdp; embed's fsdp is then taken in the same activation.
    assert partition_spec(("batch", "length", "embed"), (8, 3, 64), mesh) == P(
        ("data", "fsdp"), None, None
    )
    # A batch of 2 keeps only data; embed may then use fsdp.
    assert partition_spec(("batch", "length", "embed"), (2, 3, 64), mesh) == P("data", None, "fsdp")
    # A vocabulary that tensor=2 does not divide stays whole; unknown names too.
    assert partition_spec(("embed", "vocab"), (64, 211), mesh) == P("fsdp", None)
    assert partition_spec(("nonsense",), (8,), mesh) == P(None)


def _fake_devices(n):
    import jax

    return (jax.devices() * n)[:n]


@pytest.mark.parametrize(
    "sizes,message",
    [
        (dict(fsdp=-1, tensor=-1), "at most one axis can take the rest"),
        (dict(fsdp=3), "need a multiple of 3 devices"),
        (dict(fsdp=1), "set one axis to -1"),
        (dict(expert=0), "mesh axis 'expert' has size 0"),
        (dict(dcn={"data": 3}), "make 3 slices, which do not divide 4 devices"),
        (dict(dcn={"pipeline": 2}), "unknown DCN mesh axes"),
    ],
)
def test_impossible_meshes_name_the_axis(sizes, message):
    import jax

    devices = jax.devices() * 4  # four entries: enough for the arithmetic to be checked
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes, devices=devices)


def test_mesh_config_from_dict():
    config = MeshConfig.from_dict({"fsdp": 4, "expert": 2, "dcn_data": 2})
    assert config.ici == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2}
    assert config.dcn == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 1}
    with pytest.raises(ValueError, match=r"unknown mesh field\(s\) \['fdsp'\]"):
        MeshConfig.from_dict({"fdsp": 4})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_forward_save_and_restore(tmp_path):
    """Two local processes (4 CPU devices each, a DCN data axis across them) run the
    sharded forward, save the sharded parameters with Orbax and restore them."""
    import numpy as np
    from flax import nnx

    from mixtral_jax import Mixtral
    from mixtral_jax.checkpoints.load import load
    from mixtral_jax.params import flat_params
    from tests.mesh_worker import tiny_config

    directory = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env |= {
        "MIXTRAL_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",
        "MIXTRAL_NUM_PROCESSES": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.process_worker", str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env | {"MIXTRAL_PROCESS_ID": str(i)},
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    assert result["rows"] == [0, 4]  # process 0 loaded only its half of the batch
    assert result["logits"] <= 1e-5 and result["restored_logits"] <= 1e-5, result
    assert result["same_params"]
    assert result["w1_spec"] == "(None, 'expert', 'fsdp', None)"
    # What two processes wrote, one process reads: the parameters of the same seed.
    restored = flat_params(load(directory))
    expected = flat_params(Mixtral(tiny_config(), rngs=nnx.Rngs(0)))
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(value))


CHIPS_PER_UNIT = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # v4-N and v5p-N count TensorCores


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_mesh_recipes_use_every_chip_of_their_slice(name):
    """`configs/meshes.py`: e.g. v5e-16 has 16 chips, v5p-8 has 4."""
    config = MeshConfig.from_dict(meshes.get_config(name))
    slice_name = name.split(":")[0]
    slices, _, slice_name = slice_name.rpartition("x")
    if slice_name == "default":
        return
    generation, size = slice_name.split("-")
    chips = int(size) // CHIPS_PER_UNIT[generation] * int(slices or 1)
    assert math.prod(config.ici.values()) * math.prod(config.dcn.values()) == chips
    mesh = make_mesh(**config.ici, devices=_fake_devices(chips // math.prod(config.dcn.values())))
    assert mesh.size * math.prod(config.dcn.values()) == chips


@pytest.mark.parametrize(
    "sizes,message",
    [
        (dict(fsdp=1, expert=16), r"mesh axis 'expert' has size 16, which divides none .*expert=8"),
        (dict(fsdp=1, tensor=3), r"mesh axis 'tensor' has size 3, .*heads=4, kv_heads=2, mlp=40"),
        (dict(fsdp=5), r"mesh axis 'fsdp' has size 5, .*embed=48"),
    ],
)
def test_meshes_that_split_no_parameter_name_the_axis(sizes, message):
    from flax import nnx

    from configs import tiny
    from mixtral_jax import Mixtral, ModelConfig
    from mixtral_jax.parallel.placement import param_shardings

    model = nnx.eval_shape(
        lambda: Mixtral(ModelConfig.from_dict(tiny.get_config()), rngs=nnx.Rngs(0))
    )
    n = math.prod(v for v in sizes.values())
    with pytest.raises(ValueError, match=message):
        param_shardings(model, make_mesh(**sizes, devices=_fake_devices(n)))


def test_batches_that_do_not_split_name_the_axes():

    from mixtral_jax.parallel.rules import named_sharding
    from mixtral_jax.training import steps

    mesh = make_mesh(data=2, fsdp=2, devices=_fake_devices(4))
    batch_sharding = named_sharding(steps.BATCH_AXES, (4, 1), mesh)
    steps.check_rows(8, batch_sharding)
    with pytest.raises(
        ValueError, match=r"a batch of 3 rows does not split .* \(data=2 x fsdp=2\)"
    ):
        steps.check_rows(3, batch_sharding)


def test_routing_analysis_on_a_mesh_records_the_single_device_routes(mesh_results):
    result = mesh_results["routing"]
    assert result["same_experts"] and result["weights_diff"] < 1e-5, result


def test_meshes_parse_and_bad_ones_say_how_to_write_them():
    assert parse_mesh("data=2, tensor=4") == {"data": 2, "tensor": 4}
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("model=8")
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("tensor=two")

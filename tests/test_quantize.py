"""Weight-only int8 / int4: rounding within half a step, a model that tracks its float
twin, checkpoints that round-trip packed, sharded loads, QLoRA and clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

pytest.importorskip("qwix", reason="qwix needs Python 3.11+")

from configs import tiny  # noqa: E402
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.backends.cpu.decode import unstacked
from mixtral_jax.checkpoints import convert
from mixtral_jax.checkpoints.load import EMBEDDED, load
from mixtral_jax.checkpoints.store import CheckpointError, read_config
from mixtral_jax.model import quantized
from mixtral_jax.model.config import ConfigError
from mixtral_jax.params import flat_params
from mixtral_jax.quant import quantize
from mixtral_jax.training import evaluate
from tests import run_script
from tests.test_lora import prefill_then_decode
from tests.test_sources import write_layout

ROOT = Path(__file__).resolve().parents[1]
# tiny's sizes with a head_dim, hidden and expert size that int4 groups of 16 divide.
CONFIG = ModelConfig.from_dict(tiny.get_config()).replace(
    hidden_size=64, head_dim=16, intermediate_size=48, num_experts=4, capacity_factor=2.0
)
GROUP = 16
SCHEMES = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}


@pytest.fixture(scope="module")
def model() -> Mixtral:
    return Mixtral(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens() -> jax.Array:
    return jnp.asarray(np.random.RandomState(0).randint(0, CONFIG.vocab_size, (3, 13)))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "spec, shape, scale_shape",
    [
        # w1 stacked [L, E, D, F]: a scale per layer, expert and output; int4 stores
        # [L, E, D / 16, 16, F], a scale per group of 16 inputs and output.
        ("EGCD,EDF->EGCF", (2, 3, 64, 8), {"int8": (2, 3, 1, 8), "int4": (2, 3, 4, 1, 8)}),
        # o_proj [N, H, D]: int8 per output; int4 per head, group of H and output.
        ("BTNH,NHD->BTD", (4, 32, 8), {"int8": (1, 1, 8), "int4": (4, 2, 1, 8)}),
    ],
)
def test_rounding_error_is_within_half_a_step(scheme, spec, shape, scale_shape):
    w = jax.random.normal(jax.random.key(0), shape) * jnp.linspace(0.1, 3.0, shape[-1])
    q = quantized.quantize(w, spec, scheme, GROUP)
    assert q.qvalue.dtype == quantized.QTYPES[scheme] and q.scale.dtype == jnp.float32
    assert q.scale.shape == scale_shape[scheme]
    if scheme == "int4":
        w = quantized.split_groups(w, spec, GROUP)
    step = np.asarray(quantized.dequantize(jnp.ones_like(q.qvalue), q.scale, jnp.float32))
    error = np.abs(np.asarray(quantized.dequantize(q.qvalue, q.scale, jnp.float32)) - w)
    assert np.all(error <= step / 2 * (1 + 1e-4))  # rounding to nearest, float32 ulps
    # qwix's absmax scale maps |w| <= absmax onto [-(qmax + 0.5), qmax + 0.5]: the
    # integer range is used to its ends.
    values = np.asarray(q.qvalue.astype(jnp.int8))
    assert values.min() >= -QMAX[scheme] - 1 and values.max() <= QMAX[scheme]
    assert np.abs(values).max() >= QMAX[scheme]


@pytest.mark.parametrize("scheme, tolerance, agree", [("int8", 0.02, 0.97), ("int4", 0.15, 0.85)])
def test_quantized_model_tracks_its_float_twin(model, tokens, scheme, tolerance, agree):
    q = quantize.quantize_model(model, scheme, GROUP)
    ref, out = model.forward(tokens), q.forward(tokens)
    scale = float(jnp.max(jnp.abs(ref.logits)))
    error = float(jnp.max(jnp.abs(out.logits - ref.logits)))
    router = float(jnp.mean(jnp.all(out.routing.experts == ref.routing.experts, axis=-1)))
    print(f"{scheme}: max logit error {error / scale:.2%} of max |logit|; router {router:.1%}")
    assert error <= tolerance * scale and router >= agree


def test_only_projections_and_experts_are_quantized(model):
    q = quantize.quantize_model(model, "int4", GROUP)
    float_params, params = flat_params(model), flat_params(q)
    quantized = {p[-2] for p in params if p[-1] == "qvalue"}
    assert quantized == {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"}
    for path in ("gate", "attn_norm", "moe_norm", "final_norm", "embed", "lm_head"):
        kept = [p for p in params if path in p]
        assert kept and all(params[p].dtype == jnp.float32 for p in kept)
        for p in kept:  # shared, untouched
            np.testing.assert_array_equal(np.asarray(params[p]), np.asarray(float_params[p]))


def test_cached_decode_of_a_quantized_model_equals_its_forward(model, tokens):
    q = quantize.quantize_model(model, "int8", GROUP)
    # Sliced from the stacked integers, and from each layer's and expert's own buffer.
    for pieces in (None, unstacked(q)):
        np.testing.assert_allclose(
            prefill_then_decode(q, tokens, pieces), q(tokens)[:, -1], atol=1e-4
        )
    # numpy cannot view int4 in place: its decode keeps the stacked weights (no copy).
    assert unstacked(quantize.quantize_model(model, "int4", GROUP)) is None


@pytest.fixture(scope="module")
def converted(tmp_path_factory, model) -> dict[str, Path]:
    """The model as a Hub-layout source (bfloat16) and its bf16, int8, int4 conversions."""
    from mixtral_jax.checkpoints.hub import params_to_hub

    tmp = tmp_path_factory.mktemp("quantized")
    hub = {
        k: np.asarray(v).astype(ml_dtypes.bfloat16)
        for k, v in params_to_hub({p: np.asarray(v) for p, v in flat_params(model).items()}, CONFIG)
    }
    src = write_layout(tmp, "hf-safetensors", hub, CONFIG)
    out = {"source": src}
    for scheme in (None, *SCHEMES):  # float parts in float32: exact comparisons below
        name = scheme or "float"
        out[name] = tmp / name
        convert.convert(
            src, out[name], "float32", quantize=scheme, group_size=GROUP, verify=True, quiet=True
        )
    return out


def _stored_bytes(directory: Path) -> dict[str, int]:
    """Bytes of the arrays as stored, by dtype, read back without targets."""
    sizes: dict[str, int] = {}
    for piece in (directory / "params").rglob("_CHECKPOINT_METADATA"):
        restored = ocp.StandardCheckpointer().restore(piece.parent.absolute())
        for leaf in jax.tree.leaves(restored):
            key = str(np.asarray(leaf).dtype)
            sizes[key] = sizes.get(key, 0) + np.asarray(leaf).nbytes
    return sizes


def test_quantized_checkpoints_round_trip_packed_and_smaller(converted):
    original = load(converted["float"])
    for scheme in SCHEMES:
        config, _ = read_config(converted[scheme])
        assert config.quantization == scheme and config.quant_group_size == GROUP
        stored = load(converted[scheme])
        # Converting quantized, quantizing on load and quantizing in memory agree exactly.
        on_load = load(converted["float"], quantize=scheme, group_size=GROUP)
        in_memory = quantize.quantize_model(original, scheme, GROUP)
        for path, value in flat_params(stored).items():
            for other in (on_load, in_memory):
                np.testing.assert_array_equal(
                    np.asarray(value).astype(np.float32),
                    np.asarray(flat_params(other)[path]).astype(np.float32),
                    err_msg=str(path),
                )
    float32, int8, int4 = (_stored_bytes(converted[n]) for n in ("float", *SCHEMES))
    assert "uint8" in int4 and "int8" not in int4  # int4: two values per byte
    # The quantized weights: all float32 parameters but embedding, head, norms, router.
    c = CONFIG
    kept = c.vocab_size * c.hidden_size * 2 + c.hidden_size * (
        1 + c.num_layers * (2 + c.num_experts)
    )
    weights = float32["float32"] // 4 - kept
    assert int8["int8"] == weights and int4["uint8"] == weights // 2


MESH_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import mixtral_jax
auto = (jax.sharding.AxisType.Auto,) * 3
mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "expert"), axis_types=auto)
model = mixtral_jax.load(sys.argv[1], mesh=mesh)
experts = model.layers.moe.experts
tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 200)
print(json.dumps({
    "qvalue_spec": [str(a) for a in experts.w1.qvalue[...].sharding.spec],
    "scale_spec": [str(a) for a in experts.w1.scale[...].sharding.spec],
    "logits": np.asarray(model(tokens)).tolist(),
}))
"""


def test_sharded_quantized_model_equals_the_single_device_one(converted):
    """8 virtual CPU devices (a subprocess: the flag must precede jax's import)."""
    out = run_script(MESH_SCRIPT, str(converted["int4"]))
    # w1 [L, E, D / 16, 16, F] and its scales [L, E, D / 16, 1, F] split alike.
    assert out["qvalue_spec"] == ["None", "expert", "fsdp", "None", "tensor"]
    assert out["scale_spec"] == ["None", "expert", "fsdp", "None", "tensor"]
    single = load(converted["int4"])
    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 200)
    np.testing.assert_allclose(np.array(out["logits"]), single(tokens), atol=1e-5)


def test_qlora_trains_only_the_adapters_and_merges_to_float():
    from configs import finetune_tiny
    from mixtral_jax.parallel.mesh import make_mesh
    from mixtral_jax.training import lora, steps, train

    config = finetune_tiny.get_config()
    config.model.update(quantization="int8", vocab_size=256, num_experts=4)
    config.lora.rank = 4
    mesh = make_mesh(devices=jax.devices()[:1])
    model = train.build_model(config, mesh)
    assert model.config.quantization == "int8" and model.config.lora_rank == 4
    step = steps.jit_train_step(
        model,
        train.make_optimizer(config.optimizer, 10),
        mesh,
        trainable=train.trainable_filter(config),
    )
    base = {p: np.asarray(v) for p, v in flat_params(step.frozen).items()}
    assert any(p[-1] == "qvalue" for p in base)  # the frozen base is integers
    rng = np.random.RandomState(0)
    batch = {
        "tokens": jnp.asarray(rng.randint(0, 256, (8, 32))),
        "targets": jnp.asarray(rng.randint(0, 256, (8, 32))),
    }
    state = step.init(model)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["cross_entropy"]))
    assert losses[-1] < losses[0]
    trained = flat_params(state.params)
    assert trained and all(any(k.endswith("_lora") for k in p) for p in trained)
    for path, value in flat_params(step.frozen).items():
        np.testing.assert_array_equal(np.asarray(value), base[path])
    # Merged into float weights: the same function, without integers.
    adapted = step.model(state)
    merged = lora.merge(adapted)
    assert merged.config.quantization is None and merged.config.lora_rank == 0
    tokens = batch["tokens"][:2]
    np.testing.assert_allclose(merged(tokens), adapted(tokens), atol=1e-4)


def test_a_quantized_base_is_not_fine_tuned_in_full():
    from configs import finetune_tiny
    from mixtral_jax.parallel.mesh import make_mesh
    from mixtral_jax.training import train

    config = finetune_tiny.get_config()
    config.model.quantization = "int4"
    config.model.quant_group_size = 16
    with pytest.raises(ConfigError, match="QLoRA, config.lora.rank > 0"):
        train.build_model(config, make_mesh(devices=jax.devices()[:1]))


def test_bad_quantization_settings_say_what_to_choose(tmp_path, converted):
    with pytest.raises(ConfigError, match="choose one of int8, int4"):
        CONFIG.replace(quantization="int3")
    with pytest.raises(ConfigError, match="group size 24 does not divide hidden_size=64"):
        CONFIG.replace(quantization="int4", quant_group_size=24)
    # The suggestions divide this model's sizes (64, 16 and 48): 16, 8 or 4.
    with pytest.raises(ConfigError, match=r"for this model e\.g\. 16, 8 or 4$"):
        CONFIG.replace(quantization="int4", quant_group_size=32)
    with pytest.raises(convert.ConvertError, match="--quantize 'int3': choose one of int8, int4"):
        convert.convert(converted["source"], tmp_path / "out", quantize="int3", quiet=True)
    with pytest.raises(convert.ConvertError, match="does not divide head_dim=16"):
        convert.convert(
            converted["source"], tmp_path / "out", quantize="int4", group_size=32, quiet=True
        )
    assert not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(CheckpointError, match="already quantized"):
        load(converted["int8"], quantize="int4")
    with pytest.raises(CheckpointError, match="quantize='int2'"):
        load(converted["float"], quantize="int2")
    with pytest.raises(convert.ConvertError, match="export the float checkpoint"):
        convert.export_hf(converted["int8"], tmp_path / "hf", quiet=True)
    cli = [sys.executable, str(ROOT / "tools" / "convert.py"), str(converted["source"])]
    result = subprocess.run(
        [*cli, str(tmp_path / "cli"), "--quantize", "int4", "--group_size", "7"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "group size 7 does not divide" in result.stderr
    assert not (tmp_path / "cli").exists()


def test_agreement_counts_tokens_and_expert_sets():
    """Two batches by hand: [1, B=1, T=4, k=2] expert choices as sorted sets."""

    def preds(top1, experts, nll):
        return {
            "nll": np.asarray([nll], np.float32),
            "weights": np.asarray([[1, 1, 1, 0]], np.float32),  # the last is a prompt token
            "top1": np.asarray([top1]),
            "real": np.asarray([[True, True, True, True]]),
            "experts": np.asarray(experts)[:, None],  # [L=2, 1, 4, 2]
        }

    same = [[[0, 1], [2, 3], [0, 3], [1, 2]], [[0, 1], [0, 1], [0, 1], [0, 1]]]
    moved = [[[0, 1], [2, 4], [0, 3], [1, 2]], [[0, 2], [0, 2], [0, 1], [0, 1]]]
    reference = [preds([5, 6, 7, 8], same, [1.0, 1.0, 1.0, 9.0])]
    candidate = [preds([5, 0, 7, 0], moved, [1.5, 1.5, 1.5, 0.0])]
    result = evaluate.agreement(reference, candidate)
    assert result["tokens"] == 3
    assert result["reference"]["loss"] == pytest.approx(1.0)
    assert result["candidate"]["loss"] == pytest.approx(1.5)
    assert result["perplexity_change"] == pytest.approx(np.exp(0.5) - 1)
    assert result["top1_agreement"] == pytest.approx(2 / 3)  # the prompt token is not counted
    assert result["router_agreement"] == pytest.approx([3 / 4, 2 / 4])  # every real token


def test_evaluate_compares_a_checkpoint_with_its_quantization(capsys):
    """The CLI on the embedded model (4 layers) and a little of its held-out data."""
    data = EMBEDDED.parent / "sample" / "eval_code.jsonl"
    argv = ["--data", str(data), "--seq_len", "32", "--batch_size", "2", "--max_batches", "1"]
    assert evaluate.main([*argv, "--checkpoint", str(EMBEDDED), "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert float(lines["float"].split()[2]) > 1 and float(lines["int8"].split()[2]) > 1
    assert "top-1 agreement:" in out
    per_layer = out.split("per layer:")[1].split()
    assert len(per_layer) == 4 and all(p.endswith("%") for p in per_layer)


def test_generate_cli_names_a_bad_scheme(capsys):
    from mixtral_jax.inference.cli import main

    assert main(["--prompt", "def f(", "--quantize", "int3"]) == 2
    assert "quantize='int3': choose one of int8, int4" in capsys.readouterr().err

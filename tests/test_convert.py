"""tools/convert.py end to end: every layout to a checkpoint with the reference's logits,
back to the Hub bit for bit, and every bad input refused with nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mixtral_jax.checkpoints import convert
from mixtral_jax.checkpoints.hub import WeightError
from mixtral_jax.checkpoints.load import EMBEDDED, load, load_tokenizer
from mixtral_jax.checkpoints.sources import SafetensorsFile, SourceError
from mixtral_jax.checkpoints.store import CheckpointError, read_config, save
from mixtral_jax.params import flat_params
from tests import run_script
from tests.reference import hf_forward, hf_twin
from tests.test_sources import CONFIG, LAYOUTS, hub_tensors, random_hub, write_layout

ROOT = Path(__file__).resolve().parents[1]


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out")))


@pytest.mark.parity
@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_checkpoint_gives_the_reference_logits(tmp_path, layout):
    hf, _ = hf_twin(CONFIG, seed=4)
    src = write_layout(tmp_path, layout, hub_tensors(hf))
    summary = convert.convert(src, tmp_path / "out", dtype="float32", verify=True, quiet=True)
    assert summary["verified_tensors"] > 0

    model = load(tmp_path / "out")
    tokens = np.random.RandomState(1).randint(0, CONFIG.vocab_size, (2, 21))
    ref_logits, _, _ = hf_forward(hf, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - ref_logits).max() <= 1e-4


def test_hub_to_checkpoint_to_hub_is_bit_exact_in_bfloat16(tmp_path):
    hub = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hub().items()}
    src = write_layout(tmp_path, "hf-safetensors", hub)
    (src / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    convert.convert(src, tmp_path / "out", dtype="bfloat16", quiet=True)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    convert.export_hf(tmp_path / "out", tmp_path / "hf", quiet=True)

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hub)
    back = {}
    for name in set(index["weight_map"].values()):
        f = SafetensorsFile(tmp_path / "hf" / name)
        back.update({k: f.get(k) for k in f.entries})
    for key, value in hub.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key].view(np.uint16), value.view(np.uint16), key)
    assert (tmp_path / "hf" / "tokenizer.model").is_file()


@pytest.mark.parity
def test_exported_weights_load_in_transformers(tmp_path):
    hf, model = hf_twin(CONFIG, seed=9)
    save(tmp_path / "ck", flat_params(model), CONFIG, dtype="float32")
    convert.export_hf(tmp_path / "ck", tmp_path / "hf", quiet=True)
    import transformers

    reloaded = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    original = hf.state_dict()
    for key, value in reloaded.state_dict().items():
        assert (value == original[key]).all(), key
    tokens = np.random.RandomState(2).randint(0, CONFIG.vocab_size, (1, 17))
    a, _, _ = hf_forward(hf, tokens)
    b, _, _ = hf_forward(reloaded, tokens)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_killed_conversion_s_leftovers_are_cleared_by_the_next(tmp_path):
    src = write_layout(tmp_path, "hf-safetensors", random_hub())
    stale = tmp_path / ".out.partial-999999999"  # no such process
    (stale / "params").mkdir(parents=True)
    convert.convert(src, tmp_path / "out", quiet=True)
    assert not stale.exists()
    assert leftovers(tmp_path) == ["out"]


def test_existing_output_needs_force(tmp_path):
    src = write_layout(tmp_path, "hf-safetensors", random_hub())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(convert.ConvertError, match="already exists; pass --force"):
        convert.convert(src, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert.convert(src, tmp_path / "out", force=True, quiet=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    read_config(tmp_path / "out")


def _break(kind: str, d: Path) -> None:
    if kind == "missing tensor":
        f = SafetensorsFile(d / "model.safetensors")
        tensors = {k: f.get(k) for k in f.entries if "experts.5.w3" not in k or "layers.1" not in k}
        from mixtral_jax.checkpoints.sources import write_safetensors

        write_safetensors(d / "model.safetensors", {k: np.array(v) for k, v in tensors.items()})
    elif kind == "wrong shape":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] += 8
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:-64])
    elif kind == "unexpected tensor":
        f = SafetensorsFile(d / "model.safetensors")
        tensors = {k: np.array(f.get(k)) for k in f.entries}
        tensors["model.layers.0.mlp.shared_expert.weight"] = np.zeros(4, np.float32)
        from mixtral_jax.checkpoints.sources import write_safetensors

        write_safetensors(d / "model.safetensors", tensors)


@pytest.mark.parametrize(
    "kind,error,message",
    [
        (
            "missing tensor",
            WeightError,
            r"missing 1 tensor\(s\): model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight",
        ),
        ("wrong shape", WeightError, r"does not match the config"),
        ("truncated", SourceError, r"model\.safetensors: tensor .* lies past the end"),
        ("unexpected tensor", WeightError, r"unexpected tensor 'model\.layers\.0\.mlp\.shared"),
    ],
)
def test_bad_sources_fail_and_leave_nothing_behind(tmp_path, kind, error, message):
    src = write_layout(tmp_path, "hf-safetensors", random_hub())
    _break(kind, src)
    with pytest.raises(error, match=message):
        convert.convert(src, tmp_path / "out", quiet=True)
    assert leftovers(tmp_path) == []


def test_cli_reports_errors_with_a_nonzero_exit_and_no_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), str(empty), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "unknown checkpoint layout" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_summarises(tmp_path):
    src = write_layout(tmp_path, "mistral-inference", random_hub())
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert.py"),
            str(src),
            str(tmp_path / "out"),
            "--dtype",
            "float32",
            "--verify",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert " parameters, " in result.stdout and "verified" in result.stdout
    assert "converting mistral-inference: 100.0%" in result.stderr
    config, dtype = read_config(tmp_path / "out")
    assert dtype == "float32" and config.num_layers == CONFIG.num_layers


def test_not_a_checkpoint_is_named():
    with pytest.raises(CheckpointError, match="not a mixtral_jax checkpoint"):
        load(ROOT / "configs")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path):
    """A data file truncated (a full disk, a killed copy) and a config that does not
    parse: one line naming the file; no TensorStore traceback, nor the echoes of the
    reads that were pending (pytest would report them as unraisable exceptions)."""
    shutil.copytree(EMBEDDED, tmp_path / "model")
    piece = tmp_path / "model" / "params" / "layer_00001" / "expert_002"
    data = max(piece.glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is damaged: ") as error:
        load(tmp_path / "model")
    assert "layer_00001/expert_002" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "model" / "mixtral_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="mixtral_config.json does not parse"):
        load(tmp_path / "model")


MESH_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import mixtral_jax
assert len(jax.devices()) == 8
auto = (jax.sharding.AxisType.Auto,) * 3
mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "expert"), axis_types=auto)
model = mixtral_jax.load(sys.argv[1], mesh=mesh)
w1 = model.layers.moe.experts.w1[...]
tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 200)
print(json.dumps({
    "w1_spec": [str(a) for a in w1.sharding.spec],
    "w1_shard_shape": list(w1.addressable_shards[0].data.shape),
    "logits": np.asarray(model(tokens)).tolist(),
}))
"""


def test_load_onto_a_mesh_places_each_parameter_by_the_rules(tmp_path):
    """8 virtual CPU devices (a subprocess: the flag must precede jax's import)."""
    from flax import nnx

    from mixtral_jax import Mixtral

    model = Mixtral(CONFIG, rngs=nnx.Rngs(5))
    save(tmp_path / "ck", flat_params(model), CONFIG)
    out = run_script(MESH_SCRIPT, str(tmp_path / "ck"))
    # w1 [L, E, D, F] = ("layers", "expert", "embed", "mlp") -> (None, expert, fsdp, tensor)
    assert out["w1_spec"] == ["None", "expert", "fsdp", "tensor"]
    L, E, D, F = CONFIG.num_layers, CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size
    assert out["w1_shard_shape"] == [L, E // 2, D // 2, F // 2]
    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 200)
    np.testing.assert_allclose(np.array(out["logits"]), model(tokens), atol=1e-5)


def test_tokenizer_is_loaded_when_present(tmp_path):
    with pytest.raises(CheckpointError, match="has no tokenizer.model"):
        load_tokenizer(tmp_path)


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    import signal
    import time

    src = tmp_path / "synthetic"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "synthetic_checkpoint.py"),
            str(src),
            "--layers",
            "40",
            "--hidden",
            "256",
            "--vocab",
            "512",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "convert.py"), str(src), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # A shell that starts a job in the background (``.ci/run &``) starts it with SIGINT
        # ignored, and children inherit that; Ctrl-C in a terminal finds the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    staging = []
    for _ in range(2400):  # wait until the conversion has started writing (a busy CI: 2 min)
        staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
        if staging and (staging[0] / "params").exists():
            break
        time.sleep(0.05)
    assert staging, "conversion never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: nothing was written" in err
    assert leftovers(tmp_path) == []

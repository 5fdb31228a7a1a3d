"""Reading the three PyTorch checkpoint layouts, and refusing bad ones with clear errors."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import tiny
from mixtral_jax import ModelConfig
from mixtral_jax.checkpoints.hub import params_from_hub, params_to_hub
from mixtral_jax.checkpoints.sources import SourceError, _hub_to_rotary, open_source
from mixtral_jax.params import flat_params
from tests.reference import hf_forward, hf_twin, torch_and_transformers

CONFIG = ModelConfig.from_dict(tiny.get_config())


def params_json(c: ModelConfig) -> dict:
    return dict(
        dim=c.hidden_size,
        n_layers=c.num_layers,
        head_dim=c.head_dim,
        hidden_dim=c.intermediate_size,
        n_heads=c.num_heads,
        n_kv_heads=c.num_kv_heads,
        norm_eps=c.rms_norm_eps,
        vocab_size=c.vocab_size,
        rope_theta=c.rope_theta,
        max_seq_len=c.max_position_embeddings,
        moe=dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok),
    )


def hub_to_mistral(hub: dict[str, np.ndarray], c: ModelConfig, stacked: bool) -> dict:
    """The Mistral layouts, derived from Hub tensors by the inverse renames/permutation."""
    out = {}
    renames = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    for key, w in hub.items():
        if key in renames:
            out[renames[key]] = w
            continue
        layer = int(re.match(r"model\.layers\.(\d+)\.", key)[1])
        p = f"layers.{layer}."
        if key.endswith("input_layernorm.weight"):
            out[p + "attention_norm.weight"] = w
        elif key.endswith("post_attention_layernorm.weight"):
            out[p + "ffn_norm.weight"] = w
        elif "self_attn" in key:
            name = re.search(r"([qkvo])_proj", key)[1]
            if name == "q":
                w = _hub_to_rotary(w, c.num_heads)
            if name == "k":
                w = _hub_to_rotary(w, c.num_kv_heads)
            out[p + f"attention.w{name}.weight"] = w
        elif key.endswith("gate.weight"):
            out[p + ("block_sparse_moe" if stacked else "feed_forward") + ".gate.weight"] = w
        else:
            e, name = re.search(r"experts\.(\d+)\.(w[123])", key).groups()
            if stacked:
                out.setdefault((layer, name), {})[int(e)] = w.T if name == "w2" else w
            else:
                out[p + f"feed_forward.experts.{e}.{name}.weight"] = w
    if stacked:
        for lk in [k for k in out if isinstance(k, tuple)]:
            layer, name = lk
            experts = out.pop(lk)
            out[f"layers.{layer}.block_sparse_moe.{name}"] = np.concatenate(
                [experts[e] for e in range(c.num_experts)]
            )
    return out


def write_layout(tmp_path, layout: str, hub: dict[str, np.ndarray], c: ModelConfig = CONFIG):
    d = tmp_path / layout
    d.mkdir()
    if layout == "hf-safetensors":
        (d / "config.json").write_text(json.dumps(c.to_hf()))
        save_file(hub, str(d / "model.safetensors"))
    elif layout == "hf-sharded":
        (d / "config.json").write_text(json.dumps(c.to_hf()))
        keys = sorted(hub)
        halves = {
            "model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2],
        }
        for name, ks in halves.items():
            save_file({k: hub[k] for k in ks}, str(d / name))
        weight_map = {k: name for name, ks in halves.items() for k in ks}
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout == "hf-bin":
        torch, _ = torch_and_transformers()
        (d / "config.json").write_text(json.dumps(c.to_hf()))
        torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, d / "pytorch_model.bin")
    elif layout == "mistral-inference":
        (d / "params.json").write_text(json.dumps(params_json(c)))
        save_file(hub_to_mistral(hub, c, stacked=False), str(d / "consolidated.safetensors"))
    elif layout == "mistral":
        torch, _ = torch_and_transformers()
        (d / "params.json").write_text(json.dumps(params_json(c)))
        tensors = hub_to_mistral(hub, c, stacked=True)
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, d / "consolidated.00.pt")
    return d


LAYOUTS = ["hf-safetensors", "hf-sharded", "hf-bin", "mistral-inference", "mistral"]


def hub_tensors(hf) -> dict[str, np.ndarray]:
    """A transformers model's weights in the Hub layout, as numpy."""
    return dict(params_to_hub(params_from_hub(hf.state_dict().items(), CONFIG), CONFIG))


@pytest.mark.parity
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_reference_logits(tmp_path, layout):
    hf, model = hf_twin(CONFIG, seed=11)
    source = open_source(write_layout(tmp_path, layout, hub_tensors(hf)))
    assert source.layout == ("hf" if layout.startswith("hf") else layout)
    assert source.config.replace(router_aux_loss_coef=0.02) == CONFIG.replace(
        router_aux_loss_coef=0.02,
        router_z_loss_coef=source.config.router_z_loss_coef,
        group_size=source.config.group_size,
        initializer_range=source.config.initializer_range,
    )

    params = params_from_hub(source.tensors(), source.config)
    ours = flat_params(model)
    for path, value in params.items():
        np.testing.assert_array_equal(value, np.asarray(ours[path]), err_msg=str(path))
    tokens = np.random.RandomState(0).randint(0, CONFIG.vocab_size, (2, 19))
    ref_logits, _, _ = hf_forward(hf, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - ref_logits).max() <= 1e-4


def hub_style_params_json(c: ModelConfig) -> dict:
    """The params.json of the first release's consolidated.0N.pt: Hugging Face-style keys,
    no head_dim (hidden / heads), no top-k, and the sliding window as a string."""
    values = dict(
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_heads,
        num_hidden_layers=c.num_layers,
        num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.intermediate_size,
        num_local_experts=c.num_experts,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        vocab_size=c.vocab_size,
    )
    if c.sliding_window is not None:
        values["sliding_window"] = str(c.sliding_window)
    return values


@pytest.mark.parity
@pytest.mark.parametrize("window", [None, 6])
def test_the_first_releases_hub_style_params_json_gives_the_reference_logits(tmp_path, window):
    """params.json in the keys transformers' convert_mixtral_weights_to_hf.py reads,
    with the weights as Mistral released them (stacked experts, interleaved rotary)."""
    config = CONFIG.replace(head_dim=CONFIG.hidden_size // CONFIG.num_heads, sliding_window=window)
    hf, model = hf_twin(config, seed=12)
    d = write_layout(
        tmp_path,
        "mistral",
        dict(params_to_hub(params_from_hub(hf.state_dict().items(), config), config)),
        config,
    )
    (d / "params.json").write_text(json.dumps(hub_style_params_json(config)))
    source = open_source(d)
    assert source.layout == "mistral"
    c = source.config
    assert (c.head_dim, c.num_experts_per_tok, c.sliding_window) == (12, 2, window)
    assert (c.rope_theta, c.max_position_embeddings) == (1e6, 32768)
    params = params_from_hub(source.tensors(), c)
    ours = flat_params(model)
    for path, value in params.items():
        np.testing.assert_array_equal(value, np.asarray(ours[path]), err_msg=str(path))
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 19))
    ref_logits, _, _ = hf_forward(hf, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - ref_logits).max() <= 1e-4


def test_a_hub_style_params_json_with_a_bad_window_or_a_missing_key_says_which(tmp_path):
    values = hub_style_params_json(CONFIG.replace(head_dim=12, sliding_window=8))
    values["sliding_window"] = "eight"
    (tmp_path / "params.json").write_text(json.dumps(values))
    with pytest.raises(SourceError, match="sliding_window 'eight' is not a number of tokens"):
        open_source(tmp_path)
    values["sliding_window"] = "null"
    del values["rms_norm_eps"]
    (tmp_path / "params.json").write_text(json.dumps(values))
    with pytest.raises(SourceError, match="params.json lacks the field 'rms_norm_eps'"):
        open_source(tmp_path)


def architecture(c: ModelConfig) -> dict:
    """The config.json fields that shape the model (params.json has no training knobs)."""
    training = ("router_aux_loss_coef", "initializer_range")
    return {k: v for k, v in c.to_hf().items() if k not in training}


def random_hub() -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    from mixtral_jax.model.mixtral import param_shapes

    params = {p: rng.randn(*s).astype(np.float32) for p, s in param_shapes(CONFIG).items()}
    return dict(params_to_hub(params, CONFIG))


def test_mistral_inference_layout_without_torch(tmp_path):
    hub = random_hub()
    source = open_source(write_layout(tmp_path, "mistral-inference", hub))
    back = dict(source.tensors())
    assert back.keys() == hub.keys()
    for key, value in hub.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_truncated_safetensors_names_the_file(tmp_path):
    d = write_layout(tmp_path, "hf-safetensors", random_hub())
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SourceError, match=r"model\.safetensors: tensor .* lies past the end"):
        list(open_source(d).tensors())
    path.write_bytes(data[:5])
    with pytest.raises(SourceError, match="truncated safetensors file"):
        list(open_source(d).tensors())


def test_index_naming_a_missing_shard(tmp_path):
    d = write_layout(tmp_path, "hf-sharded", random_hub())
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        SourceError, match="names shard 'model-00002-of-00002.safetensors', which is missing"
    ):
        open_source(d)


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_with_a_path_outside_the_directory_is_refused(tmp_path, name):
    d = write_layout(tmp_path, "hf-sharded", random_hub())
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match="must be a plain file name"):
        open_source(d)


def test_unknown_layout_lists_what_it_found(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(SourceError, match=r"unknown checkpoint layout \(found weights.npz\)"):
        open_source(tmp_path)


def test_params_json_without_moe_is_not_mixtral(tmp_path):
    values = params_json(CONFIG)
    del values["moe"]
    (tmp_path / "params.json").write_text(json.dumps(values))
    with pytest.raises(SourceError, match="neither a 'moe' section .* nor 'num_local_experts'"):
        open_source(tmp_path)


class _Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    torch, _ = torch_and_transformers()
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    marker = tmp_path / "payload_ran"
    state = {"model.norm.weight": torch.ones(CONFIG.hidden_size), "evil": _Payload(marker)}
    torch.save(state, d / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(SourceError, match="refused without running it"):
        list(open_source(d).tensors())
    assert not marker.exists(), "the pickled payload ran"

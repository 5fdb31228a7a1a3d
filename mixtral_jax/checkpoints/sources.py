"""Reading PyTorch-world Mixtral checkpoints lazily, one tensor at a time, as Hub keys.

Three layouts are recognised from the files in a directory:

  hf                   config.json + model.safetensors[.index.json] or
                       pytorch_model.bin[.index.json] (the Hub layout, see hub.py)
  mistral-inference    params.json + consolidated.safetensors
                       (layers.N.feed_forward.experts.M.w1.weight, attention.wq ...)
  mistral              params.json + consolidated.NN.pt, Mistral's original release
                       (layers.N.block_sparse_moe.w1 stacks all experts, [E*F, D];
                       its w2 is stored transposed relative to the Hub's)

Both Mistral layouts keep q and k in the interleaved rotary order; the Hub's
"rotate half" order is  w.view(n, H/2, 2, D).transpose(1, 2).reshape(n*H, D),
with n = heads for wq and n = KV heads for wk. `Source.tensors()` yields every
tensor already renamed and permuted into the Hub layout, so `hub.py` stays
the one mapping to our parameters.

safetensors files are parsed here (an 8-byte header length, a JSON header,
then the data) and memory-mapped; .bin/.pt files go through
`torch.load(mmap=True, weights_only=True)`, which refuses pickles that would
run code. Nothing is read before it is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mixtral_jax.checkpoints.hub import as_numpy
from mixtral_jax.model.config import ConfigError, ModelConfig


class SourceError(ValueError):
    """A checkpoint directory or file that cannot be read as a Mixtral checkpoint."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """A memory-mapped .safetensors file; `get(key)` reads one tensor."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise SourceError(
                    f"{path}: header length {header_len} runs past the end of the file "
                    f"({size} bytes): the file is truncated or not safetensors"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SourceError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.start = 8 + header_len
        self.entries = header
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise SourceError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
            itemsize = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).itemsize
            if not 0 <= begin <= end or self.start + end > size:
                raise SourceError(
                    f"{path}: tensor {key!r} lies past the end of the file ({size} bytes): "
                    "the file is truncated; download it again"
                )
            if end - begin != itemsize * int(np.prod(entry["shape"])):
                raise SourceError(
                    f"{path}: tensor {key!r} has a size that disagrees with its shape"
                )

    def get(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        data = np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=self.start + begin, shape=(end - begin,)
        )
        return data.view(dtype).reshape(entry["shape"])


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes a .safetensors file (the format read by `SafetensorsFile`)."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for key, value in tensors.items():
        header[key] = {
            "dtype": names[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for value in tensors.values():
            f.write(np.ascontiguousarray(value).tobytes())


def torch_load(path: Path) -> dict[str, Any]:
    """A state dict from a .bin/.pt file, memory-mapped, refusing pickled code."""
    try:
        import torch
    except ImportError:
        raise SourceError(
            f"{path}: reading .bin/.pt checkpoints needs PyTorch; install the CPU build "
            "(pip install torch) or convert the files to safetensors"
        ) from None
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise SourceError(
            f"{path}: not a plain tensor checkpoint, refused without running it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Files from untrusted sources may carry code; use safetensors when you can."
        ) from None


def _rotary_to_hub(w: np.ndarray, n: int) -> np.ndarray:
    """Interleaved rotary rows (Mistral) -> rotate-half rows (Hub), for n heads."""
    rows, D = w.shape
    H = rows // n
    return w.reshape(n, H // 2, 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


def _hub_to_rotary(w: np.ndarray, n: int) -> np.ndarray:
    """The inverse of `_rotary_to_hub` (to write Mistral layouts, e.g. in tests)."""
    rows, D = w.shape
    H = rows // n
    return w.reshape(n, 2, H // 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


_MISTRAL_RENAMES = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (
        r"layers\.(\d+)\.(?:feed_forward|block_sparse_moe)\.gate\.weight",
        r"model.layers.\1.block_sparse_moe.gate.weight",
    ),
    (
        r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight",
        r"model.layers.\1.block_sparse_moe.experts.\2.\3.weight",
    ),
]
_STACKED_EXPERTS = re.compile(r"^layers\.(\d+)\.block_sparse_moe\.(w[123])$")


def mistral_to_hub(key: str, tensor: Any, config: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """One tensor of a Mistral layout as (Hub key, tensor) pairs (stacked experts split)."""
    m = _STACKED_EXPERTS.match(key)
    if m:
        layer, name = m.groups()
        array = as_numpy(tensor)
        E, F, D = config.num_experts, config.intermediate_size, config.hidden_size
        if array.shape != (E * F, D):
            raise SourceError(
                f"{key}: shape {array.shape}, expected {(E * F, D)} "
                f"({E} experts of [{F}, {D}] stacked)"
            )
        out = []
        for e, w in enumerate(array.reshape(E, F, D)):
            out.append(
                (
                    f"model.layers.{layer}.block_sparse_moe.experts.{e}.{name}.weight",
                    w.T if name == "w2" else w,
                )
            )
        return out
    for pattern, target in _MISTRAL_RENAMES:
        if re.fullmatch(pattern, key):
            hub = re.sub(f"^{pattern}$", target, key)
            array = as_numpy(tensor)
            if hub.endswith("q_proj.weight"):
                array = _rotary_to_hub(array, config.num_heads)
            elif hub.endswith("k_proj.weight"):
                array = _rotary_to_hub(array, config.num_kv_heads)
            return [(hub, array)]
    raise SourceError(f"unexpected tensor {key!r} in a Mistral checkpoint")


REQUIRED = object()
# Our field: (its key, default) in Mistral's own form of params.json, then in the
# Hugging Face-style form of the first release. A `moe.` key lies in the `moe` section.
_PARAMS_JSON = {
    "vocab_size": (("vocab_size", REQUIRED), ("vocab_size", REQUIRED)),
    "hidden_size": (("dim", REQUIRED), ("hidden_size", REQUIRED)),
    "intermediate_size": (("hidden_dim", REQUIRED), ("intermediate_size", REQUIRED)),
    "num_layers": (("n_layers", REQUIRED), ("num_hidden_layers", REQUIRED)),
    "num_heads": (("n_heads", REQUIRED), ("num_attention_heads", REQUIRED)),
    "num_kv_heads": (("n_kv_heads", None), ("num_key_value_heads", None)),  # None: num_heads
    "head_dim": (("head_dim", None), ("head_dim", None)),  # None: hidden / heads
    "num_experts": (("moe.num_experts", REQUIRED), ("num_local_experts", REQUIRED)),
    # The first release's file names no top-k; Mixtral routes to 2 (MixtralConfig's default).
    "num_experts_per_tok": (("moe.num_experts_per_tok", REQUIRED), ("num_experts_per_tok", 2)),
    # Mixtral's theta; transformers' own converter wrongly defaults to 1e4.
    "rope_theta": (("rope_theta", 1e6), ("rope_theta", 1e6)),
    "rms_norm_eps": (("norm_eps", 1e-5), ("rms_norm_eps", REQUIRED)),
    "max_position_embeddings": (("max_seq_len", 32768), ("max_position_embeddings", 32768)),
    "sliding_window": (("sliding_window", None), ("sliding_window", None)),
}


def config_from_params_json(params: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from Mistral's params.json, in either of its two forms: Mistral's
    own keys with a `moe` section (`dim`, `n_layers`, `moe.num_experts` ...), or the
    Hugging Face-style keys that came with the first release's consolidated.0N.pt
    (`hidden_size`, `num_local_experts` ..., `sliding_window` as a string), the form
    transformers' convert_mixtral_weights_to_hf.py reads."""
    hf_style = "num_local_experts" in params or "hidden_size" in params
    if not hf_style and not params.get("moe"):
        raise SourceError(
            "params.json has neither a 'moe' section (Mistral's keys) nor 'num_local_experts' "
            "(the Hugging Face-style keys of the first release): this is not a Mixtral checkpoint"
        )
    flat = dict(params) | {f"moe.{k}": v for k, v in (params.get("moe") or {}).items()}
    values = {}
    for field, forms in _PARAMS_JSON.items():
        key, default = forms[hf_style]
        if key not in flat and default is REQUIRED:
            raise SourceError(f"params.json lacks the field {key!r}")
        values[field] = flat.get(key, default)
    heads = values["num_heads"]
    if values["num_kv_heads"] is None:
        values["num_kv_heads"] = heads
    if values["head_dim"] is None and isinstance(heads, int) and heads > 0:
        values["head_dim"] = values["hidden_size"] // heads
    values["rope_theta"] = float(values["rope_theta"])
    values["sliding_window"] = _window(values["sliding_window"])
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as e:
        raise SourceError(f"params.json: {e}") from None


def _window(value: Any) -> int | None:
    """The release writes `sliding_window` as a string ("4096"); null or "null": none."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SourceError(
            f"params.json: sliding_window {value!r} is not a number of tokens or null"
        ) from None


@dataclasses.dataclass
class Source:
    """A checkpoint directory: its layout, config and files."""

    directory: Path
    layout: str  # "hf" | "mistral-inference" | "mistral"
    config: ModelConfig
    files: list[Path]

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor as (Hub key, array), one file and one tensor at a time."""
        for path in self.files:
            if path.suffix == ".safetensors":
                f = SafetensorsFile(path)
                items = ((k, f.get(k)) for k in f.entries)
            else:
                items = iter(torch_load(path).items())
            for key, tensor in items:
                if self.layout == "hf":
                    yield key, as_numpy(tensor)
                else:
                    yield from mistral_to_hub(key, tensor, self.config)

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _shards_from_index(directory: Path, index_name: str) -> list[Path]:
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise SourceError(f"{index_path}: not a valid index ({e})") from None
    shards = []
    for name in dict.fromkeys(weight_map.values()):  # unique, in order
        if Path(name).is_absolute() or ".." in Path(name).parts or "/" in name or "\\" in name:
            raise SourceError(
                f"{index_path}: refuses shard name {name!r} (must be a plain "
                "file name inside the checkpoint directory)"
            )
        if not (directory / name).is_file():
            raise SourceError(
                f"{index_path} names shard {name!r}, which is missing from "
                f"{directory}; download it again"
            )
        shards.append(directory / name)
    return shards


def open_source(directory: str | Path) -> Source:
    """Detects the layout of a checkpoint directory and reads its config."""
    d = Path(directory)
    if not d.is_dir():
        raise SourceError(f"{d} is not a directory")
    if (d / "config.json").is_file():
        config = ModelConfig.from_hf(json.loads((d / "config.json").read_text()))
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (d / index).is_file():
                return Source(d, "hf", config, _shards_from_index(d, index))
            if (d / single).is_file():
                return Source(d, "hf", config, [d / single])
        raise SourceError(
            f"{d} has config.json but no model.safetensors[.index.json] or "
            "pytorch_model.bin[.index.json]"
        )
    if (d / "params.json").is_file():
        config = config_from_params_json(json.loads((d / "params.json").read_text()))
        if (d / "consolidated.safetensors").is_file():
            return Source(d, "mistral-inference", config, [d / "consolidated.safetensors"])
        pts = sorted(d.glob("consolidated.*.pt"))
        if pts:
            return Source(d, "mistral", config, pts)
        raise SourceError(
            f"{d} has params.json but no consolidated.safetensors or consolidated.NN.pt"
        )
    found = ", ".join(sorted(p.name for p in d.iterdir())[:10]) or "nothing"
    raise SourceError(
        f"{d}: unknown checkpoint layout (found {found}). Expected a Hugging Face download "
        "(config.json + model*.safetensors), Mistral's release (params.json + "
        "consolidated.NN.pt) or mistral-inference's (params.json + consolidated.safetensors)"
    )

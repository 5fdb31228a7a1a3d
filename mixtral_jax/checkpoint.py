"""Orbax checkpoints of the model, written a layer at a time and loaded into any mesh.

A checkpoint directory holds:

    mixtral_config.json     the ModelConfig, the parameter dtype and a format tag
    params/other/           Orbax checkpoint: embed, final_norm, lm_head
    params/layer_00000/     Orbax checkpoint: one decoder layer (attention, norms, moe)
    ...
    tokenizer.model         when the source had one

One Orbax checkpoint per layer is what keeps conversion within one layer of
memory: the model's parameters are stacked over layers [L, ...], but no stacked
array is ever built on the host. Loading stacks the layers on the devices, one
layer at a time, each restored straight into its sharding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.weights import Path as ParamPath
from mixtral_jax.weights import param_shapes, set_params

CONFIG_FILE = "mixtral_config.json"
FORMAT = "mixtral_jax/1"


class CheckpointError(ValueError):
    """A directory that is not a complete mixtral_jax checkpoint."""


def layer_dir(directory: Path, layer: int) -> Path:
    return directory / "params" / f"layer_{layer:05d}"


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _save_tree(path: Path, flat: Mapping[tuple[str, ...], np.ndarray]) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), _nest(flat))
    checkpointer.wait_until_finished()


def write_config(directory: Path, config: ModelConfig, dtype: str) -> None:
    meta = {"format": FORMAT, "dtype": dtype, "config": config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_config(directory: str | Path) -> tuple[ModelConfig, str]:
    """The config and stored dtype of a checkpoint directory."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a mixtral_jax checkpoint (no {CONFIG_FILE}); convert "
            "PyTorch weights first: python tools/convert.py SOURCE_DIR OUTPUT_DIR"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return ModelConfig.from_dict(meta["config"]), meta["dtype"]


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.empty(value.shape, dtype)
    _copy_into(out, (), value)
    return out


def _copy_into(buffer: np.ndarray, index: tuple[int, ...], value: np.ndarray) -> None:
    """buffer[index] = value. Same-dtype copies go through integer views: numpy's
    strided (transposing) copy of bfloat16 is many times slower than of uint16."""
    if value.dtype == buffer.dtype:
        bits = np.dtype(f"u{buffer.dtype.itemsize}")
        buffer.view(bits)[index] = value.view(bits)
    else:
        buffer[index] = value.astype(buffer.dtype)


class LayerWriter:
    """Receives parameter slices in any order; writes each layer once it is complete.

    Memory: the layers in progress (one, for sources stored layer by layer, as
    every published checkpoint is) plus embed/final_norm/lm_head, written last.
    """

    def __init__(self, directory: Path, config: ModelConfig, dtype: Any):
        self.directory = directory
        self.config = config
        self.dtype = np.dtype(dtype)
        self.shapes = param_shapes(config)
        self.pending: dict[int, dict[ParamPath, np.ndarray]] = {}
        self.filled: dict[int, dict[ParamPath, np.ndarray]] = {}  # [experts] mask per param
        self.other: dict[ParamPath, np.ndarray] = {}
        self.written: set[int] = set()

    def add(self, path: ParamPath, index: tuple[int, ...], value: np.ndarray) -> None:
        value = np.asarray(value)
        if path[0] != "layers":
            self.other[path] = _cast(value, self.dtype)
            return
        layer, rest = index[0], index[1:]
        if layer in self.written:
            raise CheckpointError(
                f"layer {layer}: {'.'.join(path)} given again after the layer was written"
            )
        params = self.pending.setdefault(layer, {})
        if path not in params:
            params[path] = np.zeros(self.shapes[path][1:], self.dtype)
            self.filled.setdefault(layer, {})[path] = np.zeros(
                self.shapes[path][1 : 1 + self._expert_dims(path)], bool
            )
        _copy_into(params[path], rest, value)
        self.filled[layer][path][rest] = True
        if self._complete(layer):
            _save_tree(layer_dir(self.directory, layer), params)
            del self.pending[layer], self.filled[layer]
            self.written.add(layer)

    def _expert_dims(self, path: ParamPath) -> int:
        return 1 if path[:3] == ("layers", "moe", "experts") else 0

    def _complete(self, layer: int) -> bool:
        layer_paths = [p for p in self.shapes if p[0] == "layers"]
        return all(p in self.pending[layer] and self.filled[layer][p].all() for p in layer_paths)

    def finish(self) -> None:
        missing_layers = sorted(set(range(self.config.num_layers)) - self.written)
        missing_other = [p for p in self.shapes if p[0] != "layers" and p not in self.other]
        if missing_layers or missing_other:
            raise CheckpointError(
                f"incomplete source: layers {missing_layers} and {missing_other} never filled"
            )
        _save_tree(self.directory / "params" / "other", self.other)


def save(
    directory: str | Path, params: Mapping[ParamPath, Any], config: ModelConfig, dtype: Any = None
) -> None:
    """Writes full parameter arrays (e.g. `weights.flat_params(model)`) as a checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype or config.param_dtype)
    writer = LayerWriter(directory, config, dtype)
    for path, value in params.items():
        value = np.asarray(value)
        if path[0] == "layers":
            for layer in range(config.num_layers):
                writer.add(path, (layer,), value[layer])
        else:
            writer.add(path, (), value)
    writer.finish()
    write_config(directory, config, dtype.name)


def read_layer(directory: str | Path, layer: int) -> dict[ParamPath, np.ndarray]:
    """One layer's parameters {("layers", ...): array [...]} on the host."""
    path = layer_dir(Path(directory), layer)
    if not path.is_dir():
        raise CheckpointError(f"{directory}: layer {layer} is missing ({path})")
    return _flatten(ocp.StandardCheckpointer().restore(path.absolute()))


def read_other(directory: str | Path) -> dict[ParamPath, np.ndarray]:
    """embed, final_norm and lm_head on the host."""
    path = Path(directory) / "params" / "other"
    if not path.is_dir():
        raise CheckpointError(f"{directory}: {path} is missing")
    return _flatten(ocp.StandardCheckpointer().restore(path.absolute()))


def read_layers(directory: str | Path) -> Iterator[tuple[int | None, dict[ParamPath, np.ndarray]]]:
    """(layer, params) for every layer, then (None, embed/norm/head), one at a time."""
    config, _ = read_config(directory)
    for layer in range(config.num_layers):
        yield layer, read_layer(directory, layer)
    yield None, read_other(directory)


def load(
    directory: str | Path,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> nnx.Module:
    """The model stored in `directory`, parameters cast to `dtype` (default: as stored).

    With a `mesh`, every parameter is placed by the logical-axis `rules`
    (default `sharding.DEFAULT_RULES`): each layer is restored straight into its
    sharding and written into the stacked parameter on the devices, so no host
    ever holds the whole model.
    """
    from mixtral_jax import sharding as sharding_rules
    from mixtral_jax.model import Mixtral

    directory = Path(directory)
    config, stored = read_config(directory)
    dtype = jnp.dtype(dtype or stored)
    config = config.replace(param_dtype=dtype.name)
    shapes = param_shapes(config)
    checkpointer = ocp.StandardCheckpointer()
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    shardings = None
    if mesh is not None:
        shardings = sharding_rules.param_shardings(
            model, mesh, rules or sharding_rules.DEFAULT_RULES
        )

    def sharding(path: ParamPath, drop_layers: bool):
        if shardings is None:
            return None
        s = shardings[path]
        if drop_layers and isinstance(s, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
        return s

    def abstract(paths, drop_layers):
        return _nest(
            {
                p: jax.ShapeDtypeStruct(
                    shapes[p][1:] if drop_layers else shapes[p],
                    dtype,
                    sharding=sharding(p, drop_layers),
                )
                for p in paths
            }
        )

    layer_paths = [p for p in shapes if p[0] == "layers"]
    other_paths = [p for p in shapes if p[0] != "layers"]
    params = _flatten(
        checkpointer.restore(
            (directory / "params" / "other").absolute(), abstract(other_paths, False)
        )
    )

    def zeros(p):
        return jnp.zeros(shapes[p], dtype, device=sharding(p, False))

    put = jax.jit(lambda stacked, value, i: stacked.at[i].set(value), donate_argnums=0)
    stacked = {p: zeros(p) for p in layer_paths}
    for layer in range(config.num_layers):
        path = layer_dir(directory, layer)
        if not path.is_dir():
            raise CheckpointError(f"{directory}: layer {layer} is missing ({path})")
        values = _flatten(checkpointer.restore(path.absolute(), abstract(layer_paths, True)))
        for p in layer_paths:
            stacked[p] = put(stacked[p], values[p], layer)
    params.update(stacked)
    set_params(model, params)
    return model


def load_tokenizer(directory: str | Path):
    """The sentencepiece tokenizer stored with a checkpoint (`tokenizer.model`)."""
    import sentencepiece

    path = Path(directory) / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no tokenizer.model; copy the one from the original download "
            "next to the checkpoint (tools/convert.py does when the source has one)"
        )
    return sentencepiece.SentencePieceProcessor(model_file=str(path))

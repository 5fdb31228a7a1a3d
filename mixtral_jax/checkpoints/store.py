"""Orbax checkpoints of the model, written a piece at a time and loaded into any mesh.

A checkpoint directory holds:

    mixtral_config.json             the ModelConfig, the parameter dtype, a format tag
    params/other/                   Orbax checkpoint: embed, final_norm, lm_head
    params/layer_00000/rest/        Orbax checkpoint: attention, norms, router of layer 0
    params/layer_00000/expert_000/  Orbax checkpoint: w1, w2, w3 of expert 0 of layer 0
    ...
    tokenizer.model                 when the source had one

A quantized checkpoint (config.quantization) stores each quantized weight as its
integers and float32 scales, e.g. params/layer_00000/expert_000/.../w1/{qvalue,scale};
int4 integers are packed two per byte (uint8, last axis halved).

Small Orbax checkpoints are what keep conversion within about one expert of
memory: the model's parameters are stacked [L, E, ...], but no stacked array is
ever built on the host. Loading (`load.py`) writes each piece, restored straight
into its sharding, into the stacked parameters on the devices.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mixtral_jax.checkpoints import damage
from mixtral_jax.checkpoints.hub import is_expert
from mixtral_jax.model.config import ModelConfig
from mixtral_jax.model.mixtral import param_shapes, param_structs
from mixtral_jax.parallel.rules import spec_axes
from mixtral_jax.params import Path as ParamPath
from mixtral_jax.quant import int4, quantize

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
    flat = {p: int4.pack_int4(v) if v.dtype == jnp.int4 else v for p, v in flat.items()}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), _nest(flat))
    checkpointer.wait_until_finished()


def stored_dtypes(config: ModelConfig, float_dtype: Any) -> dict[ParamPath, np.dtype]:
    """Each parameter's dtype in a checkpoint whose float weights are `float_dtype`:
    a quantized weight keeps its integer dtype and float32 scales."""
    structs = param_structs(config)
    return {
        p: np.dtype(s.dtype if quantize.split_path(p) else float_dtype) for p, s in structs.items()
    }


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
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} does not parse ({e}): the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return ModelConfig.from_dict(meta["config"]), meta["dtype"]


def _cast(value: np.ndarray | jax.Array, dtype: np.dtype) -> np.ndarray | jax.Array:
    """A contiguous copy in `dtype`. Same-dtype copies go through integer views: numpy's
    strided (transposing) copy of bfloat16 is many times slower than of uint16.
    Device arrays stay on their devices (each host saves its own shards)."""
    if isinstance(value, jax.Array):
        return value.astype(dtype)
    if value.dtype != dtype:
        return value.astype(dtype, order="C")
    out = np.empty(value.shape, dtype)
    bits = np.dtype(f"u{dtype.itemsize}")
    out.view(bits)[...] = value.view(bits)
    return out


def piece_paths(shapes) -> tuple[list[ParamPath], list[ParamPath], list[ParamPath]]:
    """Parameter paths by piece: per expert, the rest of a layer, outside the layers."""
    experts = [p for p in shapes if is_expert(p)]
    rest = [p for p in shapes if p[0] == "layers" and not is_expert(p)]
    other = [p for p in shapes if p[0] != "layers"]
    return experts, rest, other


def piece_dir(directory: Path, layer: int, expert: int | None) -> Path:
    """Where a layer's piece lives: one per expert (w1, w2, w3) and one for the rest."""
    return layer_dir(directory, layer) / ("rest" if expert is None else f"expert_{expert:03d}")


class LayerWriter:
    """Receives parameter slices in any order; writes each piece once it is complete.

    A layer is stored as E + 1 pieces, one per expert and one for attention,
    norms and router. Hub checkpoints list each expert's w1/w2/w3 together, so
    memory holds about one expert at a time, not the layer (Mistral's original
    release stacks all experts in one tensor: there it is one layer).
    """

    def __init__(self, directory: Path, config: ModelConfig, dtype: Any):
        self.directory = directory
        self.config = config
        self.dtypes = stored_dtypes(config, dtype)
        self.shapes = param_shapes(config)
        experts, rest, _ = piece_paths(self.shapes)
        self.expert_paths, self.rest_paths = set(experts), set(rest)
        self.pending: dict[tuple[int, int | None], dict[ParamPath, np.ndarray]] = {}
        self.other: dict[ParamPath, np.ndarray] = {}
        self.written: set[tuple[int, int | None]] = set()

    def add(self, path: ParamPath, index: tuple[int, ...], value: np.ndarray) -> None:
        """Takes param[index] = value; a float weight that the config quantizes is
        quantized here, a slice at a time."""
        if not isinstance(value, jax.Array):
            value = np.asarray(value)
        if path[0] != "layers":
            self.other[path] = _cast(value, self.dtypes[path])
        elif is_expert(path) and len(index) == 1:  # all experts of a layer at once
            for expert in range(value.shape[0]):
                self.add(path, (index[0], expert), value[expert])
        else:
            for part, v in quantize.quantize_slice(self.config, path, value).items():
                self._add_to_piece(index[0], index[1] if is_expert(path) else None, part, v)

    def _add_to_piece(self, layer: int, expert: int | None, path: ParamPath, value) -> None:
        key = (layer, expert)
        if key in self.written:
            raise CheckpointError(
                f"layer {layer}: {'.'.join(path)} given again after it was written"
            )
        piece = self.pending.setdefault(key, {})
        piece[path] = _cast(value, self.dtypes[path])
        if set(piece) == (self.rest_paths if expert is None else self.expert_paths):
            _save_tree(piece_dir(self.directory, layer, expert), piece)
            del self.pending[key]
            self.written.add(key)

    def finish(self) -> None:
        experts = [None, *range(self.config.num_experts)]
        missing = [
            (layer, e)
            for layer in range(self.config.num_layers)
            for e in experts
            if (layer, e) not in self.written
        ]
        missing_other = [p for p in self.shapes if p[0] != "layers" and p not in self.other]
        if missing or missing_other:
            raise CheckpointError(f"incomplete source: never filled {missing[:5]} {missing_other}")
        _save_tree(self.directory / "params" / "other", self.other)


def save(
    directory: str | Path, params: Mapping[ParamPath, Any], config: ModelConfig, dtype: Any = None
) -> None:
    """Writes full parameter arrays (e.g. `weights.flat_params(model)`) as a checkpoint.

    Sharded device arrays are written where they lie: with several processes,
    every process calls `save` and each writes its own shards.
    """
    save_slices(directory, layer_slices(params, config), config, dtype)


def layer_slices(
    params: Mapping[ParamPath, Any], config: ModelConfig
) -> Iterator[tuple[ParamPath, tuple[int, ...], Any]]:
    """(path, (layer,), params[path][layer]) for every layer in turn, then
    (path, (), value) for the parameters outside the layers."""
    for layer in range(config.num_layers):
        for path, value in params.items():
            if path[0] == "layers":
                yield path, (layer,), value[layer]
    for path, value in params.items():
        if path[0] != "layers":
            yield path, (), value


def save_slices(
    directory: str | Path,
    slices: Iterable[tuple[ParamPath, tuple[int, ...], Any]],
    config: ModelConfig,
    dtype: Any = None,
) -> None:
    """Writes a checkpoint from (path, index, value) slices such as `layer_slices`.
    Given a layer at a time, each layer is written (and can be freed) before the next
    is made: `lora.merged_slices` exports a merged model so."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype or config.param_dtype)
    writer = LayerWriter(directory, config, dtype)
    for path, index, value in slices:
        writer.add(path, index, value if isinstance(value, jax.Array) else np.asarray(value))
    writer.finish()
    if jax.process_index() == 0:
        write_config(directory, config, dtype.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mixtral_jax.checkpoint.save:{directory}")


def restore_piece(path: Path, targets: Mapping[ParamPath, jax.ShapeDtypeStruct], directory: Path):
    """One piece, each array restored straight into its target's sharding.

    Targets always carry a sharding: without one, Orbax would place arrays as they
    were saved, which fails on any other set of devices."""
    if not path.is_dir():
        raise CheckpointError(f"{directory}: {path} is missing; the checkpoint is incomplete")
    on_disk = {p: _packed(t) if t.dtype == jnp.int4 else t for p, t in targets.items()}
    try:
        with damage.quietly():
            restored = ocp.StandardCheckpointer().restore(path.absolute(), _nest(on_disk))
    except Exception as e:  # noqa: BLE001 - whatever the reader met, the piece is damaged
        raise CheckpointError(
            f"{directory} is damaged: {damage.describe(path, e)}; convert or export it again"
        ) from None
    values = _flatten(restored)
    for p, t in targets.items():
        if t.dtype == jnp.int4:
            values[p] = jax.jit(int4.unpack_int4, out_shardings=t.sharding)(values[p])
    return values


def _packed(target: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The uint8 array an int4 target is stored as: last axis halved, sharded alike
    where the halved axis still divides."""
    shape = (*target.shape[:-1], target.shape[-1] // 2)
    sharding = target.sharding
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) == len(shape):
        axes = spec_axes(sharding.spec[-1])
        if shape[-1] % int(np.prod([sharding.mesh.shape[a] for a in axes])):
            spec = jax.sharding.PartitionSpec(*sharding.spec[:-1], None)
            sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    return jax.ShapeDtypeStruct(shape, np.uint8, sharding=sharding)


def _host_targets(stored: Stored, paths, drop: int) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return {
        p: jax.ShapeDtypeStruct(stored.shapes[p][drop:], stored.dtypes[p], sharding=host)
        for p in paths
    }


class Stored(NamedTuple):
    """What the host readers need to know of a checkpoint, read once."""

    config: ModelConfig
    dtype: str
    shapes: dict[ParamPath, tuple[int, ...]]
    dtypes: dict[ParamPath, np.dtype]

    @classmethod
    def of(cls, config: ModelConfig, dtype: str) -> Stored:
        """What a checkpoint of `config` with float weights in `dtype` holds."""
        return cls(config, dtype, param_shapes(config), stored_dtypes(config, dtype))


def read_stored(directory: str | Path) -> Stored:
    return Stored.of(*read_config(directory))


def read_layer(
    directory: str | Path, layer: int, stored: Stored | None = None
) -> dict[ParamPath, np.ndarray]:
    """One layer's parameters {("layers", ...): array [...]} on the host, experts stacked.

    `stored`: `read_stored(directory)`, when the caller reads several pieces."""
    directory = Path(directory)
    stored = stored or read_stored(directory)
    expert_paths, rest_paths, _ = piece_paths(stored.shapes)

    def restore(expert, paths, drop):
        targets = _host_targets(stored, paths, drop)
        values = restore_piece(piece_dir(directory, layer, expert), targets, directory)
        return {p: np.asarray(v) for p, v in values.items()}

    params = restore(None, rest_paths, 1)
    experts = [restore(e, expert_paths, 2) for e in range(stored.config.num_experts)]
    for path in expert_paths:
        params[path] = np.stack([e[path] for e in experts])
    return params


def read_other(directory: str | Path, stored: Stored | None = None) -> dict[ParamPath, np.ndarray]:
    """embed, final_norm and lm_head on the host."""
    directory = Path(directory)
    stored = stored or read_stored(directory)
    targets = _host_targets(stored, piece_paths(stored.shapes)[2], 0)
    values = restore_piece(directory / "params" / "other", targets, directory)
    return {p: np.asarray(v) for p, v in values.items()}


def read_layers(directory: str | Path) -> Iterator[tuple[int | None, dict[ParamPath, np.ndarray]]]:
    """(layer, params) for every layer, then (None, embed/norm/head), one at a time."""
    stored = read_stored(directory)
    for layer in range(stored.config.num_layers):
        yield layer, read_layer(directory, layer, stored)
    yield None, read_other(directory, stored)

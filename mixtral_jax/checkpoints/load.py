"""Loading a checkpoint onto the devices, sharded or not, quantized as it loads; and
its tokenizer.

`load` reads the pieces that `store.py` writes, each restored straight into its
sharding, and writes them into the model's stacked parameters on the devices, so
no host ever holds the whole model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.checkpoints.store import (
    CONFIG_FILE,
    CheckpointError,
    Stored,
    piece_dir,
    piece_paths,
    read_config,
    restore_piece,
)
from mixtral_jax.model import quantized
from mixtral_jax.model.config import QUANTIZATIONS, ModelConfig
from mixtral_jax.model.mixtral import Mixtral, param_structs
from mixtral_jax.model.tokenizer import OFFICIAL, OFFICIAL_BY_VOCAB, Tokenizer
from mixtral_jax.parallel.placement import param_shardings
from mixtral_jax.parallel.rules import DEFAULT_RULES
from mixtral_jax.params import Path as ParamPath
from mixtral_jax.params import set_params
from mixtral_jax.quant.quantize import jit_quantize, weight_specs

# A small Mixtral trained by this project (tools/train_embedded.py), with its tokenizer:
# what `load()` and `load_tokenizer()` read when given no directory.
EMBEDDED = Path(__file__).resolve().parents[1] / "assets" / "model"


def load(
    directory: str | Path = EMBEDDED,
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    quantize: str | None = None,
    group_size: int = 128,
) -> Mixtral:
    """The model stored in `directory` (default: the embedded model), float parameters
    cast to `dtype` (default: as stored).

    Without a `mesh` the parameters go to the default device. With one, every
    parameter is placed by the logical-axis `rules` (default
    `parallel.rules.DEFAULT_RULES`): each layer is restored straight into its
    sharding and written into the stacked parameter on the devices, so no host
    ever holds the whole model. Works whatever devices the checkpoint was saved from.

    A quantized checkpoint loads quantized. `quantize` ("int8" | "int4", int4 in
    groups of `group_size` inputs) quantizes a float checkpoint while loading, an
    expert at a time: the float model is never held.
    """
    directory = Path(directory)
    config, stored_dtype = read_config(directory)
    dtype = jnp.dtype(dtype or stored_dtype)
    on_disk = Stored.of(config.replace(param_dtype=dtype.name), dtype.name)
    config = _quantized_config(on_disk.config, quantize, group_size, directory)
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    structs = param_structs(config)
    if mesh is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
    shardings = param_shardings(model, mesh, rules or DEFAULT_RULES)

    def sharding(path: ParamPath, drop: int = 0):
        """The parameter's sharding, without its first `drop` axes (layers, expert);
        a float weight to be quantized is read as its integers will lie."""
        s = shardings[path] if path in shardings else shardings[(*path, "qvalue")]
        spec = tuple(s.spec)
        if path not in shardings and config.quantization == "int4":
            spec = quantized.without_within(spec, weight_specs()[path[-1]])
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec[drop:]))

    def read(piece: Path, paths, drop):
        """One piece restored into its shardings, quantized if asked."""
        targets = {
            p: jax.ShapeDtypeStruct(
                on_disk.shapes[p][drop:], on_disk.dtypes[p], sharding=sharding(p, drop)
            )
            for p in paths
        }
        values = {}
        for p, v in restore_piece(piece, targets, directory).items():
            if (*p, "qvalue") in structs:  # a float weight that the config quantizes
                parts = {part: sharding((*p, part), drop) for part in quantized.PARTS}
                values |= _quantize_on_device(config, p, v, parts)
            else:
                values[p] = v
        return values

    expert_paths, rest_paths, other_paths = piece_paths(on_disk.shapes)
    params = read(directory / "params" / "other", other_paths, 0)

    # Written in place on the devices (donated), piece by piece.
    put = jax.jit(lambda stacked, value, i: stacked.at[i].set(value), donate_argnums=0)
    stacked = {
        p: jnp.zeros(s.shape, s.dtype, device=sharding(p))
        for p, s in structs.items()
        if p[0] == "layers"
    }
    for layer in range(config.num_layers):
        for p, v in read(piece_dir(directory, layer, None), rest_paths, 1).items():
            stacked[p] = put(stacked[p], v, layer)
        for expert in range(config.num_experts):
            values = read(piece_dir(directory, layer, expert), expert_paths, 2)
            for p, v in values.items():
                stacked[p] = put(stacked[p], v, (layer, expert))
    params.update(stacked)
    set_params(model, params)
    return model


def _quantized_config(
    config: ModelConfig, scheme: str | None, group_size: int, directory: Path
) -> ModelConfig:
    """The config to load as: the checkpoint's, quantized when `scheme` asks for it."""
    if scheme is None:
        return config
    if config.quantization is not None:
        raise CheckpointError(
            f"{directory} is already quantized ({config.quantization}); load it without "
            "quantize=, or quantize its float original instead"
        )
    if scheme not in QUANTIZATIONS:
        raise CheckpointError(
            f"quantize={scheme!r}: choose one of {', '.join(QUANTIZATIONS)}, or None"
        )
    return config.replace(quantization=scheme, quant_group_size=group_size)


def _quantize_on_device(config: ModelConfig, path: ParamPath, value: jax.Array, shardings):
    """{path + ("qvalue",): ..., path + ("scale",): ...} of one float slice, computed
    where the slice lies and placed in the parts' shardings."""
    spec = weight_specs()[path[-1]]
    out_shardings = (shardings["qvalue"], shardings["scale"])
    fn = jit_quantize(spec, config.quantization, config.quant_group_size, out_shardings)
    qvalue, scale = fn(value)
    return {(*path, "qvalue"): qvalue, (*path, "scale"): scale}


def load_tokenizer(source: str | Path = EMBEDDED) -> Tokenizer:
    """A `Tokenizer` from `source`: a checkpoint directory (its
    `tokenizer.model`; default: the embedded model's), a sentencepiece `.model` file,
    or "mistral-v1" / "mistral-v3", Mixtral 8x7B's and 8x22B's official tokenizers
    from the mistral-common package. A checkpoint without a tokenizer whose
    vocabulary is an official one's (32000: v1, 32768: v3) gets that one, saying so."""
    if str(source) in OFFICIAL:
        return Tokenizer.official(str(source))
    source = Path(source)
    if source.is_file():
        return Tokenizer.from_file(source)
    path = source / "tokenizer.model"
    if path.is_file():
        return Tokenizer.from_file(path)
    if not (source / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{source} has no tokenizer.model and is not a checkpoint (no {CONFIG_FILE}); give "
            "a checkpoint directory, a tokenizer .model file, or mistral-v1 / mistral-v3"
        )
    vocab_size = read_config(source)[0].vocab_size
    if vocab_size in OFFICIAL_BY_VOCAB:
        name = OFFICIAL_BY_VOCAB[vocab_size]
        print(
            f"{source} has no tokenizer.model; its vocabulary ({vocab_size}) is Mixtral's: "
            f"using the official {name} tokenizer from mistral-common",
            file=sys.stderr,
        )
        return Tokenizer.official(name)
    raise CheckpointError(
        f"{source} has no tokenizer.model and its vocabulary ({vocab_size}) is not one of "
        f"Mixtral's ({', '.join(map(str, OFFICIAL_BY_VOCAB))}); copy the tokenizer.model of "
        "the original download next to the checkpoint, or pass a .model file"
    )

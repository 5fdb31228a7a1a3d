"""LoRA: low-rank adapters on a frozen Mixtral, added to a loaded model and merged back.

An adapted weight W (see `model.layers.Adapter`) computes einsum(x, W) + (alpha / r)
einsum(einsum(x, A), B); only A and B (`model.layers.LoRAParam`) are trained. The
targets are among the attention projections (q_proj, k_proj, v_proj, o_proj) and
the experts' w1, w2, w3, where each of the E experts gets its own adapter.
Merging writes W + (alpha / r) A B into the base weights and drops the adapters:
the merged model is an ordinary Mixtral that computes the same function. The base
may be quantized (QLoRA, `config.quantization`): it stays frozen as integers and
scales while the adapters train in float32, and merges into float weights.
`save_adapters` writes the adapters alone (megabytes, where a merged export is the
whole model) and `load_adapters` puts them back on a base of the same architecture.
Their files are read by `checkpoints.adapters`, whose `load_bank` puts several side by
side on one base, for serving them at once.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mixtral_jax.checkpoints.adapters import ADAPTER_CONFIG, ADAPTER_FACTORS, read_adapters
from mixtral_jax.model.config import ARCHITECTURE_FIELDS, ModelConfig
from mixtral_jax.model.layers import LoRAParam
from mixtral_jax.model.mixtral import Mixtral, with_config
from mixtral_jax.params import flat_params, set_params
from mixtral_jax.quant.quantize import dequantize_params


def add_adapters(
    model: Mixtral, *, rank: int, alpha: float, targets: Sequence[str], seed: int = 0
) -> Mixtral:
    """A model with `model`'s weights (shared, not copied) and fresh adapters on `targets`.

    A is random, B is zero: the adapted model starts out computing what `model` does.
    Only the adapters are allocated; the base weights are never rebuilt.
    """
    if model.config.lora_rank:
        raise ValueError("the model already has LoRA adapters; merge them first (lora.merge)")
    config = model.config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    return with_config(model, config, seed)


def merge(model: Mixtral) -> Mixtral:
    """The model with every adapter folded into its weight (W + alpha/r A B, in W's
    dtype) and no adapters: its config has lora_rank 0.

    A quantized base (QLoRA) merges into float weights of `config.param_dtype`:
    the function that was trained, which re-quantizing would round away."""
    config, slices = merged_slices(model)
    merged = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    layers: dict = {}
    params = {}
    for path, index, value in slices:
        if index:
            layers.setdefault(path, []).append(value)
        else:
            params[path] = value
    set_params(merged, params | {path: jnp.stack(values) for path, values in layers.items()})
    return merged


def merged_slices(model: Mixtral) -> tuple[ModelConfig, Iterator]:
    """`merge`'s config and parameters as (path, (layer,), value) one layer at a time,
    then (path, (), value) for the rest (`checkpoints.store.save_slices` takes them): a
    layer's merged weights exist only until the next layer is asked for, so a
    quantized base exports as float without the whole float model in memory."""
    config = model.config.replace(lora_rank=0, lora_targets=(), quantization=None)
    params = flat_params(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
    adapters = {
        path[:-1] + (path[-1].removesuffix("_lora"),): functools.reduce(getattr, path, model)
        for path in adapter_paths(model)
    }

    def slices():
        for layer in range(config.num_layers):
            one = {p: v[layer] for p, v in params.items() if p[0] == "layers"}
            for path, value in dequantize_params(one, jnp.float32).items():
                if path in adapters:
                    value = value.astype(jnp.float32) + adapters[path].delta(layer)
                yield path, (layer,), value.astype(config.weight_dtype)
        for path, value in params.items():
            if path[0] != "layers":
                yield path, (), value

    return config, slices()


def adapter_paths(model: Mixtral) -> list[tuple[str, ...]]:
    """Paths of the adapter modules, e.g. ("layers", "attention", "q_proj_lora")."""
    paths = {p[:-1] for p in flat_params(nnx.state(model, LoRAParam))}
    return sorted(paths)


def save_adapters(model: Mixtral, directory: str | Path) -> None:
    """The model's adapters alone in `directory`: their factors A and B by path, and
    their rank, alpha, targets and base architecture (`load_adapters` checks it). Every
    process calls it (the factors are gathered); the first writes. The directory is
    replaced whole, never left half-written."""
    c = model.config
    if not c.lora_rank:
        raise ValueError("the model has no LoRA adapters to save (config.lora_rank is 0)")
    factors = {
        "/".join(path): np.asarray(
            value
            if value.is_fully_addressable
            else multihost_utils.process_allgather(value, tiled=True)
        )
        for path, value in flat_params(nnx.state(model, LoRAParam)).items()
    }
    if jax.process_index() != 0:
        return
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "rank": c.lora_rank,
        "alpha": c.lora_alpha,
        "targets": list(c.lora_targets),
        "base": {name: getattr(c, name) for name in ARCHITECTURE_FIELDS},
    }
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        written = Path(tmp) / "adapters"
        written.mkdir()
        (written / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        np.savez(written / ADAPTER_FACTORS, **factors)
        if directory.exists():
            shutil.rmtree(directory)
        written.rename(directory)


def load_adapters(model: Mixtral, directory: str | Path) -> Mixtral:
    """`model` (a base without adapters; its weights shared, not copied) with the
    adapters `save_adapters` wrote to `directory`. Raises ValueError when the directory
    holds none, or when they were trained on a base of another architecture."""
    settings, factors = read_adapters(model.config, directory)
    adapted = add_adapters(
        model, rank=settings["rank"], alpha=settings["alpha"], targets=settings["targets"]
    )
    expected = flat_params(nnx.state(adapted, LoRAParam))
    if set(factors) != set(expected) or any(
        factors[p].shape != expected[p].shape for p in expected
    ):
        raise ValueError(
            f"{directory}/{ADAPTER_FACTORS} does not hold the factors its config names"
        )
    set_params(adapted, {p: jnp.asarray(v, expected[p].dtype) for p, v in factors.items()})
    return adapted

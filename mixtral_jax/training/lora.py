"""LoRA: low-rank adapters on a frozen Mixtral, added to a loaded model and merged back.

An adapted weight W (see `model.layers.Adapter`) computes einsum(x, W) + (alpha / r)
einsum(einsum(x, A), B); only A and B (`model.layers.LoRAParam`) are trained. The
targets are among the attention projections (q_proj, k_proj, v_proj, o_proj) and
the experts' w1, w2, w3, where each of the E experts gets its own adapter.
Merging writes W + (alpha / r) A B into the base weights and drops the adapters:
the merged model is an ordinary Mixtral that computes the same function. The base
may be quantized (QLoRA, `config.quantization`): it stays frozen as integers and
scales while the adapters train in float32, and merges into float weights.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model.config import ModelConfig
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

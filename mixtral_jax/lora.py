"""LoRA: low-rank adapters on a frozen Mixtral, added to a loaded model and merged back.

An adapted weight W (see `layers.Adapter`) computes einsum(x, W) + (alpha / r)
einsum(einsum(x, A), B); only A and B (`layers.LoRAParam`) are trained. The
targets are among the attention projections (q_proj, k_proj, v_proj, o_proj) and
the experts' w1, w2, w3, where each of the E experts gets its own adapter.
Merging writes W + (alpha / r) A B into the base weights and drops the adapters:
the merged model is an ordinary Mixtral that computes the same function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from flax import nnx

from mixtral_jax.layers import Adapter, LoRAParam
from mixtral_jax.model import Mixtral, with_config
from mixtral_jax.weights import flat_params, set_params


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
    dtype) and no adapters: its config has lora_rank 0."""
    config = model.config.replace(lora_rank=0, lora_targets=())
    merged = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    params = flat_params(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
    for path in adapter_paths(model):
        adapter: Adapter = functools.reduce(getattr, path, model)
        weight = path[:-1] + (path[-1].removesuffix("_lora"),)
        params[weight] = (params[weight] + adapter.delta()).astype(params[weight].dtype)
    set_params(merged, params)
    return merged


def adapter_paths(model: Mixtral) -> list[tuple[str, ...]]:
    """Paths of the adapter modules, e.g. ("layers", "attention", "q_proj_lora")."""
    paths = {p[:-1] for p in flat_params(nnx.state(model, LoRAParam))}
    return sorted(paths)

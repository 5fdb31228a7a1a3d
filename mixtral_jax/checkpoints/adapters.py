"""LoRA adapters on disk, as `training.lora.save_adapters` writes them, and a bank of
several served at once.

    adapters/adapter_config.json   rank, alpha, targets, the base's architecture
    adapters/adapters.npz          the factors A and B by parameter path

`read_adapters` reads and checks them against a base; `load_bank` puts several side by
side on one base (`config.lora_bank`): each row of a call then applies its own
(`Mixtral.forward`'s `adapter_ids`), as the server does for `--lora NAME=DIR`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.model.config import LORA_TARGETS, ModelConfig
from mixtral_jax.model.layers import LoRAParam
from mixtral_jax.model.mixtral import Mixtral, with_config
from mixtral_jax.params import flat_params, set_params

# What save_adapters writes: the adapters' settings and base, and their factors by path.
ADAPTER_CONFIG, ADAPTER_FACTORS = "adapter_config.json", "adapters.npz"


def read_adapters(base: ModelConfig, directory: str | Path) -> tuple[dict, dict]:
    """The settings and factors (by path) `save_adapters` wrote to `directory`, checked
    against the `base` they are for: ValueError names what does not fit."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_FACTORS).is_file():
        raise ValueError(
            f"{directory} holds no adapters (it needs {ADAPTER_CONFIG} and "
            f"{ADAPTER_FACTORS}, as a LoRA run writes to its workdir's adapters/)"
        )
    settings = json.loads((directory / ADAPTER_CONFIG).read_text())
    for name, value in settings["base"].items():
        if getattr(base, name) != value:
            raise ValueError(
                f"the adapters in {directory} were trained on a base with {name}={value}; "
                f"this model has {getattr(base, name)}: load its own base"
            )
    with np.load(directory / ADAPTER_FACTORS) as stored:
        factors = {tuple(key.split("/")): stored[key] for key in stored.files}
    return settings, factors


def load_bank(model: Mixtral, adapters: Mapping[str, str | Path]) -> Mixtral:
    """`model` (a base without adapters; its weights shared, not copied) with every
    adapter of `adapters` (name -> a directory `save_adapters` wrote) side by side in one
    bank (`config.lora_bank`, in the mapping's order): a call's row applies the adapter
    `adapter_ids` gives it, as `load_adapters(model, directory)` would compute alone.

    Adapters may differ in rank, alpha and targets: the bank's rank is the largest
    (smaller ones padded with zeros, which add nothing), its targets all of theirs (an
    adapter's missing ones zeros), and each adapter's alpha / r is folded into its B."""
    if model.config.lora_rank:
        raise ValueError("the model already has LoRA adapters; load a bank on its base")
    if not adapters:
        raise ValueError("a bank needs at least one adapter")
    read = [(d, *read_adapters(model.config, d)) for d in adapters.values()]
    rank = max(settings["rank"] for _, settings, _ in read)
    targets = {t for _, settings, _ in read for t in settings["targets"]}
    config = model.config.replace(
        lora_rank=rank,
        lora_targets=tuple(t for t in LORA_TARGETS if t in targets),
        lora_bank=len(read),
    )
    banked = with_config(model, config)
    bank = {}
    for path, value in flat_params(nnx.state(banked, LoRAParam)).items():
        # [L, shared..., J, ...]: the layers axis, the weight's shared axes, the bank's.
        axis = 1 + functools.reduce(getattr, path[:-1], banked).shared_axes
        one_shape = value.shape[:axis] + value.shape[axis + 1 :]
        rank_axis = len(one_shape) - 1 if path[-1] == "a" else axis  # A ends in R; B: [.., R, ..]
        factors = []
        for directory, settings, stored in read:
            one = stored.get(path)
            if one is None:  # a weight this adapter leaves alone
                one = np.zeros(one_shape, np.float32)
            elif path[-1] == "b":
                one = one * (settings["alpha"] / settings["rank"])
            if one.ndim == len(one_shape) and one.shape[rank_axis] <= rank:
                padding = [(0, 0)] * one.ndim
                padding[rank_axis] = (0, rank - one.shape[rank_axis])
                one = np.pad(one, padding)
            if one.shape != one_shape:
                raise ValueError(
                    f"{directory}/{ADAPTER_FACTORS} holds {'/'.join(path)} of shape "
                    f"{one.shape}, not the {one_shape} its config names"
                )
            factors.append(one)
        bank[path] = jnp.asarray(np.stack(factors, axis=axis), value.dtype)
    set_params(banked, bank)
    return banked

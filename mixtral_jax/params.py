"""A model's parameters by path: the one naming of its weights that every room uses.

A path is the tuple of attribute names that leads to a parameter, e.g.
("layers", "moe", "experts", "w1"). Checkpoints store parameters under these
paths, shardings are looked up by them and LoRA finds its adapters by them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

Path = tuple[str, ...]


def key_path(keys) -> Path:
    """("layers", "moe", "gate") from a pytree key path through a model's State."""
    return tuple(str(k.key) for k in keys if isinstance(k, jax.tree_util.DictKey))


def flat_params(tree: nnx.Module | nnx.State) -> dict[Path, jax.Array]:
    """{("layers", "moe", "gate"): array, ...} of a model's parameters (or of a State,
    such as gradients). Written on pytree paths, so it reads any recent Flax."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {key_path(keys): leaf for keys, leaf in leaves}


def set_params(model: nnx.Module, params: Mapping[Path, Any]) -> None:
    """Replaces a model's parameters in place by path; paths not given are kept."""
    state = nnx.state(model, nnx.Param)
    state = jax.tree_util.tree_map_with_path(
        lambda keys, leaf: params.get(key_path(keys), leaf), state
    )
    nnx.update(model, state)

"""Where a model's parameters go on a mesh: their logical axes resolved by the rules.

Every parameter carries logical axis names (`model.layers.param`); `param_shardings`
resolves them with the rules of `parallel.rules`, and `shardings_like` extends the
result to any pytree that mirrors the parameters (gradients, Adam's moments).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.parallel.rules import DEFAULT_RULES, Rules, named_sharding, spec_axes
from mixtral_jax.params import Path, flat_params, key_path, set_params

# Flax 0.10 hands out VariableState in states, newer Flax the Variables themselves
# (and warns that VariableState is only an alias).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _VARIABLE_TYPES = tuple(t for t in (nnx.Variable, getattr(nnx, "VariableState", None)) if t)


def logical_axes(model: nnx.Module) -> dict[Path, tuple[str | None, ...]]:
    """{parameter path: logical axis names} of a (possibly abstract) model."""
    state = nnx.state(model, nnx.Param)
    axes = {}
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, _VARIABLE_TYPES)
    )[0]
    for keys, variable in leaves:
        meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
        names = meta.get("out_sharding") or meta.get("sharding") or meta.get("sharding_names")
        path = key_path(keys)
        if path[0] == "layers" and len(names) == len(jax.tree.leaves(variable)[0].shape) - 1:
            names = ("layers", *names)  # Flax 0.10's vmap records the stack axis elsewhere
        axes[path] = tuple(names)
    return axes


def param_shardings(
    model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> dict[Path, NamedSharding]:
    """A NamedSharding for every parameter, by path, from the rules."""
    shapes = {p: v.shape for p, v in flat_params(model).items()}
    axes = logical_axes(model)
    out = {path: named_sharding(names, shapes[path], mesh, rules) for path, names in axes.items()}
    _check_every_axis_splits_something(out, axes, shapes, mesh, rules)
    return out


def _check_every_axis_splits_something(shardings, axes, shapes, mesh, rules) -> None:
    """A mesh axis that the rules map parameters to, but that divides none of their
    dimensions, would silently replicate them: an impossible mesh for this model."""
    table = dict(rules)
    used = {a for s in shardings.values() for entry in s.spec for a in spec_axes(entry)}
    for axis, size in mesh.shape.items():
        if size == 1 or axis in used:
            continue
        dims = {
            f"{name}={dim}"
            for path, names in axes.items()
            for name, dim in zip(names, shapes[path], strict=True)
            if name and axis in spec_axes(table.get(name))
        }
        if dims:
            raise ValueError(
                f"mesh axis '{axis}' has size {size}, which divides none of the parameter "
                f"dimensions the rules map to it ({', '.join(sorted(dims))}); choose a size "
                "that divides one of them"
            )


def shardings_like(tree: Any, by_path: Mapping[Path, NamedSharding], mesh: Mesh) -> Any:
    """Shardings for a pytree whose leaves sit under parameter paths: parameters, their
    gradients, or an optimizer state (Adam's `mu`/`nu` mirror the parameters). A leaf
    whose path ends with a parameter's path and has its rank gets that parameter's
    sharding; every other leaf (step counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
        if len(sharding.spec) != len(shape):
            return False  # e.g. a factored second moment
        for entry, size in zip(sharding.spec, shape, strict=True):
            if size % math.prod(mesh.shape[a] for a in spec_axes(entry)):
                return False
        return True

    def pick(keys, leaf):
        path = key_path(keys)
        for start in range(len(path)):
            sharding = by_path.get(path[start:])
            if sharding is not None and fits(sharding, tuple(np.shape(leaf))):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def place(tree: Any, shardings: Any) -> Any:
    """Moves every array of `tree` to its sharding (a like-shaped tree). Abstract
    arrays (`jax.ShapeDtypeStruct`) get the sharding attached instead: the same
    jitted steps then lower and compile without any weights (tools/plan.py)."""

    def one(x, s):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.device_put(x, s)

    return jax.tree.map(one, tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """Moves every parameter of `model` to its sharding; returns the shardings by path."""
    shardings = param_shardings(model, mesh, rules)
    set_params(model, {p: jax.device_put(v, shardings[p]) for p, v in flat_params(model).items()})
    return shardings

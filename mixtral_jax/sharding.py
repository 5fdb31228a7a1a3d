"""Logical axis names -> mesh axes.

Every parameter carries logical axis names (`layers.param`); a rule set maps
each name to a mesh axis (or None), so that modules never mention devices.
`DEFAULT_RULES` is a first, FSDP/tensor/expert-style rule set; a name whose
mesh axis is absent, or does not divide the dimension, stays unsharded.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.weights import Path, _path

# Flax 0.10 hands out VariableState in states, newer Flax the Variables themselves
# (and warns that VariableState is only an alias).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _VARIABLE_TYPES = tuple(t for t in (nnx.Variable, getattr(nnx, "VariableState", None)) if t)

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
)


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
        axes[_path(keys)] = tuple(names)
    return axes


def param_shardings(
    model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES
) -> dict[Path, NamedSharding]:
    """A NamedSharding for every parameter from the rules; unusable mappings stay None."""
    table: Mapping[str, str | None] = dict(rules)
    shapes = {p: v.shape for p, v in _shapes(model).items()}
    out = {}
    for path, names in logical_axes(model).items():
        if len(names) == len(shapes[path]) - 1 and path[0] == "layers":
            names = ("layers", *names)  # Flax 0.10's vmap records the stack axis elsewhere
        spec, used = [], set()
        for name, size in zip(names, shapes[path], strict=True):
            axis = table.get(name) if name else None
            if axis not in mesh.shape or axis in used or size % mesh.shape[axis]:
                axis = None
            used.add(axis)
            spec.append(axis)
        out[path] = NamedSharding(mesh, PartitionSpec(*spec))
    return out


def _shapes(model):
    from mixtral_jax.weights import flat_params

    return flat_params(model)

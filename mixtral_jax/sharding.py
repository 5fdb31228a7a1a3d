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

from mixtral_jax.weights import Path, _path, flat_params, set_params

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
        path = _path(keys)
        if path[0] == "layers" and len(names) == len(jax.tree.leaves(variable)[0].shape) - 1:
            names = ("layers", *names)  # Flax 0.10's vmap records the stack axis elsewhere
        axes[path] = tuple(names)
    return axes


def param_shardings(
    model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES
) -> dict[Path, NamedSharding]:
    """A NamedSharding for every parameter from the rules; unusable mappings stay None."""
    table: Mapping[str, str | None] = dict(rules)
    shapes = {p: v.shape for p, v in flat_params(model).items()}
    out = {}
    for path, names in logical_axes(model).items():
        spec, used = [], set()
        for name, size in zip(names, shapes[path], strict=True):
            axis = table.get(name) if name else None
            if axis not in mesh.shape or axis in used or size % mesh.shape[axis]:
                axis = None
            used.add(axis)
            spec.append(axis)
        out[path] = NamedSharding(mesh, PartitionSpec(*spec))
    return out


MESH_AXES = ("data", "fsdp", "tensor", "expert")


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1, devices=None
) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh; one size may be -1, meaning "the rest".

    Axes are `AxisType.Auto`: the logical rules and sharding constraints assume
    the compiler propagates shardings (Explicit axes refuse ambiguous matmuls).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh axes {rest} are all -1; at most one axis can take the rest")
    for name, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh axis '{name}' has size {size!r}; use a positive int or -1")
    fixed = 1
    for size in sizes.values():
        if size != -1:
            fixed *= size
    if len(devices) % fixed:
        named = ", ".join(f"{n}={s}" for n, s in sizes.items() if s != -1)
        raise ValueError(
            f"mesh axes {named} need a multiple of {fixed} devices; there are {len(devices)}"
        )
    if rest:
        sizes[rest[0]] = len(devices) // fixed
    elif fixed != len(devices):
        raise ValueError(
            f"mesh axes multiply to {fixed} but there are {len(devices)} devices; "
            "set one axis to -1 to take the rest"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> dict[Path, NamedSharding]:
    """Moves every parameter of `model` to its sharding; returns the shardings by path."""
    shardings = param_shardings(model, mesh, rules)
    set_params(model, {p: jax.device_put(v, shardings[p]) for p, v in flat_params(model).items()})
    return shardings

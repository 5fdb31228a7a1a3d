"""Logical axis names -> mesh axes, for parameters and activations alike.

Every parameter carries logical axis names (`layers.param`), and the model
marks its activations with `constrain(x, names)`. A rule set maps each name to
mesh axes, so modules never mention devices. Resolving a name (`partition_spec`)
takes, in order, the rule's mesh axes that exist with more than one device, are
not used by an earlier dimension of the same array, and keep the dimension
divisible; a name with none of those stays unsharded. So `embed` is sharded
over `fsdp` in a weight but not in an activation whose `batch` already took
`fsdp`, and the same rules serve every mesh, one CPU included.

With `expert` > 1 the token groups are sharded over `expert` too (rule `group`)
and the dispatched tokens [E, G, C, D] over experts: moving from one layout to
the other is the all-to-all of expert parallelism.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.config import ConfigError
from mixtral_jax.weights import Path, flat_params, key_path, set_params

# Flax 0.10 hands out VariableState in states, newer Flax the Variables themselves
# (and warns that VariableState is only an alias).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _VARIABLE_TYPES = tuple(t for t in (nnx.Variable, getattr(nnx, "VariableState", None)) if t)

MESH_AXES = ("data", "fsdp", "tensor", "expert")
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    # Activations.
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("group", ("data", "fsdp", "expert")),
    ("capacity", None),
)


def partition_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis `names` and `shape` on `mesh`."""
    table: Mapping[str, Any] = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = spec_axes(table.get(name) if name else None)
        kept: list[str] = []
        for axis in axes:
            n = mesh.shape.get(axis, 1)
            if (
                n > 1
                and axis not in used
                and size % (n * math.prod(mesh.shape[a] for a in kept)) == 0
            ):
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(names, shape, mesh, rules))


# ---------------------------------------------------------------------------
# Activations.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "mixtral_jax_sharding_rules", default=None
)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (while tracing), `constrain` places activations by `rules`.

    The jitted functions of `steps.py` enter it themselves; enter it by hand only
    around a function you jit yourself, inside the function being traced.
    """
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A sharding constraint on an activation by logical names; identity outside `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))


# ---------------------------------------------------------------------------
# Parameters.


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


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


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


# ---------------------------------------------------------------------------
# Meshes.


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) and across slices (DCN), and the rules.

    Within a slice one axis may be -1: the devices left over. The mesh has
    axes `data, fsdp, tensor, expert`, each of size ICI size x DCN size.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1
    rules: tuple = DEFAULT_RULES

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MeshConfig:
        """From a dict or ConfigDict (e.g. `config.mesh` of a training config)."""
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"unknown mesh field(s) {unknown}; the fields are {sorted(fields)}")
        if "rules" in values:
            values["rules"] = tuple(
                (name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in values["rules"]
            )
        return cls(**values)

    @property
    def ici(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    @property
    def dcn(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}") for a in MESH_AXES}

    def make_mesh(self, devices=None) -> Mesh:
        return make_mesh(**self.ici, dcn=self.dcn, devices=devices)


def _resolve(sizes: dict[str, int], num_devices: int, where: str) -> dict[str, int]:
    """Replaces a -1 by the devices left over; checks that the sizes use every device."""
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh axes {rest} are all -1; at most one axis can take the rest")
    for name, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh axis '{name}' has size {size!r}; use a positive int or -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if num_devices % fixed:
        named = ", ".join(f"{n}={s}" for n, s in sizes.items() if s != -1)
        raise ValueError(
            f"mesh axes {named} need a multiple of {fixed} devices; there are {num_devices} {where}"
        )
    if rest:
        return {**sizes, rest[0]: num_devices // fixed}
    if fixed != num_devices:
        raise ValueError(
            f"mesh axes multiply to {fixed} but there are {num_devices} devices {where}; "
            "set one axis to -1 to take the rest"
        )
    return sizes


def parse_mesh(text: str | None) -> dict[str, int]:
    """ "data=2,tensor=4" (a CLI's --mesh) -> {"data": 2, "tensor": 4}; one size may
    be -1 (the rest); None or "" -> {}."""
    sizes = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not re.fullmatch(r"-?\d+", value):
            raise ValueError(
                f"bad mesh entry {part!r}; write AXIS=SIZE with AXIS among "
                f"{list(MESH_AXES)}, e.g. --mesh data=2,tensor=4"
            )
        sizes[name] = int(value)
    return sizes


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    expert: int = 1,
    *,
    dcn: Mapping[str, int] | None = None,
    devices=None,
) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh; one size may be -1, meaning "the rest".

    `dcn`: sizes across slices (multi-slice TPU, or processes when the devices
    carry no slice index), e.g. {"data": 2} for two slices doing data
    parallelism over the data-center network; the ICI sizes then describe one
    slice. Axes are `AxisType.Auto`: the logical rules and sharding constraints
    assume the compiler propagates shardings (Explicit axes refuse ambiguous matmuls).
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {a: 1 for a in MESH_AXES} | dict(dcn or {})
    unknown = sorted(set(dcn) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown DCN mesh axes {unknown}; the axes are {list(MESH_AXES)}")
    slices = math.prod(dcn.values())
    if len(devices) % slices:
        raise ValueError(
            f"DCN axes {dcn} make {slices} slices, which do not divide {len(devices)} devices"
        )
    ici = _resolve(
        {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert},
        len(devices) // slices,
        "per slice" if slices > 1 else "",
    )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        shape = tuple(ici[a] for a in MESH_AXES)
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    from jax.experimental import mesh_utils

    # The DCN granules are TPU slices, or else processes (hosts).
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    num_processes = len({d.process_index for d in devices})
    if slices not in (num_slices, num_processes):
        raise ValueError(
            f"DCN axes {dcn} make {slices} slices, but the devices come from {num_slices} "
            f"slice(s) and {num_processes} process(es); set the dcn_* sizes to multiply to one "
            "of those, or use ICI axes only"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        tuple(ici[a] for a in MESH_AXES),
        tuple(dcn[a] for a in MESH_AXES),
        devices,
        process_is_granule=slices != num_slices,
    )
    return Mesh(grid, MESH_AXES, axis_types=auto)

"""Logical axis names -> mesh axes, for parameters and activations alike.

Every parameter carries logical axis names (`model.layers.param`), and the model
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
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "mixtral_jax_sharding_rules", default=None
)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (while tracing), `constrain` places activations by `rules`.

    The jitted functions of `training.steps` and `inference.generate` enter it
    themselves; enter it by hand only around a function you jit yourself, inside the
    function being traced.
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


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())

"""Device meshes: (data, fsdp, tensor, expert) axes within a slice (ICI) and across
slices (DCN), from sizes, a config or a command line."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh

from mixtral_jax.parallel.rules import DEFAULT_RULES, MESH_AXES


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
            raise ValueError(f"unknown mesh field(s) {unknown}; the fields are {sorted(fields)}")
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

"""TPU slices: their chips (memory, peak FLOP/s, bandwidth) and abstract devices.

The devices come from `jax.experimental.topologies` when libtpu is installed
(`pip install -e ".[tpu]"`): the TPU compiler then compiles for a slice on any
machine. `cpu:N` gives N virtual CPU devices instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

GiB = 1024**3


class PlanError(ValueError):
    """A plan that cannot be made: an unknown topology, a mesh that does not fit it."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm: int  # bytes of memory per chip
    flops: float | None = None  # peak bf16 FLOP/s per chip
    bandwidth: float | None = None  # memory bytes/s per chip


# Per chip: HBM, peak bf16 FLOP/s, HBM bandwidth (Google's published figures).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 0.82e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2.8e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1.6e12),
}
# Slice names count TensorCores: a v4-16 or v5p-16 is 8 chips (two cores each).
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # as the user wrote it, e.g. "v5e-8"
    topology: str  # e.g. "v5e:2x4"
    chip: Chip
    devices: tuple

    @property
    def size(self) -> int:
        return len(self.devices)


def topology_name(name: str) -> tuple[str, str]:
    """("v5e", "v5e:2x4") from "v5e-8" or "v5e:2x4"; ("cpu", "cpu:8") from "cpu:8"."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|cpu)([-:])([0-9x]+)", name)
    if not match:
        raise PlanError(
            f"unknown topology {name!r}; give a slice (v5e-8, v5p-16, v4-16, v6e-1), a TPU "
            f"topology (v5e:2x4, v5p:2x2x2) or cpu:N; the TPU generations are {sorted(CHIPS)}"
        )
    generation, sep, size = match.groups()
    if generation == "cpu" or sep == ":":
        return generation, name
    cores = int(size)
    chips, rest = divmod(cores, CORES_PER_CHIP[generation])
    shapes = SHAPES_3D if generation in ("v4", "v5p") else SHAPES_2D
    if rest or chips not in shapes:
        raise PlanError(
            f"no {generation} slice with {cores} cores is known here; use one of "
            + ", ".join(f"{generation}-{c * CORES_PER_CHIP[generation]}" for c in shapes)
            + f", or a topology such as {generation}:{next(iter(shapes.values()))}"
        )
    return generation, f"{generation}:{shapes[chips]}"


def get_slice(name: str, hbm_gib: float | None = None) -> TpuSlice:
    """The abstract devices of a TPU slice (needs libtpu) or `cpu:N` virtual CPUs.
    `hbm_gib` overrides the memory per chip (a what-if, or CPU devices)."""
    generation, topology = topology_name(name)
    if generation == "cpu":
        count = int(topology.split(":")[1])
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise PlanError(
                f"{topology} needs {count} CPU devices but JAX has {len(devices)}; set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts "
                "(tools/plan.py does this itself)"
            )
        devices = devices[:count]
        memory = hbm_gib * GiB if hbm_gib else _host_memory() // count
        return TpuSlice(name, topology, Chip("CPU", int(memory)), tuple(devices))
    try:
        from jax.experimental import topologies

        cells = math.prod(int(n) for n in topology.split(":")[1].split("x"))
        options = {"chips_per_host_bounds": (1, 1, 1)} if cells == 1 else {}
        if CORES_PER_CHIP[generation] == 2:  # one device per chip, as JAX runs v4 and v5p
            options["chip_config_name"] = "megacore"
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
    except Exception as error:  # no libtpu, or a topology it does not know
        raise PlanError(
            f"cannot compile for {topology}: {str(error).splitlines()[0][:200]}. Compiling for "
            'TPUs needs libtpu (pip install -e ".[tpu]"); --topology cpu:8 plans on virtual '
            "CPU devices without it"
        ) from error
    chip = CHIPS[generation]
    if hbm_gib:
        chip = dataclasses.replace(chip, hbm=int(hbm_gib * GiB))
    return TpuSlice(name, topology, chip, tuple(desc.devices))


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

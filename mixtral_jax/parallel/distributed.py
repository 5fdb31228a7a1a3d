"""Many hosts: JAX's distributed runtime, and global batches from host-local data.

Every process runs the same program on its own devices; `jax.devices()` then
lists the devices of all processes and a mesh spans them. Each host loads only
the rows of the batch that its devices hold (`host_rows`), and `global_batch`
assembles the global arrays from those rows without moving data between hosts.

    distributed.initialize()              # no-op on one host
    mesh = make_mesh(fsdp=-1)             # over every host's devices (parallel.mesh)
    rows = distributed.host_rows(step.batch_sharding, global_batch_size)
    batch = distributed.global_batch(load(rows), step.batch_sharding)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from mixtral_jax.parallel.rules import spec_axes

# Environment variables read when `initialize` is not given the value.
ENV = {
    "coordinator_address": "MIXTRAL_COORDINATOR_ADDRESS",  # host:port of process 0
    "num_processes": "MIXTRAL_NUM_PROCESSES",
    "process_id": "MIXTRAL_PROCESS_ID",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `initialize`, for a command-line tool."""
    group = parser.add_argument_group("multi-host")
    group.add_argument(
        "--coordinator_address", help=f"host:port of process 0 (or ${ENV['coordinator_address']})"
    )
    group.add_argument("--num_processes", type=int, help=f"(or ${ENV['num_processes']})")
    group.add_argument("--process_id", type=int, help=f"(or ${ENV['process_id']})")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="start the distributed runtime with JAX's own detection (Cloud TPU pods, SLURM, MPI)",
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Starts `jax.distributed` when the program runs as several processes.

    Values not given are read from `$MIXTRAL_COORDINATOR_ADDRESS`,
    `$MIXTRAL_NUM_PROCESSES` and `$MIXTRAL_PROCESS_ID`. With none of them set,
    `auto=True` lets JAX detect the cluster itself (multi-host Cloud TPU VMs,
    SLURM, Open MPI); otherwise this is a single process and nothing happens.
    Call it before anything else touches JAX's devices. Returns whether the
    distributed runtime was started.
    """
    given = {
        "coordinator_address": coordinator_address or os.environ.get(ENV["coordinator_address"]),
        "num_processes": num_processes or _int_env("num_processes"),
        "process_id": process_id if process_id is not None else _int_env("process_id"),
    }
    if all(v is None for v in given.values()):
        if auto:
            jax.distributed.initialize()
        return auto
    missing = [ENV[k] for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"multi-host setup is incomplete: {', '.join(missing)} not set; give the "
            "coordinator address, the number of processes and this process's id together"
        )
    if given["num_processes"] == 1:
        return False
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(
            f"process id {given['process_id']} is outside [0, {given['num_processes']})"
        )
    jax.distributed.initialize(**given)
    return True


def _int_env(key: str) -> int | None:
    value = os.environ.get(ENV[key])
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${ENV[key]}={value!r} is not an integer") from None


def host_rows(batch_sharding: NamedSharding, global_batch_size: int) -> slice:
    """The rows of a global batch that this host's devices hold, as one slice.

    Loaders read only these rows (e.g. documents `rows.start`, ... of a step).
    """
    indices = batch_sharding.addressable_devices_indices_map((global_batch_size, 1))
    bounds = sorted({index[0].indices(global_batch_size)[:2] for index in indices.values()})
    end = bounds[0][0]
    for start, stop in bounds:
        if start > end:
            raise ValueError(
                "this host's rows of the batch are not contiguous under this mesh; shard "
                "the batch over the multi-host axis first (dcn_data, or data before fsdp)"
            )
        end = max(end, stop)
    return slice(bounds[0][0], end)


def global_batch(local: Mapping[str, Any] | Any, batch_sharding: NamedSharding) -> Any:
    """Global arrays from each host's rows (`host_rows`); a dict or a single array.

    On one host this is `jax.device_put` with the batch sharding.
    """
    # The batch is cut into `shards` blocks of rows; this host holds `held` of them.
    axes = spec_axes(batch_sharding.spec[0] if len(batch_sharding.spec) else None)
    shards = int(np.prod([batch_sharding.mesh.shape[a] for a in axes]))
    rows = host_rows(batch_sharding, shards)
    held = rows.stop - rows.start

    def assemble(value):
        value = np.asarray(value)
        if value.shape[0] % held:
            raise ValueError(
                f"this host's batch has {value.shape[0]} rows, which its {held} of the "
                f"batch's {shards} shards do not divide"
            )
        global_shape = (value.shape[0] * shards // held, *value.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding, value, global_shape)

    if isinstance(local, Mapping):
        return {k: assemble(v) for k, v in local.items()}
    return assemble(local)

"""Parallelism: logical axis names to mesh axes, meshes, placement and many hosts.

    rules.py        the rules that map logical axis names to mesh axes; activation constraints
    mesh.py         (data, fsdp, tensor, expert) meshes within and across slices
    placement.py    where each parameter goes: shardings by path, placing a model
    distributed.py  starting several processes; a host's rows of a global batch
    devices.py      whether this machine has a TPU, before JAX starts its backends

The lowest room: it knows logical names and devices, nothing of Mixtral.
"""

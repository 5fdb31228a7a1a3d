"""Resuming a run from the newest checkpoint step that restores.

A preempted VM or a full disk can leave the newest step damaged: a data file
truncated or missing, no commit marker, metadata that does not parse. Steps are
tried newest first. The damaged ones above the first step that restores are set
aside, moved (never deleted) to `WORKDIR/damaged/`, one line each, so the run goes
on from that step and its later saves do not collide with them. When no step
restores, nothing is moved and the error names each step's fault.

A step that is intact but holds arrays of other shapes than the run's model is
damage too when an older step fits (it does not belong to this run); when none
fits, the config has changed, and the error says so instead.
"""

from __future__ import annotations

import collections
import functools
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from mixtral_jax.checkpoints import damage
from mixtral_jax.checkpoints.store import CheckpointError

T = TypeVar("T")

# Orbax writes this into a step just before the rename that makes the step final:
# a step without it was not written by a save that finished.
COMMIT_MARKER = "commit_success.txt"
# A step's items: the training state, and where the run was in its data.
STATE, POSITION = "state", "data"
# Orbax writes a step under a temporary name, renamed when the save finishes.
TEMPORARY = ".orbax-checkpoint-tmp"


class Fault(NamedTuple):
    step: int
    problem: str  # one line: the file and what is wrong with it
    other_model: bool  # intact, but its arrays have other shapes than the run's


def restore_newest(
    manager: ocp.CheckpointManager,
    restore: Callable[[int], T],
    target: Any,
    set_aside: Path,
    report: Callable[[str], None] | None = None,
) -> T | None:
    """`restore(step)` of the newest step of `manager` that restores; None if it has
    none. Damaged newer steps are moved under `set_aside` (and `manager` reloaded),
    each reported in one line (`report`, default: printed). `target`: the tree of
    arrays a step must hold."""
    report = report or functools.partial(print, flush=True)
    directory = Path(manager.directory)
    faults: list[Fault] = []
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = directory / str(step)
        restored, problem, other_shapes = None, None, None
        if not (step_dir / COMMIT_MARKER).is_file():
            problem = f"{step_dir / COMMIT_MARKER} is missing: its save did not finish"
        elif other_shapes := _other_shapes(step_dir, target):
            problem = other_shapes  # not read: Orbax would fail on it, noisily
        else:
            try:
                with damage.quietly():
                    restored = restore(step)
            except Exception as error:  # noqa: BLE001 - any failure to read is damage
                problem = _diagnose(step_dir, error)
        if _everywhere(problem is None):
            _set_aside(faults, directory, set_aside, report, step)
            if faults:
                manager.reload()
            return restored
        problem = problem or "another process could not restore it"
        faults.append(Fault(step, problem, other_shapes is not None))
    if not faults:
        return None
    lines = "\n".join(f"  step {f.step}: {f.problem}" for f in faults)
    if all(f.other_model for f in faults):
        raise CheckpointError(
            f"the checkpoints in {directory} hold another model than this config "
            f"describes:\n{lines}\nresume with the run's own config, or give another "
            "--workdir to start afresh"
        )
    raise CheckpointError(
        f"no checkpoint step in {directory} restores:\n{lines}\nmove {directory} aside "
        "(or give another --workdir) to start afresh; nothing was changed"
    )


def unfinished_saves(checkpoints: Path) -> list[Path]:
    """The temporary directories of saves that did not finish (a killed run's)."""
    if not checkpoints.is_dir():
        return []
    return [p for p in checkpoints.iterdir() if TEMPORARY in p.name]


def _set_aside(faults, directory: Path, set_aside: Path, report, good_step: int) -> None:
    """Each damaged step moved under `set_aside` (by the first process only)."""
    for fault in faults:
        destination = set_aside / str(fault.step)
        for n in itertools.count(1):
            if not destination.exists():
                break
            destination = set_aside / f"{fault.step}.{n}"
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(directory / str(fault.step), destination)
        report(
            f"checkpoint step {fault.step} is damaged ({fault.problem}); set aside in "
            f"{destination}, resuming from step {good_step}"
        )
    if faults and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mixtral_jax: damaged steps set aside")


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (they must resume from the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _diagnose(step_dir: Path, error: Exception) -> str:
    """One line: the item or file of the step at fault."""
    for item in (STATE, POSITION):
        if not (step_dir / item).is_dir():
            return f"{step_dir / item} is missing"
    return damage.describe(step_dir, error)


def _other_shapes(step_dir: Path, target: Any) -> str | None:
    """How the arrays the step's own metadata lists differ from `target`'s, if they
    do (the step is then intact, but another model's); None if not or unreadable."""
    try:
        with damage.quietly():
            metadata = ocp.StandardCheckpointer().metadata(step_dir / STATE)
    except Exception:  # noqa: BLE001 - unreadable metadata is damage, not another model
        return None
    tree = getattr(metadata, "item_metadata", metadata)
    if not jax.tree.leaves(tree):
        return None  # a metadata file that lists nothing is damage
    stored = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(tree))
    wanted = collections.Counter(tuple(x.shape) for x in jax.tree.leaves(target))
    if stored == wanted:
        return None
    there, here = sorted(stored - wanted), sorted(wanted - stored)
    return (
        f"another model's arrays: {there[0] if there else 'none'} there where this "
        f"config makes {here[0] if here else 'none'}, and {stored.total()} arrays "
        f"there, {wanted.total()} here"
    )

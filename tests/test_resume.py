"""Resuming from the newest intact step: each kind of damage a full disk or a killed
VM leaves is named in one line and set aside, never deleted; with no intact step,
nothing moves and the error names every step's fault. Small Orbax managers, in
process; the training command's own resume is in test_faults.py."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mixtral_jax.checkpoints.store import CheckpointError
from mixtral_jax.training import resume

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def state(step: int, width: int = 64) -> dict:
    """Random (incompressible) values: the largest data file holds array data."""
    w = jax.random.normal(jax.random.key(step), (256, width))
    return {"w": w, "b": jnp.arange(width) + step}


def target(width: int = 64):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SHARDING), state(0, width)
    )


def save(directory: Path, step: int, width: int = 64) -> None:
    with ocp.CheckpointManager(directory) as manager:
        args = {
            resume.STATE: ocp.args.StandardSave(state(step, width)),
            resume.POSITION: ocp.args.JsonSave({"step": step}),
        }
        manager.save(step, args=ocp.args.Composite(**args))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Steps 10, 20, 30 of a run, written once and copied by each test."""
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    for step in (10, 20, 30):
        save(directory, step)
    return directory


@pytest.fixture
def run(saved, tmp_path) -> Path:
    shutil.copytree(saved, tmp_path / "checkpoints")
    return tmp_path


def restore_newest(workdir: Path, width: int = 64):
    """(the restored step or None, the lines reported), as the training command does."""
    lines = []
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:

        def restore(step):
            args = {
                resume.STATE: ocp.args.StandardRestore(target(width)),
                resume.POSITION: ocp.args.JsonRestore(),
            }
            return manager.restore(step, args=ocp.args.Composite(**args))

        restored = resume.restore_newest(
            manager, restore, target(width), workdir / "damaged", lines.append
        )
        steps = manager.all_steps()
    if restored is None:
        return None, lines, steps
    step = restored[resume.POSITION]["step"]
    np.testing.assert_array_equal(restored[resume.STATE]["w"], state(step, width)["w"])
    return step, lines, steps


def data_files(step_dir: Path) -> list[Path]:
    return sorted(step_dir.glob("state/ocdbt.process_0/d/*"), key=lambda p: -p.stat().st_size)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# Each kind of damage: how it is made in step 30, and what the one line must name.
DAMAGE = {
    "truncated data file": (lambda s: truncate(data_files(s)[0]), "OCDBT database at local"),
    "missing data file": (lambda s: data_files(s)[0].unlink(), "30/state/"),
    "empty data file": (lambda s: data_files(s)[0].write_bytes(b""), "is empty"),
    "no commit marker": (lambda s: (s / "commit_success.txt").unlink(), "commit_success.txt"),
    "metadata that does not parse": (
        lambda s: (s / "state" / "_METADATA").write_text("{not json"),
        "30/state/_METADATA does not parse",
    ),
    "position that does not parse": (
        lambda s: (s / "data" / "metadata").write_text("{not json"),
        "30/data/metadata does not parse",
    ),
    "missing item": (lambda s: shutil.rmtree(s / "state"), "30/state is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_step_is_set_aside_and_the_newest_intact_one_restored(run, kind):
    damage, named = DAMAGE[kind]
    damage(run / "checkpoints" / "30")
    step, lines, steps = restore_newest(run)
    assert step == 20
    assert len(lines) == 1 and "step 30 is damaged" in lines[0] and named in lines[0], lines
    assert "resuming from step 20" in lines[0]
    assert (run / "damaged" / "30").is_dir() and not (run / "checkpoints" / "30").exists()
    assert list(steps) == [10, 20]  # the manager knows: step 30 can be saved again


def test_an_intact_run_restores_its_newest_step_and_moves_nothing(run):
    assert restore_newest(run)[:2] == (30, [])
    assert not (run / "damaged").exists()


def test_a_newer_step_of_another_model_is_damage_when_an_older_one_fits(run):
    shutil.rmtree(run / "checkpoints" / "30")
    save(run / "checkpoints", 30, width=32)
    step, lines, _ = restore_newest(run)
    assert (
        step == 20
        and "another model's arrays: (32,) there where this config makes (64,)" in lines[0]
    ), lines


def test_every_step_of_another_model_means_the_config_changed(run):
    with pytest.raises(CheckpointError, match="hold another model than this config") as error:
        restore_newest(run, width=32)
    assert "(64,) there where this config makes (32,)" in str(error.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20", "30"]


def test_no_intact_step_is_an_error_that_names_each_and_moves_nothing(run):
    for step in ("10", "20", "30"):
        truncate(data_files(run / "checkpoints" / step)[0])
    (run / "checkpoints" / "20" / "commit_success.txt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint step in .* restores") as error:
        restore_newest(run)
    message = str(error.value)
    assert all(f"step {s}:" in message for s in (10, 20, 30)), message
    assert "20/commit_success.txt is missing" in message and "nothing was changed" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20", "30"]


def test_a_step_set_aside_twice_keeps_both(run):
    truncate(data_files(run / "checkpoints" / "30")[0])
    (run / "damaged" / "30").mkdir(parents=True)  # set aside by an earlier resume
    step, lines, _ = restore_newest(run)
    assert step == 20 and (run / "damaged" / "30.1").is_dir() and "30.1" in lines[0]


def test_a_run_without_checkpoints_starts_afresh(tmp_path):
    assert restore_newest(tmp_path)[:2] == (None, [])


def test_no_echo_of_the_failed_reads(run, capfd, caplog, monkeypatch):
    """One line, and nothing else: no Orbax warning, no "exception was never
    retrieved", no errors of the reads still pending when the first failed."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    for path in data_files(run / "checkpoints" / "30"):
        path.unlink()
    assert restore_newest(run)[0] == 20
    time.sleep(0.5)  # the pending reads end
    gc.collect()
    out, err = capfd.readouterr()
    assert not unraisable, [u.exc_value for u in unraisable]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in out + err, err[-2000:]


def test_the_metadata_files_named_are_the_ones_orbax_writes(saved):
    """`damage.describe` checks every file outside the array data as JSON: a new
    Orbax file that is not JSON would be called damaged; this fails first."""
    for path in (saved / "30").rglob("*"):
        if path.is_file() and path.parent.name != "d" and path.suffix not in (".ocdbt", ".txt"):
            json.loads(path.read_bytes())


def test_asyncio_s_late_echo_of_a_failed_read_is_dropped_and_nothing_else(run, caplog):
    """The failed reads' tasks may be collected long after the restore (at exit, in
    CI): asyncio's "never retrieved" for them is dropped, any other record kept."""
    truncate(data_files(run / "checkpoints" / "30")[0])
    restore_newest(run)  # a failure: the filter is in place from here on
    try:
        exec(compile("raise ValueError('read')", "/x/orbax/serialization.py", "exec"))
    except ValueError as e:
        orbax_error = e
    log = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        log.error("Task exception was never retrieved", exc_info=orbax_error)
        log.error("Task exception was never retrieved", exc_info=ValueError("ours"))
    assert [r.exc_info[1].args for r in caplog.records] == [("ours",)]

"""The training command under faults, as a user meets them: a damaged newest step
(resumed past, one line), no intact step (one error, nothing moved), and SIGKILL at
random moments, checkpoint writes among them (resumed with the same losses).
Subprocesses of `python -m mixtral_jax.train` on the tiny config, sharing one
compilation cache; tools/faults.py runs the kill trials at length."""

from __future__ import annotations

import shutil

import pytest

from tools import faults

STEPS = 8  # checkpoints at 2, 4, 6, 8; the last two kept


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """An uninterrupted run: its work directory, copied by the tests that damage it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    code, output = faults.run(workdir, STEPS, cache)
    assert code == 0, output
    return workdir


def truncate_largest_data_file(step_dir):
    data = max(step_dir.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def test_a_damaged_newest_step_is_named_set_aside_and_resumed_past(finished, cache, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    truncate_largest_data_file(workdir / "checkpoints" / "8")
    code, output = faults.run(workdir, STEPS, cache)
    assert code == 0 and "Traceback" not in output, output
    damaged = [line for line in output.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "step 8 is damaged" in damaged[0], output
    assert "8/state" in damaged[0] and "resuming from step 6" in damaged[0]
    assert "resumed from step 6" in output
    assert (workdir / "damaged" / "8" / "state").is_dir()  # set aside, not deleted
    reference = faults.losses(finished)
    assert faults.losses(workdir) == {s: v * 2 if s > 6 else v for s, v in reference.items()}


def test_no_intact_step_is_one_error_and_nothing_moves(finished, cache, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    for step in ("6", "8"):
        truncate_largest_data_file(workdir / "checkpoints" / step)
    code, output = faults.run(workdir, STEPS, cache)
    assert code == 2 and "Traceback" not in output, output
    assert "error: no checkpoint step in" in output and "step 6:" in output, output
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6", "8"]
    assert not (workdir / "damaged").exists()


def test_kills_at_random_moments_resume_with_the_uninterrupted_losses():
    done = faults.trials(2, STEPS, seed=1, report=lambda line: None)
    assert all(t.passed for t in done), [faults.describe(n, t) for n, t in enumerate(done)]


def test_a_first_save_cut_short_is_said_and_the_run_starts_afresh(cache, tmp_path):
    (tmp_path / "run" / "checkpoints" / "2.orbax-checkpoint-tmp-1796544439").mkdir(parents=True)
    code, output = faults.run(tmp_path / "run", 2, cache)
    assert code == 0 and "holds no finished step" in output and "resumed" not in output, output
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["2"]

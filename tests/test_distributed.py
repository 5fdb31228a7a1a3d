"""Multi-host start-up and batches, on one process (two processes: test_sharding.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mixtral_jax.parallel import distributed
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.parallel.rules import named_sharding
from mixtral_jax.training import steps


def test_one_process_starts_nothing(monkeypatch):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    monkeypatch.setenv("MIXTRAL_NUM_PROCESSES", "1")
    monkeypatch.setenv("MIXTRAL_PROCESS_ID", "0")
    monkeypatch.setenv("MIXTRAL_COORDINATOR_ADDRESS", "localhost:1234")
    assert distributed.initialize() is False


@pytest.mark.parametrize(
    "env,message",
    [
        ({"MIXTRAL_NUM_PROCESSES": "2"}, "MIXTRAL_COORDINATOR_ADDRESS, MIXTRAL_PROCESS_ID not set"),
        ({"MIXTRAL_NUM_PROCESSES": "two"}, r"\$MIXTRAL_NUM_PROCESSES='two' is not an integer"),
        (
            {
                "MIXTRAL_NUM_PROCESSES": "2",
                "MIXTRAL_PROCESS_ID": "2",
                "MIXTRAL_COORDINATOR_ADDRESS": "localhost:1234",
            },
            r"process id 2 is outside \[0, 2\)",
        ),
    ],
)
def test_incomplete_setups_are_named(monkeypatch, env, message):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize()


def test_one_host_holds_every_row_and_the_global_batch_is_the_local_one():
    mesh = make_mesh(devices=jax.devices()[:1])
    batch_sharding = named_sharding(steps.BATCH_AXES, (1, 1), mesh)
    assert distributed.host_rows(batch_sharding, 6) == slice(0, 6)
    tokens = np.arange(12).reshape(6, 2)
    batch = distributed.global_batch({"tokens": tokens}, batch_sharding)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
    assert batch["tokens"].sharding == batch_sharding

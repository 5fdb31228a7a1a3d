"""A machine without a TPU never starts libtpu (no page of warnings); one with a TPU, or
an explicit JAX_PLATFORMS, is left as it is. And `python -m` commands print no
runpy warning."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax._src import xla_bridge

from mixtral_jax.parallel import devices

ROOT = Path(__file__).resolve().parents[1]
LIBTPU_NOISE = ("Failed to find host bounds", "E0000", "unexpected worker hostname")


def fake_pci(tmp_path: Path, vendors: list[str]) -> Path:
    for i, vendor in enumerate(vendors):
        device = tmp_path / f"0000:00:0{i}.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
    return tmp_path


def test_a_tpu_is_a_pci_device_of_googles(tmp_path):
    assert devices.has_tpu(str(fake_pci(tmp_path / "tpu", ["0x8086", "0x1ae0"])))
    assert not devices.has_tpu(str(fake_pci(tmp_path / "gpu", ["0x8086", "0x10de"])))
    assert not devices.has_tpu(str(tmp_path / "none"))


def test_the_tpu_runtime_is_skipped_only_where_there_is_no_tpu(monkeypatch):
    tpu = xla_bridge._backend_factories["tpu"]
    monkeypatch.setitem(xla_bridge._backend_factories, "tpu", tpu)  # restored afterwards
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(devices, "has_tpu", lambda: True)  # a TPU VM
    assert not devices.skip_absent_tpu()
    assert xla_bridge._backend_factories["tpu"] is tpu
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")  # the user's choice wins
    monkeypatch.setattr(devices, "has_tpu", lambda: False)
    assert not devices.skip_absent_tpu()
    assert xla_bridge._backend_factories["tpu"] is tpu
    monkeypatch.delenv("JAX_PLATFORMS")
    assert devices.skip_absent_tpu()  # no TPU: the platform stays, its start is skipped
    skipped = xla_bridge._backend_factories["tpu"]
    assert skipped.factory() is None and skipped.fail_quietly


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.skipif(devices.has_tpu(), reason="this machine has a TPU")
def test_a_command_on_a_machine_without_a_tpu_prints_only_its_answer():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixtral_jax.generate",
            "--prompt",
            "def f(",
            "--max_new_tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("def f(")
    assert not [noise for noise in (*LIBTPU_NOISE, "RuntimeWarning") if noise in done.stderr]


def test_the_command_module_refuses_to_be_imported():
    """`mixtral_jax.generate` is the function; importing the command would hide it."""
    import mixtral_jax

    with pytest.raises(ImportError, match="python -m mixtral_jax.generate"):
        importlib.import_module("mixtral_jax.generate")
    assert callable(mixtral_jax.generate)

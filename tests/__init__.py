"""Tests. Every test process, and every process a test starts, compiles with
`xla_flags()` (`conftest.py` sets it; the multi-device workers ask for more devices)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tiny test models compile for far longer than they run. LLVM's cheaper passes
# make the suite's compiles faster; XLA's own passes, which decide what is computed,
# are unchanged, and the numbers are the same to rounding.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test process with `devices` virtual CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


def run_worker(module: str, *args: str) -> dict:
    """Runs `python -m module args` (a worker that sets its own devices before JAX
    starts) and returns the JSON of its last stdout line."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_script(code: str, *args: str, devices: int = 8) -> dict:
    """Runs `python -c code args` on `devices` virtual CPU devices (the flag must be set
    before JAX starts) and returns the JSON of its last stdout line."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Whether `condition()` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()

"""Which accelerators this machine has, looked up before JAX starts its backends.

With libtpu installed (the `.[tpu]` and `.[test]` extras install it, so that
`tools/plan.py` can compile for TPU slices anywhere), JAX tries the TPU runtime
on every machine, and on one without a TPU libtpu prints a page of warnings
("Failed to find host bounds ...", "E0000 ... unexpected worker hostname ...")
before falling back to the CPU (jax-ml/jax#11668). `skip_absent_tpu` looks for
a TPU the way JAX itself does, by the PCI devices of Google's vendor id, and only
when there is none has JAX skip the TPU runtime, as JAX itself skips CUDA where no
NVIDIA GPU is visible: a TPU VM keeps its TPU, an explicit `JAX_PLATFORMS` always
wins, and compiling for a TPU slice (`jax.experimental.topologies`) still loads
libtpu.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # every TPU chip is a PCI device of Google's


def has_tpu(pci_devices: str = "/sys/bus/pci/devices") -> bool:
    """Whether a PCI device of Google's (a TPU chip) is visible on this machine."""
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            if Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def skip_absent_tpu() -> bool:
    """Keeps JAX from starting the TPU runtime on a machine with no TPU; returns whether
    it did. Nothing changes where JAX_PLATFORMS or JAX_FORCE_TPU_INIT is set, where a
    TPU is present, or once JAX has started its backends (then it is too late)."""
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or has_tpu():
        return False
    try:
        from jax._src import xla_bridge  # the backend registry has no public API
    except ImportError:
        return False
    factories = getattr(xla_bridge, "_backend_factories", None)
    initialized = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    tpu = factories.get("tpu") if isinstance(factories, dict) else None
    if tpu is None or initialized or not dataclasses.is_dataclass(tpu):
        return False
    # The platform stays registered (lowering rules name it); only its start is skipped:
    # a factory that returns no client fails quietly, as TPU's factory is marked to.
    factories["tpu"] = dataclasses.replace(tpu, factory=_no_tpu, fail_quietly=True)
    return True


def _no_tpu() -> None:
    """A backend factory for a machine without a TPU: no client."""
    return None

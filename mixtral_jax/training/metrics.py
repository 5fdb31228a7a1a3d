"""Training metrics: TensorBoard event files, a JSONL log, and model FLOPs for MFU.

Event files are written by tensorboardX (the TensorBoard format without TensorFlow);
the same scalars go, one JSON object per step, to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import tensorboardX

from mixtral_jax.model.config import ModelConfig


class SummaryWriter:
    """Scalars into `logdir/events.out.tfevents.*` (TensorBoard) and `logdir/metrics.jsonl`."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._events = tensorboardX.SummaryWriter(str(self.logdir))
        path = self.logdir / "metrics.jsonl"
        _drop_unfinished_line(path)  # a run killed mid-line is resumed on a fresh line
        self._jsonl = open(path, "a")  # noqa: SIM115 (closed by close())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes every value at `step` and flushes (a preempted run keeps its log)."""
        now = time.time()
        for tag, value in values.items():
            self._events.add_scalar(tag, float(value), step, walltime=now)
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self.flush()

    def flush(self) -> None:
        self._events.flush()
        self._jsonl.flush()

    def close(self) -> None:
        self._events.close()
        self._jsonl.close()


def _drop_unfinished_line(path: Path) -> None:
    """Cuts the file back to its last whole line, if it ends in the middle of one."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        text = f.read()
        if not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)


class Throughput:
    """Tokens/s and MFU over the steps since the last report; the first step (which
    compiles) and the time before a `restart` (evaluation) are not counted."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.tokens_per_step, self.flops_per_token, self.peak = (
            tokens_per_step,
            flops_per_token,
            peak,
        )
        self.compiled = False
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def step(self, outputs) -> None:
        if self.compiled:
            self.steps += 1
        else:
            jax.block_until_ready(outputs)
            self.compiled = True
            self.restart()

    def report(self) -> dict[str, float]:
        """{"tokens_per_s", "mfu"} of the steps since the last report (call it after the
        step's outputs were read, so that the work is done), then starts a new window."""
        values = {}
        if self.steps:
            tokens_per_s = self.steps * self.tokens_per_step / (time.perf_counter() - self.start)
            values["tokens_per_s"] = tokens_per_s
            if self.peak:
                values["mfu"] = self.flops_per_token * tokens_per_s / self.peak
        self.restart()
        return values


def flops_per_token(config: ModelConfig, seq_len: int, trained_fraction: float = 1.0) -> float:
    """Model FLOPs of one training token (forward + backward), as in the PaLM paper's MFU.

    Matmuls with the active weights: 2 FLOPs per weight forward, 4 backward
    (2 for the activations' gradient, 2 for the weight's; the latter only for
    the trained fraction); attention scores and values: 12 L T D-sized per token
    in all (half of it masked out by causality, counted as PaLM does).
    """
    c = config
    D, F, L = c.hidden_size, c.intermediate_size, c.num_layers
    attention = D * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    experts = 3 * D * F * c.num_experts_per_tok
    active = L * (attention + experts + D * c.num_experts) + D * c.vocab_size
    matmuls = (2 + 2 + 2 * trained_fraction) * active
    scores = 12 * L * seq_len * c.num_heads * c.head_dim / 2
    return matmuls + scores


# Dense bf16 peak FLOP/s per chip.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(mesh: jax.sharding.Mesh) -> float | None:
    """The mesh's peak FLOP/s: its chips' figure from the table, or for CPU devices the
    best measured rate of a float32 matmul (the most a CPU run can reach; virtual
    CPU devices share the same cores). None for an unknown accelerator."""
    device = mesh.devices.flat[0]
    for kind, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return flops * mesh.size
    if device.platform != "cpu":
        return None
    import jax.numpy as jnp

    n = 1024
    a = jnp.ones((n, n), jnp.float32, device=device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best

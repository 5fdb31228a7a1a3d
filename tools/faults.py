"""Training killed at random moments, a checkpoint write among them, then resumed.

    python tools/faults.py                 # 20 trials on the tiny config
    python tools/faults.py --trials 5 --steps 16

One uninterrupted run gives the reference losses. Each trial starts the same run
in a fresh work directory, SIGKILLs it a random 0-150 ms after a random step's
line (every other step saves a checkpoint asynchronously, so many kills land in
a write), notes whether a write was cut (Orbax's temporary directory is left),
runs the same command again, and compares every step's loss with the reference.
A trial passes when the rerun exits 0, deletes what the cut write left, and logs
every loss, including the steps the killed run logged before it died, equal to the
reference bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mixtral_jax.training.resume import unfinished_saves

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY = 2


@dataclass
class Trial:
    killed_after: int  # the step whose line was printed
    delay_ms: int
    cut_a_write: bool  # Orbax's temporary directory was left behind
    resumed_from: int  # 0: no finished checkpoint yet, the rerun started afresh
    exit_code: int  # of the rerun
    same_losses: bool
    tidy: bool  # the rerun deleted what the cut write left

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and self.same_losses and self.tidy


def command(workdir: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mixtral_jax.train",
        "--config=configs/finetune_tiny.py",
        f"--workdir={workdir}",
        f"--config.steps={steps}",
        "--config.log_every=1",
        f"--config.checkpoint_every={CHECKPOINT_EVERY}",
        "--config.keep_checkpoints=2",
        "--config.data.eval=",
        "--config.export=False",
        "--config.data.seq_len=32",
        "--config.data.batch_size=4",
    ]


def environment(cache: Path) -> dict[str, str]:
    """One CPU device, and one compilation cache for every run: compiled once."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def run(workdir: Path, steps: int, cache: Path, kill_after: int | None = None, delay=0.0):
    """(exit code, output) of the training command; SIGKILLed `delay` seconds after
    it prints step `kill_after`'s line, when given."""
    proc = subprocess.Popen(
        command(workdir, steps),
        cwd=ROOT,
        env=environment(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if kill_after is not None and line.startswith(f"step {kill_after}/"):
            time.sleep(delay)
            proc.kill()
            break
    proc.wait()
    return proc.returncode, "".join(output)


def losses(workdir: Path) -> dict[int, list[float]]:
    """Every loss logged per step (a step the killed run logged is logged again)."""
    logged: dict[int, list[float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            logged.setdefault(record["step"], []).append(record["loss"])
    return logged


def trial(workdir: Path, steps: int, cache: Path, reference, rng: random.Random) -> Trial:
    killed_after, delay_ms = rng.randrange(1, steps), rng.randrange(0, 150)
    code, output = run(workdir, steps, cache, killed_after, delay_ms / 1000)
    if code != -signal.SIGKILL:
        raise RuntimeError(f"the run was to be killed, but exited {code}:\n{output}")
    checkpoints = workdir / "checkpoints"
    cut = bool(unfinished_saves(checkpoints))
    code, output = run(workdir, steps, cache)
    resumed = re.search(r"resumed from step (\d+)", output)
    same = code == 0 and all(
        values == [reference[step]] * len(values) for step, values in losses(workdir).items()
    )
    same = same and sorted(losses(workdir)) == sorted(reference)
    resumed_from = int(resumed[1]) if resumed else 0
    tidy = not unfinished_saves(checkpoints)
    return Trial(killed_after, delay_ms, cut, resumed_from, code, same, tidy)


def trials(count: int, steps: int, seed: int = 0, report=print) -> list[Trial]:
    """`count` trials after one reference run, each reported as it ends."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="mixtral_faults_") as tmp:
        tmp = Path(tmp)
        code, output = run(tmp / "reference", steps, tmp / "cache")
        if code != 0:
            raise RuntimeError(f"the reference run failed:\n{output}")
        reference = {step: values[0] for step, values in losses(tmp / "reference").items()}
        done = []
        for n in range(count):
            done.append(trial(tmp / f"trial_{n}", steps, tmp / "cache", reference, rng))
            report(describe(n, done[-1]))
        return done


def describe(n: int, t: Trial) -> str:
    write = "cut a checkpoint write" if t.cut_a_write else "between writes"
    verdict = "same losses" if t.passed else f"FAILED (exit {t.exit_code}, {t})"
    return (
        f"trial {n + 1:2d}: killed {t.delay_ms:3d} ms after step {t.killed_after:2d} "
        f"({write}); resumed from step {t.resumed_from:2d}: {verdict}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=12, help="steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="of the kill moments")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    done = trials(args.trials, args.steps, args.seed, report=lambda line: print(line, flush=True))
    cut = sum(t.cut_a_write for t in done)
    passed = sum(t.passed for t in done)
    print(
        f"{passed}/{len(done)} trials resumed with the uninterrupted run's losses; {cut} "
        f"kills cut a checkpoint write ({time.perf_counter() - start:.0f} s)"
    )
    return 0 if passed == len(done) else 1


if __name__ == "__main__":
    sys.exit(main())

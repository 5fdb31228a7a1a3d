"""Shared fixtures."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The tests run on the CPU. With libtpu installed (the test extra installs it for
# tests/test_plan.py), JAX would otherwise probe for a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

CORPUS = """The quick brown fox jumps over the lazy dog. Über den Wolken muss die Freiheit
wohl grenzenlos sein. Les élèves étudient à l'école. 東京は日本の首都です。 Emoji: 🙂🚀.
def fibonacci(n):
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
"""


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A small sentencepiece BPE model like Mistral's (byte fallback, <unk>=0, <s>=1,
    </s>=2), trained here on a few lines of text."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("sp")
    corpus = directory / "corpus.txt"
    corpus.write_text(CORPUS * 20, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tok"),
        model_type="bpe",
        vocab_size=320,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Mistral's: whitespace is kept
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return str(directory / "tok.model")


# ---------------------------------------------------------------------------
# Background workers. A test module that needs its own JAX (8 virtual devices must be
# set before JAX starts) names its worker's arguments in BACKGROUND_WORKER. The workers
# start as soon as the tests are collected and run one at a time, on the second core,
# while the other modules' tests run; a module's `worker_results` fixture waits for
# the JSON line its worker prints last.

ROOT = Path(__file__).resolve().parents[1]
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1)
_FUTURES: dict[str, concurrent.futures.Future] = {}
_RUNNING: list[subprocess.Popen] = []


def _run_worker(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    worker = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _RUNNING.append(worker)
    out, err = worker.communicate()
    return worker.returncode, out, err


def pytest_collection_finish(session) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # workers set their own
    needed = {i.module for i in session.items if "worker_results" in i.fixturenames}
    for module in sorted(needed, key=lambda m: m.__name__):  # in the order tests need them
        _FUTURES[module.__name__] = _POOL.submit(_run_worker, module.BACKGROUND_WORKER, env)


def pytest_unconfigure(config) -> None:
    _POOL.shutdown(wait=False, cancel_futures=True)
    for worker in _RUNNING:
        if worker.poll() is None:
            worker.kill()


@pytest.fixture(scope="module")
def worker_results(request) -> dict:
    """The last stdout line (JSON) of the module's background worker."""
    returncode, out, err = _FUTURES[request.module.__name__].result(timeout=3600)
    assert returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])

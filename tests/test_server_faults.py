"""The server under faults: a full queue answers 429, a client that goes away frees its
slot, a request that fails ends alone, and SIGTERM finishes what is in flight and
exits 0. One small server (2 slots, 2 waiting) for the module; SIGTERM on its own."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mixtral_jax.inference import openai_api
from mixtral_jax.inference.engine import Engine
from tests import ROOT, wait_until
from tests.serving import NAME, free_port, running_server

MAX_LEN = 1024  # room for answers that take seconds, to give up on


@pytest.fixture(scope="module")
def engine(embedded_model):
    engine = Engine(embedded_model, max_batch=2, max_len=MAX_LEN, prefill_chunk=32, max_queue=2)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def url(engine, embedded_tokenizer):
    with running_server(engine, embedded_tokenizer) as url:
        yield url


def complete(url: str, prompt: str = "def f(x):", timeout: float = 120, **fields):
    body = {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0} | fields
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def fail_requests_that_stop_at_boom(monkeypatch) -> None:
    """A test hook: a request with the stop string "BOOM" raises in the server as its
    first tokens are turned into text (undone by `monkeypatch.undo()`)."""
    add = openai_api.Answer.add

    def add_or_fail(self, output):
        if "BOOM" in self.stops:
            raise RuntimeError("a fault injected into one request")
        return add(self, output)

    monkeypatch.setattr(openai_api.Answer, "add", add_or_fail)


def test_a_full_queue_answers_429_and_the_accepted_ones_complete(url, engine):
    """8 long requests at once into 2 slots and a queue of 2."""

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": NAME, "prompt": "import", "max_tokens": 120, "temperature": 0}
            return await asyncio.gather(
                *(client.post(f"{url}/v1/completions", json=body) for _ in range(8))
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(429) >= 2 and set(codes) == {200, 429}
    refused = next(r for r in responses if r.status_code == 429).json()["error"]
    assert refused["type"] == "rate_limit_exceeded" and "max_queue" in refused["message"]
    done = [r.json()["choices"][0] for r in responses if r.status_code == 200]
    assert len({c["text"] for c in done}) == 1 and all(c["finish_reason"] for c in done)
    assert wait_until(lambda: not engine.busy())


def test_a_client_that_disconnects_mid_stream_frees_its_slot(url, engine):
    body = {
        "model": NAME,
        "prompt": "class A:",
        "max_tokens": 1000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    before = engine.tokens_generated
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        assert engine.active_slots == 1
    # Closed after three chunks: the slot is free a step or two later, not 1000 tokens on.
    assert wait_until(lambda: engine.active_slots == 0, timeout=5)
    assert engine.tokens_generated - before < 900
    assert not engine.busy()
    assert complete(url).status_code == 200


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(url, engine):
    before = engine.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        complete(url, "class A:", max_tokens=1000, ignore_eos=True, timeout=0.5)
    assert wait_until(lambda: engine.active_slots == 0, timeout=5)
    assert engine.tokens_generated - before < 900  # cancelled, not run to its end
    assert complete(url).status_code == 200


def test_a_request_that_fails_ends_alone_and_the_server_serves_on(url, engine, monkeypatch):
    expected = complete(url).json()["choices"][0]["text"]
    fail_requests_that_stop_at_boom(monkeypatch)

    async def mixed():
        async with httpx.AsyncClient(timeout=120) as client:
            base = {"model": NAME, "prompt": "def f(x):", "max_tokens": 8, "temperature": 0}
            return await asyncio.gather(
                client.post(f"{url}/v1/completions", json=base),
                client.post(f"{url}/v1/completions", json=base | {"stop": ["BOOM"]}),
                client.post(f"{url}/v1/completions", json=base),
            )

    good, bad, good_too = asyncio.run(mixed())
    assert bad.status_code == 500
    assert bad.json()["error"]["type"] == "server_error"
    assert "a fault injected" in bad.json()["error"]["message"]
    for response in (good, good_too):
        assert response.json()["choices"][0]["text"] == expected
    assert wait_until(lambda: not engine.busy())
    # The failed request's connection stays open for the client's next request.
    with httpx.Client(limits=httpx.Limits(max_connections=1), timeout=120) as client:
        base = {"model": NAME, "prompt": "def f(x):", "max_tokens": 8, "temperature": 0}
        assert (
            client.post(f"{url}/v1/completions", json=base | {"stop": ["BOOM"]}).status_code == 500
        )
        again = client.post(f"{url}/v1/completions", json=base)
        assert again.json()["choices"][0]["text"] == expected
    monkeypatch.undo()
    assert complete(url).json()["choices"][0]["text"] == expected


def test_sigterm_finishes_what_is_in_flight_and_exits_0(tmp_path):
    """The CLI with a paged cache (--block_size): its blocks on /metrics, and on SIGTERM
    the stream in flight ends complete and the process exits 0."""
    port = free_port()
    env = dict(os.environ, MIXTRAL_JAX_CACHE=str(tmp_path))
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mixtral_jax.serve",
            "--port",
            str(port),
            "--max_len",
            "256",
            "--prefill_chunk",
            "32",
            "--max_batch",
            "2",
            "--block_size",
            "16",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(url), timeout=240), server.stderr.read()
        metrics = httpx.get(f"{url}/metrics").text  # a paged cache, all its blocks free
        assert "\nkv_blocks_used 0.0" in metrics and "\nkv_blocks_total " in metrics
        assert "\nprefix_cache_hit_rate 0.0" in metrics
        body = {
            "model": NAME,
            "prompt": "def f(x):",
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
        }
        chunks = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in filter(None, response.iter_lines()):
                if not chunks:  # the first token is out: stop the server
                    server.send_signal(signal.SIGTERM)
                chunks.append(line)
        assert chunks[-1] == "data: [DONE]"
        assert len(chunks) > 10  # it went on after the signal
        assert '"finish_reason": "length"' in chunks[-2] or '"finish_reason": "stop"' in chunks[-2]
        assert server.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.5)
        return False


PROMPTS = ["def f(x):", "import", "class A:", "for i in range(", "# a comment", "return"]


def resident_bytes() -> int:
    """This process's resident memory (the server runs on a thread of it)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_an_open_loop_load_with_faults_ends_every_request_and_leaks_nothing(
    url, engine, monkeypatch
):
    """A few hundred requests arriving at random (Poisson) past the queue's room, some
    streamed and dropped part-way, some given up on, one failing in the server: every
    accepted request ends whole (its text a prefix of the solo greedy answer) or with
    a clean error; then no slot is held, memory is where it was, and the server
    answers as before."""
    full = {p: complete(url, p, max_tokens=12).json()["choices"][0]["text"] for p in PROMPTS}
    gc.collect()
    before = resident_bytes()
    fail_requests_that_stop_at_boom(monkeypatch)
    rng = random.Random(0)

    async def one(client, n: int, prompt: str, max_tokens: int, kind: str):
        body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if kind == "drop":  # streamed, and the client goes away after a chunk or two
            async with client.stream(
                "POST", f"{url}/v1/completions", json=body | {"stream": True}
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and rng.random() < 0.5:
                        break
            return kind, prompt, response.status_code, None
        if kind == "give up":
            with contextlib.suppress(httpx.TimeoutException):
                await client.post(f"{url}/v1/completions", json=body, timeout=0.05)
            return kind, prompt, None, None
        if kind == "fail":
            body["stop"] = ["BOOM"]
        response = await client.post(f"{url}/v1/completions", json=body)
        # The failing request must reach the engine, whatever the queue held when it came.
        while kind == "fail" and response.status_code == 429:
            await asyncio.sleep(0.05)
            response = await client.post(f"{url}/v1/completions", json=body)
        return kind, prompt, response.status_code, response.json()

    async def load():
        kinds = ["whole"] * 7 + ["drop"] * 2 + ["give up"]
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = []
            for n in range(300):
                kind = "fail" if n == 150 else rng.choice(kinds)
                request = one(client, n, rng.choice(PROMPTS), rng.randint(1, 12), kind)
                tasks.append(asyncio.create_task(request))
                await asyncio.sleep(rng.expovariate(40))  # 40 requests/s on average
            return await asyncio.gather(*tasks)

    results = asyncio.run(load())
    monkeypatch.undo()
    codes = collections.Counter((kind, code) for kind, _, code, _ in results)
    assert codes[("fail", 500)] == 1, codes
    assert codes[("whole", 429)] > 0 and codes[("whole", 200)] > 20, codes
    for kind, prompt, code, body in results:
        if kind == "whole" and code == 200:
            choice = body["choices"][0]
            assert choice["finish_reason"] in ("stop", "length"), choice
            assert full[prompt].startswith(choice["text"]), (prompt, choice, full[prompt])
        elif kind == "whole":
            assert code == 429 and body["error"]["type"] == "rate_limit_exceeded", body

    assert wait_until(lambda: not engine.busy(), timeout=30)
    assert engine.active_slots == 0 and engine.queue_depth == 0
    assert engine.scheduler.slots == [None] * len(engine.scheduler.slots)
    gc.collect()
    after = resident_bytes()
    assert after <= before * 1.05, (before, after)
    for prompt in PROMPTS:
        assert complete(url, prompt, max_tokens=12).json()["choices"][0]["text"] == full[prompt]
    print(f"load: {dict(codes)}; resident {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")

"""The serve section of tools/bench.py: one open-loop load, three ways of serving it.

A load is N requests with random prompts and lengths arriving as a Poisson process.
It is sent to `python -m mixtral_jax.serve` over HTTP (streamed, as a chat client
would read it), and run through static batches of `batch` with our `generate` and
with transformers' `generate`, a batch starting when the previous one ends with the
requests that have arrived by then. Every request's tokens are counted: a request
that comes back short is a failure, not a slower figure.

Times are measured from each request's arrival: time to first token (TTFT), the gaps
between its streamed chunks (inter-token latency; a static batch's rows reach the
host together each step), and the makespan from the first arrival to the last token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import httpx
import numpy as np


class Job(NamedTuple):
    arrival: float  # seconds after the load starts
    prompt: list[int]
    max_tokens: int


class Result(NamedTuple):
    arrival: float
    first: float  # when its first token came, seconds after the load started
    gaps: list[float]  # between successive chunks
    end: float
    tokens: int
    expected: int


def make_load(
    count: int, rate: float, vocab: int, prompts=(16, 512), answers=(16, 256), seed: int = 0
) -> list[Job]:
    """`count` requests at `rate` per second (Poisson), prompt and answer lengths uniform."""
    rs = np.random.RandomState(seed)
    arrivals = np.cumsum(rs.exponential(1 / rate, count))
    arrivals -= arrivals[0]  # the first arrives at once
    return [
        Job(
            float(arrivals[i]),
            rs.randint(3, vocab, rs.randint(prompts[0], prompts[1] + 1)).tolist(),
            int(rs.randint(answers[0], answers[1] + 1)),
        )
        for i in range(count)
    ]


def shared_prefix_load(
    count: int, rate: float, vocab: int, prefix: int, suffixes=(16, 64), answer: int = 16, seed=0
) -> list[Job]:
    """`count` requests at `rate` per second (Poisson) whose prompts all begin with the
    same `prefix` tokens (a system prompt), each then its own 16-64 tokens."""
    rs = np.random.RandomState(seed)
    shared = rs.randint(3, vocab, prefix).tolist()
    jobs = make_load(count, rate, vocab, suffixes, (answer, answer), seed + 1)
    return [job._replace(prompt=shared + job.prompt) for job in jobs]


async def _one(client: httpx.AsyncClient, url: str, model: str, job: Job, start: float) -> Result:
    await asyncio.sleep(max(0.0, start + job.arrival - time.perf_counter()))
    body = {
        "model": model,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    marks, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"a request failed: {response.status_code} {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                marks.append(time.perf_counter() - start)
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return Result(job.arrival, marks[0], gaps, marks[-1], tokens, job.max_tokens)


def run_http(url: str, model: str, load: Sequence[Job]) -> tuple[list[Result], float]:
    """The load sent to a server, streamed; (results, seconds from start to last token)."""

    async def run():
        limits = httpx.Limits(max_connections=len(load))
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            start = time.perf_counter()
            return await asyncio.gather(*(_one(client, url, model, j, start) for j in load))

    results = asyncio.run(run())
    return list(results), max(r.end for r in results)


def run_static(
    generate_batch: Callable[[list[Job]], tuple[list[list[int]], float, list[float]]],
    load: Sequence[Job],
    batch: int,
) -> tuple[list[Result], float]:
    """Static batching on a simulated clock: when idle, take up to `batch` arrived jobs
    (or wait for the next), run them to the longest answer. `generate_batch(jobs)` ->
    (tokens per job, seconds to the first token, the seconds of each later step)."""
    clock, pending, results = 0.0, list(load), []
    while pending:
        clock = max(clock, pending[0].arrival)
        jobs = [j for j in pending if j.arrival <= clock][:batch]
        pending = [j for j in pending if j not in jobs]
        tokens, first, steps = generate_batch(jobs)
        marks = clock + first + np.concatenate([[0.0], np.cumsum(steps)])
        for job, ids in zip(jobs, tokens, strict=True):
            n = min(len(ids), job.max_tokens)
            own = marks[:n]
            gaps = list(np.diff(own))
            results.append(
                Result(job.arrival, float(own[0]), gaps, float(own[-1]), n, job.max_tokens)
            )
        clock = float(marks[-1])
    return results, clock


def output_rate(results: list[Result], makespan: float) -> float:
    return sum(r.tokens for r in results) / makespan


def summarize(name: str, results: list[Result], makespan: float, reference: float | None):
    """One row: output tokens/s (and against `reference`'s), TTFT and inter-token latency
    p50/p99, requests complete."""
    complete = sum(r.tokens == r.expected for r in results)
    ttft = [r.first - r.arrival for r in results]
    gaps = [g for r in results for g in r.gaps]
    rate = output_rate(results, makespan)
    ratio = f"{rate / reference:5.2f}x" if reference else "    -"
    print(
        f"  {name:<34} {rate:8.1f} {ratio} "
        f"{_ms(ttft, 50):>8} {_ms(ttft, 99):>8} {_ms(gaps, 50):>7} {_ms(gaps, 99):>7} "
        f"{complete:>4}/{len(results)}"
    )
    return rate


def header():
    print(
        f"  {'':<34} {'tok/s':>8} {'':>6} {'TTFT p50':>8} {'p99':>8} {'ITL p50':>7} "
        f"{'p99':>7} {'done':>9}"
    )


def _ms(values: list[float], q: int) -> str:
    if not values:
        return "-"
    return f"{np.percentile(values, q) * 1e3:.0f}ms" if len(values) > 1 else "-"


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {name{labels}: value}."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out

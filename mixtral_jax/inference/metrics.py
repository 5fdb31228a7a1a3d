"""What a serving engine reports to Prometheus (`GET /metrics`), in plain names.

queue_depth                     gauge: requests waiting for a slot
active_slots                    gauge: slots holding a request
max_slots                       gauge: the engine's slots (--max_batch)
kv_blocks_used, kv_blocks_total gauges: a paged cache's blocks held by requests, in all
prefix_cache_hit_rate           gauge: of the prompt tokens looked up, the share cached
prefix_cache_hit_tokens_total   counter: prompt tokens the prefix cache held (not computed)
prompt_tokens_total             counter: prompt tokens of finished requests
tokens_generated_total          counter: tokens generated
requests_finished_total{reason} counter: stop, length, cancelled, error
engine_busy_seconds_total{phase} counter: seconds spent prefilling and decoding
decode_rows_total               counter: rows the decode steps computed
decode_steps_total{rows}        counter: decode steps, by the rows each computed
time_to_first_token_seconds     histogram: from the request's arrival to its first token
inter_token_latency_seconds     histogram: between a request's successive tokens
request_duration_seconds        histogram: from arrival to the last output
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.requests import Output

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    """The metrics of one engine, in `registry`. `timer()` follows one request."""

    def __init__(self, engine: Engine, registry: CollectorRegistry):
        registry.register(_EngineCollector(engine))
        self.prompt_tokens = Counter(
            "prompt_tokens", "Prompt tokens of finished requests", registry=registry
        )
        self.generated = Counter("tokens_generated", "Tokens generated", registry=registry)
        self.finished = Counter(
            "requests_finished", "Requests ended, by reason", ["reason"], registry=registry
        )
        self.first_token = Histogram(
            "time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "inter_token_latency_seconds",
            "Between a request's successive tokens",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "request_duration_seconds",
            "From a request's arrival to its last output",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def timer(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)


class _EngineCollector(Collector):
    """What the engine counts itself, read at each scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        yield GaugeMetricFamily("queue_depth", "Requests waiting for a slot", e.queue_depth)
        yield GaugeMetricFamily("active_slots", "Slots holding a request", e.active_slots)
        yield GaugeMetricFamily("max_slots", "The engine's decode slots", e.max_batch)
        pool = e.scheduler.pool
        if pool is not None:
            yield GaugeMetricFamily("kv_blocks_used", "KV cache blocks held by requests", pool.used)
            yield GaugeMetricFamily(
                "kv_blocks_total", "KV cache blocks in the pool", pool.num_blocks
            )
            yield GaugeMetricFamily(
                "prefix_cache_hit_rate",
                "Of the prompt tokens looked up in the prefix cache, the share it held",
                pool.hit_rate,
            )
            yield CounterMetricFamily(
                "prefix_cache_hit_tokens",
                "Prompt tokens the prefix cache held, not computed",
                pool.hit_tokens,
            )
        if e.drafter is not None:
            yield CounterMetricFamily(
                "spec_verify_steps", "Decode steps that verified drafts", e.verify_steps
            )
            yield CounterMetricFamily(
                "spec_draft_tokens", "Tokens drafted (speculative decoding)", e.drafted_tokens
            )
            yield CounterMetricFamily(
                "spec_accepted_tokens", "Drafted tokens the model kept", e.accepted_tokens
            )
        busy = CounterMetricFamily(
            "engine_busy_seconds", "Seconds spent prefilling and decoding", labels=["phase"]
        )
        for phase, seconds in e.busy_seconds.items():
            busy.add_metric([phase], seconds)
        yield busy
        yield CounterMetricFamily("decode_rows", "Rows the decode steps computed", e.decode_rows)
        steps = CounterMetricFamily(
            "decode_steps", "Decode steps, by the rows each computed", labels=["rows"]
        )
        for rows, count in enumerate(list(e.decode_steps)):
            if count:
                steps.add_metric([str(rows)], count)
        yield steps


class RequestTimer:
    """Observes one request's outputs as they are produced (on the engine's thread)."""

    def __init__(self, metrics: ServingMetrics, prompt_tokens: int):
        self.metrics, self.prompt_tokens = metrics, prompt_tokens
        self.arrival = self.last = time.perf_counter()
        self.tokens = 0

    def observe(self, output: Output) -> None:
        now, m = time.perf_counter(), self.metrics
        for _ in output.tokens:
            if self.tokens == 0:
                m.first_token.observe(now - self.arrival)
            else:
                m.inter_token.observe(now - self.last)
            self.tokens += 1
            self.last = now
        m.generated.inc(len(output.tokens))
        if output.finished:
            m.finished.labels(output.finish_reason).inc()
            m.prompt_tokens.inc(self.prompt_tokens)
            m.duration.observe(now - self.arrival)

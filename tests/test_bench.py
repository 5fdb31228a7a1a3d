"""tools/bench.py's decode bound: the bytes a step reads and the experts it touches."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.inference.engine import Engine
from mixtral_jax.params import flat_params
from tools import bench


@pytest.fixture(scope="module")
def config():
    return bench.load_config("configs/tiny.py")


def test_a_step_over_every_expert_reads_every_weight_but_the_embedding(config):
    model = Mixtral(config, rngs=nnx.Rngs(0))
    params = flat_params(model)
    read = sum(v.nbytes for name, v in params.items() if name != ("embed", "embedding"))
    assert bench.active_weight_bytes(config, config.num_experts) == read
    # One token reads k of the E experts' weights and all the rest.
    experts = sum(v.nbytes for name, v in params.items() if "experts" in name)
    k, E = config.num_experts_per_tok, config.num_experts
    assert bench.active_weight_bytes(config) == read - experts * (E - k) / E


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_experts_touched_is_the_mean_of_uniform_routing(config, batch):
    E, k = config.num_experts, config.num_experts_per_tok
    rng = np.random.default_rng(batch)
    trials = 20_000
    # Each token picks k distinct experts, uniformly.
    picks = np.argsort(rng.random((trials, batch, E)), axis=-1)[..., :k]
    touched = np.zeros((trials, E), bool)
    np.put_along_axis(touched, picks.reshape(trials, batch * k), True, axis=1)
    mean = touched.sum(axis=1).mean()
    assert bench.experts_touched(config, batch) == pytest.approx(mean, abs=0.03)
    if batch == 1:
        assert bench.experts_touched(config, batch) == pytest.approx(k)


def test_a_decode_rate_needs_three_new_tokens(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "decode", "--new_tokens", "2"])
    assert "at least 3 new tokens" in capsys.readouterr().err


def test_a_serving_load_has_the_lengths_and_rate_asked():
    from tools import serve_load

    load = serve_load.make_load(400, rate=4.0, vocab=100, prompts=(16, 32), answers=(5, 9))
    arrivals = [j.arrival for j in load]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert all(16 <= len(j.prompt) <= 32 and 5 <= j.max_tokens <= 9 for j in load)
    assert all(0 <= t < 100 for j in load for t in j.prompt)
    assert load[-1].arrival / (len(load) - 1) == pytest.approx(1 / 4.0, rel=0.15)


def test_static_batching_takes_what_has_arrived_and_runs_to_the_longest():
    """Three requests, batches of 2: the first batch holds the one there at t=0, the
    second the two that arrived while it ran; each row's tokens end at its own length."""
    from tools import serve_load

    jobs = [serve_load.Job(0.0, [1], 3), serve_load.Job(0.5, [1], 2), serve_load.Job(1.0, [1], 4)]
    batches = []

    def generate_batch(batch):
        batches.append([j.arrival for j in batch])
        n = max(j.max_tokens for j in batch)
        return [[7] * n for _ in batch], 1.0, [0.25] * (n - 1)

    results, makespan = serve_load.run_static(generate_batch, jobs, batch=2)
    assert batches == [[0.0], [0.5, 1.0]]
    first, second, third = results
    assert (first.first, first.end, first.tokens) == (1.0, 1.5, 3)  # 1 s, then 2 steps
    assert (second.first, second.end, second.tokens) == (2.5, 2.75, 2)  # starts at 1.5
    assert (third.first, third.end, third.tokens) == (2.5, 3.25, 4)
    assert makespan == 3.25 and third.gaps == [0.25] * 3


def test_the_speculation_bench_counts_tokens_a_row_per_decode_step():
    """Plain decoding makes exactly one token a row per step (the first token, the
    prefill's, not counted); speculating on prompts that repeat, more."""
    model = Mixtral(ModelConfig.from_dict(tiny.get_config()), rngs=nnx.Rngs(4))
    prompts = [[5, 6, 7, 8] * 6, [9, 10] * 10, [11, 12, 13] * 5]
    per_step = {}
    for speculate in (None, "ngram:4"):
        engine = Engine(model, max_batch=2, max_len=64, prefill_chunk=16, speculate=speculate)
        tokens, rate, per_step[speculate] = bench._decode_rate(engine, prompts, 2, 24)
        assert [len(t) for t in tokens] == [24] * 3 and rate > 0
    assert per_step[None] == 1.0 and per_step["ngram:4"] > 1.0


def test_serve_rounds_must_be_one_or_more(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "serve", "--serve_rounds", "0"])
    assert "--serve_rounds 0" in capsys.readouterr().err


def test_the_servers_decode_bound_is_at_the_median_read(config):
    before = {'engine_busy_seconds_total{phase="decode"}': 10.0, "decode_rows_total": 100.0}
    after = {
        'engine_busy_seconds_total{phase="decode"}': 14.0,
        'engine_busy_seconds_total{phase="prefill"}': 3.0,
        "decode_rows_total": 900.0,
    }
    reads = [30e9, 55e9, 29e9, 31e9, 20e9]  # one fast read and one slow: the median is 30
    rate, bound, bandwidth, prefill_s, decode_s = bench._engine_figures(
        before, after, reads, config
    )
    assert (rate, prefill_s, decode_s) == (200.0, 3.0, 4.0)
    step_bytes = bench.active_weight_bytes(config, bench.experts_touched(config, 16))
    assert bandwidth == 30e9
    assert bound == pytest.approx(16 * 30e9 / step_bytes)


@pytest.mark.parametrize("batch", [1, 16])
def test_the_decode_roofline_is_the_longer_of_reading_and_multiplying(config, batch):
    bound = bench.decode_bound(config, batch, 30e9)
    # With FLOPs free, the roofline is the read bound.
    assert bench.decode_roofline(config, batch, 30e9, 1e30) == pytest.approx(bound)
    # With reads free, it is the FLOPs: 2 per multiply-add, each token through
    # attention, the router, its k experts and the head.
    model = Mixtral(config, rngs=nnx.Rngs(0))
    params = flat_params(model)
    E, k = config.num_experts, config.num_experts_per_tok
    per_token = sum(
        v.size * (k / E if "experts" in name else 1)
        for name, v in params.items()
        if name != ("embed", "embedding") and "norm" not in "".join(name)
    )
    compute = 1e12 / (2 * per_token)
    assert bench.decode_roofline(config, batch, 1e30, 1e12) == pytest.approx(compute)
    # At the peak where the two bounds are equal, each weight takes the longer of its
    # two times: slower than either bound (the norms are read, never multiplied), and
    # faster than both times added (which would take 2 / bound a token).
    peak = 1e12 * bound / compute
    both = bench.decode_roofline(config, batch, 30e9, peak)
    assert both < bound * (1 - 1e-6)
    assert 1 / both < 2 / bound * 0.999


def test_the_servers_steps_are_priced_at_their_own_rows(config):
    before = {'decode_steps_total{rows="16"}': 5.0, 'decode_steps_total{rows="1"}': 2.0}
    after = {
        'decode_steps_total{rows="16"}': 15.0,
        'decode_steps_total{rows="4"}': 3.0,
        'decode_steps_total{rows="1"}': 2.0,
        "decode_rows_total": 172.0,
    }
    steps = bench._steps_by_rows(before, after)
    assert steps == {16: 10.0, 4: 3.0}
    bandwidth, peak = 30e9, 1e12

    def seconds(rows):  # one step at the bound, and at the roofline
        return (
            rows / bench.decode_bound(config, rows, bandwidth),
            rows / bench.decode_roofline(config, rows, bandwidth, peak),
        )

    # Steps that took exactly their least time are at 100% of it, whatever their rows.
    at_bound = 10 * seconds(16)[0] + 3 * seconds(4)[0]
    of_bound, of_roofline = bench.at_their_rows(steps, at_bound, config, bandwidth, peak)
    assert of_bound == pytest.approx(1.0)
    assert of_roofline == pytest.approx((10 * seconds(16)[1] + 3 * seconds(4)[1]) / at_bound)
    # Twice as long: half of it. A 4-row step costs less than a 16-row one, so pricing
    # every step at 16 rows would give more than half.
    assert bench.at_their_rows(steps, 2 * at_bound, config, bandwidth, peak)[0] == pytest.approx(
        0.5
    )
    assert 13 * seconds(16)[0] / (2 * at_bound) > 0.5


def test_cache_capacity_counts_requests_by_the_blocks_they_fill(config):
    """Requests of a whole context fit as slots do; requests of one block fit a row's
    blocks per slot; mixed ones in between, each counted from its own start."""
    from tools.serve_load import Job

    config = config.replace(sliding_window=None)
    whole, one = Job(0.0, [1] * 60, 4), Job(0.0, [1] * 5, 3)  # 64 tokens; 8 tokens
    assert bench.cache_capacity(config, [whole] * 5, 3, 64, 8) == [3] * 5
    assert bench.cache_capacity(config, [one] * 40, 3, 64, 8) == [24] * 40
    # 24 blocks: from the first, three whole ones fill them; from the fourth, 1 + 1 + 8 + 8
    counts = bench.cache_capacity(config, [whole, whole, whole, one, one], 3, 64, 8)
    assert (counts[0], counts[3]) == (3, 4)

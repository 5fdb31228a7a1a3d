"""Speculative decoding: n-gram drafts from a request's own context, verified in one
call. Greedy requests get exactly the tokens plain decoding gives, sampled ones the
same distribution (exact rejection sampling), over contiguous, paged, int8 and
sliding-window caches, in the engine and through the server."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import Mixtral
from mixtral_jax.inference.engine import SPECULATE_ROWS_CPU, Engine
from mixtral_jax.inference.generate import generate_tokens
from mixtral_jax.inference.requests import Request
from mixtral_jax.inference.sampling import RowSampling
from mixtral_jax.inference.speculate import Ngram, accept
from tests.serving import NAME, openai_client, running_server
from tests.test_engine import Collected, mixed_requests, run_staggered, solo, tiny_config
from tools import bench

# ---- drafts ----


def test_ngram_drafts_copy_what_followed_the_newest_longest_match():
    drafter = Ngram(4)
    # The last 3 tokens [1, 2, 3] occurred twice: the newer occurrence is copied.
    assert drafter.propose([1, 2, 3, 4, 5, 1, 2, 3, 9, 8, 1, 2, 3]) == [9, 8, 1, 2]
    # A longer match wins over a newer shorter one: [7, 1, 2] at 0, [1, 2] newer at 5.
    assert drafter.propose([7, 1, 2, 6, 6, 1, 2, 5, 7, 1, 2]) == [6, 6, 1, 2]
    # A match p tokens back drafts the period-p loop on past the end of the context.
    assert drafter.propose([4, 5, 6, 4, 5, 6]) == [4, 5, 6, 4]
    assert drafter.propose([3, 9, 9, 9]) == [9, 9, 9, 9]
    assert drafter.propose([4, 5, 6, 4, 5, 6], limit=2) == [4, 5]
    assert drafter.propose([4, 5, 6, 4, 5, 6], limit=0) == []
    # A lone token's match is not enough (min_n 2), unless asked for.
    assert drafter.propose([1, 2, 3, 1]) == []
    assert Ngram(2, min_n=1).propose([1, 2, 3, 1]) == [2, 3]
    assert drafter.propose([1, 2, 3]) == [] and drafter.propose([5]) == []


def test_ngram_specs_and_widths():
    assert Ngram.parse("ngram:4") == Ngram(4)
    assert Ngram(4).widths() == (2, 3, 5) and Ngram(8).widths() == (2, 3, 5, 9)
    assert Ngram(1).widths() == (2,) and Ngram(6).widths() == (2, 3, 5, 7)
    for bad in ("ngram", "ngram:", "eagle:4", "ngram:x"):
        with pytest.raises(ValueError, match="ngram:K"):
            Ngram.parse(bad)
    with pytest.raises(ValueError, match="1 to 16"):
        Ngram.parse("ngram:0")


# ---- acceptance ----


def rows(n: int, temperature=0.0, top_k=0, top_p=1.0, step=0) -> RowSampling:
    return RowSampling(
        jnp.full(n, temperature, jnp.float32),
        jnp.full(n, top_k, jnp.int32),
        jnp.full(n, top_p, jnp.float32),
        jnp.arange(n, dtype=jnp.uint32),
        jnp.full(n, step, jnp.int32),
    )


def test_greedy_rows_keep_the_drafts_that_equal_the_argmax_then_add_one():
    argmaxes = np.array([[2, 1, 3, 0], [2, 1, 3, 0], [2, 1, 3, 0], [2, 1, 3, 0]])
    logits = jax.nn.one_hot(argmaxes, 5) * 4.0  # [4 rows, T = 4, V = 5]
    drafts = jnp.array([[2, 1, 3], [2, 4, 3], [0, 1, 3], [2, 1, 3]])
    lengths = jnp.array([3, 3, 3, 2])
    tokens, count = accept(logits, drafts, lengths, rows(4))
    assert count.tolist() == [4, 2, 1, 3]
    assert tokens[0].tolist() == [2, 1, 3, 0]  # all kept, the last position's argmax
    assert tokens[1, :2].tolist() == [2, 1]  # 4 rejected: the argmax in its place
    assert tokens[2, :1].tolist() == [2]
    assert tokens[3, :3].tolist() == [2, 1, 3]  # a draft of 2: its third is the model's


@pytest.mark.parametrize("top_k", [0, 3])
def test_sampled_rows_draw_what_plain_sampling_draws(top_k):
    """40,000 rows of one step, drafts [2, 1]: the first token is distributed as p_0 (cut
    and tempered) and the second, given a kept first, as p_1; a rejected draft's place
    drawn from p without it. Drawing it from p instead would give the draft twice its
    share: the total variation would be ~0.1, not <0.02."""
    V, n = 6, 40_000
    logits = jnp.asarray(np.random.RandomState(0).normal(size=(1, 3, V)) * 1.5, jnp.float32)
    drafts = jnp.array([[int(jnp.argsort(logits[0, 0])[-2]), 1]])  # likely, not the likeliest
    sampling = rows(n, temperature=0.7, top_k=top_k)
    tokens, count = jax.jit(accept)(
        jnp.broadcast_to(logits, (n, 3, V)), jnp.repeat(drafts, n, 0), jnp.full(n, 2), sampling
    )
    scaled = logits[0] / 0.7
    if top_k:
        scaled = jnp.where(scaled >= jnp.sort(scaled, axis=-1)[:, -top_k, None], scaled, -jnp.inf)
    p = np.asarray(jax.nn.softmax(scaled, axis=-1))
    tokens, count = np.asarray(tokens), np.asarray(count)

    def total_variation(drawn, probs):
        return 0.5 * np.abs(np.bincount(drawn, minlength=V) / len(drawn) - probs).sum()

    assert total_variation(tokens[:, 0], p[0]) < 0.02
    kept = tokens[:, 0] == drafts[0, 0]
    assert total_variation(tokens[kept, 1], p[1]) < 0.03
    assert set(np.unique(count)) <= {1, 2, 3}
    if top_k:  # nothing outside the top 3 is ever drawn
        assert not np.isin(tokens[:, 0], np.flatnonzero(p[0] == 0)).any()


# ---- the engine ----


def engine_with(model, **options) -> Engine:
    """4 slots, every step speculating whatever the device."""
    return Engine(model, max_batch=4, max_len=96, prefill_chunk=16, speculate_rows=4, **options)


def looping_requests(vocab: int, count: int, seed: int) -> list[Request]:
    """Prompts that repeat a phrase (drafts find it) and random ones."""
    rs = np.random.RandomState(seed)
    requests = []
    for i, request in enumerate(mixed_requests(vocab, count, seed)):
        if i % 2:
            phrase = rs.randint(3, vocab, rs.randint(2, 6)).tolist()
            request.prompt = (phrase * 8)[: rs.randint(8, 40)]
        request.max_tokens = int(rs.randint(8, 40))
        requests.append(request)
    return requests


@pytest.mark.parametrize(
    "changes,options",
    [
        ({}, {}),
        ({}, {"block_size": 8}),
        ({}, {"block_size": 8, "kv_dtype": "int8"}),
        ({"sliding_window": 6}, {}),
    ],
    ids=["slots", "pages", "pages-int8", "window"],
)
def test_speculative_greedy_tokens_are_the_plain_ones(changes, options):
    """36 requests through 4 slots, drafts of up to 4 verified beside plain rows."""
    model = Mixtral(tiny_config(**changes), rngs=nnx.Rngs(4))
    requests = looping_requests(model.config.vocab_size, 36, seed=0)
    engine = engine_with(model, speculate="ngram:4", **options)
    sink = run_staggered(engine, requests)
    expected = (
        solo(model, requests)
        if "kv_dtype" not in options  # an int8 cache's tokens are its own: compare to plain
        else [run_staggered(engine_with(model, **options), requests).tokens[r.id] for r in requests]
    )
    for request, tokens in zip(requests, expected, strict=True):
        assert sink.tokens[request.id] == tokens, request.prompt
    assert engine.verify_steps > 0 and engine.accepted_tokens > 0
    assert engine.active_slots == 0 and engine.queue_depth == 0


def test_speculation_on_code_keeps_several_tokens_a_step(embedded_model):
    """32 pieces of code on the embedded model: the plain greedy tokens, and on average
    more than one drafted token kept per verifying step (the speed-up's source)."""
    encoded = bench.code_samples()
    prompts = [ids[s : s + 96] for ids in encoded if len(ids) > 400 for s in (0, 300)][:32]
    assert len(prompts) == 32
    requests = [Request(p, 48) for p in prompts]
    engine = Engine(embedded_model, max_batch=8, max_len=192, speculate="ngram:4", speculate_rows=8)
    sink = run_staggered(engine, requests, every=1)
    for request, tokens in zip(requests, solo(embedded_model, requests), strict=True):
        assert sink.tokens[request.id] == tokens
    assert engine.accepted_tokens > engine.verify_steps


def test_speculative_log_probabilities_and_stop_ids_are_plain_ones():
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(4))
    engine = engine_with(model, speculate="ngram:4")
    prompt = [5, 6, 7, 8] * 6
    plain = generate_tokens(model, [prompt], max_new_tokens=24)[0][0]
    sink = Collected()
    logged = Request(prompt, 24, logprobs=3, on_output=sink)
    stop = Request(prompt, 24, stop_ids=frozenset({plain[9]}), on_output=sink)
    for request in (logged, stop):
        engine.submit(request)
    engine.run_until_idle()
    assert engine.accepted_tokens > 0
    assert sink.tokens[logged.id] == plain
    assert sink.tokens[stop.id] == plain[: plain.index(plain[9])]
    assert sink.finish(stop.id).finish_reason == "stop"
    expected = np.asarray(jax.nn.log_softmax(model(jnp.asarray([prompt + plain]))[0], axis=-1))
    generated = [lp for o in sink.outputs if o.request_id == logged.id for lp in o.logprobs]
    assert len(generated) == len(plain)
    for j, lp in enumerate(generated):
        row = expected[len(prompt) + j - 1]
        assert lp.logprob == pytest.approx(row[plain[j]], abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-row)[:3])


def test_sampled_and_greedy_requests_share_verifying_steps():
    """Sampling rows beside greedy ones: the greedy keep their plain tokens, a seeded
    sampled request draws the same tokens twice, and differs across seeds."""
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(4))
    engine = engine_with(model, speculate="ngram:4")
    prompt = [9, 10, 11] * 8
    plain = generate_tokens(model, [prompt], max_new_tokens=20)[0][0]

    def run(seeds):
        sink = Collected()
        greedy = Request(prompt, 20, on_output=sink)
        drawn = [Request(prompt, 20, temperature=1.0, seed=s, on_output=sink) for s in seeds]
        for request in (greedy, *drawn):
            engine.submit(request)
        engine.run_until_idle()
        assert sink.tokens[greedy.id] == plain
        return [sink.tokens[r.id] for r in drawn]

    first, again = run([1, 2, 3]), run([1, 2, 3])
    assert first == again and len({tuple(t) for t in first}) > 1


def test_only_steps_of_at_most_speculate_rows_rows_speculate():
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(4))
    engine = engine_with(model, speculate="ngram:4")
    engine.speculate_rows = 1
    prompt = [5, 6, 7, 8] * 6
    for _ in range(2):  # prefilled in one call, decoded side by side to the end
        engine.submit(Request(prompt, 24))
    engine.run_until_idle()
    assert engine.verify_steps == 0
    engine.submit(Request(prompt, 24))
    engine.run_until_idle()
    assert engine.verify_steps > 0
    on_a_cpu = Engine(model, max_batch=4, max_len=96, prefill_chunk=16, speculate="ngram:4")
    assert on_a_cpu.speculate_rows == SPECULATE_ROWS_CPU


def test_bad_speculation_settings_are_named():
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(4))
    with pytest.raises(ValueError, match="ngram:K"):
        engine_with(model, speculate="medusa")
    with pytest.raises(ValueError, match="prefill_chunk above it"):
        engine_with(model, speculate="ngram:16")
    for bad, message in ((-1, "0 to 16 forced"), (17, "0 to 16 forced"), (True, "an integer")):
        with pytest.raises(ValueError, match=message):
            engine_with(model, jump_forward=bad)
    with pytest.raises(ValueError, match="jump_forward drafts 16 tokens a step"):
        engine_with(model, jump_forward=16)


# ---- the server ----


@pytest.fixture(scope="module")
def client(embedded_model, embedded_tokenizer):
    engine = Engine(
        embedded_model, max_batch=4, max_len=256, prefill_chunk=64, speculate="ngram:4",
        speculate_rows=4,
    )  # fmt: skip
    engine.warmup()
    with running_server(engine, embedded_tokenizer) as url:
        yield openai_client(url), url


PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "class Stack:", "import os\n"]


def test_a_speculating_server_answers_as_generate(client, embedded_model, embedded_tokenizer):
    client, url = client
    expected = mixtral_jax.generate(
        embedded_model, embedded_tokenizer, PROMPTS, max_new_tokens=48
    ).texts
    out = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=48, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    stream = client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=48, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == expected[0]
    metrics = openai.DefaultHttpxClient().get(f"{url}/metrics").text
    accepted = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("spec_accepted_tokens_total")
    )
    assert accepted > 0 and "spec_draft_tokens_total" in metrics

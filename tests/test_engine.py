"""The serving engine: continuous batching gives every request exactly what it gets
alone, compiles nothing after warm-up, frees slots at once, and keeps one request's
failure to itself."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.generate import generate_tokens
from mixtral_jax.inference.requests import QueueFull, Request, RequestError
from mixtral_jax.inference.sampling import RowSampling, argmax, sample_rows
from mixtral_jax.inference.scheduler import buckets
from tests import run_script, wait_until

MAX_LEN = 96


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.from_dict(tiny.get_config()).replace(**changes)


@pytest.fixture(scope="module")
def model() -> Mixtral:
    return Mixtral(tiny_config(), rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    """4 slots, up to 64 prompt tokens a step: one prompt's, or 16 of each of four (long
    prompts then take several steps)."""
    engine = Engine(model, max_batch=4, max_len=MAX_LEN, prefill_chunk=64, max_queue=64)
    engine.warmup()
    return engine


def mixed_requests(vocab: int, count: int, seed: int, **params) -> list[Request]:
    """Prompts of 1-60 tokens and 1-30 new tokens, as a varied load has them."""
    rs = np.random.RandomState(seed)
    return [
        Request(rs.randint(3, vocab, rs.randint(1, 61)).tolist(), int(rs.randint(1, 31)), **params)
        for _ in range(count)
    ]


class Collected:
    """Every request's tokens, and every output in order."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.outputs = []

    def __call__(self, output):
        self.outputs.append(output)
        self.tokens.setdefault(output.request_id, []).extend(output.tokens)

    def finish(self, request_id: str):
        return next(o for o in self.outputs if o.request_id == request_id and o.finished)


def run_staggered(engine: Engine, requests: list[Request], every: int = 3) -> Collected:
    """Submits the requests a few at a time, some steps apart, and steps to the end."""
    sink = Collected()
    for request in requests:
        request.on_output = sink
    pending = list(requests)
    while pending or engine.busy():
        for _ in range(min(len(pending), 5)):
            engine.submit(pending.pop(0))
        for _ in range(every):
            engine.step()
    engine.run_until_idle()
    return sink


def solo(model: Mixtral, requests: list[Request]) -> list[list[int]]:
    """Each prompt's greedy tokens from `generate`. Batched prompts get what they get
    alone (tests/test_generate.py), so one batch serves all; a few run alone too."""
    longest = max(r.max_tokens for r in requests)
    batched, _ = generate_tokens(model, [r.prompt for r in requests], max_new_tokens=longest)
    for i in (0, len(requests) // 2):
        r = requests[i]
        assert generate_tokens(model, [r.prompt], max_new_tokens=longest)[0][0] == batched[i]
    return [tokens[: r.max_tokens] for tokens, r in zip(batched, requests, strict=True)]


def test_continuous_batching_gives_every_request_its_solo_greedy_tokens(model, engine):
    """36 requests through 4 slots: chunked prefill, slots reused many times."""
    requests = mixed_requests(model.config.vocab_size, 36, seed=0)
    sink = run_staggered(engine, requests)
    expected = solo(model, requests)
    for request, tokens in zip(requests, expected, strict=True):
        assert sink.tokens[request.id] == tokens, request.prompt
        assert sink.finish(request.id).finish_reason == "length"
    assert engine.active_slots == 0 and engine.queue_depth == 0


@pytest.mark.parametrize("window", [6, 20])
def test_a_sliding_window_model_too(window):
    """Past the window, with chunks longer than it (the rolling buffer holds W + C - 1)."""
    model = Mixtral(tiny_config(sliding_window=window), rngs=nnx.Rngs(5))
    engine = Engine(model, max_batch=3, max_len=MAX_LEN, prefill_chunk=16)
    requests = mixed_requests(model.config.vocab_size, 12, seed=1)
    sink = run_staggered(engine, requests)
    for request, tokens in zip(requests, solo(model, requests), strict=True):
        assert sink.tokens[request.id] == tokens


class CompileCount:
    """Backend compilations while in the `with` block."""

    def __enter__(self):
        self.compiles = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles.append(duration)

    def __exit__(self, *_):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_a_paged_cache_gives_the_solo_tokens_and_its_pool_runs_dry_without_loss(model):
    """36 requests through 4 slots and a pool of 20 blocks of 8, where one request can
    need 12: the head of the queue waits for blocks (slots stand free), and then every
    request still gets its solo greedy tokens, nothing compiles after warm-up, and
    every block is free at the end."""
    engine = Engine(
        model, max_batch=4, max_len=MAX_LEN, prefill_chunk=64, block_size=8, kv_blocks=20
    )
    engine.warmup()
    pool = engine.scheduler.pool
    requests = mixed_requests(model.config.vocab_size, 36, seed=0)
    starved = []  # steps where a request waited with a slot free: blocks ran out
    step = engine.step

    def watched_step():
        out = step()
        free_slot = engine.active_slots < engine.max_batch
        starved.append(free_slot and bool(engine.scheduler.waiting))
        assert pool.used == sum(len(s.blocks) for s in engine.scheduler.running)
        return out

    engine.step = watched_step
    with CompileCount() as counted:
        sink = run_staggered(engine, requests)
    assert counted.compiles == []
    assert sum(starved) > 0
    for request, tokens in zip(requests, solo(model, requests), strict=True):
        assert sink.tokens[request.id] == tokens, request.prompt
        assert sink.finish(request.id).finish_reason == "length"
    assert pool.used == 0 and pool.available == 20


def test_prefix_cache_hits_give_the_tokens_of_misses(model):
    """Prompts sharing a 40-token header (some whole prompts repeated), staggered: the
    later ones start their prefill after the header's cached blocks, and every request
    gets its solo greedy tokens; an echo request computes its whole prompt."""
    engine = Engine(model, max_batch=3, max_len=MAX_LEN, prefill_chunk=16, block_size=8)
    pool = engine.scheduler.pool
    rs = np.random.RandomState(7)
    vocab = model.config.vocab_size
    header = rs.randint(3, vocab, 40).tolist()
    prompts = [header + rs.randint(3, vocab, rs.randint(1, 20)).tolist() for _ in range(8)]
    prompts += [prompts[1], prompts[1], header[:17]]
    requests = [Request(p, int(rs.randint(1, 20))) for p in prompts]
    sink = run_staggered(engine, requests, every=6)
    for request, tokens in zip(requests, solo(model, requests), strict=True):
        assert sink.tokens[request.id] == tokens, request.prompt
    assert pool.hit_tokens >= 8 * 40  # most later prompts found the header cached
    assert pool.used == 0
    echo = Request(prompts[2], 0, prompt_logprobs=0)
    hits = pool.hit_tokens
    run_staggered(engine, [echo])
    assert pool.hit_tokens == hits


def test_an_int8_cache_paged_or_not_gives_the_same_tokens(model):
    """An int8 cache stores the same keys and scales in slots or in pages, so the two
    engines agree token for token (and neither is the float cache: see
    tests/test_paged_cache.py for int8's quality)."""
    requests = {
        paged: mixed_requests(model.config.vocab_size, 10, seed=3) for paged in (False, True)
    }
    tokens = {}
    for paged, batch in requests.items():
        engine = Engine(
            model,
            max_batch=3,
            max_len=MAX_LEN,
            prefill_chunk=16,
            kv_dtype="int8",
            block_size=8 if paged else None,
        )
        assert engine.cache.k[0].dtype == jnp.int8
        sink = run_staggered(engine, batch)
        tokens[paged] = [sink.tokens[r.id] for r in batch]
    assert tokens[True] == tokens[False]


def test_a_paged_cache_of_a_sliding_window_model_reuses_its_blocks():
    """Past a window of 6 with chunks of 16: a row's rolling buffer of 21 slots is 3
    blocks of 8, overwritten in turn, and a request never holds more."""
    model = Mixtral(tiny_config(sliding_window=6), rngs=nnx.Rngs(5))
    engine = Engine(model, max_batch=3, max_len=MAX_LEN, prefill_chunk=16, block_size=8)
    assert engine.scheduler.pool.blocks_per_row == 3
    requests = mixed_requests(model.config.vocab_size, 12, seed=1)
    sink = run_staggered(engine, requests)
    for request, tokens in zip(requests, solo(model, requests), strict=True):
        assert sink.tokens[request.id] == tokens


def test_nothing_compiles_after_warmup(model, engine):
    """Requests of every kind coming and going: greedy and sampled, log-probabilities,
    prompt log-probabilities, every prompt length, stop ids, cancellations."""
    with CompileCount() as counted:
        vocab = model.config.vocab_size
        requests = mixed_requests(vocab, 8, seed=2)
        requests += mixed_requests(vocab, 6, seed=3, temperature=0.9, top_k=5, top_p=0.9)
        requests += mixed_requests(vocab, 4, seed=4, logprobs=3, prompt_logprobs=2)
        requests += [Request([1, 5, 9], 0, prompt_logprobs=0)]
        requests += mixed_requests(vocab, 4, seed=5, stop_ids=frozenset(range(3, vocab, 2)))
        sink = Collected()
        for request in requests:
            request.on_output = sink
            engine.submit(request)
        engine.step()
        engine.cancel(requests[-1].id)
        engine.run_until_idle()
        assert len({o.request_id for o in sink.outputs if o.finished}) == len(requests)
    assert counted.compiles == []


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch(model, engine):
    def sampled():
        return Request([1, 20, 30, 40], 20, temperature=1.0, top_k=30, top_p=0.95, seed=11)

    alone = run_staggered(engine, [r := sampled()])
    alone_tokens = alone.tokens[r.id]
    crowd = mixed_requests(model.config.vocab_size, 7, seed=6, temperature=1.2)
    mixed = run_staggered(engine, [*crowd[:3], (r := sampled()), *crowd[3:]], every=1)
    assert mixed.tokens[r.id] == alone_tokens
    other = run_staggered(engine, [Request([1, 20, 30, 40], 20, temperature=1.0, seed=12)])
    assert list(other.tokens.values())[0] != alone_tokens


def test_sample_rows_follows_each_rows_parameters():
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 50), jnp.float32)
    rows = RowSampling(
        temperature=jnp.asarray([0.0, 1.0, 1.0, 0.0]),
        top_k=jnp.asarray([0, 1, 3, 0], jnp.int32),
        top_p=jnp.asarray([1.0, 1.0, 1.0, 0.5]),
        seed=jnp.asarray([1, 2, 3, 4], jnp.uint32),
        step=jnp.zeros(4, jnp.int32),
    )
    greedy = np.asarray(argmax(logits))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    drawn = set()
    for step in range(40):
        tokens = np.asarray(sample_rows(logits, rows._replace(step=jnp.full(4, step))))
        assert tokens[0] == greedy[0] and tokens[3] == greedy[3]  # greedy rows
        assert tokens[1] == greedy[1]  # top_k 1
        assert tokens[2] in top3[2]
        drawn.add(int(tokens[2]))
    assert len(drawn) > 1  # it does draw


def test_a_finished_request_frees_its_slot_for_the_next_step(model):
    engine = Engine(model, max_batch=1, max_len=MAX_LEN, prefill_chunk=16)
    sink = Collected()
    first, second = Request([1, 2, 3], 2, on_output=sink), Request([1, 4], 2, on_output=sink)
    engine.submit(first)
    engine.submit(second)
    engine.step()  # first: prefill (token 1) and a decode step (token 2): done
    assert sink.finish(first.id).finish_reason == "length"
    assert engine.active_slots == 0 and engine.queue_depth == 1
    engine.step()  # second takes the slot at once
    assert sink.tokens[second.id] and engine.queue_depth == 0
    engine.run_until_idle()


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(model):
    engine = Engine(model, max_batch=2, max_len=MAX_LEN, prefill_chunk=16)
    sink = Collected()
    short = Request([1, 2, 3], 20, on_output=sink)
    engine.submit(short)
    engine.step()
    long = Request(list(range(3, 67)), 3, on_output=sink)  # 64 tokens: four chunks
    engine.submit(long)
    for step in range(4):
        before = len(sink.tokens[short.id])
        engine.step()
        assert len(sink.tokens[short.id]) == before + 1  # decoding never stalls
        assert (long.id in sink.tokens) == (step == 3)  # the first token after 4 chunks
    engine.run_until_idle()
    assert sink.tokens[long.id] == generate_tokens(model, [long.prompt], max_new_tokens=3)[0][0]
    # The steps by their rows: short alone for its first five, then both. Every token
    # but each request's first (its prefill's) came from a decode row.
    steps = engine.decode_steps
    assert steps[1] >= 5 and steps[2] >= 1
    assert engine.decode_rows == (20 - 1) + (3 - 1)


def test_cancel_frees_the_slot_within_a_step(model, engine):
    sink = Collected()
    requests = [Request([1, 2, 3 + i], 50, on_output=sink) for i in range(6)]
    for request in requests:
        engine.submit(request)
    engine.step()
    assert engine.active_slots == 4 and engine.queue_depth == 2
    engine.cancel(requests[0].id)
    engine.cancel(requests[5].id)  # still waiting
    engine.step()
    assert sink.finish(requests[0].id).finish_reason == "cancelled"
    assert sink.finish(requests[5].id).finish_reason == "cancelled"
    assert requests[4].id in sink.tokens  # took the freed slot in the same step
    for request in requests[1:5]:
        engine.cancel(request.id)
    engine.step()
    assert not engine.busy()


def test_a_request_whose_consumer_raises_fails_alone(model, engine):
    requests = mixed_requests(model.config.vocab_size, 6, seed=7)
    sink = Collected()
    calls = []

    def broken(output):
        calls.append(output)
        if len(calls) == 2:
            raise RuntimeError("the client's handler broke")

    for request in requests:
        request.on_output = sink
    requests[2].on_output = broken
    for request in requests:
        engine.submit(request)
    engine.run_until_idle()
    assert calls[-1].finish_reason == "error" and "handler broke" in calls[-1].error
    others = [r for i, r in enumerate(requests) if i != 2]
    for request, tokens in zip(others, solo(model, others), strict=True):
        assert sink.tokens[request.id] == tokens
    assert not engine.busy()


def test_log_probabilities_are_the_models(model, engine):
    """A generated token's and the prompt's log-probabilities equal log_softmax of the
    full forward's logits, with the most likely alternatives in order."""
    sink = Collected()
    prompt = np.random.RandomState(8).randint(3, model.config.vocab_size, 40).tolist()
    request = Request(prompt, 6, logprobs=4, prompt_logprobs=3, on_output=sink)
    engine.submit(request)
    engine.run_until_idle()
    tokens = sink.tokens[request.id]
    outputs = [o for o in sink.outputs if o.request_id == request.id]
    generated = [lp for o in outputs for lp in o.logprobs]
    prompt_lps = next(o.prompt_logprobs for o in outputs if o.prompt_logprobs)
    sequence = prompt + tokens
    expected = np.asarray(jax.nn.log_softmax(model(jnp.asarray([sequence]))[0], axis=-1))
    assert prompt_lps[0].logprob is None and len(prompt_lps) == len(prompt)
    for i in range(1, len(prompt)):
        assert prompt_lps[i].logprob == pytest.approx(expected[i - 1, prompt[i]], abs=1e-4)
        assert [t for t, _ in prompt_lps[i].top] == list(np.argsort(-expected[i - 1])[:3])
    for j, lp in enumerate(generated):
        row = expected[len(prompt) + j - 1]
        assert lp.logprob == pytest.approx(row[tokens[j]], abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-row)[:4])
        assert [v for _, v in lp.top] == pytest.approx(np.sort(row)[::-1][:4], abs=1e-4)


def test_stop_ids_end_a_request_and_are_not_returned(model, engine):
    reference = generate_tokens(model, [[1, 7, 8, 9]], max_new_tokens=10)[0][0]
    sink = Collected()
    request = Request([1, 7, 8, 9], 10, stop_ids=frozenset({reference[3]}), on_output=sink)
    engine.submit(request)
    engine.run_until_idle()
    assert sink.tokens[request.id] == reference[: reference.index(reference[3])]
    assert sink.finish(request.id).finish_reason == "stop"


@pytest.mark.parametrize(
    "changes,param,message",
    [
        (dict(prompt=[]), "prompt", "the prompt is empty"),
        (dict(max_tokens=MAX_LEN), "max_tokens", "exceeds this server's context"),
        (dict(prompt=[1] * MAX_LEN), "prompt", "shorten the prompt"),
        (dict(max_tokens=0), "max_tokens", "max_tokens 0 generates nothing"),
        (dict(temperature=-1.0), "temperature", "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p", r"top_p must be in \(0, 1\]"),
        (dict(logprobs=21), "logprobs", r"logprobs must be in \[0, 20\]"),
        (dict(prompt=[1, 10_000]), "prompt", "outside the vocabulary"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(engine, changes, param, message):
    request = Request(**({"prompt": [1, 2], "max_tokens": 4} | changes))
    with pytest.raises(RequestError, match=message) as error:
        engine.submit(request)
    assert error.value.param == param


def test_a_full_queue_refuses_and_bad_settings_are_named(model):
    engine = Engine(model, max_batch=1, max_len=MAX_LEN, max_queue=2)
    for _ in range(3):  # one for the free slot, two to wait: all taken before a step
        engine.submit(Request([1, 2], 8))
    with pytest.raises(QueueFull, match="3 requests are waiting for a slot"):
        engine.submit(Request([1, 2], 8))
    engine.step()  # one in the slot (8 tokens take more than a step), two waiting
    with pytest.raises(QueueFull, match="2 requests are waiting for a slot"):
        engine.submit(Request([1, 2], 8))
    engine.run_until_idle()
    engine.submit(Request([1, 2], 2))  # room again
    engine.run_until_idle()
    with pytest.raises(ValueError, match="max_len 4096 exceeds the model's"):
        Engine(model, max_len=4096)
    for name in ("max_batch", "block_size", "kv_blocks", "speculate_rows"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            Engine(model, max_len=MAX_LEN, **{name: 0})
    with pytest.raises(ValueError, match="kv_blocks 5 cannot hold one request of max_len 96: "):
        Engine(model, max_len=MAX_LEN, block_size=8, kv_blocks=5)
    with pytest.raises(ValueError, match="kv_blocks sizes a paged cache: give block_size"):
        Engine(model, max_len=MAX_LEN, kv_blocks=50)
    with pytest.raises(ValueError, match="kv_dtype 'int4' is not one of int8, bfloat16"):
        Engine(model, max_len=MAX_LEN, kv_dtype="int4")
    assert buckets(256) == (16, 32, 64, 128, 256) and buckets(100) == (16, 32, 64, 100)


MESH_SCRIPT = """
import json, sys
import numpy as np
from flax import nnx
from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.requests import Request
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.parallel.placement import shard_model

config = ModelConfig.from_dict(tiny.get_config())
rs = np.random.RandomState(9)
prompts = [rs.randint(3, config.vocab_size, rs.randint(1, 40)).tolist() for _ in range(10)]
prompts += [[5, 6, 7, 8] * 6, [9, 10] * 10]  # drafts find these
out = {}
for name, mesh, speculate in (
    ("one", None, None),
    ("mesh", make_mesh(data=2, fsdp=1, tensor=2, expert=2), None),
    ("speculating", make_mesh(data=2, fsdp=1, tensor=2, expert=2), "ngram:4"),
):
    model = Mixtral(config, rngs=nnx.Rngs(4))
    if mesh is not None:
        shard_model(model, mesh)
    engine = Engine(
        model, max_batch=4, max_len=64, prefill_chunk=16, mesh=mesh, speculate=speculate,
        speculate_rows=4,
    )  # fmt: skip
    tokens = {}
    for i, p in enumerate(prompts):
        sink = lambda o, i=i: tokens.setdefault(i, []).extend(o.tokens)
        engine.submit(Request(p, 12, on_output=sink))
    engine.run_until_idle()
    out[name] = [tokens[i] for i in range(len(prompts))]
    out[name + "_cache"] = str(engine.cache.k.sharding.spec) if mesh is not None else ""
    out[name + "_kept"] = engine.accepted_tokens
print(json.dumps(out))
"""


def test_the_engine_on_a_mesh_gives_the_same_tokens():
    """8 CPU devices, (data 2, tensor 2, expert 2): the cache split by slot and KV head;
    and speculating there, the same tokens."""
    out = run_script(MESH_SCRIPT)
    assert out["mesh"] == out["one"] and out["speculating"] == out["one"]
    assert out["speculating_kept"] > 0
    assert "data" in out["mesh_cache"] and "tensor" in out["mesh_cache"]


def test_stop_finishes_what_it_can_then_cancels_the_rest(model):
    """On its own thread: `stop` refuses new requests, lets the running ones go on for
    its timeout, then cancels what is left and ends the thread."""
    engine = Engine(model, max_batch=1, max_len=MAX_LEN, prefill_chunk=16)
    engine.warmup()
    sink = Collected()

    def slow(output):  # a slow consumer: each step of the long request takes 10 ms
        sink(output)
        time.sleep(0.01)

    short, long = Request([1, 2], 2, on_output=sink), Request([1, 3], 90, on_output=slow)
    engine.submit(short)
    engine.submit(long)
    engine.start()
    assert wait_until(lambda: short.id in sink.tokens and long.id in sink.tokens, timeout=30)
    engine.stop(timeout=0)
    assert sink.finish(short.id).finish_reason == "length"
    assert sink.finish(long.id).finish_reason == "cancelled"
    assert len(sink.tokens[long.id]) < 89 and not engine.busy()
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit(Request([1, 2], 2))

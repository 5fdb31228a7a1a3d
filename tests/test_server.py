"""The OpenAI-compatible server, through the real `openai` client and httpx: answers
equal `generate`'s, streams equal whole answers, log-probabilities are the model's,
and bad requests get OpenAI's error object naming the field. One server for the module."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import mixtral_jax
from mixtral_jax.inference.engine import Engine
from tests.serving import NAME, openai_client, running_server

PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n", "for i in range(", "    return"]
MAX_LEN = 256


@pytest.fixture(scope="module")
def model(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, max_batch=4, max_len=MAX_LEN, prefill_chunk=32)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def url(engine, tokenizer):
    with running_server(engine, tokenizer) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


def test_completions_equal_generate_for_a_batch_of_prompts(client, model, tokenizer):
    expected = mixtral_jax.generate(model, tokenizer, PROMPTS, max_new_tokens=24).texts
    out = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert {c.finish_reason for c in out.choices} <= {"length", "stop"}
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in PROMPTS)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == NAME


def test_concurrent_clients_each_get_their_solo_answer(client, model, tokenizer):
    """12 requests at once through 4 slots, prompts and lengths mixed."""
    rs = np.random.RandomState(0)
    jobs = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), int(rs.randint(4, 40))) for i in range(12)]

    def ask(job):
        prompt, n = job
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, jobs))
    longest = max(n for _, n in jobs)
    reference = mixtral_jax.generate(
        model, tokenizer, [p for p, _ in jobs], max_new_tokens=longest
    ).tokens
    for (prompt, n), answer, tokens in zip(jobs, answers, reference, strict=True):
        assert answer.choices[0].text == tokenizer.decode(tokens[:n]), prompt


def test_chat_streams_what_it_answers_whole(client, model, tokenizer):
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=30, temperature=0
    )
    expected = mixtral_jax.generate(
        model, tokenizer, messages[0]["content"], chat=True, max_new_tokens=30
    )
    assert whole.choices[0].message.content == expected.texts[0]
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stream_is_server_sent_events_ending_done(url):
    body = {"model": NAME, "prompt": "def f(", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(c["object"] == "text_completion" for c in chunks)


def log_softmax(model, ids: list[int]) -> np.ndarray:
    """The model's log-probabilities at every position, float32 [T, V]."""
    logits = model(jnp.asarray([ids])).astype(jnp.float32)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))[0]


def test_echo_with_max_tokens_0_gives_the_prompts_log_probabilities(client, model, tokenizer):
    """What evaluation harnesses ask for a log-likelihood."""
    prompt = "def add(a, b):\n    return a + b\n"
    out = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    choice = out.choices[0]
    ids = tokenizer.encode(prompt)
    expected = log_softmax(model, ids)
    assert choice.text == prompt and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    # bfloat16 weights: prefill in chunks and in one go round differently.
    np.testing.assert_allclose(
        lp.token_logprobs[1:], [expected[i - 1, ids[i]] for i in range(1, len(ids))], atol=2e-2
    )
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_chat_log_probabilities_are_the_models(client, model, tokenizer):
    messages = [{"role": "user", "content": "Sort a list."}]
    out = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    ids = tokenizer.encode_chat(messages)
    generated = mixtral_jax.generate(
        model, tokenizer, messages[0]["content"], chat=True, max_new_tokens=6
    ).tokens[0]
    expected = log_softmax(model, ids + generated)
    assert len(content) == len(generated)
    for j, entry in enumerate(content):
        row = expected[len(ids) + j - 1]
        assert entry.logprob == pytest.approx(row[generated[j]], abs=2e-2)
        assert entry.token == tokenizer.token_text(generated[j])
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def test_stop_strings_cut_the_answer_and_say_stop(client, model, tokenizer):
    full = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    for stream in (False, True):
        out = client.completions.create(
            model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop], stream=stream
        )
        chunks = list(out) if stream else [out]
        got = "".join(c.choices[0].text for c in chunks)
        assert got == text[: text.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_gives_the_same_sample(client):
    def ask(seed):
        out = client.completions.create(
            model=NAME, prompt="x = ", max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
        )
        return out.choices[0].text

    assert ask(5) == ask(5)
    assert len({ask(5), ask(6), ask(7)}) > 1


def test_models_health_and_metrics(url, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    client.completions.create(model=NAME, prompt="a", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "queue_depth",
        "active_slots",
        "tokens_generated_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        'requests_finished_total{reason="length"}',
        'engine_busy_seconds_total{phase="decode"}',
        "decode_rows_total",
        'decode_steps_total{rows="1"}',
    ):
        assert f"\n{name}" in text, name
    generated = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("tokens_generated_total")
    )
    assert generated >= 3


@pytest.mark.parametrize(
    "path,body,param,message",
    [
        ("completions", "{not json", None, "not valid JSON"),
        ("completions", {"model": NAME}, "prompt", "Field required"),
        (
            "completions",
            {"model": NAME, "prompt": "a", "max_tokens": "lots"},
            "max_tokens",
            "integer",
        ),
        ("completions", {"model": "gpt-4", "prompt": "a"}, "model", "not served here"),
        ("completions", {"model": NAME, "prompt": "a", "n": 2}, "n", "n > 1 is not supported"),
        (
            "completions",
            {"model": NAME, "prompt": "a", "max_tokens": 300},
            "max_tokens",
            "exceeds this server's context of 256",
        ),
        ("completions", {"model": NAME, "prompt": "a " * 300}, "prompt", "shorten the prompt"),
        ("completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, "max_tokens", "echo"),
        (
            "completions",
            {"model": NAME, "prompt": "a", "temperature": -1},
            "temperature",
            "greater",
        ),
        ("completions", {"model": NAME, "prompt": "a", "logprobs": 50}, "logprobs", "less"),
        ("completions", {"model": NAME, "prompt": "a", "max_token": 5}, "max_token", "unknown"),
        ("completions", {"model": NAME, "prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
        ("chat/completions", {"model": NAME, "messages": []}, "messages", "at least 1"),
        (
            "chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": "a " * 300}]},
            "messages",
            "shorten the prompt",
        ),
        (
            "chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": "a"}], "max_tokens": 300},
            "max_tokens",
            "exceeds this server's context",
        ),
        (
            "chat/completions",
            {"model": NAME, "messages": [{"role": "assistant", "content": "hi"}]},
            "messages",
            "first message",
        ),
        (
            "chat/completions",
            {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]},
            "messages",
            "Input should be",
        ),
        (
            "chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "tools",
            "has no tool calls",
        ),
    ],
)
def test_bad_requests_get_openais_error_naming_the_field(url, path, body, param, message):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(
        f"{url}/v1/{path}", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]


def test_the_openai_client_raises_its_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.completions.create(model="other", prompt="a", max_tokens=2)

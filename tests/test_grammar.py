"""Structured output (`response_format`): every answer parses and validates against its
schema, on the embedded model through the real `openai` client and on random tiny
models through the engine; each constrained token is the model's best the grammar
allows; free requests in the same steps are untouched; bad formats get 400s naming
`response_format`. One server for the module."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import jax.numpy as jnp
import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pydantic
import pytest
from flax import nnx

import mixtral_jax
from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.grammar import Grammars, fill_masks, free_masks, token_bytes
from mixtral_jax.inference.requests import Request
from mixtral_jax.inference.sampling import constrain
from mixtral_jax.model.tokenizer import Tokenizer, has_mistral_common
from tests.serving import NAME, openai_client, running_server
from tests.test_engine import CompileCount
from tests.test_server import log_softmax

# Schemas whose every string, number and array is bounded: a document always ends.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "choice": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    "list": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}
                },
                "required": ["email"],
                "additionalProperties": False,
            },
            "note": {"type": ["string", "null"], "maxLength": 20},
        },
        "required": ["user", "note"],
        "additionalProperties": False,
    },
    "either": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"enum": ["none"]}]},
    "code": {
        "type": "object",
        "properties": {
            "language": {"const": "python"},
            "lines": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 2},
        },
        "required": ["language", "lines"],
        "additionalProperties": False,
    },
}
MAX_LEN = 256


def json_schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


def validated(text: str, schema: dict):
    document = json.loads(text)
    jsonschema.validate(document, schema)
    return document


# ---- the pieces ----


def test_token_bytes_spell_what_the_tokenizer_decodes(sp_model, embedded_tokenizer):
    from tests.conftest import CORPUS

    for tokenizer in (Tokenizer.from_file(sp_model), embedded_tokenizer):
        pieces = token_bytes(tokenizer)
        for line in CORPUS.splitlines():
            ids = tokenizer.encode(line, bos=False)
            # sentencepiece puts a space before a text of its own; decode drops it.
            spelt = b"".join(pieces[i] for i in ids).decode()
            assert spelt == " " + tokenizer.decode(ids), line
        assert pieces[tokenizer.eos_id] == b"\xff</s>"


def test_constrain_masks_exactly_the_tokens_not_allowed():
    rng = np.random.default_rng(0)
    B, V = 3, 70  # V not a multiple of 32: the last word's high bits are past it
    logits = rng.normal(size=(B, V)).astype(np.float32)
    allowed = rng.integers(-(2**31), 2**31, size=(B, 3), dtype=np.int64).astype(np.int32)
    allowed[1] = -1  # a free row beside constrained ones
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, allowed)  # the library's own
    np.testing.assert_array_equal(np.asarray(constrain(jnp.asarray(logits), allowed)), expected)
    # Over a verify call's positions [B, T, V], each row's mask at every position.
    stacked = np.asarray(constrain(jnp.asarray(np.stack([logits] * 2, 1)), allowed))
    np.testing.assert_array_equal(stacked, np.stack([expected] * 2, 1))
    # Or a mask a position [B, T, W], as along a grammar's draft.
    by_place = np.stack([allowed, allowed[::-1]], 1)
    placed = np.asarray(constrain(jnp.asarray(np.stack([logits] * 2, 1)), by_place))
    reversed_ = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(reversed_, allowed[::-1].copy())
    np.testing.assert_array_equal(placed, np.stack([expected, reversed_], 1))
    free = free_masks(B, V)
    np.testing.assert_array_equal(np.asarray(constrain(jnp.asarray(logits), free)), logits)


@pytest.mark.skipif(not has_mistral_common(), reason="the official tokenizers ship with it")
@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_every_token_a_mask_allows_is_accepted_with_mixtrals_tokenizers(name):
    """Random walks through the masks: a token the mask allows is one the parser takes.
    (Encoding text after `<unk>`, as the first wrapper did, merged `>` with `{` and broke
    this for a third of the documents.)"""
    tokenizer = Tokenizer.official(name)
    make = Grammars(tokenizer, tokenizer.vocab_size).json(SCHEMAS["code"])
    rng = np.random.default_rng(0)
    mask = free_masks(1, tokenizer.vocab_size)
    for _ in range(30):
        constraint, tokens = make(), []
        while not constraint.finished:
            fill_masks([(constraint, 0)], mask)
            bits = (mask[0][:, None] >> np.arange(32)) & 1
            allowed = np.flatnonzero(bits.reshape(-1)[: tokenizer.vocab_size])
            token = int(rng.choice(allowed))
            if token == tokenizer.eos_id:
                break
            assert constraint.advance(token), constraint.error
            tokens.append(token)
        validated(tokenizer.decode(tokens), SCHEMAS["code"])


@pytest.mark.parametrize("name", ["embedded", "mistral-v3"])
def test_a_draft_is_what_the_grammar_forces_with_the_mask_of_each_place(name, embedded_tokenizer):
    """Random walks: where the grammar forces text, `draft` gives tokens each allowed at
    its place, the masks there and after them as stepping gives them, and leaves the
    parser where it was; keys and punctuation make drafts of several tokens."""
    if name == "embedded":
        tokenizer = embedded_tokenizer
    elif has_mistral_common():
        tokenizer = Tokenizer.official(name)
    else:
        pytest.skip("the official tokenizers ship with mistral-common")
    V = tokenizer.vocab_size
    make = Grammars(tokenizer, V).json(SCHEMAS["nested"])
    rng = np.random.default_rng(0)
    mask, lengths = free_masks(1, V), []
    for _ in range(5):
        constraint = make()
        while not constraint.finished:
            draft, masks = constraint.draft(6, V)
            fill_masks([(constraint, 0)], mask)
            if draft:
                lengths.append(len(draft))
                assert len(draft) <= 6 and masks.shape == (len(draft) + 1, mask.shape[1])
                assert constraint.draft(2, V)[0] == draft[:2]
                assert constraint.draft(0, V) == ([], None)
            bits = (mask[0][:, None] >> np.arange(32)) & 1
            allowed = np.flatnonzero(bits.reshape(-1)[:V])
            for j, token in enumerate(draft):  # the first: the state is as it was
                fill_masks([(constraint, 0)], mask)
                np.testing.assert_array_equal(masks[j], mask[0])
                assert (mask[0][token // 32] >> (token % 32)) & 1, "a forced token not allowed"
                assert constraint.advance(token), constraint.error
            if draft:
                fill_masks([(constraint, 0)], mask)
                np.testing.assert_array_equal(masks[-1], mask[0])
                continue
            token = int(rng.choice(allowed))
            if token == tokenizer.eos_id:
                break
            assert constraint.advance(token), constraint.error
    assert lengths and max(lengths) > 1


def test_schemas_that_cannot_be_enforced_are_named(embedded_tokenizer):
    grammars = Grammars(embedded_tokenizer, 4096)
    with pytest.raises(ValueError, match="Invalid type: foo"):
        grammars.json({"type": "foo"})
    with pytest.raises(ValueError, match="unclosed group"):
        grammars.json({"type": "string", "pattern": "(("})
    with pytest.raises(ValueError, match="more than the model's 300 logits"):
        Grammars(embedded_tokenizer, 300).json(SCHEMAS["person"])


# ---- random tiny models, through the engine ----


@pytest.mark.parametrize("seed", [0, 1])
def test_random_models_write_valid_documents(sp_model, seed):
    """A random model's sampled tokens are as far from JSON as text gets: only the mask
    keeps them valid. 333 logits for 320 pieces: the extra ones are never allowed."""
    tokenizer = Tokenizer.from_file(sp_model)
    config = ModelConfig.from_dict(tiny.get_config()).replace(vocab_size=333)
    model = Mixtral(config, rngs=nnx.Rngs(seed))
    engine = Engine(model, max_batch=4, max_len=128, prefill_chunk=32)
    grammars = Grammars(tokenizer, config.vocab_size)
    outputs: dict[str, list] = {}
    requests = []
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        make = grammars.json(schema)
        for temperature in (1.0, 1.5):
            request = Request(
                tokenizer.encode(f"{name} {i}"),
                100,
                temperature=temperature,
                seed=seed * 100 + i,
                stop_ids=frozenset({tokenizer.eos_id}),
                constraint=make(),
                on_output=lambda o: outputs.setdefault(o.request_id, []).append(o),
            )
            requests.append((request, schema))
            engine.submit(request)
    engine.run_until_idle()
    for request, schema in requests:
        answer = outputs[request.id]
        assert answer[-1].finish_reason == "stop"
        tokens = [t for o in answer for t in o.tokens]
        assert max(tokens) < tokenizer.vocab_size
        validated(tokenizer.decode(tokens), schema)


def test_jump_forward_gives_the_plain_tokens_in_fewer_steps(embedded_tokenizer):
    """Greedy requests under the schemas through an engine that verifies what the
    grammar forces (jump_forward) and one that does not: the same tokens, in fewer
    steps, each token drawn under its own place's mask; sampled requests stay valid;
    nothing compiles after warm-up."""
    tokenizer = embedded_tokenizer
    config = ModelConfig.from_dict(tiny.get_config()).replace(vocab_size=tokenizer.vocab_size)
    model = Mixtral(config, rngs=nnx.Rngs(3))
    grammars = Grammars(tokenizer, config.vocab_size)
    options = dict(max_batch=4, max_len=128, prefill_chunk=32, speculate_rows=4)
    plain, jumping = Engine(model, **options), Engine(model, jump_forward=6, **options)
    jumping.warmup()

    def run(engine, temperature):
        outputs: dict[str, list[int]] = {}
        requests = []
        # (Not "code": a random model's two strings of 30 can outrun 100 tokens.)
        for i, (name, schema) in enumerate(s for s in SCHEMAS.items() if s[0] != "code"):
            request = Request(
                tokenizer.encode(f"{name} {i}"),
                100,
                temperature=temperature,
                seed=i,
                stop_ids=frozenset({tokenizer.eos_id}),
                constraint=grammars.json(schema)(),
                on_output=lambda o: outputs.setdefault(o.request_id, []).extend(o.tokens),
            )
            requests.append((request, schema))
            engine.submit(request)
        engine.run_until_idle()
        return [(outputs[r.id], schema) for r, schema in requests]

    with CompileCount() as counted:
        jumped = run(jumping, 0.0)
        sampled = run(jumping, 1.0)
    assert counted.compiles == []
    assert [tokens for tokens, _ in jumped] == [tokens for tokens, _ in run(plain, 0.0)]
    for tokens, schema in jumped + sampled:
        validated(tokenizer.decode(tokens), schema)
    assert jumping.accepted_tokens > jumping.verify_steps > 0
    assert sum(jumping.decode_steps) < sum(plain.decode_steps)


# ---- the embedded model, through the server ----


@pytest.fixture(scope="module")
def model(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="module")
def engine(model):
    # Speculating on every row: free rows draft from their context, constrained ones
    # what their grammar forces, in the same verify steps.
    engine = Engine(
        model, max_batch=4, max_len=MAX_LEN, prefill_chunk=64, speculate="ngram:4",
        speculate_rows=4, jump_forward=4,
    )  # fmt: skip
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def url(engine, tokenizer):
    with running_server(engine, tokenizer) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


def chat(client, name: str, temperature: float, **options):
    return client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": f"Write the {name} as JSON."}],
        max_tokens=200,
        temperature=temperature,
        seed=7,
        response_format=json_schema_format(name),
        **options,
    )


def test_answers_validate_and_free_requests_sharing_their_steps_are_untouched(
    client, model, tokenizer
):
    """20 constrained requests (chat and completions, greedy and sampled) and 4 free
    ones, all at once: the free ones equal `generate`'s answers."""
    free_prompts = ["def fibonacci(n):", "class Stack:", "import os\n", "for i in range("]
    jobs = [("chat", name, t) for name in SCHEMAS for t in (0.0, 0.9)]
    jobs += [("completion", n, t) for n in ("person", "list", "choice", "either") for t in (0, 1)]
    jobs += [("free", prompt, 0.0) for prompt in free_prompts]

    def ask(job):
        kind, name, temperature = job
        if kind == "chat":
            return chat(client, name, temperature).choices[0]
        if kind == "free":
            out = client.completions.create(model=NAME, prompt=name, max_tokens=24, temperature=0)
            return out.choices[0]
        out = client.completions.create(
            model=NAME,
            prompt=f'{name} = json.loads("',
            max_tokens=200,
            temperature=temperature,
            seed=3,
            extra_body={"response_format": json_schema_format(name)},
        )
        return out.choices[0]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    constrained = [(job, a) for job, a in zip(jobs, answers, strict=True) if job[0] != "free"]
    assert len(constrained) >= 20
    for (kind, name, _), answer in constrained:
        text = answer.message.content if kind == "chat" else answer.text
        validated(text, SCHEMAS[name])
        assert answer.finish_reason == "stop"
    expected = mixtral_jax.generate(model, tokenizer, free_prompts, max_new_tokens=24).texts
    assert [a.text for a in answers[-4:]] == expected


def test_each_greedy_token_is_the_best_the_grammar_allows(engine, model, tokenizer):
    """Replays the grammar over greedy answers (submitted to the serving engine as the
    server does, forced text verified as drafts): every token is the argmax of the
    model's logits over the tokens allowed at its place (to bfloat16 rounding: chunked
    prefill rounds differently)."""
    grammars = Grammars(tokenizer, model.config.vocab_size)
    for name in ("person", "nested", "code"):
        prompt = tokenizer.encode(f"{name} = ")
        done, outputs = threading.Event(), []

        def on_output(output, outputs=outputs, done=done):
            outputs.append(output)
            if output.finished:
                done.set()

        make = grammars.json(SCHEMAS[name])
        engine.submit(Request(prompt, 200, constraint=make(), on_output=on_output))
        assert done.wait(120)
        assert outputs[-1].finish_reason == "stop"
        tokens = [t for o in outputs for t in o.tokens]
        validated(tokenizer.decode(tokens), SCHEMAS[name])
        log_probs = log_softmax(model, prompt + tokens)
        matcher, mask = make().matcher, free_masks(1, model.config.vocab_size)
        for i, token in enumerate(tokens):
            llguidance.numpy.fill_next_token_bitmask(matcher, mask)
            row = log_probs[len(prompt) + i - 1][None].copy()
            llguidance.numpy.apply_token_bitmask_inplace(row, mask)
            assert np.isfinite(row[0, token]), "a token the grammar does not allow"
            assert row[0, token] >= row.max() - 2e-2, (name, i)
            assert matcher.consume_token(token)
        assert matcher.is_stopped()
    assert engine.accepted_tokens > 0  # drafts of forced text were verified and kept


def test_streamed_answers_equal_whole_ones_and_json_object_gives_an_object(client):
    whole = chat(client, "nested", 0.0).choices[0].message.content
    stream = chat(client, "nested", 0.0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole
    out = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Any JSON object."}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_the_openai_clients_parse_gets_its_pydantic_model(client):
    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=10)
        age: int = pydantic.Field(ge=0, le=99)

    out = client.beta.chat.completions.parse(
        model=NAME,
        messages=[{"role": "user", "content": "A person, please."}],
        max_tokens=100,
        temperature=0,
        response_format=Person,
    )
    assert isinstance(out.choices[0].message.parsed, Person)


@pytest.mark.parametrize(
    "response_format,message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "foo"),
        ({"type": "json_schema"}, "needs a json_schema"),
        ({"type": "xml"}, "Input should be"),
        ({"type": "text", "json_schema": {"name": "x", "schema": {}}}, "is for type"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"pattern": "(("}}},
            "unclosed group",
        ),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "pattern"),
    ],
)
@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_bad_response_formats_get_400s_naming_it(url, path, response_format, message):
    body = {"model": NAME, "max_tokens": 4, "response_format": response_format}
    if path == "completions":
        body["prompt"] = "a"
    else:
        body["messages"] = [{"role": "user", "content": "a"}]
    response = httpx.post(f"{url}/v1/{path}", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_format"
    assert message in error["message"]

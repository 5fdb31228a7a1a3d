"""Tool calls in Mistral's format, through the real `openai` client: a random tiny model
with the v3 tokenizer (Mixtral 8x22B's, from mistral-common) calls the tools it is
given, with arguments valid under their parameters; the calls come back in the
conversation and the server's prompt equals mistral-common's encoding of it; streamed
calls equal whole ones; tool_choice is obeyed; bad tools and choices get 400s naming
the field. One server for the module."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.inference import openai_api as api
from mixtral_jax.inference.engine import Engine
from mixtral_jax.model.tokenizer import Tokenizer, has_mistral_common, official_path
from tests.serving import NAME, openai_client, running_server

pytestmark = pytest.mark.skipif(
    not has_mistral_common(), reason="mistral-common (Python 3.11+) encodes tools"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 100},
                "b": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.official("mistral-v3")


@pytest.fixture(scope="module")
def url(tokenizer):
    config = ModelConfig.from_dict(tiny.get_config()).replace(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=2048
    )
    engine = Engine(Mixtral(config, rngs=nnx.Rngs(0)), max_batch=4, max_len=1024, prefill_chunk=256)
    engine.warmup()
    with running_server(engine, tokenizer) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


def call_tools(client, **options):
    options = {"temperature": 1.0, "tool_choice": "required", "max_tokens": 200, **options}
    return client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, **options)


def checked(calls, tools=TOOLS) -> None:
    """Each call names a tool and its arguments are valid under its parameters."""
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and re.fullmatch(r"[a-f0-9]{9}", call.id)
        jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])


def mistral_common_tokens(messages: list, tools: list) -> list[int]:
    """mistral-common's own encoding, from its own message and tool classes."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    native = []
    for m in messages:
        if m["role"] == "user":
            native.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            native.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            calls = [
                ToolCall(
                    id=c["id"],
                    function=FunctionCall(
                        name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"])
                    ),
                )
                for c in m["tool_calls"]
            ]
            native.append(AssistantMessage(content=None, tool_calls=calls))
    request = ChatCompletionRequest(messages=native, tools=[Tool.model_validate(t) for t in tools])
    mistral = MistralTokenizer.from_file(str(official_path("mistral-v3")))
    return mistral.encode_chat_completion(request).tokens


def test_calls_round_trip_and_prompts_equal_mistral_commons_encoding(client, tokenizer):
    """A random model's sampled calls are as far from valid as calls get: the grammar
    alone keeps them so. Each answer's calls go back with their results; the server
    encodes the conversation as mistral-common does."""
    first = mistral_common_tokens(ASK, TOOLS)
    for seed in range(6):
        answer = call_tools(client, seed=seed)
        assert answer.usage.prompt_tokens == len(first)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        checked(choice.message.tool_calls)
        calls = [c.model_dump() for c in choice.message.tool_calls]
        conversation = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": calls},
            *[{"role": "tool", "tool_call_id": c["id"], "content": "42"} for c in calls],
        ]
        after = client.chat.completions.create(
            model=NAME, messages=conversation, max_tokens=4, tools=TOOLS, temperature=0
        )
        expected = mistral_common_tokens(conversation, TOOLS)
        assert after.usage.prompt_tokens == len(expected)
        # The server's prompt, token for token: the request as it parses it, encoded.
        body = {"model": NAME, "messages": conversation, "tools": TOOLS}
        assert api.ChatRequest.model_validate(body).prompt(tokenizer) == expected


def test_tool_choice_names_a_tool_and_parallel_calls_can_be_off(client):
    for seed in range(3):
        named = call_tools(
            client, seed=seed, tool_choice={"type": "function", "function": {"name": "add"}}
        )
        calls = named.choices[0].message.tool_calls
        checked(calls)
        assert {c.function.name for c in calls} == {"add"}
        single = call_tools(client, seed=seed, parallel_tool_calls=False)
        assert len(single.choices[0].message.tool_calls) == 1
    text = call_tools(client, tool_choice="none", max_tokens=12, seed=1)
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content
    for seed in range(4):  # "auto": text, or calls that hold
        answer = call_tools(client, tool_choice="auto", parallel_tool_calls=False, seed=seed)
        message = answer.choices[0].message
        if message.tool_calls is None:
            assert message.content and answer.choices[0].finish_reason in ("stop", "length")
        else:
            checked(message.tool_calls)


def test_streamed_calls_equal_whole_ones(client):
    # One call: a random model's greedy calls could repeat until max_tokens.
    whole = call_tools(client, temperature=0, parallel_tool_calls=False).choices[0]
    chunks = list(call_tools(client, temperature=0, parallel_tool_calls=False, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [call for d in deltas for call in d.tool_calls or []]
    strip = lambda calls: [(c.function.name, c.function.arguments) for c in calls]  # noqa: E731
    assert strip(streamed) == strip(whole.message.tool_calls)
    assert [c.index for c in streamed] == list(range(len(streamed)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(d.content for d in deltas)


BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}


@pytest.mark.parametrize(
    "changes,param,message",
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "no tools"),
        ({"tools": [BAD_TOOL]}, "tools", "Invalid type: foo"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "pattern"),
        ({"tools": [ADD, ADD]}, "tools", "same name"),
        (
            {"response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined with tools",
        ),
        (
            {"messages": [{"role": "tool", "tool_call_id": "abcdefghi", "content": "1"}]},
            "messages",
            "Mistral's format refuses",
        ),
    ],
)
def test_bad_tools_get_400s_naming_the_field(url, changes, param, message):
    body = {"model": NAME, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **changes}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]

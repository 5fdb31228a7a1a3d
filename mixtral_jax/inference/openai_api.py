"""OpenAI's completions and chat completions API: the requests as pydantic models, the
errors as OpenAI writes them, and the text side of an answer (stop strings,
log-probabilities, offsets). No HTTP here: `server.py` is the shell around it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mixtral_jax.inference.requests import MAX_TOP_LOGPROBS, Output, TokenLogprob
from mixtral_jax.model.tokenizer import Tokenizer


class ApiError(Exception):
    """An error as OpenAI's API returns it: `{"error": {"message", "type", "param",
    "code"}}` with an HTTP status."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


# A schema's or a function's name, as OpenAI (and Mistral, for functions) take it.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchema(BaseModel):
    """`response_format.json_schema`, as OpenAI takes it (`strict` or not, the schema
    is enforced)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """What the answer must be: any text, a JSON object, or JSON valid under a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def schema(self) -> dict[str, Any] | None:
        """The schema to enforce (None: any JSON object); the request is refused when
        the type and the schema do not go together."""
        if self.type == "json_schema" and self.json_schema is None:
            raise ApiError(
                'response_format of type "json_schema" needs a json_schema: '
                '{"name": ..., "schema": {...}}',
                "response_format",
            )
        if self.type != "json_schema" and self.json_schema is not None:
            raise ApiError(
                f'response_format.json_schema is for type "json_schema", not {self.type!r}',
                "response_format",
            )
        return self.json_schema.schema_ if self.json_schema else None


class _Common(BaseModel):
    """Fields both endpoints take. Unknown fields are refused (a misspelt one would
    otherwise silently keep its default); fields OpenAI has and we do not support
    are refused unless they ask for the default."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # an extension, as vLLM's: 0 is no cut
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # an extension, as vLLM's: generate max_tokens whatever comes
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None  # OpenAI's chat field; here on both
    n: int = Field(default=1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def check(self, served: Sequence[str]) -> None:
        """What pydantic cannot say: the model's name (one of `served`: the model's and
        its adapters'), what we do not support."""
        if self.model not in served:
            raise ApiError(
                f"model {self.model!r} is not served here; this server has "
                f"{', '.join(map(repr, served))}",
                "model",
            )
        if self.n != 1:
            raise ApiError("n > 1 is not supported: send the request n times (with seeds)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(f"{name} is not supported; leave it 0", name)
        if self.logit_bias:
            raise ApiError("logit_bias is not supported", "logit_bias")

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def check(self, served: Sequence[str]) -> None:
        super().check(served)
        if self.best_of not in (None, 1):
            raise ApiError("best_of > 1 is not supported", "best_of")
        if self.suffix:
            raise ApiError("suffix (insertion) is not supported", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(
                "max_tokens 0 is for echo (the prompt's log-probabilities)", "max_tokens"
            )

    def prompts(self, tokenizer: Tokenizer) -> list[tuple[list[int], str]]:
        """Each prompt's ids and its text (as echo returns it)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise ApiError("prompt is empty", "prompt")
        out = []
        for prompt in p:
            if isinstance(prompt, str):
                if not prompt:
                    raise ApiError("prompt is an empty string", "prompt")
                out.append((tokenizer.encode(prompt), prompt))
            else:
                if not prompt:
                    raise ApiError("prompt is an empty list of token ids", "prompt")
                bad = next((t for t in prompt if not 0 <= t < tokenizer.vocab_size), None)
                if bad is not None:
                    raise ApiError(
                        f"token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})",
                        "prompt",
                    )
                out.append((list(prompt), tokenizer.decode(prompt)))
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant message made (sent back in the conversation)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant's tool calls alone
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's result answers this call

    def text(self) -> str:
        if self.content is None:
            raise ApiError(f"a {self.role} message needs content", "messages")
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # the arguments are always held to `parameters`


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: Function


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check(self, served: Sequence[str]) -> None:
        super().check(served)
        if self.max_tokens == 0:
            raise ApiError("max_tokens must be at least 1", "max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
        names = [t.function.name for t in self.tools or []]
        choice = self.tool_choice
        if not names and (choice == "required" or isinstance(choice, NamedToolChoice)):
            raise ApiError("tool_choice asks for a call, but no tools are given", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ApiError(
                f"tool_choice names {choice.function.name!r}, which is not among the tools "
                f"({', '.join(names)})",
                "tool_choice",
            )
        if len(set(names)) < len(names):
            raise ApiError("two tools have the same name", "tools")
        if names and self.response_format is not None and self.response_format.type != "text":
            raise ApiError("response_format cannot be combined with tools", "response_format")

    @property
    def calls_tools(self) -> bool:
        """The conversation has tools, calls or results: Mistral's tool format."""
        return bool(self.tools) or any(m.role == "tool" or m.tool_calls for m in self.messages)

    @property
    def tool_mode(self) -> str:
        """ "none", "auto" or "required" (a named tool: required, of that tool alone)."""
        choice = self.tool_choice
        return "required" if isinstance(choice, NamedToolChoice) else choice or "auto"

    def callable_tools(self) -> list[Tool]:
        """The tools the answer may call (tool_choice naming one: that one)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == choice.function.name]
        return list(self.tools or [])

    def prompt(self, tokenizer: Tokenizer) -> list[int]:
        if self.calls_tools:
            return self._prompt_with_tools(tokenizer)
        messages = [{"role": m.role, "content": m.text()} for m in self.messages]
        try:
            return tokenizer.encode_chat(messages)
        except ValueError as e:
            raise ApiError(str(e), "messages") from None

    def check_tools(self, tokenizer: Tokenizer) -> None:
        """Tools need a chat format that has them."""
        if self.tools and tokenizer.tool_calls_id is None:
            raise ApiError(
                f"this model's chat format ({tokenizer.version}) has no tool calls; tools "
                "need a tokenizer of the v3 kind (Mixtral 8x22B's)",
                "tools",
            )

    def _prompt_with_tools(self, tokenizer: Tokenizer) -> list[int]:
        messages = [m.model_dump(exclude_none=True) for m in self.messages]
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        try:
            return tokenizer.encode_chat_openai(messages, tools)
        except ValueError as e:
            raise ApiError(str(e), "messages") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Answer:
    """One choice's text as the engine's outputs arrive: decoded piece by piece, cut at
    the first stop string, and held back while its end might begin one (so a stream
    never sends what a stop string then takes back)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.decoder = tokenizer.stream()
        self.text = ""  # everything decoded
        self.sent = 0  # characters handed out
        self.tokens: list[int] = []
        self.offsets: list[int] = []  # where each token's text starts in `text`
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        self.finish_reason: str | None = None
        self.stopped = False  # a stop string ended it

    def add(self, output: Output) -> str:
        """Takes an output; returns the text that may be sent now."""
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        for i, token in enumerate(output.tokens):
            if self.stopped:
                break
            self.offsets.append(len(self.text))
            self.tokens.append(token)
            if output.logprobs is not None:
                self.logprobs.append(output.logprobs[i])
            self.text += self.decoder.add(token)
            self._cut()
        if output.finished and not self.stopped:
            self.text += self.decoder.flush()
            self._cut()
            self.finish_reason = self.finish_reason or output.finish_reason
        return self._release(output.finished or self.stopped)

    def _cut(self) -> None:
        found = [self.text.find(s) for s in self.stops if s in self.text]
        if found:
            self.text, self.stopped, self.finish_reason = self.text[: min(found)], True, "stop"

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stops:
            # Hold back the longest tail that is the start of a stop string.
            for held in range(min(max(map(len, self.stops)) - 1, end), 0, -1):
                if any(s.startswith(self.text[end - held :]) for s in self.stops):
                    end -= held
                    break
        piece, self.sent = self.text[self.sent : max(end, self.sent)], max(end, self.sent)
        return piece

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def token_entry(tokenizer: Tokenizer, token: int, lp: TokenLogprob) -> dict:
    """A chat logprobs entry: the token, its log-probability, bytes, alternatives."""

    def one(t: int, logprob: float) -> dict:
        text = tokenizer.token_text(t)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**one(token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}


def completion_logprobs(
    tokenizer: Tokenizer,
    tokens: list[int],
    logprobs: list[TokenLogprob],
    offsets: list[int],
) -> dict:
    """The completions API's logprobs object for `tokens` starting at `offsets`."""
    return {
        "tokens": [tokenizer.token_text(t) for t in tokens],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [
            None if lp.logprob is None else {tokenizer.token_text(t): v for t, v in lp.top}
            for lp in logprobs
        ],
        "text_offset": offsets,
    }


def prompt_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Where each prompt token's text starts in the decoded prompt."""
    return [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

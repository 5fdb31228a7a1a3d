"""What a serving client asks of the engine (`Request`) and what it hears back (`Output`).

Plain data, no JAX: the HTTP front builds requests from OpenAI's JSON, the engine
answers with outputs, one or more per step, the last with `finish_reason` set.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from mixtral_jax.inference.grammar import Constraint

# The most alternatives a token's log-probabilities list (OpenAI's chat API allows 20).
MAX_TOP_LOGPROBS = 20
_ids = itertools.count()


class RequestError(ValueError):
    """A request the engine cannot take: `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` requests already: try again later."""


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt to continue. temperature 0 is greedy; top_k 0 / top_p 1 mean no cut;
    `seed` None draws one. `logprobs`: report each generated token's log-probability and
    its `logprobs` most likely alternatives (None: no log-probabilities);
    `prompt_logprobs` likewise for the prompt's tokens (OpenAI's `echo`). A row ends
    after `max_tokens` (0: the prompt's log-probabilities only) or at one of `stop_ids`
    (not included), or when its `constraint` (`grammar.Constraint`: the tokens it may
    draw, e.g. a JSON schema's) says the document is complete. `adapter`: the index of
    the LoRA adapter it applies, among the engine's model's bank (`config.lora_bank`);
    None: the base model. `on_output(output)` hears every output, on the engine's
    thread."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_ids: frozenset[int] = frozenset()
    constraint: Constraint | None = None
    adapter: int | None = None
    on_output: Callable[[Output], None] | None = None
    id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")

    @property
    def kv_namespace(self) -> bytes:
        """What decides the prompt's keys and values besides its tokens (the adapter), for
        the prefix cache: equal prompts share their blocks only within one namespace."""
        return b"" if self.adapter is None else f"adapter {self.adapter}".encode()

    def check(self, vocab_size: int, max_len: int, adapters: int = 0) -> None:
        """Raises RequestError naming the field when the request cannot be served by an
        engine of `max_len` whose model has `adapters` in its bank."""
        if self.adapter is not None and not 0 <= self.adapter < adapters:
            raise RequestError(
                f"adapter {self.adapter} is not among this model's {adapters} adapters",
                "model",
            )
        if not self.prompt:
            raise RequestError("the prompt is empty; give at least one token", "prompt")
        bad = next((t for t in self.prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise RequestError(
                f"max_tokens must be a whole number >= 0, got {self.max_tokens!r}", "max_tokens"
            )
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise RequestError(
                "max_tokens 0 generates nothing; it is for the prompt's log-probabilities "
                "(echo with logprobs)",
                "max_tokens",
            )
        if len(self.prompt) >= max_len:
            raise RequestError(
                f"the prompt has {len(self.prompt)} tokens; this server's context is "
                f"{max_len} tokens (--max_len): shorten the prompt",
                "prompt" if self.max_tokens else "max_tokens",
            )
        if len(self.prompt) + self.max_tokens > max_len:
            raise RequestError(
                f"the prompt ({len(self.prompt)} tokens) plus max_tokens={self.max_tokens} "
                f"exceeds this server's context of {max_len} tokens (--max_len); ask for at "
                f"most {max_len - len(self.prompt)} tokens",
                "max_tokens",
            )
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0: no cut), got {self.top_k}", "top_k")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
                raise RequestError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {n}", name)


class TokenLogprob(NamedTuple):
    """A token's log-probability and the most likely alternatives, (id, logprob) best
    first. The first prompt token has none (`logprob` None)."""

    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


class Output(NamedTuple):
    """What one step did for a request: tokens generated since the last output (and
    their log-probabilities when asked), the prompt's log-probabilities (once, with
    the first output, when asked), and the end: `finish_reason` "stop" (a stop id),
    "length" (max_tokens), "cancelled" or "error" (with `error` saying what)."""

    request_id: str
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

"""Structured output, enforced token by token: JSON, with or without a schema, and
calls of given tools in Mistral's format.

    grammars = Grammars(tokenizer, vocab_size)       # once per server
    make = grammars.json(schema)                     # a schema compiled (ValueError if bad)
    make = grammars.tool_calls(tools, "required")    # or: calls of these tools
    constraint = make()                              # one per request: its parser state
    fill_masks([(constraint, row)], masks)           # before a step: the tokens allowed
    constraint.advance(token)                        # after it: the token drawn
    draft, masks = constraint.draft(8, vocab_size)   # or: the tokens it forces, to verify

The grammar engine is llguidance (the Rust parser behind Microsoft's guidance). For
each step it gives a bitmask of the tokens that keep the output a prefix of some valid
document, `[B, ceil(V / 32)]` int32 (bit t % 32 of word t // 32: token t); the step
sets the other tokens' logits to -inf before sampling (`sampling.constrain`), so
constrained and free requests share a step (a free row's words are all ones). Its
wheel needs nothing else; xgrammar, the other well-kept choice, requires torch and
transformers at run time, which this package keeps to its tests.

JSON is written compactly, as `json.dumps` does (`", "` and `": "`, no other
whitespace but one space before it, which a sentencepiece model's first piece carries):
a model cannot then spend its answer on whitespace, and a schema whose strings, numbers
and arrays are bounded always ends within a known number of tokens.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mixtral_jax.model.tokenizer import Tokenizer

# How the JSON compiler writes a document: compact, as json.dumps does.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A schema for `{"type": "json_object"}`: any JSON object.
ANY_OBJECT = {"type": "object"}


def mask_words(vocab_size: int) -> int:
    """int32 words in one row's bitmask."""
    return (vocab_size + 31) // 32


def free_masks(rows: int, vocab_size: int) -> np.ndarray:
    """[rows, W] masks that allow every token."""
    return np.full((rows, mask_words(vocab_size)), -1, np.int32)


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise ValueError(
            "structured output needs the llguidance package: pip install llguidance "
            '(or pip install "mixtral_jax[serve]")'
        ) from None
    return llguidance


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each sentencepiece piece as the bytes it decodes to: `▁` a space, a byte-fallback
    piece `<0xNN>` its byte, a control piece (`<s>`, `[INST]`) its name after 0xFF, which
    llguidance reads as a special token that no text matches."""
    sp = tokenizer.sp
    pieces = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            pieces.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i):
            pieces.append(b"\xff" + piece.encode())
        else:
            pieces.append(piece.replace("\u2581", " ").encode())
    return pieces


class _SentencePiece:
    """What llguidance's TokenizerWrapper reads of a tokenizer: pieces (empty ones for a
    model's logits past them: never allowed), ids of `<s>` and `</s>`, and text to ids.
    The text is encoded as text inside a document, without the space sentencepiece puts
    before a text of its own: as the ids after a newline's, a byte-fallback piece that
    merges with nothing (a prefix that can merge, as `<unk>`'s `>` with `{`, would take
    the text's first piece with it, and llguidance then misreads forced bytes)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.sp = tokenizer.sp
        self.tokens = token_bytes(tokenizer)
        self.tokens += [b""] * (vocab_size - len(self.tokens))
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        self._newline = self.sp.encode("\n")

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self.sp.encode("\n" + text)
        n = len(self._newline)
        return ids[n:] if ids[:n] == self._newline else self.sp.encode(text)


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens drawn."""

    def __init__(self, matcher):
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Takes the token drawn; False if the grammar refuses it (see `error`)."""
        return self.matcher.consume_token(int(token))

    def draft(self, limit: int, vocab_size: int) -> tuple[list[int], np.ndarray | None]:
        """Up to `limit` tokens the grammar forces next (llguidance's fast-forward
        tokens: the forced text as the tokenizer writes it) and the masks [n + 1, W] of
        the tokens allowed at each of their places and after them, to verify as a
        speculative draft (the model may spell the same text in other tokens, or stop
        where a longer token could follow); ([], None) when nothing is forced. The
        state is left as it was."""
        forced = self.matcher.compute_ff_tokens()[:limit] if limit > 0 else []
        forced = forced[: self.matcher.validate_tokens(forced)] if forced else []
        if not forced:
            return [], None
        import llguidance.numpy as lln

        masks = free_masks(len(forced) + 1, vocab_size)
        for j, token in enumerate(forced):
            lln.fill_next_token_bitmask(self.matcher, masks, j)
            self.matcher.consume_token(token)
        lln.fill_next_token_bitmask(self.matcher, masks, len(forced))
        self.matcher.rollback(len(forced))
        return forced, masks

    @property
    def finished(self) -> bool:
        """The document is complete: nothing but the end may follow."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class Grammars:
    """Compiles response formats for one tokenizer and a model's vocabulary of
    `vocab_size` logits (llguidance's tokenizer is built when first needed)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    @functools.cached_property
    def _lltokenizer(self):
        llguidance = _llguidance()
        if self.tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} pieces, more than the "
                f"model's {self.vocab_size} logits: they do not belong together"
            )
        wrapper = llguidance.TokenizerWrapper(_SentencePiece(self.tokenizer, self.vocab_size))
        return llguidance.LLTokenizer(wrapper)

    def json(self, schema: dict[str, Any] | None = None) -> Callable[[], Constraint]:
        """Requests for a JSON document valid under `schema` (None: any JSON object):
        a function that gives each request its own Constraint. Raises ValueError saying
        what is wrong with the schema."""
        schema = ANY_OBJECT if schema is None else schema
        if not isinstance(schema, dict):
            raise ValueError(f"the schema is not a JSON object: {schema!r}")
        # An answer's first piece carries the space sentencepiece puts before a text
        # (`▁{`, as the instruct format encodes answers): one space may open it.
        document = json.dumps({**schema, "x-guidance": JSON_OPTIONS})
        grammar = _llguidance().LLMatcher.grammar_from_lark(f'start: " "? %json {document}\n')
        return self._compiled(grammar, "the schema")

    def tool_calls(
        self, tools: Sequence[dict[str, Any]], mode: str, parallel: bool = True
    ) -> Callable[[], Constraint]:
        """Requests answered in Mistral's tool format: `[TOOL_CALLS]` then a JSON list of
        `{"name": ..., "arguments": {...}}`, each naming one of `tools` (OpenAI's
        functions: `name`, `parameters`) with arguments valid under its parameters (any
        object where it has none); one call unless `parallel`. mode "required": calls;
        "auto": calls or text; "none": text alone. Raises ValueError for a tokenizer
        without the format, or parameters that cannot be enforced."""
        if self.tokenizer.tool_calls_id is None:
            raise ValueError("this tokenizer has no [TOOL_CALLS] piece: no tool format")
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["name"]},
                    "arguments": t.get("parameters") or ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema = {
            "type": "array",
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            "minItems": 1,
            **({} if parallel else {"maxItems": 1}),
            "x-guidance": JSON_OPTIONS,
        }
        # The format writes a space after [TOOL_CALLS] (sentencepiece's, before the JSON).
        body = {"required": "calls", "auto": "calls | text", "none": "text"}[mode]
        grammar = _llguidance().LLMatcher.grammar_from_lark(
            f"start: {body}\n"
            f'calls: <[{self.tokenizer.tool_calls_id}]> " "? %json {json.dumps(schema)}\n'
            "text: (/(.|\\n)+/)+\n"
        )
        return self._compiled(grammar, "the tools' parameters")

    def _compiled(self, grammar: str, what: str) -> Callable[[], Constraint]:
        llguidance = _llguidance()
        error = llguidance.LLMatcher.validate_grammar(grammar, self._lltokenizer)
        if error:  # without the listing of the grammar that follows the reason
            reason = re.split(r"\n +1 \| ", error)[0]
            raise ValueError(f"{what} cannot be enforced: {reason}")

        def constraint() -> Constraint:
            return Constraint(llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0))

        return constraint


def fill_masks(constrained: Sequence[tuple[Constraint, int]], masks: np.ndarray) -> None:
    """Writes each constraint's mask of allowed tokens into its row of `masks` [R, W]
    (int32, C-contiguous). One row after another: a mask takes about 10 us, and
    llguidance's thread pool (`fill_next_token_bitmask_par`) cost more than that to
    hand rows to, at 2 to 16 rows (docs/serving.md)."""
    if not constrained:
        return
    import llguidance.numpy as lln

    for constraint, row in constrained:
        lln.fill_next_token_bitmask(constraint.matcher, masks, row)

"""Mistral's sentencepiece tokenizers, BOS/EOS handling and the instruct format.

Mixtral's tokenizers are sentencepiece BPE with byte fallback, `<unk>`=0, `<s>`=1,
`</s>`=2. Two instruct formats exist, told apart by the vocabulary:

- v1 (Mixtral 8x7B, 32000 pieces): `[INST]` is plain text, with spaces around the
  content; a system prompt opens the *first* user turn:
  `<s>▁[INST]▁system<0x0A><0x0A>user▁[/INST]▁answer</s>▁[INST]▁...▁[/INST]`
- v3 (Mixtral 8x22B, 32768 pieces): `[INST]`=3 and `[/INST]`=4 are control pieces,
  no spaces; a system prompt opens the *last* user turn:
  `<s>[INST]▁user[/INST]▁answer</s>[INST]▁system<0x0A><0x0A>user[/INST]`

Consecutive user (or assistant) messages, and all system messages, are joined with a
blank line. Conversations are encoded by Mistral's own library, `mistral-common`
(the authors' reference, `MistralTokenizer.encode_chat_completion`), message by
message. On Python 3.10, which mistral-common does not support, a transcription of
the same rules does it; the tests check both against mistral-common.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROLES = ("system", "user", "assistant")
# The official tokenizers that the mistral-common package ships (in mistral_common/data/).
OFFICIAL = {
    "mistral-v1": "tokenizer.model.v1",  # Mixtral 8x7B
    "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3",  # Mixtral 8x22B
}
OFFICIAL_BY_VOCAB = {32000: "mistral-v1", 32768: "mistral-v3"}


def has_mistral_common() -> bool:
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        return False
    return True


def official_path(name: str) -> Path:
    """The file of an official tokenizer, "mistral-v1" or "mistral-v3"."""
    if name not in OFFICIAL:
        raise ValueError(f"unknown tokenizer {name!r}; the official ones are {sorted(OFFICIAL)}")
    if not has_mistral_common():
        raise ValueError(
            f"the {name} tokenizer comes from the mistral-common package, which is not "
            "installed (it needs Python 3.11 or newer): pip install mistral-common"
        )
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / OFFICIAL[name]


class Tokenizer:
    """A sentencepiece model with Mistral's conventions and instruct format
    (`version` "v1" or "v3": detected from the model, see the module docstring)."""

    def __init__(self, processor, version: str | None = None, path: str | Path | None = None):
        self.sp = processor
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        self.vocab_size = processor.get_piece_size()
        inst = processor.piece_to_id("[INST]")
        control = inst != processor.unk_id() and processor.is_control(inst)
        self.version = version or ("v3" if control else "v1")
        self.path = Path(path) if path else None
        self._reference = None  # mistral-common's encoders, built when first needed

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; give a sentencepiece .model file")
        return cls(sentencepiece.SentencePieceProcessor(model_file=str(path)), path=path)

    @classmethod
    def official(cls, name: str) -> Tokenizer:
        """Mixtral's own tokenizer from mistral-common: "mistral-v1" or "mistral-v3"."""
        return cls.from_file(official_path(name))

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """sentencepiece's ids, with `<s>` before and `</s>` after when asked."""
        ids = list(self.sp.encode(text))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; `<s>`, `</s>` and other control pieces are dropped."""
        return self.sp.decode([int(i) for i in ids])

    def token_text(self, token: int) -> str:
        """One token's text alone, as log-probabilities name it: its piece with `▁` as a
        space; a byte piece (`<0x0A>`) as that byte's character where it is one alone."""
        token = int(token)
        if self.sp.is_byte(token):
            byte = int(self.sp.id_to_piece(token)[3:5], 16)
            return chr(byte) if byte < 0x80 else self.sp.id_to_piece(token)
        if self.sp.is_control(token):
            return self.sp.id_to_piece(token)
        return self.sp.id_to_piece(token).replace("\u2581", " ")

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, train: bool = False):
        """The instruct encoding of a conversation, a list of {"role": "system" |
        "user" | "assistant", "content": str}.

        train=False: the conversation ends with a user turn; returns the ids of the
        prompt for the assistant's answer. train=True: it ends with an assistant
        turn; returns (ids, loss_mask), the mask true exactly on every answer's
        tokens and its `</s>`. A conversation Mistral's format refuses raises
        ValueError with the reason.
        """
        check_messages(messages, train=train)
        if has_mistral_common():
            ids, mask = self._mistral_common().encode(messages, train)
        else:
            ids, mask = self._encode_chat(messages)
        return (ids, mask) if train else ids

    def _encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
        """The rules of mistral-common's v1 and v3 instruct encoders, for Python 3.10."""
        system = "\n\n".join(
            m["content"] for m in messages if m["role"] == "system" and m["content"]
        )
        turns: list[list] = []  # [role, content], a run of messages of one role joined
        previous = None
        for m in messages:
            if m["role"] == previous and m["role"] != "system":
                turns[-1][1] += "\n\n" + m["content"]
            elif m["role"] != "system":
                turns.append([m["role"], m["content"]])
            previous = m["role"]
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        with_system = users[0] if self.version == "v1" else users[-1]
        ids, mask = [self.bos_id], [False]
        for i, (role, content) in enumerate(turns):
            if role == "assistant":
                answer = self.encode(content, bos=False, eos=True)
                ids, mask = ids + answer, mask + [True] * len(answer)
                continue
            if system and i == with_system:
                content = f"{system}\n\n{content}"
            if self.version == "v1":
                prompt = self.encode(f"[INST] {content} [/INST]", bos=False)
            else:
                inst, end = self.sp.piece_to_id("[INST]"), self.sp.piece_to_id("[/INST]")
                prompt = [inst, *self.encode(content, bos=False), end]
            ids, mask = ids + prompt, mask + [False] * len(prompt)
        return ids, mask

    @property
    def tool_calls_id(self) -> int | None:
        """The id of `[TOOL_CALLS]`, which opens the model's tool calls (v3 tokenizers);
        None where the format has no tools (v1)."""
        token = self.sp.piece_to_id("[TOOL_CALLS]")
        return token if token != self.sp.unk_id() and self.sp.is_control(token) else None

    def encode_chat_openai(
        self,
        messages: Sequence[Mapping],
        tools: Sequence[Mapping] | None = None,
    ) -> list[int]:
        """The prompt for the assistant's answer to a conversation in OpenAI's format
        (assistant `tool_calls`, `role: "tool"` results) with OpenAI's `tools`, as
        mistral-common encodes it (`ChatCompletionRequest.from_openai`): the tools
        before the last user message, calls and results in their control pieces (a
        `tool_choice` changes nothing in the v3 prompt: it is the grammar's). A
        conversation Mistral's format refuses raises ValueError with the reason."""
        if not has_mistral_common():
            raise ValueError(
                "tools and tool messages are encoded by mistral-common, which is not "
                "installed (it needs Python 3.11 or newer): pip install mistral-common"
            )
        return self._mistral_common().encode_openai(messages, tools)

    def parse_tool_calls(self, ids: Sequence[int]) -> list[dict] | None:
        """The tool calls of an answer that opens with `[TOOL_CALLS]`, in OpenAI's format
        (`{"id", "type": "function", "function": {"name", "arguments": JSON text}}`),
        read by mistral-common's decoder; None for an answer that calls nothing.
        Raises ValueError when the calls do not parse."""
        if not ids or self.tool_calls_id is None or ids[0] != self.tool_calls_id:
            return None
        return self._mistral_common().parse_tool_calls(list(ids), self.tool_calls_id)

    def _mistral_common(self) -> _MistralCommon:
        """mistral-common's encoders for this tokenizer, built when first needed."""
        if self._reference is None:
            self._reference = _MistralCommon(self)
        return self._reference

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def check_messages(messages: Sequence[Mapping[str, str]], *, train: bool) -> None:
    """The conversations Mistral's format refuses, as ValueErrors that say why."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, Mapping)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}"
            )
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles:
        raise ValueError("a chat needs a user message, not only system messages")
    if roles[0] != "user":
        raise ValueError("the first message (after system messages) must be from the user")
    if train and roles[-1] != "assistant":
        raise ValueError("a training conversation must end with an assistant message")
    if not train and roles[-1] != "user":
        raise ValueError("the last message must be from the user (the assistant answers it)")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"]:
            raise ValueError(f"message {i}: an assistant message needs content")
        if m["role"] == "system" and i and messages[i - 1]["role"] == "assistant":
            raise ValueError(f"message {i}: a system message cannot follow an assistant message")


class _MistralCommon:
    """mistral-common's encoders for this tokenizer's file and version: the test
    mode for generation requests, the fine-tuning mode for training conversations."""

    def __init__(self, tokenizer: Tokenizer):
        from mistral_common.protocol.instruct.normalize import get_normalizer
        from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
        from mistral_common.tokens.tokenizers.base import TokenizerVersion
        from mistral_common.tokens.tokenizers.instruct import (
            InstructTokenizerV1,
            InstructTokenizerV3,
        )
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

        version = TokenizerVersion(tokenizer.version)
        instruct = {"v1": InstructTokenizerV1, "v3": InstructTokenizerV3}[tokenizer.version]
        if tokenizer.path is not None:
            spm = SentencePieceTokenizer(tokenizer.path, tokenizer_version=version)
        else:  # built from a processor: mistral-common reads a file, once
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "tokenizer.model"
                path.write_bytes(tokenizer.sp.serialized_model_proto())
                spm = SentencePieceTokenizer(path, tokenizer_version=version)
        self.modes = {
            train: MistralTokenizer(
                instruct(spm),
                validator=get_validator(version, mode=mode),
                request_normalizer=get_normalizer(version, spm.model_settings_builder),
            )
            for train, mode in ((False, ValidationMode.test), (True, ValidationMode.finetuning))
        }

    def encode(self, messages, train: bool) -> tuple[list[int], list[bool]]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import (
            AssistantMessage,
            SystemMessage,
            UserMessage,
        )
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        request = ChatCompletionRequest(
            messages=[kinds[m["role"]](content=m["content"]) for m in messages]
        )
        mistral = self.modes[train]
        answers: list[list[int]] = []  # each answer's ids, as the encoder makes them
        encoder = mistral.instruct_tokenizer
        encode_answer = encoder.encode_assistant_message

        def recorded(*args, **kwargs):
            answers.append(encode_answer(*args, **kwargs))
            return answers[-1]

        encoder.encode_assistant_message = recorded
        try:
            ids = mistral.encode_chat_completion(request).tokens
        except (MistralCommonException, AssertionError) as e:
            raise ValueError(f"Mistral's format refuses this conversation: {e}") from None
        finally:
            del encoder.encode_assistant_message
        return ids, _answer_mask(ids, answers)

    def encode_openai(self, messages, tools) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(
                messages=[dict(m) for m in messages],
                tools=None if tools is None else [dict(t) for t in tools],
            )
            return self.modes[False].encode_chat_completion(request).tokens
        except (MistralCommonException, AssertionError, ValueError) as e:
            raise ValueError(f"Mistral's format refuses this conversation: {e}") from None

    def parse_tool_calls(self, ids: list[int], tool_calls_id: int) -> list[dict]:
        # mistral-common's own decoder of generated calls, the one its reference server
        # (mistral_common.experimental.app) uses.
        from mistral_common.experimental.tools import (
            _decode_tool_calls,
            _split_content_and_tool_calls,
        )

        eos = self.modes[False].instruct_tokenizer.tokenizer.eos_id
        _, calls = _split_content_and_tool_calls([t for t in ids if t != eos], tool_calls_id)
        try:
            decoded = _decode_tool_calls(calls, self.modes[False].instruct_tokenizer.tokenizer)
        except ValueError as e:
            raise ValueError(f"the tool calls do not parse: {e}") from None
        return [call.to_openai() for call in decoded]


def _answer_mask(ids: list[int], answers: list[list[int]]) -> list[bool]:
    """True on the answers, found in order in `ids` (each ends with `</s>`)."""
    mask, start = [False] * len(ids), 0
    for answer in answers:
        for i in range(start, len(ids) - len(answer) + 1):
            if ids[i : i + len(answer)] == answer:
                mask[i : i + len(answer)] = [True] * len(answer)
                start = i + len(answer)
                break
        else:
            raise AssertionError("an answer is missing from mistral-common's encoding")
    return mask


class StreamDecoder:
    """Turns ids, one at a time, into text pieces, holding back an incomplete UTF-8
    character (byte-fallback pieces) until its last byte arrives. The pieces, then
    `flush()`, concatenate to the decoded text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters already returned
        self.held = 0  # ids since the last piece

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        self.held += 1
        text = self.tokenizer.decode(self.ids)
        # A UTF-8 character has at most 4 bytes: after 4 held ids it will not complete.
        if text.endswith("\ufffd") and self.held < 4:
            return ""
        piece, self.sent, self.held = text[self.sent :], len(text), 0
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent :], len(text)
        return piece

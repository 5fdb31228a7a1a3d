"""Mistral's sentencepiece tokenizer, its BOS/EOS handling and the instruct format.

Mixtral 8x7B's tokenizer is sentencepiece BPE with byte fallback: `<unk>`=0,
`<s>`=1, `</s>`=2, and `[INST]`/`[/INST]` as plain text. A conversation is
encoded segment by segment, as Mistral's own library does (encoding the rendered
string in one go can split differently):

    <s> [INST] user [/INST] answer</s> [INST] user [/INST]

a system message joins the first user message, separated by a blank line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROLES = ("system", "user", "assistant")


class Tokenizer:
    """A sentencepiece model with Mistral's conventions."""

    def __init__(self, processor):
        self.sp = processor
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        self.vocab_size = processor.get_piece_size()

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; give a sentencepiece .model file")
        return cls(sentencepiece.SentencePieceProcessor(model_file=str(path)))

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """sentencepiece's ids, with `<s>` before and `</s>` after when asked."""
        ids = list(self.sp.encode(text))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; `<s>`, `</s>` and other control pieces are dropped."""
        return self.sp.decode([int(i) for i in ids])

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, train: bool = False):
        """The Mixtral-Instruct encoding of a conversation.

        train=False: the conversation ends with a user turn; returns the ids of the
        prompt for the assistant's answer. train=True: it ends with an assistant
        turn; returns (ids, loss_mask), the mask true exactly on every answer's
        tokens and its `</s>`.
        """
        turns = chat_turns(messages, train=train)
        ids, mask = [self.bos_id], [False]
        for user, answer in turns:
            prompt = self.encode(f"[INST] {user} [/INST]", bos=False)
            ids += prompt
            mask += [False] * len(prompt)
            if answer is not None:
                reply = self.encode(answer, bos=False, eos=True)
                ids += reply
                mask += [True] * len(reply)
        return (ids, mask) if train else ids

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def chat_turns(
    messages: Sequence[Mapping[str, str]], *, train: bool = False
) -> list[tuple[str, str | None]]:
    """(user text, assistant answer or None) pairs. For generation the last has no
    answer; for training (`train=True`) every turn has one."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    system, turns, user = [], [], []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(
                f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}"
            )
        if role == "system":
            system.append(content)
        elif role == "user":
            user.append(content)
        else:
            if not user:
                raise ValueError(f"message {i}: an assistant message must follow a user message")
            turns.append(["\n\n".join(user), content])
            user = []
    if train:
        if user or not turns:
            raise ValueError("a training conversation must end with an assistant message")
    elif not user:
        raise ValueError("the last message must be from the user (the assistant answers it)")
    else:
        turns.append(["\n\n".join(user), None])
    if system:
        turns[0][0] = "\n\n".join([*system, turns[0][0]])
    return [tuple(t) for t in turns]


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

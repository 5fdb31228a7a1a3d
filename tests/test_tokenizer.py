"""The tokenizer wrapper: ids as sentencepiece's, round trips, streaming, chat format."""

from __future__ import annotations

import pytest

from mixtral_jax.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "Über Wolken: élève, 東京",
    "emoji 🙂🦊 and tabs\tand\nnewlines",
    "  two spaces",
]


@pytest.fixture(scope="module")
def tokenizer(sp_model) -> Tokenizer:
    return Tokenizer.from_file(sp_model)


def test_ids_are_sentencepieces_with_bos_and_eos_as_asked(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    ids = list(tokenizer.sp.encode("Hello world"))
    assert tokenizer.encode("Hello world") == [1, *ids]
    assert tokenizer.encode("Hello world", bos=False, eos=True) == [*ids, 2]


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert 0 not in ids  # byte fallback: nothing becomes <unk>


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_splits_a_character(tokenizer, text):
    stream = tokenizer.stream()
    pieces = [stream.add(i) for i in tokenizer.encode(text, bos=False)]
    pieces.append(stream.flush())
    assert "".join(pieces) == tokenizer.decode(tokenizer.encode(text))
    assert not any("\ufffd" in p for p in pieces)


def test_emoji_spelled_in_bytes_waits_for_its_last_byte(tokenizer):
    ids = tokenizer.encode("🦊", bos=False)  # not in the training text
    byte_ids = [i for i in ids if tokenizer.sp.id_to_piece(i).startswith("<0x")]
    assert len(byte_ids) == 4  # not in the vocabulary: four UTF-8 bytes
    stream = tokenizer.stream()
    pieces = [stream.add(i) for i in ids]
    assert pieces[-1].endswith("🦊") and not any(pieces[-4:-1])


def test_chat_format_is_mistral_instruct_v1(tokenizer):
    def enc(text, **kw):
        return tokenizer.encode(text, bos=False, **kw)

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fox."},
        {"role": "user", "content": "A quick one."},
    ]
    # <s>[INST] system\n\nuser [/INST] answer</s>[INST] user\n\nuser [/INST]
    expected = [1, *enc("[INST] Be brief.\n\nHi [/INST]"), *enc("Hello!", eos=True)]
    expected += enc("[INST] Name a fox.\n\nA quick one. [/INST]")
    assert tokenizer.encode_chat(messages) == expected
    assert tokenizer.decode(expected) == (
        "[INST] Be brief.\n\nHi [/INST] Hello! [INST] Name a fox.\n\nA quick one. [/INST]"
    )


@pytest.mark.parametrize(
    "messages,message",
    [
        ([], "at least one message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}], "must follow"),
        ([{"role": "bot", "content": "a"}], "message 0 must be"),
        ([{"role": "user", "content": 3}], "message 0 must be"),
    ],
)
def test_bad_conversations_are_named(tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.encode_chat(messages)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")


def test_training_conversations_end_with_an_answer(tokenizer):
    with pytest.raises(ValueError, match="must end with an assistant message"):
        tokenizer.encode_chat([{"role": "user", "content": "a"}], train=True)
    ids, mask = tokenizer.encode_chat(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], train=True
    )
    assert ids[: len(mask) - sum(mask)] == tokenizer.encode_chat([{"role": "user", "content": "a"}])
    assert [i for i, m in zip(ids, mask, strict=True) if m] == tokenizer.encode(
        "b", bos=False, eos=True
    )

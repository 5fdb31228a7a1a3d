"""The tokenizer wrapper: ids as sentencepiece's, round trips, streaming, chat format."""

from __future__ import annotations

import json

import pytest

from mixtral_jax.model.tokenizer import Tokenizer

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
        (
            [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}],
            "first message",
        ),
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


# --- The official tokenizers, token for token with mistral-common ----------------------

OFFICIAL_TEXTS = [
    "Hello world",
    "  two leading spaces",
    "tabs\tand\nnewlines\n\n  indented",
    "Привет, мир. 東京は日本の首都です。 مرحبا",
    "emoji 🙂🦊🚀",
    "",
]
S, U, A = "system", "user", "assistant"
GENERATION = [
    [(U, "Hi")],
    [(S, "Be brief."), (U, "Hi")],
    [(U, "Hi"), (A, "Hello!"), (U, "Name a fox.")],
    [(S, "Be brief."), (U, "a"), (A, "b"), (U, "c"), (A, "d"), (U, "e")],
    [(U, "Name a fox."), (U, "A quick one.")],
    [(S, "one"), (S, "two"), (U, "x")],
    [(U, "x"), (A, "a"), (A, "b"), (U, "y")],
    [(U, "x"), (S, "late system prompt"), (U, "y")],
    [(U, "   ")],
    [(U, "line one\nline two\n\n    indented\ttab  ")],
    [(U, "[INST] not a control token [/INST] </s> <s>")],
    [(U, "Über 東京 🙂"), (A, "🦊"), (U, "  spaces around  ")],
]
TRAINING = [
    [(U, "Hi"), (A, "Hello!")],
    [(S, "Be brief."), (U, "Hi"), (A, "Hello!")],
    [(U, "a"), (A, "b"), (U, "c"), (A, "d")],
    [(U, "a"), (U, "b"), (A, "c")],
    [(S, "s"), (U, "q"), (A, "def f():\n\treturn 1\n"), (U, "more"), (A, "🙂 done")],
    [(U, "[/INST]"), (A, "</s> looks like the end")],
]
REFUSED = [  # (turns, train, whether mistral-common refuses it too)
    ([], False, True),
    ([(U, "x"), (A, "a")], False, True),  # a generation request must end with the user
    ([(U, "x")], True, True),  # a training conversation must end with an answer
    ([(U, "x"), (A, "a"), (S, "system after an answer"), (U, "y")], False, True),
    # mistral-common's test mode puts an empty user turn before these; we refuse them.
    ([(A, "first"), (U, "x")], False, False),
    ([(S, "only a system prompt")], False, False),
]


def as_messages(turns):
    return [{"role": role, "content": content} for role, content in turns]


@pytest.fixture(scope="module", params=["mistral-v1", "mistral-v3"])
def official(request):
    """(our tokenizer, mistral-common's own MistralTokenizer per mode) for one version."""
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mixtral_jax.model.tokenizer import official_path

    path = official_path(request.param)
    reference = {
        train: MistralTokenizer.from_file(str(path), mode=mode)
        for train, mode in ((False, ValidationMode.test), (True, ValidationMode.finetuning))
    }
    return Tokenizer.official(request.param), reference


def reference_ids(reference, turns) -> list[int]:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {S: SystemMessage, U: UserMessage, A: AssistantMessage}
    messages = [kinds[role](content=content) for role, content in turns]
    return reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def test_official_tokenizers_are_mixtrals(official):
    tokenizer, _ = official
    expected = {"v1": 32000, "v3": 32768}[tokenizer.version]
    assert tokenizer.vocab_size == expected
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    if tokenizer.version == "v3":
        assert tokenizer.sp.piece_to_id("[INST]") == 3 and tokenizer.sp.piece_to_id("[/INST]") == 4


@pytest.mark.parametrize("text", OFFICIAL_TEXTS)
def test_plain_text_matches_mistral_common(official, text):
    tokenizer, reference = official
    raw = reference[False].instruct_tokenizer.tokenizer
    for bos, eos in ((True, False), (False, True), (False, False)):
        assert tokenizer.encode(text, bos=bos, eos=eos) == raw.encode(text, bos=bos, eos=eos)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == raw.decode(ids) == text
    stream = tokenizer.stream()
    assert "".join(stream.add(i) for i in ids) + stream.flush() == text


@pytest.mark.parametrize("turns", GENERATION, ids=lambda t: "-".join(r for r, _ in t))
def test_generation_prompts_match_mistral_common(official, turns):
    tokenizer, reference = official
    expected = reference_ids(reference[False], turns)
    assert tokenizer.encode_chat(as_messages(turns)) == expected
    assert tokenizer._encode_chat(as_messages(turns))[0] == expected  # Python 3.10's path


@pytest.mark.parametrize("turns", TRAINING, ids=lambda t: "-".join(r for r, _ in t))
def test_training_conversations_and_loss_masks_match_mistral_common(official, turns):
    tokenizer, reference = official
    ids, mask = tokenizer.encode_chat(as_messages(turns), train=True)
    assert ids == reference_ids(reference[True], turns)
    assert tokenizer._encode_chat(as_messages(turns)) == (ids, mask)
    # The mask covers exactly each answer (consecutive answers joined) and its </s>.
    answers, current = [], []
    for token, on in zip(ids, mask, strict=True):
        if on:
            current.append(token)
        elif current:
            answers.append(current)
            current = []
    answers.append(current)
    expected = [content for role, content in turns if role == A]
    assert [a[-1] for a in answers] == [tokenizer.eos_id] * len(expected)
    assert [tokenizer.decode(a) for a in answers] == [c.strip(" ") for c in expected]


@pytest.mark.parametrize("turns, train, refused_by_reference", REFUSED)
def test_refused_conversations_raise_value_error(official, turns, train, refused_by_reference):
    tokenizer, reference = official
    with pytest.raises(ValueError):
        tokenizer.encode_chat(as_messages(turns), train=train)
    if refused_by_reference:
        with pytest.raises(Exception):  # noqa: B017 - whichever error mistral-common raises
            reference_ids(reference[train], turns)


def test_emoji_in_byte_pieces_streams_whole(official):
    tokenizer, _ = official
    ids = tokenizer.encode("fox 🦊", bos=False)
    assert sum(tokenizer.sp.id_to_piece(i).startswith("<0x") for i in ids) == 4
    stream = tokenizer.stream()
    pieces = [stream.add(i) for i in ids]
    assert pieces.count("🦊") + sum("🦊" in p for p in pieces if p != "🦊") == 1
    assert not any(pieces[-4:-1]) and pieces[-1].endswith("🦊")


def test_converted_checkpoint_without_tokenizer_gets_the_official_one(tmp_path, capsys):
    pytest.importorskip("mistral_common")
    from flax import nnx

    from configs import tiny
    from mixtral_jax import Mixtral, ModelConfig
    from mixtral_jax.checkpoints.load import load_tokenizer
    from mixtral_jax.checkpoints.store import CONFIG_FILE, save
    from mixtral_jax.params import flat_params

    config = ModelConfig.from_dict(tiny.get_config()).replace(vocab_size=32000)
    model = Mixtral(config, rngs=nnx.Rngs(0))
    save(tmp_path / "v1", flat_params(model), config)  # as tools/convert.py does
    tokenizer = load_tokenizer(tmp_path / "v1")
    assert (tokenizer.version, tokenizer.vocab_size) == ("v1", 32000)
    assert "official mistral-v1 tokenizer" in capsys.readouterr().err
    # 8x22B's vocabulary: the choice reads only the config.
    meta = json.loads((tmp_path / "v1" / CONFIG_FILE).read_text())
    meta["config"]["vocab_size"] = 32768
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / CONFIG_FILE).write_text(json.dumps(meta))
    tokenizer = load_tokenizer(tmp_path / "v3")
    assert (tokenizer.version, tokenizer.vocab_size) == ("v3", 32768)
    assert "official mistral-v3 tokenizer" in capsys.readouterr().err
    assert load_tokenizer("mistral-v3").vocab_size == 32768


def test_checkpoint_of_another_vocabulary_without_tokenizer_is_an_error(tmp_path):
    from configs import tiny
    from mixtral_jax import ModelConfig
    from mixtral_jax.checkpoints.load import load_tokenizer
    from mixtral_jax.checkpoints.store import CONFIG_FILE, FORMAT, CheckpointError

    config = ModelConfig.from_dict(tiny.get_config())
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({"format": FORMAT, "dtype": "float32", "config": config.to_dict()})
    )
    with pytest.raises(CheckpointError, match="not one of Mixtral's"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        Tokenizer.official("mistral-v9")

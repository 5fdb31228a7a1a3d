"""Training data: records, loss masks, packing that keeps documents apart, batches."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.model.tokenizer import Tokenizer
from mixtral_jax.training.data import DataError, Example, batches, pack, read_records, tokenize


def example(ids, mask=None) -> Example:
    ids = np.asarray(ids, np.int32)
    mask = np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)
    return Example(ids, mask)


def test_rows_hold_inputs_next_token_targets_and_weights():
    rows = list(pack([example([1, 10, 11, 2]), example([1, 20, 21, 22, 2], [0, 0, 1, 1, 1])], 8))
    assert len(rows) == 1
    row = rows[0]
    np.testing.assert_array_equal(row["tokens"], [1, 10, 11, 1, 20, 21, 22, 0])
    np.testing.assert_array_equal(row["targets"], [10, 11, 2, 20, 21, 22, 2, 0])
    np.testing.assert_array_equal(row["weights"], [1, 1, 1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 0])


def test_documents_that_do_not_fit_start_a_row_and_long_ones_are_cut():
    rows = list(pack([example(range(1, 5)), example(range(1, 13))], 5))
    # [1..4] -> 3 inputs; [1..12] -> 11 inputs: pieces of 5, 5, 1.
    assert [r["segment_ids"].tolist() for r in rows] == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    assert rows[2]["positions"].tolist() == [0, 1, 2, 3, 4]


def test_packed_documents_do_not_see_each_other():
    """A packed row's logits equal each document's logits alone."""
    config = ModelConfig.from_dict(tiny.get_config())
    model = Mixtral(config, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, config.vocab_size, n) for n in (9, 5, 12)]
    (row,) = pack([example(d) for d in docs], 32)
    packed = model(
        jnp.asarray(row["tokens"][None]),
        jnp.asarray(row["positions"][None]),
        jnp.asarray(row["segment_ids"][None]),
    )[0]
    start = 0
    for doc in docs:
        alone = model(jnp.asarray(doc[None, :-1]))[0]
        np.testing.assert_allclose(packed[start : start + len(doc) - 1], alone, atol=1e-5)
        start += len(doc) - 1


def test_text_and_chat_records_are_masked(tmp_path, sp_model):
    tokenizer = Tokenizer.from_file(sp_model)
    text = tokenize({"text": "The quick brown fox"}, tokenizer)
    assert (
        text.ids[0] == 1
        and text.ids[-1] == 2
        and text.loss_mask.tolist() == [False] + [True] * (len(text.ids) - 1)
    )
    chat = tokenize(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "Fox"},
            ]
        },
        tokenizer,
    )
    trained = [tokenizer.decode(chat.ids[chat.loss_mask]).strip()]
    answers = tokenizer.encode("Hello", bos=False, eos=True) + tokenizer.encode(
        "Fox", bos=False, eos=True
    )
    assert chat.ids[chat.loss_mask].tolist() == answers
    assert trained == ["Hello Fox"]


def test_batches_are_deterministic_per_seed_and_split_by_host():
    examples = [example(np.arange(1, n + 3)) for n in range(1, 40)]
    kwargs = dict(seq_len=16, batch_size=4)
    a = list(batches(examples, seed=0, **kwargs))
    b = list(batches(examples, seed=0, **kwargs))
    c = list(batches(examples, seed=1, **kwargs))
    assert len(a) > 2 and all(x["tokens"].shape == (4, 16) for x in a)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c, strict=False))
    halves = [list(batches(examples, seed=0, rows=r, **kwargs)) for r in (slice(0, 2), slice(2, 4))]
    for whole, first, second in zip(a, *halves, strict=True):
        np.testing.assert_array_equal(
            whole["tokens"], np.concatenate([first["tokens"], second["tokens"]])
        )


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", "  \n", "the file is empty"),
        ("bad.jsonl", '{"text": "a"}\n{"text": ', r"bad.jsonl:2: invalid JSON"),
        ("norecord.jsonl", '{"body": "a"}\n', r'norecord.jsonl:1: a record needs "text"'),
        ("binary.txt", b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_records([path])


def test_records_from_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one document\nover two lines")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "x"}) + "\n\n" + json.dumps({"messages": []}) + "\n"
    )
    records = read_records([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert records == [{"text": "one document\nover two lines"}, {"text": "x"}, {"messages": []}]

"""Training data: documents -> token ids with loss masks -> packed fixed-length rows.

Sources are plain text files (one document per file) and JSONL files whose
records are `{"text": ...}` or `{"messages": [...]}` (a chat, rendered in the
instruct format with the loss only on the assistant's answers).

Packing puts several documents in one row of T tokens. Each document is its
own segment (`segment_ids` 1, 2, ...; 0 is padding) with positions restarting
at 0, so packed documents never attend to each other and the model sees each
as if it were alone. A row holds, per position t: the input token, its target
(the next token of the same document) and the target's loss weight (0 on
padding, prompts and a document's last token). A document longer than T is cut
into pieces of T tokens, each a document of its own.

Batches are deterministic in (seed, epoch): the documents are shuffled with a
seeded generator, so a restarted run that skips the steps it has done sees
the same batches. With several hosts each yields only its rows of the global
batch (`distributed.host_rows`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mixtral_jax.model.tokenizer import Tokenizer


class DataError(ValueError):
    """Training data that cannot be read, named with its file and line."""


class Example(NamedTuple):
    ids: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] bool: whether token i is trained on as a target


def read_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every record of the files: {"text": ...} or {"messages": [...]}."""
    records = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        if path.suffix != ".jsonl":
            records.append({"text": text})
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not (
                isinstance(record.get("text"), str) or isinstance(record.get("messages"), list)
            ):
                raise DataError(
                    f'{path}:{number}: a record needs "text" (a string) or "messages" (a list)'
                )
            records.append(record)
    return records


def tokenize(record: dict[str, Any], tokenizer: Tokenizer) -> Example:
    """Text: `<s>` text `</s>`, trained on every token after `<s>`. Messages: the chat
    in the instruct format, trained on the assistant's answers and their `</s>`."""
    if "messages" in record:
        ids, mask = tokenizer.encode_chat(record["messages"], train=True)
    else:
        ids = tokenizer.encode(record["text"], bos=True, eos=True)
        mask = [False] + [True] * (len(ids) - 1)
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def pack(examples: Iterable[Example], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of `seq_len` tokens: tokens, targets, weights, positions, segment_ids [T]."""
    row = _empty_row(seq_len)
    used, segment = 0, 0
    for example in examples:
        inputs, targets = example.ids[:-1], example.ids[1:]
        weights = example.loss_mask[1:].astype(np.float32)
        for start in range(0, len(inputs), seq_len):
            n = min(seq_len, len(inputs) - start)
            if used + n > seq_len:
                yield row
                row, used, segment = _empty_row(seq_len), 0, 0
            segment += 1
            piece = slice(start, start + n)
            span = slice(used, used + n)
            row["tokens"][span] = inputs[piece]
            row["targets"][span] = targets[piece]
            row["weights"][span] = weights[piece]
            row["positions"][span] = np.arange(n)
            row["segment_ids"][span] = segment
            used += n
    if used:
        yield row


def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
        "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
    }


def batches(
    examples: Sequence[Example],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    rows: slice | None = None,
    shuffle: bool = True,
    keep_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Global batches of `batch_size` packed rows [B, T] for one epoch, documents
    shuffled by (seed, epoch); `rows` keeps only this host's rows of each batch.
    A last, incomplete batch is dropped, or with `keep_last` filled with empty
    rows (weight 0), as evaluation wants."""
    if not examples:
        raise DataError("no documents to train on")
    order = np.arange(len(examples))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    packed = pack((examples[i] for i in order), seq_len)
    while True:
        group = list(itertools.islice(packed, batch_size))
        if not group or (len(group) < batch_size and not keep_last):
            return
        group += [_empty_row(seq_len) for _ in range(batch_size - len(group))]
        group = group[rows] if rows is not None else group
        yield {key: np.stack([row[key] for row in group]) for key in group[0]}

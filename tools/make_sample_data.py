"""Writes the bundled tokenizer and sample training data, from the Python standard library.

    python tools/make_sample_data.py        # rewrites mixtral_jax/assets/

The corpus exists on every machine with no download: the docstrings of the
standard library's modules, classes and functions, read from the running
interpreter. It gives

- `tokenizer.model`: sentencepiece BPE like Mixtral's (byte fallback, `▁` word
  prefix, whitespace kept, `<unk>`=0, `<s>`=1, `</s>`=2), 4096 pieces;
- `sample/train.jsonl`, `sample/eval.jsonl`: `{"text": docstring}` records and
  `{"messages": [...]}` chats ("What does json.dumps do?" -> its summary line),
  split by module so that the evaluation modules are never trained on.

The modules, their order and the seeds are fixed; a different Python version
can find other docstrings, so the committed files are the reference.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "mixtral_jax" / "assets"
TRAIN_MODULES = (
    *("argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal"),
    *("difflib", "enum", "fractions", "functools", "heapq", "itertools", "logging", "math"),
    *("operator", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics"),
    *("string", "struct", "subprocess", "tempfile", "textwrap", "threading", "typing"),
    *("unittest", "zipfile"),
)
EVAL_MODULES = ("json", "bisect", "glob", "copy", "calendar")
VOCAB_SIZE = 4096


def docstrings(module_name: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a module, its public classes and functions."""
    module = importlib.import_module(module_name)
    found = [(module_name, inspect.getdoc(module))]
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            found.append((f"{module_name}.{name}", inspect.getdoc(value)))
            if inspect.isclass(value):
                for attr, member in sorted(vars(value).items()):
                    if not attr.startswith("_") and inspect.isfunction(member):
                        found.append((f"{module_name}.{name}.{attr}", inspect.getdoc(member)))
    return [(name, doc.strip()) for name, doc in found if doc and len(doc.strip()) > 40]


def records(modules: tuple[str, ...] | list[str], seed: int) -> list[dict]:
    out = []
    for module in modules:
        for name, doc in docstrings(module):
            out.append({"text": f"{name}\n\n{doc}"})
            summary = doc.split("\n\n")[0].replace("\n", " ")
            question = f"What does `{name}` do?"
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": summary},
                    ]
                }
            )
    random.Random(seed).shuffle(out)
    return out


def train_tokenizer(texts: list[str], path: Path) -> None:
    import sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(texts), encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tokenizer"),
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",  # whitespace is kept, as in Mistral's
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((Path(tmp) / "tokenizer.model").read_bytes())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    train, held_out = records(TRAIN_MODULES, seed=0), records(EVAL_MODULES, seed=1)
    texts = [r["text"] for r in train if "text" in r]
    train_tokenizer(texts, args.out / "tokenizer.model")
    write_jsonl(args.out / "sample" / "train.jsonl", train)
    write_jsonl(args.out / "sample" / "eval.jsonl", held_out)
    print(f"{len(train)} training and {len(held_out)} held-out records in {args.out}")


if __name__ == "__main__":
    main()

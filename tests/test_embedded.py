"""The embedded model (mixtral_jax/assets/model, tools/train_embedded.py): it loads,
generates deterministically, is the CLI's default, and reaches the held-out
perplexity that its training recorded, recomputed here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import mixtral_jax
from mixtral_jax.checkpoints.load import EMBEDDED
from mixtral_jax.training import evaluate

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "mixtral_jax" / "assets" / "sample"
HELD_OUT = {"code": "eval_code.jsonl", "docstrings": "eval.jsonl"}


@pytest.fixture(scope="module")
def model(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


def test_is_a_small_mixtral_with_its_tokenizer(model, tokenizer):
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok) == (8, 2)
    assert c.vocab_size == tokenizer.vocab_size == 4096
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    size = sum(f.stat().st_size for f in EMBEDDED.rglob("*") if f.is_file())
    assert size < 40e6  # git-sized: bfloat16 weights, a few tens of MB at most


def test_greedy_generation_is_deterministic_and_says_something(model, tokenizer):
    prompts = ["def fibonacci(n):", "import os\n\n\ndef "]
    first = mixtral_jax.generate(model, tokenizer, prompts, max_new_tokens=24)
    again = mixtral_jax.generate(model, tokenizer, prompts, max_new_tokens=24)
    assert first.tokens == again.tokens and first.texts == again.texts
    assert all(len(text.strip()) > 10 for text in first.texts)


@pytest.mark.parametrize("kind", sorted(HELD_OUT))
def test_held_out_perplexity_is_the_one_training_recorded(model, tokenizer, kind):
    """Recomputed, the held-out perplexity is the figure that tools/train_embedded.py
    recorded for the shipped weights (training.json), and far better than a uniform
    guess over the vocabulary."""
    result = evaluate.perplexity(model, tokenizer, [SAMPLE / HELD_OUT[kind]], seq_len=256)
    recorded = json.loads((EMBEDDED / "training.json").read_text())["held_out"][kind]
    assert result["tokens"] == recorded["tokens"]
    assert result["perplexity"] == pytest.approx(recorded["perplexity"], rel=0.01)
    assert result["perplexity"] < tokenizer.vocab_size / 10


def test_held_out_source_was_never_trained_on():
    sys.path.insert(0, str(ROOT))
    from tools import train_embedded

    trained = {r["text"] for r in train_embedded.code_records(held_out=False)}
    lines = (SAMPLE / HELD_OUT["code"]).read_text(encoding="utf-8").splitlines()
    held_out = [json.loads(line)["text"] for line in lines]
    assert held_out and not trained.intersection(held_out)
    assert train_embedded.module_name(Path("json/decoder.py")) == "json"
    assert train_embedded.module_name(Path("copy.py")) == "copy"


def test_source_pieces_cover_the_file_and_cut_before_top_level_lines():
    sys.path.insert(0, str(ROOT))
    from tools import train_embedded

    source = "import os\n\n" + "".join(f"def f{i}():\n    return {i}\n\n\n" for i in range(200))
    pieces = train_embedded.pieces(source, size=300)
    assert "".join(pieces) == source and len(pieces) > 5
    assert all(p.startswith(("import", "def")) for p in pieces)
    assert all(len(p) < 300 + 40 for p in pieces)


def test_cli_defaults_to_the_embedded_model(model, tokenizer, capsys):
    from mixtral_jax.inference.cli import main

    assert main(["--prompt", "def add(a, b):", "--max_new_tokens", "12"]) == 0
    out = capsys.readouterr()
    expected = mixtral_jax.generate(model, tokenizer, "def add(a, b):", max_new_tokens=12)
    assert out.out.startswith("def add(a, b):" + expected.texts[0])
    assert "the embedded model" in out.err and "tokens/s" in out.err

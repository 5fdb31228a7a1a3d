"""Shared fixtures."""

from __future__ import annotations

import gc
import os

import pytest

from tests import xla_flags

# The tests run on the CPU. With libtpu installed (the test extra installs it for
# tests/test_plan.py), JAX would otherwise probe for a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One CPU device, compiled quickly; the processes the tests start inherit this.
os.environ["XLA_FLAGS"] = xla_flags()

CORPUS = """The quick brown fox jumps over the lazy dog. Über den Wolken muss die Freiheit
wohl grenzenlos sein. Les élèves étudient à l'école. 東京は日本の首都です。 Emoji: 🙂🚀.
def fibonacci(n):
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
"""


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Drops the programs a module compiled when it ends. XLA:CPU keeps each program's
    machine code in memory mappings of its own while the program lives; the whole
    suite's programs in one process would pass the kernel's limit on mappings
    (vm.max_map_count, 65530 by default) and crash inside a compile."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A small sentencepiece BPE model like Mistral's (byte fallback, <unk>=0, <s>=1,
    </s>=2), trained here on a few lines of text."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("sp")
    corpus = directory / "corpus.txt"
    corpus.write_text(CORPUS * 20, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tok"),
        model_type="bpe",
        vocab_size=320,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Mistral's: whitespace is kept
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return str(directory / "tok.model")


@pytest.fixture(scope="session")
def embedded_model():
    """The model embedded in the package, loaded once for the session."""
    import mixtral_jax

    return mixtral_jax.load()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    import mixtral_jax

    return mixtral_jax.load_tokenizer()

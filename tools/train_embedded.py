"""Trains the embedded model, mixtral_jax/assets/model/: about an hour on a 2-core CPU.

    python tools/train_embedded.py [--workdir runs/embedded] [--steps N]

A Mixtral (8 experts, top-2; configs/embedded.py) trained from scratch with the
project's own training loop (`mixtral_jax.train`), seed 0, on text that exists on
every machine with no download, read from the running interpreter:

- the source of the Python standard library (tests, IDLE, encodings and generated
  tables left out), cut into pieces at top-level definitions;
- the bundled docstrings and chats, `mixtral_jax/assets/sample/train.jsonl`.

Held out, never trained on: the modules `tools/make_sample_data.py` holds out
(json, bisect, glob, copy, calendar), whose docstrings are in `sample/eval.jsonl`
and whose source this script writes to `sample/eval_code.jsonl`. A rerun of the
same command resumes an interrupted training. At the end the export replaces
`assets/model/` (written beside it, then renamed), with `training.json`: the
config, the time taken, held-out perplexity and greedy samples. A different
Python version reads a different standard library; the committed files are the
reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # configs/ and tools/ when run as a script

from configs import embedded  # noqa: E402
from tools import make_sample_data  # noqa: E402

ASSETS = ROOT / "mixtral_jax" / "assets"
SAMPLE = ASSETS / "sample"
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data"}
SKIPPED_DIRS |= {"turtledemo", "lib2to3", "ensurepip", "__pycache__", "__phello__"}
PIECE_CHARS = 3000
SAMPLE_PROMPTS = (
    "def fibonacci(n):",
    "import os\n\n\ndef ",
    "class Stack:\n    ",
    "What does `json.dumps` do?",
)


def module_name(relative: Path) -> str:
    """`json/decoder.py` -> `json`, `bisect.py` -> `bisect`: the top-level module."""
    return relative.parts[0].removesuffix(".py")


def stdlib_sources() -> list[tuple[str, str]]:
    """(relative path, source) of the standard library's Python files, sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(lib.rglob("*.py")):
        relative = path.relative_to(lib)
        if SKIPPED_DIRS.intersection(relative.parts) or relative.name.startswith("test_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 400_000:  # generated tables, not code
            continue
        found.append((relative.as_posix(), text))
    return found


def pieces(source: str, size: int = PIECE_CHARS) -> list[str]:
    """The source cut before top-level statements into pieces of about `size`
    characters, so that a long file does not fill whole batches by itself."""
    blocks, current = [], []
    for line in source.splitlines(keepends=True):
        top_level = line[:1] not in (" ", "\t", "\n", "#", ")", "]", "}", "'", '"', "")
        if top_level and current and sum(map(len, current)) >= size:
            blocks.append("".join(current))
            current = []
        current.append(line)
    if current:
        blocks.append("".join(current))
    return [b for b in blocks if b.strip()]


def code_records(held_out: bool) -> list[dict]:
    held = set(make_sample_data.EVAL_MODULES)
    return [
        {"text": piece}
        for relative, source in stdlib_sources()
        if (module_name(Path(relative)) in held) == held_out
        for piece in pieces(source)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "embedded")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--out", type=Path, default=ASSETS / "model")
    args = parser.parse_args()

    import jax

    import mixtral_jax
    from mixtral_jax.checkpoints.store import save
    from mixtral_jax.params import flat_params
    from mixtral_jax.training import evaluate, train

    corpus = args.workdir / "corpus" / "code.jsonl"
    train_code = code_records(held_out=False)
    make_sample_data.write_jsonl(corpus, train_code)
    make_sample_data.write_jsonl(SAMPLE / "eval_code.jsonl", code_records(held_out=True))
    print(f"{len(train_code)} pieces of standard-library source for training", flush=True)

    config = embedded.get_config()
    config.data.train = f"{corpus},{SAMPLE / 'train.jsonl'}"
    config.data.eval = f"{SAMPLE / 'eval.jsonl'},{SAMPLE / 'eval_code.jsonl'}"
    if args.steps:
        config.steps = args.steps
    # Wall time of the training, summed over the runs that resumed it.
    clock = args.workdir / "train_seconds.txt"
    before = float(clock.read_text()) if clock.is_file() else 0.0
    start = time.perf_counter()
    train.train(config, args.workdir)
    seconds = before + time.perf_counter() - start
    clock.write_text(f"{seconds:.0f}\n")

    # Stored in bfloat16 (18 MB instead of 36) and dropless (training's capacity factor
    # is a training setting): what ships is what is measured below.
    partial = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    export = args.workdir / "export"
    exported = mixtral_jax.load(export, dtype="bfloat16")
    shipped = exported.config.replace(capacity_factor=None)
    save(partial, flat_params(exported), shipped)
    shutil.copy(export / "tokenizer.model", partial / "tokenizer.model")
    model = mixtral_jax.load(partial)
    tokenizer = mixtral_jax.load_tokenizer(partial)
    held_out = {
        name: evaluate.perplexity(model, tokenizer, [SAMPLE / file], seq_len=config.data.seq_len)
        for name, file in (("docstrings", "eval.jsonl"), ("code", "eval_code.jsonl"))
    }
    samples = {
        prompt: mixtral_jax.generate(model, tokenizer, prompt, max_new_tokens=48).texts[0]
        for prompt in SAMPLE_PROMPTS
    }
    record = {
        "config": json.loads(json.dumps(config.to_dict()).replace(f"{ROOT}/", "")),
        "train_seconds": round(seconds),
        "train_tokens": config.steps * config.data.batch_size * config.data.seq_len,
        "held_out": held_out,
        "greedy_samples": samples,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}",
    }
    (partial / "training.json").write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    shutil.rmtree(args.out, ignore_errors=True)
    partial.rename(args.out)
    print(json.dumps({k: record[k] for k in ("train_seconds", "held_out")}, indent=2))
    for prompt, text in samples.items():
        print(f"--- {prompt!r}\n{prompt}{text}")


if __name__ == "__main__":
    main()

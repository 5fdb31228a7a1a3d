"""The generation CLI, `python -m mixtral_jax.generate`: stream text from a checkpoint.

python -m mixtral_jax.generate --prompt "def fibonacci(n):"            # the embedded model
python -m mixtral_jax.generate --checkpoint DIR --chat --prompt "Hi" [--quantize int8]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mixtral_jax import cli
from mixtral_jax.checkpoints.load import EMBEDDED, load, load_tokenizer
from mixtral_jax.inference.generate import generate
from mixtral_jax.inference.sampling import Sampling


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mixtral_jax.generate`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mixtral_jax.generate",
        description="Generate text with a converted Mixtral checkpoint, streaming to stdout.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a directory written by tools/convert.py or a training export "
        "(default: the small model embedded in the package)",
    )
    parser.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as [INST] ... [/INST]")
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16")
    parser.add_argument(
        "--quantize",
        default=None,
        help="int8 or int4: quantize a float checkpoint's projections and experts as it loads",
    )
    parser.add_argument("--group_size", type=int, default=128, help="int4: inputs per scale")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer.model file, or mistral-v1 / mistral-v3 (default: the checkpoint's)",
    )
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = EMBEDDED
        print(
            "(no --checkpoint: the embedded model, 9 M parameters trained on the Python "
            "standard library; see tools/train_embedded.py)",
            file=sys.stderr,
        )
    return cli.run(lambda: _generate(args), fresh_line=True)


def _generate(args: argparse.Namespace) -> None:
    Sampling(args.temperature, args.top_k, args.top_p)  # bad flags fail before loading
    model = load(
        args.checkpoint, dtype=args.dtype, quantize=args.quantize, group_size=args.group_size
    )
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    single = len(args.prompt) == 1
    if single:
        print(args.prompt[0], end="", flush=True)

    def on_token(row: int, token: int, piece: str) -> None:
        if single:
            print(piece, end="", flush=True)

    result = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
        on_token=on_token,
    )
    if not single:
        for prompt, text in zip(args.prompt, result.texts, strict=True):
            print(f"{prompt}{text}\n---")
    t = result.timing
    print(
        f"\n[{sum(len(ids) for ids in result.tokens)} tokens; first after {t.first_token_s:.2f} s "
        f"(compilation included); decode {t.steps_per_s * len(args.prompt):.1f} tokens/s]",
        file=sys.stderr,
    )

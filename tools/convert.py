"""Convert PyTorch Mixtral checkpoints to mixtral_jax (Orbax) checkpoints, and back.

    python tools/convert.py SOURCE_DIR OUTPUT_DIR [--dtype bfloat16|float32] [--force] [--verify]
        [--quantize int8|int4 [--group_size 128]]
    python tools/convert.py --to-hf CHECKPOINT_DIR HF_DIR [--force]

SOURCE_DIR is a Hugging Face download (config.json + model*.safetensors or
pytorch_model*.bin), Mistral's original release (params.json +
consolidated.NN.pt) or a mistral-inference directory (params.json +
consolidated.safetensors); the layout is detected. Tensors are read lazily and
written an expert at a time; the output appears only when complete.

--quantize stores the attention projections and the experts as int8 (one scale
per output channel) or int4 (one scale per --group_size inputs, two values per
byte); the router, norms, embedding and LM head stay in --dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral_jax import cli  # noqa: E402
from mixtral_jax.checkpoints import convert, hub, sources  # noqa: E402
from mixtral_jax.checkpoints.store import CheckpointError  # noqa: E402

ERRORS = (
    convert.ConvertError,
    sources.SourceError,
    hub.WeightError,
    CheckpointError,
    FileNotFoundError,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("source", help="checkpoint directory to read")
    parser.add_argument("output", help="directory to create")
    parser.add_argument("--dtype", default="bfloat16", choices=convert.DTYPES)
    parser.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-read the output and compare every tensor with the source",
    )
    parser.add_argument(
        "--quantize", default=None, help="int8 or int4: weight-only quantization (qwix)"
    )
    parser.add_argument(
        "--group_size", type=int, default=128, help="int4: inputs per scale (default 128)"
    )
    parser.add_argument(
        "--to-hf",
        action="store_true",
        help="export a mixtral_jax checkpoint to Hub-layout safetensors",
    )
    args = parser.parse_args(argv)
    return cli.run(
        lambda: _convert(args), ERRORS, interrupted="nothing was written", fresh_line=True
    )


def _convert(args: argparse.Namespace) -> None:
    if args.to_hf:
        convert.export_hf(args.source, args.output, force=args.force)
    else:
        convert.convert(
            args.source,
            args.output,
            dtype=args.dtype,
            force=args.force,
            verify=args.verify,
            quantize=args.quantize,
            group_size=args.group_size,
        )


if __name__ == "__main__":
    sys.exit(main())

"""Write a random Mixtral checkpoint in the Hub layout (config.json + safetensors shards,
one shard per layer, as the Hub's are), to try conversion without a download.

    python tools/synthetic_checkpoint.py OUT_DIR [--layers 12] [--hidden 1024] [--dtype bfloat16]

Each layer is generated, written and freed in turn, so this needs little memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral_jax import ModelConfig  # noqa: E402
from mixtral_jax.checkpoints.hub import hub_keys  # noqa: E402
from mixtral_jax.checkpoints.sources import write_safetensors  # noqa: E402
from mixtral_jax.model.mixtral import param_shapes  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 7 // 2,
        num_layers=args.layers,
        num_heads=args.hidden // 128,
        num_kv_heads=max(1, args.hidden // 512),
        head_dim=128,
        num_experts=args.experts,
        num_experts_per_tok=2,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
    )
    out = Path(args.out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config.to_hf() | {"torch_dtype": args.dtype}))
    shapes = param_shapes(config)
    rng = np.random.default_rng(0)
    by_shard: dict[int, list] = {}
    for key, rule, index in hub_keys(config):
        shard = index[0] if rule.path[0] == "layers" else args.layers
        by_shard.setdefault(shard, []).append((key, rule, index))
    n = len(by_shard)
    weight_map, total = {}, 0
    for shard in sorted(by_shard):
        tensors = {}
        for key, rule, index in by_shard[shard]:
            shape = shapes[rule.path][len(index) :]
            hub_shape = (
                shape
                if rule.in_dims is None
                else (int(np.prod(shape[rule.in_dims :])), int(np.prod(shape[: rule.in_dims])))
            )
            tensors[key] = (rng.standard_normal(hub_shape, np.float32) * 0.02).astype(dtype)
        name = f"model-{shard + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(out / name, tensors)
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    layer_bytes = sum(np.prod(s[1:]) for p, s in shapes.items() if p[0] == "layers")
    layer_bytes *= np.dtype(dtype).itemsize
    print(
        f"wrote {out}: {total / 1e9:.2f} GB in {n} shards, {config.num_layers} layers "
        f"of {layer_bytes / 1e9:.3f} GB"
    )


if __name__ == "__main__":
    main()

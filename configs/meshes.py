"""Device meshes for Mixtral 8x7B on common TPU slices; docs/sharding.md has the
memory arithmetic behind each. `get_config("v5e-8:inference")` or, with
ml_collections' config flags, `--mesh configs/meshes.py:v5e-8:inference`; build
the mesh with `mixtral_jax.sharding.MeshConfig.from_dict(config).make_mesh()`.

Sizes are (data, fsdp, tensor, expert) within a slice, `dcn_*` across slices;
one ICI size may be -1 ("the devices left over").
"""

import ml_collections

RECIPES = {
    # Anything: FSDP over every device (one CPU, 8 virtual CPUs, a GPU).
    "default": dict(fsdp=-1),
    # Inference: tensor parallelism, so every chip reads 1/N of every weight per step.
    "v5e-8:inference": dict(fsdp=1, tensor=8),
    "v6e-8:inference": dict(fsdp=1, tensor=8),
    "v5p-8:inference": dict(fsdp=1, tensor=4),
    "v5e-16:inference": dict(data=2, fsdp=1, tensor=8),
    # LoRA: the frozen base sharded by FSDP; adapters and their Adam state are small.
    # On 16 GiB v5e chips, FSDP alone gathers all 8 experts of a layer on every chip
    # (18.2 GiB per chip, tools/plan.py); expert=8 gathers one (14.5 GiB).
    "v5e-16:lora": dict(fsdp=2, expert=8),
    # A v5e-8 holds LoRA only on a quantized base (QLoRA, configs/finetune_qlora.py):
    # int8 with expert=8 at 8 x 4k rows is 12.6 GiB per chip (16 x 4k: 16.0 GiB).
    "v5e-8:lora": dict(fsdp=1, expert=8),
    "v5p-8:lora": dict(fsdp=4),
    "v4-32:lora": dict(fsdp=16),
    # Full fine-tuning with float32 master weights and AdamW: 16 bytes per parameter.
    "v4-128:full": dict(fsdp=64),  # v4-64 holds the state but not the step (tools/plan.py)
    "v5p-32:full": dict(fsdp=16),
    "v5p-32:full-ep": dict(fsdp=2, expert=8),
    # Two v5e-16 slices over the data-center network: data parallel across slices.
    "2xv5e-16:lora": dict(fsdp=2, expert=8, dcn_data=2),
}


def get_config(recipe: str = "default") -> ml_collections.ConfigDict:
    if recipe not in RECIPES:
        raise ValueError(f"unknown mesh recipe {recipe!r}; the recipes are {sorted(RECIPES)}")
    return ml_collections.ConfigDict(RECIPES[recipe])

"""Full fine-tuning of converted Mixtral weights: float32 master weights, bf16 compute.

    python -m mixtral_jax.train --config configs/finetune_full.py \
        --config.checkpoint=mixtral-8x7b --config.data.train=corpus.jsonl --workdir runs/full

Every weight is trained with AdamW: 16 bytes per parameter (weights, two
moments, gradients, float32), ~750 GB for 8x7B, so a v4-128 or v5p-32 (see
configs/meshes.py "v4-128:full"); parameters and optimizer state are FSDP-sharded.
Otherwise the run of configs/finetune_lora.py (execution settings, sequence
length, schedule), with every weight trained instead of adapters.
"""

import ml_collections

from configs import finetune_lora


def get_config() -> ml_collections.ConfigDict:
    c = finetune_lora.get_config()
    c.model.param_dtype = "float32"  # master weights
    c.data.batch_size = 64
    c.lora.rank = 0  # no adapters: every weight trains
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.1
    c.optimizer.accumulate = 4
    c.optimizer.freeze_router = True  # the usual choice when fine-tuning an MoE
    c.steps = 2000
    return c

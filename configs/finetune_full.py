"""Full fine-tuning of converted Mixtral weights: float32 master weights, bf16 compute.

    python -m mixtral_jax.train --config configs/finetune_full.py \
        --config.checkpoint=mixtral-8x7b --config.data.train=corpus.jsonl --workdir runs/full

Every weight is trained with AdamW: 16 bytes per parameter (weights, two
moments, gradients, float32), ~750 GB for 8x7B, so a v4-128 or v5p-32 (see
configs/meshes.py "v4-128:full"); parameters and optimizer state are FSDP-sharded.
"""

import ml_collections

from configs import finetune_tiny


def get_config() -> ml_collections.ConfigDict:
    c = finetune_tiny.get_config()
    c.checkpoint = ""  # required: --config.checkpoint=DIR
    c.tokenizer = ""  # the checkpoint's
    # Execution settings only: the architecture is the checkpoint's.
    c.model = ml_collections.ConfigDict(
        dict(
            dtype="bfloat16",
            param_dtype="float32",  # master weights
            remat_policy="full",
            capacity_factor=1.25,
            group_size=1024,
            router_aux_loss_coef=0.02,
            router_z_loss_coef=0.001,
        )
    )
    c.data.seq_len = 4096
    c.data.batch_size = 64
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.1
    c.optimizer.accumulate = 4
    c.optimizer.freeze_router = True  # the usual choice when fine-tuning an MoE
    c.steps = 2000
    c.eval_every = 200
    c.checkpoint_every = 200
    return c

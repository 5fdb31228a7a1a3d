"""LoRA fine-tuning of converted Mixtral weights: adapters on attention and experts.

    python -m mixtral_jax.train --config configs/finetune_lora.py \
        --config.checkpoint=mixtral-8x7b-instruct --config.data.train=my_chats.jsonl \
        --workdir runs/lora

The base stays frozen in bfloat16 (FSDP-sharded over every device); only the
adapters (float32) and their AdamW state are trained and checkpointed. At the
end `workdir/export` holds the base with the adapters merged in. For 8x7B on a
v5e-16, set the mesh of configs/meshes.py's "v5e-16:lora" recipe:
`--config.mesh.fsdp=2 --config.mesh.expert=8` (FSDP alone does not fit; tools/plan.py).
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
            param_dtype="bfloat16",
            remat_policy="full",
            capacity_factor=1.25,
            group_size=1024,
            router_aux_loss_coef=0.02,
            router_z_loss_coef=0.001,
        )
    )
    c.data.seq_len = 4096
    c.data.batch_size = 16
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    c.steps = 1000
    c.eval_every = 200
    c.checkpoint_every = 200
    return c

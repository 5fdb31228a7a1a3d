"""QLoRA: LoRA fine-tuning on a base quantized to int8 (or int4) as it loads.

    python -m mixtral_jax.train --config configs/finetune_qlora.py \
        --config.checkpoint=mixtral-8x7b-instruct --config.data.train=my_chats.jsonl \
        --workdir runs/qlora

As configs/finetune_lora.py, but the frozen base is stored as int8 with one
scale per output channel (`--config.model.quantization=int4` for int4 in groups
of `quant_group_size` inputs), and 8 rows of 4k tokens per step: half the base's
memory, so 8x7B LoRA fits a v5e-8 with the mesh of configs/meshes.py's
"v5e-8:lora" recipe, `--config.mesh.fsdp=1 --config.mesh.expert=8` (12.6 GiB per
chip; tools/plan.py --topology v5e-8 --mode lora --train_config
configs/finetune_qlora.py). The adapters and their optimizer state stay float32.
The export merges the adapters into float weights (bfloat16) a layer at a time:
the function that was trained.
"""

import ml_collections

from configs import finetune_lora


def get_config() -> ml_collections.ConfigDict:
    c = finetune_lora.get_config()
    c.model.quantization = "int8"
    c.model.quant_group_size = 128
    c.data.batch_size = 8
    return c

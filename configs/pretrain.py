"""Training every weight as MaxText benchmarks Mixtral 8x7B: the plan behind
`python tools/plan.py --mode train`, set beside MaxText's published MFU.

bfloat16 compute over float32 master weights, 4,096-token rows, the router
trained (with its load-balancing loss), one optimizer step per batch (no
accumulation), every block rematerialised, the dense dispatch at capacity
factor 1.25 (MaxText's "dropped" recipe; its v5p figures are dropless). The
batch is a slice's: `tools/plan.py --mode train` gives each chip ROWS_PER_CHIP
rows unless --batch says otherwise. Otherwise configs/finetune_full.py's run.
"""

import ml_collections

from configs import finetune_full

# MaxText's per-device batch in its Mixtral 8x7B benchmark runs.
ROWS_PER_CHIP = 8


def get_config() -> ml_collections.ConfigDict:
    c = finetune_full.get_config()
    c.checkpoint = ""  # the architecture is --config's; nothing is loaded to plan
    c.optimizer.accumulate = 1
    c.optimizer.freeze_router = False
    c.optimizer.weight_decay = 0.1
    c.data.batch_size = ROWS_PER_CHIP  # per chip: tools/plan.py multiplies by the slice's
    return c

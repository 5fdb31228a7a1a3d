"""Train a tiny Mixtral from scratch on the bundled sample data: a minute on a CPU.

    python -m mixtral_jax.train --config configs/finetune_tiny.py --workdir /tmp/tiny

Every training setting exists here with the value a small run wants; the full
and LoRA configs change only what differs. Any field can be set on the command
line, e.g. `--config.steps=50 --config.optimizer.learning_rate=1e-3`.
"""

from pathlib import Path

import ml_collections

ASSETS = Path(__file__).resolve().parent.parent / "mixtral_jax" / "assets"
SAMPLE = ASSETS / "sample"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Where the weights come from: a checkpoint written by tools/convert.py (its
    # architecture; `model` then only overrides execution settings such as dtype,
    # remat_policy, capacity_factor), or "" to train `model` from scratch.
    c.checkpoint = ""
    c.tokenizer = str(ASSETS / "tokenizer.model")  # "": the checkpoint's
    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=4096,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            max_position_embeddings=1024,
            moe_impl="dense",
            capacity_factor=1.25,  # training drops overflow; inference is always dropless
            group_size=256,
            router_aux_loss_coef=0.02,
            router_z_loss_coef=0.001,
            dtype="float32",  # "bfloat16": bf16 compute on the float32 master weights
            param_dtype="float32",
            remat_policy="none",
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            # .txt files (one document each) and .jsonl files, separated by commas
            train=f"{SAMPLE}/train.jsonl",
            eval=f"{SAMPLE}/eval.jsonl",  # held-out files, comma-separated; "": none
            seq_len=128,
            batch_size=8,  # rows per optimizer step, over all hosts and micro-batches
            eval_batches=4,
        )
    )
    c.lora = ml_collections.ConfigDict(
        # rank 0: no LoRA. Targets among q_proj, k_proj, v_proj, o_proj, w1, w2, w3.
        dict(rank=0, alpha=16.0, targets="q_proj,k_proj,v_proj,o_proj,w1,w2,w3")
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-3,
            warmup_steps=20,
            end_learning_rate_ratio=0.1,  # cosine decay to this fraction at the last step
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.01,  # not on norms' scales
            grad_clip=1.0,  # global norm
            accumulate=1,  # micro-batches per step: batch_size / accumulate rows at a time
            freeze_router=False,
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
    c.steps = 150
    c.seed = 0
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 50
    c.keep_checkpoints = 2
    c.export = True  # at the end, write workdir/export: a checkpoint (LoRA merged)
    return c

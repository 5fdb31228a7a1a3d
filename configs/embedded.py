"""The embedded model: a small Mixtral trained from scratch by tools/train_embedded.py.

    python tools/train_embedded.py    # about an hour on a 2-core CPU

Eight experts, top-2, four layers, grouped-query attention and the 4096-piece
tokenizer in mixtral_jax/assets/; trained on the Python standard library's source
and docstrings (the held-out modules' never). The result is committed in
mixtral_jax/assets/model/ with this config beside it, and is the checkpoint that
`python -m mixtral_jax.generate` uses when none is given.
"""

from configs import finetune_tiny


def get_config():
    c = finetune_tiny.get_config()
    c.model.update(
        hidden_size=192,
        intermediate_size=384,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        # The dense dispatch trains 4x faster on a CPU than the (dropless) sorted one;
        # 1.5 drops little once the router balances. Inference is dropless anyway.
        moe_impl="dense",
        capacity_factor=1.5,
        group_size=256,
    )
    # tools/train_embedded.py writes the code corpus and sets data.train / data.eval.
    c.data.update(seq_len=256, batch_size=16, eval_batches=8)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=50, end_learning_rate_ratio=0.05)
    c.steps = 1100  # 4.5 M tokens, a little over one epoch of the corpus
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 100
    return c

"""A tiny Mixtral for tests and CPU experiments: every feature, a few thousand parameters.

The odd sizes are deliberate: a vocabulary that is not a multiple of 128, a
head_dim that is not hidden_size / num_heads, and GQA with 2 query heads per KV head.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=211,
            hidden_size=48,
            intermediate_size=40,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=10,
            num_experts=8,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            max_position_embeddings=128,
            sliding_window=None,
            moe_impl="dense",
            capacity_factor=None,
            group_size=64,
            router_aux_loss_coef=0.02,
            router_z_loss_coef=0.001,
            initializer_range=0.02,
            dtype="float32",
            param_dtype="float32",
            scan_layers=True,
            remat_policy="none",
        )
    )

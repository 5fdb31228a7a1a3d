"""Mixtral 8x7B, as in the Hub's config.json (mistralai/Mixtral-8x7B-v0.1)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            num_experts=8,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            max_position_embeddings=32768,
            sliding_window=None,
            moe_impl="dense",
            capacity_factor=None,
            group_size=1024,
            router_aux_loss_coef=0.02,
            router_z_loss_coef=0.0,
            initializer_range=0.02,
            dtype="bfloat16",
            param_dtype="bfloat16",
            scan_layers=True,
            remat_policy="none",
        )
    )

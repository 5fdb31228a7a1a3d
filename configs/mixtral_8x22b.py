"""Mixtral 8x22B, as in the Hub's config.json (mistralai/Mixtral-8x22B-v0.1)."""

import ml_collections

from configs import mixtral_8x7b


def get_config() -> ml_collections.ConfigDict:
    config = mixtral_8x7b.get_config()
    config.update(
        vocab_size=32768,
        hidden_size=6144,
        intermediate_size=16384,
        num_layers=56,
        num_heads=48,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=65536,
    )
    return config

"""The benchmark model of tools/bench.py: Mixtral's shape scaled to a 2-core CPU.

4 layers, 1024 wide, 8 experts (top-2), GQA 8/2 heads of 128, Mixtral's
expert ratio (intermediate = 3.5 x hidden) and vocabulary.
"""

from configs import mixtral_8x7b


def get_config():
    config = mixtral_8x7b.get_config()
    config.update(
        hidden_size=1024,
        intermediate_size=3584,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=128,
        max_position_embeddings=4096,
        dtype="float32",
        param_dtype="float32",
        moe_impl="sorted",
    )
    return config

"""The model: Mixtral as Flax NNX modules, its configuration and its tokenizer.

    config.py      ModelConfig: every field, validated when built
    layers.py      parameters with logical axes, LoRA adapters, RMSNorm, embedding, RoPE
    quantized.py   a weight as an einsum: float, or int8 / int4 integers and scales
    attention.py   grouped-query attention, causal / sliding-window / segment masks
    kv_cache.py    the KV cache as attention reads and writes it
    routing.py     top-k routing, dispatch/combine tensors, router losses (pure functions)
    moe.py         the SMoE layer: router, stacked SwiGLU experts, three dispatches
    mixtral.py     the decoder: blocks stacked over layers, scanned or unrolled
    tokenizer.py   Mistral's sentencepiece tokenizers and instruct format

Imports only `mixtral_jax.params` and `mixtral_jax.parallel`: nothing here knows of
checkpoints, inference, training or a backend.
"""

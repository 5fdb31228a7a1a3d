"""Quantization: whole-model int8 / int4 weights, and their stored form.

    quantize.py   a float model -> its quantized copy; slices as conversion and loading
                  stream them; quantized parameters -> the float weights they stand for
    int4.py       int4 packed two per byte, as checkpoints store it

The weight type itself (integers, scales, the einsum that reads them) is the model's:
`mixtral_jax.model.quantized`.
"""

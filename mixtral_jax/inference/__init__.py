"""Inference: generating text from a model over a KV cache.

    generate.py   batched prefill, jitted decode steps, `generate` and `generate_tokens`
    sampling.py   greedy, temperature, top-k, top-p: pure functions of logits
    cache.py      a KV cache made in its shardings on a mesh
    cli.py        `python -m mixtral_jax.generate`

How a decode step runs on the devices at hand (the CPU's kernels) is chosen by
`mixtral_jax.backends.for_decode`; the loop here is the same everywhere.
"""

"""Inference: generating text from a model over a KV cache, and serving it.

    generate.py    batched prefill, jitted decode steps, `generate` and `generate_tokens`
    sampling.py    greedy, temperature, top-k, top-p (one setting, or each row its own)
    cache.py       a KV cache made in its shardings on a mesh
    cli.py         `python -m mixtral_jax.generate`

    requests.py    what a serving client asks of the engine, and what it hears back
    scheduler.py   continuous batching's bookkeeping: queue, slots, prefill chunks
    engine.py      the serving engine: the scheduler's steps run on the model
    openai_api.py  OpenAI's request and error formats, an answer's text and log-probs
    metrics.py     what the engine reports to Prometheus
    server.py      the HTTP front (FastAPI): OpenAI's API over the engine
    serve_cli.py   `python -m mixtral_jax.serve`

How a decode step runs on the devices at hand (the CPU's kernels) is chosen by
`mixtral_jax.backends.for_decode`; the loop here is the same everywhere. The server
modules need the `.[serve]` extra; nothing else imports them.
"""

"""A paged KV cache: rows read and write their slots through block tables, and give
the contiguous cache's logits, across block boundaries and past the sliding window."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.backends.cpu.decode import per_layer, unstacked
from mixtral_jax.model.kv_cache import (
    blocks_per_row,
    gather_rows,
    init_cache,
    init_paged_cache,
    paged_slots,
)

B, T, CHUNK, BLOCK = 3, 21, 4, 4


def test_paged_slots_name_each_slot_s_block_and_place_and_drop_the_rest():
    blocks = jnp.asarray([[7, 2, 9], [4, 9, 9]], jnp.int32)  # 9: no block (N = 9)
    slots = jnp.asarray([[0, 3, 4, 11, 12], [5, 6, 4, 0, 12]], jnp.int32)  # 12: not stored
    page, offset = paged_slots(blocks, slots, block_size=4, num_blocks=9)
    np.testing.assert_array_equal(page, [[7, 7, 2, 9, 9], [9, 9, 9, 4, 9]])
    np.testing.assert_array_equal(offset[0, :4], [0, 3, 0, 3])
    pool = jnp.arange(9 * 2 * 4 * 1, dtype=jnp.float32).reshape(9, 2, 4, 1)
    rows = gather_rows(pool, blocks)  # [B, K, M bs, H]
    assert rows.shape == (2, 2, 12, 1)
    np.testing.assert_array_equal(rows[0, 1, 4:8, 0], pool[2, 1, :, 0])


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("weights", ["stacked", "packed"])
@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
def test_paged_cache_gives_the_contiguous_cache_logits(window, weights, kv_dtype):
    """A prompt prefilled in chunks of 4, then decoded one token at a time to 21, into
    a contiguous cache and into a paged one whose rows hold shuffled blocks of 4 of a
    pool twice their size: every call's logits agree to 1e-5 (float32). With a window
    of 6 the rows are rolling buffers of 12 slots (3 blocks), overwritten past it;
    `packed` decodes with the CPU kernels (attention through the block tables). An
    int8 cache, paged or not, stores the same keys and scales."""
    if weights == "packed" and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    config = ModelConfig.from_dict(tiny.get_config()).replace(
        sliding_window=window, dtype="float32"
    )
    model = Mixtral(config, rngs=nnx.Rngs(3))
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, config.vocab_size, (B, T)))
    M = blocks_per_row(config, T, BLOCK, CHUNK)
    N = 2 * B * M
    table = rng.permutation(N)[: B * M].reshape(B, M).astype(np.int32)
    dtype = jnp.dtype(kv_dtype)
    caches = {
        "contiguous": init_cache(config, B, T, dtype, chunk=CHUNK),
        "paged": init_paged_cache(config, B, T, N, BLOCK, dtype, chunk=CHUNK)._replace(
            blocks=jnp.asarray(table)
        ),
    }
    assert caches["paged"].length == M * BLOCK >= caches["contiguous"].length
    forward = nnx.jit(
        lambda m, t, p, c, u, chunk: m.forward(t, p, cache=c, unstacked=u, chunk=chunk),
        static_argnames="chunk",
    )
    pieces = unstacked(model) if weights == "packed" else None
    prompt = 12
    logits = {}
    for name, cache in caches.items():
        outs = []
        for start in range(0, prompt, CHUNK):
            positions = jnp.broadcast_to(jnp.arange(start, start + CHUNK), (B, CHUNK))
            out = forward(model, tokens[:, start : start + CHUNK], positions, cache, None, True)
            cache = out.cache
            outs.append(out.logits)
        if pieces is not None:
            cache = per_layer(cache)
        for t in range(prompt, T):
            out = forward(model, tokens[:, t : t + 1], jnp.full((B, 1), t), cache, pieces, False)
            cache = out.cache
            outs.append(out.logits)
        logits[name] = np.concatenate([np.asarray(o) for o in outs], axis=1)
        assert (cache.blocks is None) == (name == "contiguous")
    np.testing.assert_allclose(logits["paged"], logits["contiguous"], rtol=1e-5, atol=1e-5)
    full = np.asarray(model(tokens)) if window is None and kv_dtype == "float32" else None
    if full is not None:  # and both are the model's own logits
        np.testing.assert_allclose(logits["paged"], full, atol=1e-4)


def test_a_paged_cache_writes_only_its_rows_blocks():
    """Blocks no row's table lists are never written: a prefill into three rows of a
    pool leaves every other block as it was (zeros), and only full or partial blocks
    of the rows' prompts change."""
    config = ModelConfig.from_dict(tiny.get_config()).replace(dtype="float32")
    model = Mixtral(config, rngs=nnx.Rngs(0))
    N = 12
    cache = init_paged_cache(config, B, 16, N, BLOCK)
    table = np.full((B, 4), N, np.int32)
    table[0, :2], table[1, :1], table[2, :3] = [5, 1], [8], [0, 11, 3]
    lengths = [6, 3, 9]  # row r's prompt fills ceil(lengths[r] / 4) blocks
    tokens = jnp.ones((B, 9), jnp.int32)
    segment_ids = jnp.asarray([[1] * n + [0] * (9 - n) for n in lengths])
    forward = nnx.jit(lambda m, t, s, c: m.forward(t, segment_ids=s, cache=c))
    out = forward(model, tokens, segment_ids, cache._replace(blocks=jnp.asarray(table)))
    written = np.flatnonzero(np.abs(np.asarray(out.cache.k)).sum(axis=(0, 2, 3, 4)))
    assert sorted(written) == [0, 1, 3, 5, 8, 11]


def test_an_int8_cache_halves_bfloat16s_memory_within_its_quality_bounds(embedded_model):
    """The embedded model over 256 tokens of code, teacher-forced through an int8 cache
    and a bfloat16 one: the greedy token agrees at 98% of positions or more, the mean
    logit error is under 0.05 and the largest under 5 (measured: 99.4%, 0.011, 2.5 over
    512 tokens). The same cache against itself differs by nothing."""
    from tools import bench

    tokens = bench.code_sample_tokens(256)
    worst, mean, agree = bench.cache_quality(embedded_model, tokens, "int8", "bfloat16")
    assert agree >= 0.98 and mean < 0.05 and worst < 5, (worst, mean, agree)
    assert bench.cache_quality(embedded_model, tokens[:32], "bfloat16", "bfloat16")[:2] == (0, 0)
    config = embedded_model.config
    int8, bf16 = (init_cache(config, 2, 64, jnp.dtype(d)) for d in ("int8", "bfloat16"))
    assert int8.k.dtype == jnp.int8 and int8.k_scale.shape == int8.k.shape[:-1]
    nbytes = [sum(a.nbytes for a in c.buffers) for c in (int8, bf16)]
    assert nbytes[0] / nbytes[1] == (1 + 4 / config.head_dim) / 2

"""The CPU decode kernels (backends/cpu/kernels.py, csrc/cpu_moe.cc) against JAX: the
experts and the dense products, every tile size, padded widths, saturated gates, idle
experts; where they apply; their build and cache."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import ModelConfig, backends
from mixtral_jax.backends.cpu import kernels
from mixtral_jax.backends.cpu.decode import PROJECTIONS, ExpertBuffers, per_layer, unstacked
from mixtral_jax.inference.generate import generate_tokens
from mixtral_jax.model.attention import _attend, cached_attention_mask
from mixtral_jax.model.kv_cache import dequantize, gather_rows, init_cache, quantize
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.moe import SparseMoE

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module")
def built():
    """The kernels, built and registered (a compiler on PATH must build them: a failed
    build fails the tests, only a machine without one skips them)."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler")
    assert kernels.available(), "the kernels did not build (see the warning)"


@pytest.fixture(scope="module", params=[8, 16], ids=["8-float-vectors", "16-float-vectors"])
def variant(request, built) -> str:
    """The kernels built to compute in vectors of 8 floats (AVX2's) or of 16 (AVX-512's),
    whatever this CPU has, registered under their own names: each width has its own
    tiles, and a machine tests both (one of them runs slowly, as on a CPU without it)."""
    floats = request.param
    library = kernels.build(vector_floats=floats)  # cached as the native build, by its flags
    kernels.register(ctypes.CDLL(str(library)), variant=f"_w{floats}")
    return f"_w{floats}"


def reference(xs, start, count, w1, w2, w3):
    """Each expert's rows through its SwiGLU in JAX, HIGHEST precision; 0 elsewhere."""
    ys = np.zeros_like(xs)
    for e, (s, c) in enumerate(zip(start, count, strict=True)):
        x = jnp.asarray(xs[s : s + c])
        with jax.default_matmul_precision("highest"):
            ys[s : s + c] = np.asarray(jax.nn.silu(x @ w1[e]) * (x @ w3[e]) @ w2[e])
    return ys


@pytest.mark.parametrize("D, F", [(64, 96), (40, 52)], ids=["whole-panels", "padded"])
def test_kernel_equals_the_experts(D, F, variant):
    """Experts given every number of rows from 0 to 21 cover every tile, a whole and a
    last one (up to 8 rows for w1/w3 and 16 for w2 in 16-float vectors; in 8-float ones
    3 for w1/w3 below 16 rows and 6 from 16 (16-21 end in tiles of 4, 5, 6, 1, 2 and 3
    rows), and 6 for w2); 52 and 40 are not multiples of the 16-float panel; the last
    rows belong to no expert (padding tokens) and must come out 0."""
    rng = np.random.RandomState(0)
    E = 22
    w1, w3 = rng.randn(2, 1, E, D, F).astype(np.float32) * 0.3
    w2 = rng.randn(1, E, F, D).astype(np.float32) * 0.3
    count = rng.permutation(E).astype(np.int32)
    start = (np.cumsum(count) - count).astype(np.int32)
    n = int(count.sum()) + 4
    xs = rng.randn(n, D).astype(np.float32)
    xs[0] *= 40  # gates far into silu's saturation, both ways
    packed = kernels.pack(w1, w2, w3, jnp.int32(0))
    assert packed.w13.shape == (E, -(-F // 16), D, 32)
    assert packed.w2.shape == (E, -(-D // 16), -(-F // 16) * 16, 16)
    experts = jax.jit(functools.partial(kernels.experts, variant=variant))
    ys = np.asarray(experts(xs, start, count, packed))
    want = reference(xs, start, count, w1[0], w2[0], w3[0])
    np.testing.assert_allclose(ys, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    assert np.all(ys[count.sum() :] == 0)
    assert np.all(np.isfinite(ys))


@pytest.mark.parametrize("K, N", [(64, 112), (40, 211)], ids=["whole-panels", "padded"])
def test_dense_kernel_equals_a_matmul(K, N, variant):
    """Rows 1-19 cover every tile, a whole and a last one (up to 8 rows in 16-float
    vectors, 6 in 8-float ones); 112 columns are 7 panels (in 16-float vectors groups of
    3, 3, 1), 211 are 14 (3, 3, 3, 3, 2), the last padded."""
    rng = np.random.RandomState(0)
    w = rng.randn(K, N).astype(np.float32)
    packed = kernels.pack_dense(w)
    assert packed.shape == (-(-N // 16), K, 16)
    dense = jax.jit(functools.partial(kernels.dense, variant=variant), static_argnums=2)
    for n in range(1, 20):
        x = rng.randn(n, K).astype(np.float32)
        x[-1] *= 1e3
        want = x.astype(np.float64) @ w
        np.testing.assert_allclose(
            dense(x, packed, N), want, rtol=1e-5, atol=1e-5 * abs(want).max()
        )
    with pytest.raises(Exception, match="dense operand shapes do not fit together"):
        # The kernel reports at run time; dispatch is asynchronous, so wait for it.
        jax.block_until_ready(dense(x, packed, N + 16))


@pytest.mark.parametrize("rows", [7, 300], ids=["one-thread", "thread-pool"])
def test_lora_rows_kernel_applies_each_rows_adapter_on_its_segments(rows, variant):
    """A bank of 3 adapters on 3 column segments (q's, k's and v's, with columns between
    and after them in no segment): each row gets (x A) B of its own adapter in each
    segment, zeros elsewhere and for rows of no adapter (-1), with rows of one adapter
    scattered over the batch; 300 rows hold enough work for the thread pool. Segments that
    do not fit the factors are refused."""
    rng = np.random.RandomState(0)
    J, K, R, N = 3, 40, 5, 60
    columns = ((0, 24), (30, 39), (40, 49))
    a = rng.randn(J, K, 3 * R).astype(np.float32)
    b = rng.randn(J, R, 24 + 9 + 9).astype(np.float32)
    x = rng.randn(rows, K).astype(np.float32)
    ids = rng.randint(-1, J, rows).astype(np.int32)
    call = functools.partial(kernels.lora_rows, variant=variant)
    got = np.asarray(jax.jit(call, static_argnums=(4, 5))(x, ids, a, b, columns, N))
    want = np.zeros((rows, N))
    for r, j in enumerate(ids):
        if j < 0:
            continue
        offset = 0
        for s, (begin, end) in enumerate(columns):
            h = x[r].astype(np.float64) @ a[j][:, s * R : (s + 1) * R]
            want[r, begin:end] = h @ b[j][:, offset : offset + end - begin]
            offset += end - begin
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * abs(want).max())
    assert np.all(got[ids < 0] == 0) and np.all(got[:, 49:] == 0)
    with pytest.raises(Exception, match="the LoRA segments' widths are not B's"):
        jax.block_until_ready(call(x, ids, a, b, ((0, 24), (30, 39), (40, 48)), N))


def test_experts_lora_kernel_applies_each_rows_adapter_of_its_expert(variant):
    """300 rows over 4 experts and a bank of 3 adapters (and none), rows of one (expert,
    adapter) scattered among an expert's rows, enough work for the thread pool: each row
    goes through its expert with its own adapter on w1, w3 and w2, as the merged weights
    would compute it; rows of no expert come out 0."""
    rng = np.random.RandomState(1)
    E, J, D, F, R = 4, 3, 48, 40, 4
    w1, w3 = rng.randn(2, 1, E, D, F).astype(np.float32) * 0.3
    w2 = rng.randn(1, E, F, D).astype(np.float32) * 0.3
    a1, a3 = rng.randn(2, E, J, D, R).astype(np.float32) * 0.3
    b1, b3 = rng.randn(2, E, J, R, F).astype(np.float32) * 0.3
    a2 = rng.randn(E, J, F, R).astype(np.float32) * 0.3
    b2 = rng.randn(E, J, R, D).astype(np.float32) * 0.3
    count = np.array([90, 0, 130, 76], np.int32)
    start = (np.cumsum(count) - count).astype(np.int32)
    n = int(count.sum()) + 4
    xs = rng.randn(n, D).astype(np.float32)
    ids = rng.randint(-1, J, n).astype(np.int32)
    packed = kernels.pack(w1, w2, w3, jnp.int32(0))
    bank = kernels.PackedExpertsLoRA(packed.w13, packed.w2, (a1, b1, a3, b3, a2, b2))
    call = jax.jit(functools.partial(kernels.experts_lora, variant=variant))
    ys = np.asarray(call(xs, start, count, bank, ids))
    want = np.zeros_like(ys)
    for e in range(E):
        for r in range(start[e], start[e] + count[e]):
            j = ids[r]
            merged = [w[0][e].astype(np.float64) for w in (w1, w3, w2)]
            if j >= 0:
                for i, (a, b) in enumerate(((a1, b1), (a3, b3), (a2, b2))):
                    merged[i] = merged[i] + a[e, j].astype(np.float64) @ b[e, j]
            x = xs[r].astype(np.float64)
            gate, up = x @ merged[0], x @ merged[1]
            want[r] = (gate / (1 + np.exp(-gate)) * up) @ merged[2]
    np.testing.assert_allclose(ys, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    assert np.all(ys[count.sum() :] == 0)


@pytest.mark.parametrize("stored", ["float32", "int8"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("H, window", [(128, None), (40, 5)], ids=["causal", "window-tail"])
def test_attention_kernel_equals_the_masked_softmax(H, window, paged, stored, variant):
    """Each row over the keys its slot holds, in any slot order (a rolling buffer's),
    some empty, one stored past the query; H = 40 leaves a tail of 8 past the vectors.
    Paged: the rows' slots are blocks of 8 of a shuffled pool, read through their
    tables (an idle row's in no block). int8: the keys and values as an int8 cache
    stores them, with a scale per key and head. A row that sees no key (an idle slot)
    gets zeros, where the mask would average."""
    rng = np.random.RandomState(0)
    B, K, G, S = 6, 2, 3, 24
    q = rng.randn(B, K, G, H).astype(np.float32) * H**-0.5
    keys, values = (rng.randn(B, K, S, H).astype(np.float32) for _ in range(2))
    query_positions = np.array([0, 5, 23, 40, 9, 3], np.int32)
    key_positions = np.full((B, S), -1, np.int32)
    for b, t in enumerate(query_positions):
        held = np.arange(max(0, t - S + 2), t + 2)  # up to one key past the query
        key_positions[b, rng.permutation(S)[: len(held)]] = held
    key_positions[5] = -1  # idle
    blocks = np.arange(B, dtype=np.int32)[:, None]
    pool_keys, pool_values = keys, values
    if paged:  # row b's block m is pool block blocks[b, m], in a pool with spares
        bs, N = 8, 2 * B * S // 8
        blocks = rng.permutation(N)[: B * S // bs].reshape(B, S // bs).astype(np.int32)
        blocks[5] = N  # no block
        pool_keys, pool_values = (rng.randn(N, K, bs, H).astype(np.float32) for _ in range(2))
        for pool, rows in ((pool_keys, keys), (pool_values, values)):
            pool[blocks[:5]] = rows[:5].reshape(5, K, S // bs, bs, H).swapaxes(1, 2)
    scales = ()
    if stored == "int8":  # what the kernel reads, and what it must compute with
        (pool_keys, key_scales), (pool_values, value_scales) = map(
            quantize, (pool_keys, pool_values)
        )
        scales = key_scales, value_scales
        pool = {"k": dequantize(pool_keys, key_scales, jnp.float32)}
        pool["v"] = dequantize(pool_values, value_scales, jnp.float32)
        if paged:
            keys, values = (np.asarray(gather_rows(pool[n], blocks)) for n in ("k", "v"))
        else:
            keys, values = np.asarray(pool["k"]), np.asarray(pool["v"])
    attend = jax.jit(functools.partial(kernels.attend, variant=variant), static_argnums=6)
    got = attend(q, pool_keys, pool_values, blocks, query_positions, key_positions, window, *scales)
    mask = cached_attention_mask(query_positions[:, None], key_positions, window)
    want = _attend(q[:, None], keys, values, mask, kv_axes="BKSH")[:, 0]
    np.testing.assert_allclose(got[:5], want[:5], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got[5]) == 0)
    with pytest.raises(Exception, match="attention operand shapes do not fit together"):
        jax.block_until_ready(
            kernels.attend(
                q,
                pool_keys[:, :, :, :8],
                pool_values,
                blocks,
                query_positions,
                key_positions,
                window,
                *scales,
                variant=variant,
            )
        )


@pytest.mark.parametrize("window", [None, 4])
def test_attention_kernel_reads_a_rows_queries_together(window, variant):
    """T = 3 queries a row (a speculative step's: positions t, t+1, t+2, their keys
    stored), as heads of the row's kv heads: each sees the keys up to its own position,
    not those of the queries after it; an idle row gets zeros."""
    rng = np.random.RandomState(1)
    B, K, G, T, S, H = 3, 2, 2, 3, 24, 40
    q = rng.randn(B, T, K, G, H).astype(np.float32) * H**-0.5
    keys, values = (rng.randn(B, K, S, H).astype(np.float32) for _ in range(2))
    query_positions = np.array([[9, 10, 11], [2, 3, 4], [0, 1, 2]], np.int32)
    key_positions = np.full((B, S), -1, np.int32)
    for b in range(2):
        held = np.arange(query_positions[b, -1] + 1)
        key_positions[b, rng.permutation(S)[: len(held)]] = held
    blocks = np.arange(B, dtype=np.int32)[:, None]
    attend = jax.jit(functools.partial(kernels.attend, variant=variant), static_argnums=6)
    heads = q.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)  # query t: heads t G..
    got = attend(heads, keys, values, blocks, query_positions, key_positions, window)
    got = np.asarray(got).reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
    mask = cached_attention_mask(query_positions, key_positions, window)
    want = _attend(q, keys, values, mask, kv_axes="BKSH")
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-5, atol=1e-5)
    assert np.all(got[2] == 0)


def test_decode_moe_with_the_kernel_equals_the_sorted_dispatch(built):
    """A decode step's MoE layer (one token per row, one padded row) gives the same
    output through the kernel as through XLA's per-expert matmuls."""
    config = ModelConfig.from_dict(tiny.get_config()).replace(initializer_range=0.3)
    moe = SparseMoE(config, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(1).randn(5, 1, config.hidden_size), jnp.float32)
    mask = jnp.asarray([[True], [True], [False], [True], [True]])
    e = moe.experts
    stacked = (e.w1[...][None], e.w2[...][None], e.w3[...][None])  # one layer
    packed = kernels.pack(*stacked, jnp.int32(0))
    run = nnx.jit(lambda m, x, fn: m(x, mask, impl="sorted", dropless=True, experts_fn=fn))
    kernel, xla = run(moe, x, packed), run(moe, x, None)
    np.testing.assert_allclose(np.asarray(kernel.y), np.asarray(xla.y), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(kernel.y)[2] == 0)


def test_experts_are_packed_once_per_set_of_weights(built):
    """generate_tokens asks for the weights on every call: the packed copy is made once,
    and made again only when the weights are new arrays."""
    model = Mixtral(ModelConfig.from_dict(tiny.get_config()), rngs=nnx.Rngs(0))
    pieces = unstacked(model)
    first = pieces.experts
    assert all(isinstance(p, kernels.PackedExperts) for p in first)
    qkv, o = pieces.attention[0].qkv_weights, pieces.attention[0].o_weights
    assert qkv.w.shape == (5, 48, 16)  # q, k, v: (4 + 2 + 2) x 10 wide
    assert qkv.width == 80 and o.width == 48
    assert o.w.shape == (3, 40, 16)
    assert pieces.lm_head.w.shape == (14, 48, 16) and pieces.lm_head.width == 211  # -> 224
    again = unstacked(model)
    assert again.experts is first and again.attention is pieces.attention
    assert again.lm_head is pieces.lm_head
    w1 = model.layers.moe.experts.w1
    w1[...] = w1[...] * 2
    again = unstacked(model).experts
    assert again is not first
    np.testing.assert_array_equal(
        np.asarray(again[0].w13[..., :16]), 2 * np.asarray(first[0].w13[..., :16])
    )
    unpacked = unstacked(model, pack=False).experts
    assert all(isinstance(p, ExpertBuffers) and len(p.experts) == 8 for p in unpacked)


@pytest.mark.parametrize(
    "changes, experts, attention, lm_head",
    [
        (dict(dtype="bfloat16"), None, False, False),
        # One adapter on the experts: their kernel takes none (XLA's matmuls). The
        # attention kernels compute projections with adapters, which lora_rows adds.
        (dict(lora_rank=2, lora_targets="w2"), None, True, True),
        (dict(lora_rank=2, lora_targets="v_proj"), kernels.PackedExperts, True, True),
        # A bank of adapters on every expert weight: the experts' kernel applies them.
        (
            dict(lora_rank=2, lora_targets="w1,w2,w3,q_proj", lora_bank=3),
            kernels.PackedExpertsLoRA,
            True,
            True,
        ),
        (dict(lora_rank=2, lora_targets="w1,w2", lora_bank=3), None, True, True),
        pytest.param(
            dict(quantization="int8"),
            None,
            False,
            True,
            marks=pytest.mark.skipif(importlib.util.find_spec("qwix") is None, reason="no qwix"),
        ),
    ],
    ids=["bf16-compute", "lora-experts", "lora-attention", "bank", "bank-partial", "int8"],
)
def test_the_kernels_are_only_used_where_they_compute_what_the_model_does(
    changes, experts, attention, lm_head, built
):
    config = ModelConfig.from_dict(tiny.get_config()).replace(**changes)
    pieces = unstacked(Mixtral(config, rngs=nnx.Rngs(0)))
    kinds = {type(p) for p in pieces.experts}
    assert kinds == ({experts} if experts else {ExpertBuffers})
    assert (pieces.attention is not None) == attention
    assert (pieces.lm_head is not None) == lm_head
    if attention:
        qkv, o = pieces.attention[0].adapters
        assert (qkv is not None) == any(config.lora(n) for n in PROJECTIONS[:3])
        assert (o is not None) == config.lora("o_proj")


def test_bfloat16_weights_decode_through_the_kernel_as_without_it(built):
    """The model casts bfloat16 weights to float32 before its float32 matmuls; the
    packed copy is that cast, so a decode step's logits are the same either way."""
    config = ModelConfig.from_dict(tiny.get_config()).replace(
        param_dtype="bfloat16", initializer_range=0.2
    )
    model = Mixtral(config, rngs=nnx.Rngs(4))
    packed = unstacked(model)
    assert all(isinstance(p, kernels.PackedExperts) for p in packed.experts)
    assert packed.experts[0].w13.dtype == jnp.float32
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (3, 9)))
    forward = nnx.jit(lambda m, t, p, c, u: m.forward(t, p, cache=c, unstacked=u))
    logits = []
    for pieces in (packed, unstacked(model, pack=False)):
        out = forward(
            model,
            tokens[:, :8],
            jnp.broadcast_to(jnp.arange(8), (3, 8)),
            init_cache(config, 3, 9),
            None,
        )
        out = forward(model, tokens[:, 8:], jnp.full((3, 1), 8), per_layer(out.cache), pieces)
        logits.append(np.asarray(out.logits))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_a_prefill_reads_views_or_the_kernels_and_gets_the_stacked_logits(built):
    """A CPU prefill reads each expert's own buffer (XLA:CPU would copy it out of the
    stack), through the experts' kernel where the decode step has one: the logits and
    the cache are those of the stacked weights, for chunks that give each expert a few
    rows and many. The decode step's kernels of rows (attention, LM head) are refused
    for a prefill, by name, and give a chunk over a cache the stacked weights' logits."""
    config = ModelConfig.from_dict(tiny.get_config())  # 8 experts, top 2: batch 64 packs
    model = Mixtral(config, rngs=nnx.Rngs(5))
    packed, unpacked = backends.for_decode(model, 4), backends.for_decode(model, 65)
    kernel, views = packed.prefill(), unpacked.prefill()
    assert all(isinstance(p, kernels.PackedExperts) for p in kernel.experts)
    assert all(isinstance(p, ExpertBuffers) for p in views.experts)
    assert kernel.takes_any_length and views.takes_any_length
    assert packed.prefill(views=False).experts is packed.unstacked.experts
    assert unpacked.prefill(views=False) is None
    forward = nnx.jit(lambda m, t, c, u: m.forward(t, cache=c, unstacked=u))
    for T in (4, 96):
        tokens = jnp.asarray(np.random.RandomState(T).randint(0, config.vocab_size, (3, T)))
        cache = init_cache(config, 3, T + 1)
        want = forward(model, tokens, cache, None)
        for pieces in (kernel, views):
            got = forward(model, tokens, cache, pieces)
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.cache.k, want.cache.k, rtol=1e-6, atol=1e-6)
    assert packed.unstacked.attention is not None
    with pytest.raises(ValueError, match="calls over a cache"):
        forward(model, tokens, init_cache(config, 3, T + 1), packed.unstacked)
    # A chunk continuing a cache (a speculative step's) may: the stacked chunk's logits.
    chunk = nnx.jit(lambda m, t, p, c, u: m.forward(t, p, cache=c, unstacked=u, chunk=True))
    cache = forward(model, tokens[:, :90], init_cache(config, 3, T + 1), None).cache
    positions = jnp.broadcast_to(jnp.arange(90, 96), (3, 6))
    want = chunk(model, tokens[:, 90:], positions, cache, None)
    got = chunk(model, tokens[:, 90:], positions, packed.cache(cache), packed.unstacked)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_no_packed_copy_where_it_would_not_fit(monkeypatch, built):
    model = Mixtral(ModelConfig.from_dict(tiny.get_config()), rngs=nnx.Rngs(5))
    e = model.layers.moe.experts
    need = kernels.packed_bytes(e.w1[...])
    assert need == 3 * 2 * 8 * 48 * 48 * 4  # F = 40 rounded up to 48
    monkeypatch.setattr(
        kernels, "available_memory", lambda: int(need / kernels.MAX_FREE_FRACTION) - 1
    )
    with pytest.warns(UserWarning, match="would take 0.0 GB of the 0.0 GB available"):
        pieces = unstacked(model)
        ids, _ = generate_tokens(model, [[1, 2, 3]], max_new_tokens=3)  # on XLA's matmuls
    assert all(isinstance(p, ExpertBuffers) for p in pieces.experts)
    # Each copy is judged on its own: the smaller ones still fit.
    assert pieces.attention is not None and pieces.lm_head is not None
    monkeypatch.undo()
    assert generate_tokens(model, [[1, 2, 3]], max_new_tokens=3)[0] == ids  # on the kernel


def test_no_packed_copies_at_all_without_memory(monkeypatch, built):
    model = Mixtral(ModelConfig.from_dict(tiny.get_config()), rngs=nnx.Rngs(6))
    monkeypatch.setattr(kernels, "available_memory", lambda: 0)
    with pytest.warns(UserWarning) as caught:
        pieces = unstacked(model)
        ids, _ = generate_tokens(model, [[1, 2, 3], [4]], max_new_tokens=3)
    copies = sorted({str(w.message).split(" for the CPU")[0] for w in caught})
    whats = ("the LM head", "the attention projections", "the experts")
    assert copies == sorted(f"mixtral_jax: no packed copy of {what}" for what in whats)
    assert pieces.attention is None and pieces.lm_head is None
    assert all(isinstance(p, ExpertBuffers) for p in pieces.experts)
    monkeypatch.undo()
    assert generate_tokens(model, [[1, 2, 3], [4]], max_new_tokens=3)[0] == ids


def test_a_failed_build_names_the_problem_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="no C.. compiler 'no-such-c..' on PATH"):
        kernels.build(compiler="no-such-c++", cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="failed"):
        kernels.build(compiler="false", cache_dir=tmp_path)  # a compiler that fails
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_the_build_is_cached(tmp_path):
    library = kernels.build(cache_dir=tmp_path)
    built = library.stat().st_mtime_ns
    assert kernels.build(cache_dir=tmp_path) == library
    assert library.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [library.name]


def test_large_batches_leave_the_experts_to_xla(built):
    """Past 16 rows per expert on average XLA's matmuls are as fast: generation then
    reads each expert's own buffers, and gets the same tokens as at batch 1."""
    config = ModelConfig.from_dict(tiny.get_config())  # 8 experts, top 2
    assert kernels.suits(config, 64) and not kernels.suits(config, 65)
    model = Mixtral(config, rngs=nnx.Rngs(3))
    prompts = [[1, 5 + i % 7, 9 + i % 11] for i in range(65)]
    batched, _ = generate_tokens(model, prompts, max_new_tokens=4)
    for i in (0, 7, 64):
        assert batched[i] == generate_tokens(model, [prompts[i]], max_new_tokens=4)[0][0]

"""Generation: cached decode equals the full forward, greedy equals transformers,
sampling is reproducible and stays in its allowed set, and the CLI streams."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.backends.cpu.decode import per_layer, unstacked
from mixtral_jax.inference.generate import generate, generate_tokens
from mixtral_jax.inference.sampling import Sampling, allowed, argmax, sample
from mixtral_jax.model.kv_cache import init_cache
from tests.reference import hf_twin, torch_and_transformers

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 17, 42, 99, 5, 60, 7], [1, 150], [1, 33, 34, 35, 36]]


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.from_dict(tiny.get_config()).replace(**changes)


@pytest.mark.parametrize("weights", ["stacked", "pieces", "packed"])
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_cached_decode_equals_the_full_forward(window, weights):
    """Prefill 7 tokens, then decode one at a time past the window (rolling buffer),
    reading the stacked weights and cache (a scan, as on TPUs) or each layer's and
    expert's own buffers and each layer's own cache, with the experts, the attention
    projections and the LM head computed by XLA or by the CPU kernels (as generation
    on a CPU does)."""
    if weights == "packed" and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    config = tiny_config(sliding_window=window)
    model = Mixtral(config, rngs=nnx.Rngs(1))
    pieces = None
    if weights != "stacked":
        pieces = unstacked(model, pack=weights == "packed")
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (3, 16)))
    full = np.asarray(model(tokens))
    forward = nnx.jit(lambda m, t, p, c, u: m.forward(t, p, cache=c, unstacked=u))
    positions = jnp.broadcast_to(jnp.arange(7), (3, 7))
    out = forward(model, tokens[:, :7], positions, init_cache(config, 3, 16), None)
    assert out.cache.length == (16 if window is None else window)
    np.testing.assert_allclose(np.asarray(out.logits), full[:, :7], atol=1e-4)
    cache = out.cache if pieces is None else per_layer(out.cache)  # as generation does
    step = jnp.full((3, 1), 7)
    program = forward.lower(model, tokens[:, 7:8], step, cache, pieces).as_text()
    kernel_calls = ("mixtral_jax_cpu_moe", "mixtral_jax_cpu_dense")
    assert all((call in program) == (weights == "packed") for call in kernel_calls)
    for t in range(7, 16):
        out = forward(model, tokens[:, t : t + 1], jnp.full((3, 1), t), cache, pieces)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, t], atol=1e-4)


def test_layer_pieces_are_views_of_the_stacked_weights():
    """Each layer's and each expert's buffer is the stacked parameter's own memory at
    its offset: generation on a CPU reads the weights in place and copies nothing."""
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(0))
    pieces = unstacked(model, pack=False)
    stacked = model.layers
    layer, expert = 1, 5
    w1, w2, w3 = pieces.experts[layer].experts[expert]
    checks = [
        (stacked.attention.q_proj[...], pieces.layers[layer]["attention"]["q_proj"][...], (layer,)),
        (stacked.moe.gate[...], pieces.layers[layer]["moe"]["gate"][...], (layer,)),
        (stacked.moe.experts.w2[...], w2.w, (layer, expert)),
    ]
    for whole, piece, index in checks:
        np.testing.assert_array_equal(np.asarray(piece), np.asarray(whole[index]))
        offset = np.ravel_multi_index(index + (0,) * piece.ndim, whole.shape) * 4
        assert piece.unsafe_buffer_pointer() == whole.unsafe_buffer_pointer() + offset
    assert len(pieces.layers) == 2 and all(len(e.experts) == 8 for e in pieces.experts)


def test_batched_prompts_get_what_they_would_get_alone():
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(2))
    batched, _ = generate_tokens(model, PROMPTS, max_new_tokens=12)
    alone = [generate_tokens(model, [p], max_new_tokens=12)[0][0] for p in PROMPTS]
    assert batched == alone


@pytest.mark.parity
@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
def test_greedy_generation_equals_transformers(window):
    """32 new tokens for three prompts of different lengths, batched on our side, each
    alone with transformers' `generate`."""
    torch, _ = torch_and_transformers()
    config = tiny_config(sliding_window=window)
    hf, model = hf_twin(config, seed=3)
    ours, _ = generate_tokens(model, PROMPTS, max_new_tokens=32)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        expected = out[0, len(prompt) :].tolist()
        assert got == expected


def test_sampling_is_reproducible_and_depends_on_the_seed():
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(0))
    kwargs = dict(max_new_tokens=16, sampling=Sampling(temperature=1.5, top_k=20, top_p=0.95))
    a, _ = generate_tokens(model, PROMPTS, seed=7, **kwargs)
    b, _ = generate_tokens(model, PROMPTS, seed=7, **kwargs)
    c, _ = generate_tokens(model, PROMPTS, seed=8, **kwargs)
    assert a == b and a != c


def test_top_k_and_top_p_never_draw_outside_their_set():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05], [0.05, 0.05, 0.1, 0.2, 0.6]]))
    # top-k 2: the two most likely; top-p 0.7: smallest set reaching 0.7.
    np.testing.assert_array_equal(
        allowed(logits, Sampling(1.0, top_k=2)), [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    )
    np.testing.assert_array_equal(
        allowed(logits, Sampling(1.0, top_p=0.7)), [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    )
    np.testing.assert_array_equal(
        allowed(logits, Sampling(1.0, top_p=0.71)), [[1, 1, 1, 0, 0], [0, 0, 0, 1, 1]]
    )
    np.testing.assert_array_equal(
        allowed(logits, Sampling(1.0, top_k=3, top_p=0.5)), [[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]
    )
    for sampling, ok in [
        (Sampling(1.0, top_k=2), [{0, 1}, {3, 4}]),
        (Sampling(1.0, top_p=0.5), [{0, 1}, {4}]),
    ]:
        keys = jax.random.split(jax.random.key(0), 400)
        draw = jax.vmap(lambda k, s=sampling: sample(logits, k, s))
        drawn = np.asarray(draw(keys))  # [400, 2]
        for row in range(2):
            assert set(drawn[:, row].tolist()) == ok[row]  # all of the set, nothing else


def test_greedy_argmax_is_jnp_argmax():
    """Random rows, ties (the first maximum wins), NaN (counts as the maximum), -inf."""
    logits = np.random.RandomState(0).standard_normal((6, 1000)).astype(np.float32)
    logits[1, [10, 500]] = 9.0
    logits[2, [3, 700]] = np.nan
    logits[3] = -np.inf
    logits[4, 999] = 50.0
    np.testing.assert_array_equal(argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))
    assert argmax(jnp.asarray(logits)).tolist()[1:5] == [10, 3, 0, 999]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1.0), "temperature must be a number >= 0"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=200), "exceeds the model's max_position_embeddings=128"),
    ],
)
def test_invalid_requests_are_named(kwargs, message):
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(0))
    sampling = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p") if k in kwargs}
    with pytest.raises(ValueError, match=message):
        generate_tokens(model, PROMPTS, sampling=Sampling(**sampling), **kwargs)


def test_empty_prompts_are_refused():
    model = Mixtral(tiny_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[1, 2], []])
    with pytest.raises(ValueError, match="a non-empty string or a non-empty list of token ids"):
        generate(model, None, [""])
    with pytest.raises(ValueError, match=r"mixtral_jax.generate_tokens\(model"):
        generate(model, None, [[1, 15, 27]])  # ids without a tokenizer: generate_tokens


def test_text_generation_streams_and_stops_at_stop_strings(sp_model):
    from mixtral_jax.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(sp_model)
    config = tiny_config(vocab_size=tokenizer.vocab_size)
    model = Mixtral(config, rngs=nnx.Rngs(0))
    pieces = {0: [], 1: []}
    result = generate(
        model,
        tokenizer,
        ["The quick brown", "Über"],
        max_new_tokens=24,
        temperature=1.0,
        seed=1,
        on_token=lambda row, token, piece: pieces[row].append(piece),
    )
    for row in range(2):
        assert "".join(pieces[row]) == result.texts[row] == tokenizer.decode(result.tokens[row])
    # A stop string cuts the text where it starts.
    text = result.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = generate(
            model,
            tokenizer,
            "The quick brown",
            max_new_tokens=24,
            temperature=1.0,
            seed=1,
            stop=[stop],
        )
        assert cut.texts[0] == text[: text.find(stop)]


def test_text_and_token_id_prompts_give_the_same_tokens(sp_model):
    from mixtral_jax.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(sp_model)
    model = Mixtral(tiny_config(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    text = generate(model, tokenizer, ["The quick brown", "Über"], max_new_tokens=6)
    ids = generate(model, tokenizer, text.prompt_tokens, max_new_tokens=6)
    one = generate(model, tokenizer, text.prompt_tokens[1], max_new_tokens=6)  # one prompt
    assert ids.tokens == text.tokens and ids.texts == text.texts
    assert one.tokens == text.tokens[1:]
    alone, _ = generate_tokens(model, text.prompt_tokens, max_new_tokens=6, eos_id=2)
    assert alone == text.tokens
    with pytest.raises(ValueError, match="chat=True wraps text prompts"):
        generate(model, tokenizer, text.prompt_tokens, chat=True)


def test_cli_streams_and_reports_speed(sp_model, tmp_path):
    from mixtral_jax.checkpoints.store import save
    from mixtral_jax.model.tokenizer import Tokenizer
    from mixtral_jax.params import flat_params

    tokenizer = Tokenizer.from_file(sp_model)
    config = tiny_config(vocab_size=tokenizer.vocab_size)
    model = Mixtral(config, rngs=nnx.Rngs(0))
    save(tmp_path / "ckpt", flat_params(model), config)
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max_new_tokens", "8"]
    result = subprocess.run(
        [sys.executable, "-m", "mixtral_jax.generate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = generate(model, tokenizer, "Hello", max_new_tokens=8).texts[0]
    assert result.stdout.startswith("Hello" + expected)
    assert "tokens/s" in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "mixtral_jax.generate", *args, "--top_p", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr

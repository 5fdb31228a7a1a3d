"""The routing analysis (mixtral_jax/routing/analysis.py and its CLI) on a model whose
routers are set by hand: every statistic equals the one counted by hand."""

from __future__ import annotations

import html
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.analysis import figures
from mixtral_jax.analysis import routing as analysis
from mixtral_jax.analysis.cli import main
from mixtral_jax.checkpoints.store import save
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.tokenizer import Tokenizer
from mixtral_jax.params import flat_params, set_params
from tests.test_generate import tiny_config

E = 8
PERMUTATIONS = [np.arange(E), np.array([3, 1, 4, 0, 5, 7, 2, 6])]  # expert of direction d


def hand_routed_model(vocab_size: int = 211) -> Mixtral:
    """Attention and experts output zero, so every layer's router sees the embedding.
    Token t's embedding points mostly along direction t % E and less along
    (t + 3) % E; layer l's router sends direction d to expert PERMUTATIONS[l][d].
    So in layer l token t chooses PERMUTATIONS[l][t % E] first and
    PERMUTATIONS[l][(t + 3) % E] second."""
    config = tiny_config(vocab_size=vocab_size)
    model = Mixtral(config, rngs=nnx.Rngs(0))
    params = {k: np.array(v) for k, v in flat_params(model).items()}
    embedding = np.zeros_like(params[("embed", "embedding")])
    for t in range(vocab_size):
        embedding[t, t % E], embedding[t, (t + 3) % E] = 4.0, 2.0
    gate = np.zeros_like(params[("layers", "moe", "gate")])  # [L, D, E]
    for layer, permutation in enumerate(PERMUTATIONS):
        gate[layer, np.arange(E), permutation] = 1.0
    params[("embed", "embedding")] = embedding
    params[("layers", "moe", "gate")] = gate
    params[("layers", "attention", "o_proj")] *= 0
    params[("layers", "moe", "experts", "w2")] *= 0
    set_params(model, {k: jnp.asarray(v) for k, v in params.items()})
    return model


def expected_experts(tokens) -> np.ndarray:
    """[L, T, 2] by the construction above."""
    return np.array([[[p[t % E], p[(t + 3) % E]] for t in tokens] for p in PERMUTATIONS], np.int32)


def test_recorded_choices_are_the_models_own():
    model = hand_routed_model()
    sequences = [[1, 9, 9, 17, 4, 12, 5], [2, 3], list(range(1, 40))]
    routes = analysis.record(model, sequences, seq_len=16, batch_size=2)
    for ids, r in zip(sequences, routes, strict=True):
        np.testing.assert_array_equal(r.tokens, ids)
        np.testing.assert_array_equal(r.experts, expected_experts(ids))
        np.testing.assert_allclose(r.weights.sum(-1), 1.0, atol=1e-5)
        # A window starts every 16 tokens: 39 tokens are 3 windows.
        assert list(np.flatnonzero(r.starts)) == list(range(0, len(ids), 16))
    forward = model.forward(jnp.asarray([sequences[0]])).routing  # the weights are its own
    np.testing.assert_allclose(routes[0].weights, np.asarray(forward.weights[:, 0]), atol=1e-6)


def test_statistics_equal_counts_by_hand():
    tokens = [1, 9, 9, 17, 4, 12, 5, 13, 2]
    experts = expected_experts(tokens)
    starts = np.zeros(len(tokens), bool)
    starts[[0, 5]] = True  # two windows: pairs (4, 5) and across them do not count
    shares = analysis.expert_shares(experts, E)
    first, shared = analysis.repeat_rates(experts, starts)
    for layer in range(len(PERMUTATIONS)):
        counts = [0] * E
        for choices in experts[layer]:
            for e in choices:
                counts[e] += 1
        assert shares[layer].tolist() == [c / (2 * len(tokens)) for c in counts]
        pairs = [(t - 1, t) for t in range(1, len(tokens)) if not starts[t]]
        same = sum(experts[layer, a, 0] == experts[layer, b, 0] for a, b in pairs)
        overlap = sum(bool(set(experts[layer, a]) & set(experts[layer, b])) for a, b in pairs)
        assert first[layer] == same / len(pairs)
        assert shared[layer] == overlap / len(pairs)
    # 1, 9, 9, 17 share t % 8: three repeats, and 5 -> 13 a fourth; 4 -> 12 would be
    # one more but crosses into the second window. 7 pairs count.
    assert first[0] == first[1] == pytest.approx(4 / 7)


def test_random_baseline_is_its_closed_form_and_what_random_routing_gives():
    first, shared = analysis.random_repeat_rates(8, 2)
    assert first == 1 / 8 and shared == pytest.approx(1 - 15 / 28)  # 12.5%, 46.4%
    rng = np.random.default_rng(0)
    n = 200_000
    experts = np.argsort(rng.random((1, n, E)), axis=-1)[..., :2]  # random top-2 sets
    measured_first, measured_shared = analysis.repeat_rates(experts, np.eye(1, n, dtype=bool)[0])
    for p, measured in ((first, measured_first[0]), (shared, measured_shared[0])):
        assert abs(measured - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_report_writes_valid_images_tables_and_json(tmp_path, sp_model):
    tokenizer = Tokenizer.from_file(sp_model)
    model = hand_routed_model(tokenizer.vocab_size)
    texts = {"code": "def f(x):\n    return x  # 🙂\n", "prose": "The quick brown fox. Über."}
    ids = [tokenizer.encode(t) for t in texts.values()]
    routes = dict(zip(texts, analysis.record(model, ids, seq_len=32, batch_size=2), strict=True))
    summary = figures.write_report(tmp_path, tokenizer, routes, E, 2, [0, 1])
    stored = json.loads((tmp_path / "routing.json").read_text())
    assert stored["sets"]["code"]["shares"] == summary["sets"]["code"]["shares"]
    assert stored["random"]["repeat_any"] == pytest.approx(1 - 15 / 28)
    for name in ("expert_shares.png", "tokens_code_layer0.png", "tokens_prose_layer1.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
        from matplotlib import image

        assert image.imread(tmp_path / name).ndim == 3
    assert ET.parse(tmp_path / "expert_shares.svg").getroot().tag.endswith("svg")
    page = (tmp_path / "tokens_code.html").read_text(encoding="utf-8")
    blocks = re.findall(r"<pre>(.*?)</pre>", page, re.S)
    assert len(blocks) == 2  # layers 0 and 1, each the whole text, coloured token by token
    assert all(html.unescape(re.sub(r"<[^>]+>", "", b)) == texts["code"] for b in blocks)
    table = (tmp_path / "locality.md").read_text()
    assert "| random assignment |  | 12.5% | 46.4% |" in table
    assert (tmp_path / "locality.csv").read_text().startswith("input,layer,first choice")


@pytest.fixture(scope="module")
def hand_checkpoint(tmp_path_factory, sp_model) -> Path:
    tokenizer = Tokenizer.from_file(sp_model)
    model = hand_routed_model(tokenizer.vocab_size)
    directory = tmp_path_factory.mktemp("routing") / "ckpt"
    save(directory, flat_params(model), model.config)
    (directory / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())
    return directory


def test_cli_writes_the_figures(hand_checkpoint, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n" * 5)
    (tmp_path / "b.jsonl").write_text('{"text": "The fox."}\n{"text": "Über den Wolken."}\n')
    out = tmp_path / "out"
    argv = ["--checkpoint", str(hand_checkpoint), "--out", str(out), "--seq_len", "32"]
    assert (
        main([*argv, "--inputs", f"code={tmp_path / 'a.txt'}", f"prose={tmp_path / 'b.jsonl'}"])
        == 0
    )
    assert "| code | 0 |" in capsys.readouterr().out
    summary = json.loads((out / "routing.json").read_text())
    assert set(summary["sets"]) == {"code", "prose"}
    assert summary["layers_shown"] == [0, 1]
    assert (out / "tokens_prose_layer1.png").is_file()


@pytest.mark.parametrize(
    "inputs, extra, message",
    [
        (["code=missing.txt"], [], "missing.txt: no such file"),
        (["code=empty.txt"], [], "empty.txt: the file is empty"),
        (["code"], [], "give NAME=FILE"),
        (["code=a.txt", "code=a.txt"], [], "the name 'code' is given twice"),
        (["code=a.txt"], ["--layers", "5"], "no layer 5; the model has 2 layers (0-1)"),
        (["code=a.txt"], ["--seq_len", "0"], "must be positive"),
        (["code=a.txt"], ["--seq_len", "99999"], "longer than the model's max_position"),
    ],
)
def test_cli_errors_name_the_problem(
    hand_checkpoint, tmp_path, monkeypatch, capsys, inputs, extra, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x = 1\n")
    (tmp_path / "empty.txt").write_text("  \n")
    argv = ["--checkpoint", str(hand_checkpoint), "--out", "out", *extra, "--inputs", *inputs]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_the_figures_name_the_extra(
    hand_checkpoint, tmp_path, monkeypatch, capsys
):
    """The model never needs matplotlib; the figures say how to get it, before any work."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[plots\]"'):
        figures.require_matplotlib()
    (tmp_path / "a.txt").write_text("x = 1\n")
    argv = ["--checkpoint", str(hand_checkpoint), "--out", str(tmp_path / "out")]
    assert main([*argv, "--inputs", f"code={tmp_path / 'a.txt'}"]) == 2
    assert "the routing figures need matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

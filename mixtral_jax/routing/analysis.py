"""Routing analysis: which experts the routers choose, token by token, as in section 5
of the Mixtral paper (arXiv 2401.04088). CLI: `python -m mixtral_jax.routing`.

The paper found that Mixtral's experts do not specialise by topic but by syntax,
and that consecutive tokens often go to the same expert. For any checkpoint and
texts, `record` takes every token's top-k experts and weights in every layer
from the model's own forward pass (dropless, as at inference), and `summarise`
computes per input set:

- `shares` [L][E]: the fraction of all choices (first and second) that each
  expert gets (the paper's Figure 7; uniform routing gives 1/E);
- `repeat_first` [L]: the fraction of consecutive token pairs whose first
  choices are the same expert, and `repeat_any` [L]: whose top-k sets share an
  expert (Table 5), next to random assignment, 1/E and 1 - C(E-k, k)/C(E, k)
  (12.5% and 46.4% for 8 experts, top-2).

`plot_shares`, `locality_table`, `tokens_html` and `plot_tokens` draw them;
`write_report` writes all of it. Long texts are cut into windows of `seq_len`
tokens routed on their own (a pair never spans two windows), `batch_size`
windows per call of the jitted forward: memory does not grow with the input.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from mixtral_jax import sharding, steps
from mixtral_jax.model import Mixtral, with_config
from mixtral_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Routes:
    """The routing of a run of tokens: ids [T], chosen experts and their weights
    [L, T, k] (best first), and which tokens start a window (no predecessor) [T]."""

    tokens: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    starts: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[Routes]) -> Routes:
        return Routes(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.experts for p in parts], axis=1),
            np.concatenate([p.weights for p in parts], axis=1),
            np.concatenate([p.starts for p in parts]),
        )


def record(
    model: Mixtral,
    sequences: Sequence[Sequence[int]],
    *,
    seq_len: int = 2048,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> list[Routes]:
    """The routing of each token sequence, from the model's forward pass on `mesh`
    (default: the default device), windows of `seq_len` tokens, `batch_size` rows
    per call."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot route an empty sequence of tokens")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's max_position_embeddings "
            f"({model.config.max_position_embeddings})"
        )
    model = with_config(model, model.config.replace(capacity_factor=None))  # dropless
    mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    routing = steps.jit_routing(model, mesh)
    steps.check_rows(batch_size, routing.batch_sharding)
    windows = [
        (i, start, np.asarray(s[start : start + seq_len], np.int32))
        for i, s in enumerate(sequences)
        for start in range(0, len(s), seq_len)
    ]
    pieces: list[list[Routes]] = [[] for _ in sequences]
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)  # 0: padding, not routed
        for row, (_, _, ids) in enumerate(batch):
            tokens[row, : len(ids)], segments[row, : len(ids)] = ids, 1
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)
        experts, weights = jax.device_get(
            routing(routing.params, tokens, positions, segments)
        )  # [L, B, T, k]
        for row, (i, _, ids) in enumerate(batch):
            n = len(ids)
            starts = np.zeros(n, bool)
            starts[0] = True
            pieces[i].append(Routes(ids, experts[:, row, :n], weights[:, row, :n], starts))
    return [Routes.concatenate(p) for p in pieces]


def expert_shares(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, T, k] chosen experts -> [L, E]: the fraction of each layer's choices
    that went to each expert."""
    counts = [np.bincount(layer.ravel(), minlength=num_experts) for layer in experts]
    return np.stack(counts) / experts[0].size


def repeat_rates(experts: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer [L], over the consecutive pairs (t-1, t) within a window: the
    fraction whose first choices are equal, and whose top-k sets share an expert."""
    pairs = ~starts[1:]
    if not pairs.any():
        nan = np.full(experts.shape[0], np.nan)
        return nan, nan
    before, after = experts[:, :-1][:, pairs], experts[:, 1:][:, pairs]  # [L, P, k]
    first = (before[..., 0] == after[..., 0]).mean(-1)
    shared = (before[..., :, None] == after[..., None, :]).any((-2, -1)).mean(-1)
    return first, shared


def random_repeat_rates(num_experts: int, k: int) -> tuple[float, float]:
    """What uniformly random routing gives: equal first choices with probability
    1/E; two random k-sets of E share an expert with probability 1 - C(E-k,k)/C(E,k)."""
    return 1 / num_experts, 1 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


def summarise(routes: Mapping[str, Routes], num_experts: int, k: int) -> dict:
    """Every figure of the analysis, JSON-ready: per input set its token count,
    expert shares [L][E] and repeat rates [L]; the random baselines."""
    first_random, any_random = random_repeat_rates(num_experts, k)
    sets = {}
    for name, r in routes.items():
        first, shared = repeat_rates(r.experts, r.starts)
        sets[name] = {
            "tokens": int(r.tokens.size),
            "shares": expert_shares(r.experts, num_experts).tolist(),
            "repeat_first": first.tolist(),
            "repeat_any": shared.tolist(),
        }
    return {
        "num_experts": num_experts,
        "top_k": k,
        "random": {"repeat_first": first_random, "repeat_any": any_random},
        "sets": sets,
    }


def locality_table(summary: dict, layers: Sequence[int]) -> tuple[str, str]:
    """Table 5: (Markdown, CSV) of the repeat rates per input set and layer."""
    k = summary["top_k"]
    head = ["input", "layer", "first choice", f"any of top-{k}"]
    rows = [
        [name, str(layer), f"{s['repeat_first'][layer]:.1%}", f"{s['repeat_any'][layer]:.1%}"]
        for name, s in summary["sets"].items()
        for layer in layers
    ]
    random = summary["random"]
    rows.append(
        ["random assignment", "", f"{random['repeat_first']:.1%}", f"{random['repeat_any']:.1%}"]
    )
    markdown = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])
    csv = "\n".join(",".join(r) for r in [head, *rows])
    return markdown + "\n", csv + "\n"


def expert_colors(num_experts: int) -> list[str]:
    """A light, distinct background colour per expert, as '#rrggbb'."""
    from matplotlib import colormaps, colors

    cmap = colormaps["tab10" if num_experts <= 10 else "tab20" if num_experts <= 20 else "hsv"]
    # Qualitative maps are indexed by integer, the continuous one by a fraction.
    picks = range(num_experts) if cmap.N <= 20 else np.arange(num_experts) / num_experts
    return [colors.to_hex(0.55 * np.asarray(cmap(i)[:3]) + 0.45) for i in picks]


def token_texts(tokenizer: Tokenizer, tokens: Sequence[int]) -> list[str]:
    """Each token's text, as streaming shows it: a character spelled in several
    byte pieces appears with its last piece."""
    stream = tokenizer.stream()
    texts = [stream.add(int(t)) for t in tokens]
    texts[-1] += stream.flush()
    return texts


def tokens_html(
    tokenizer: Tokenizer,
    routes: Routes,
    layers: Sequence[int],
    num_experts: int,
    max_tokens: int = 400,
) -> str:
    """Figure 8: the text with each token on the colour of its first-choice expert,
    one block per layer, as a standalone HTML page."""
    palette = expert_colors(num_experts)
    tokens = routes.tokens[:max_tokens]
    texts = token_texts(tokenizer, tokens)
    blocks = []
    for layer in layers:
        spans = "".join(
            f'<span style="background:{palette[routes.experts[layer, t, 0]]}" '
            f'title="expert {routes.experts[layer, t, 0]}">{html.escape(text)}</span>'
            for t, text in enumerate(texts)
        )
        blocks.append(f"<h2>Layer {layer}</h2>\n<pre>{spans}</pre>")
    legend = " ".join(
        f'<span style="background:{c};padding:0 6px">expert {e}</span>'
        for e, c in enumerate(palette[:num_experts])
    )
    style = "body{font-family:sans-serif} pre{font-size:13px;white-space:pre-wrap}"
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><style>{style}</style>"
        f"<title>First-choice experts</title></head><body>\n<p>{legend}</p>\n"
        + "\n".join(blocks)
        + "\n</body></html>\n"
    )


def plot_shares(summary: dict, layers: Sequence[int], path: str | Path) -> None:
    """Figure 7: per chosen layer, each expert's share of the choices, one bar per
    input set, with the uniform share 1/E as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    num_experts, names = summary["num_experts"], list(summary["sets"])
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(max(6, num_experts * 0.9), 2.4 * len(layers)), squeeze=False
    )
    width = 0.8 / len(names)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        for i, name in enumerate(names):
            shares = summary["sets"][name]["shares"][layer]
            ax.bar(
                np.arange(num_experts) + (i - (len(names) - 1) / 2) * width,
                shares,
                width,
                label=name,
            )
        ax.axhline(1 / num_experts, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xticks(range(num_experts))
        ax.set_ylabel("share of choices")
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=8, ncols=min(len(names), 4))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tokens(
    tokenizer: Tokenizer,
    routes: Routes,
    layer: int,
    num_experts: int,
    path: str | Path,
    max_tokens: int = 400,
    columns: int = 90,
) -> None:
    """Figure 8 as an image: the text in a monospace grid, each character on the
    colour of its token's first-choice expert in `layer`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    palette = expert_colors(num_experts)
    cells = []  # (column, row, character, colour)
    column = row = 0
    for t, text in enumerate(token_texts(tokenizer, routes.tokens[:max_tokens])):
        for char in text.replace("\t", "    "):
            char = char if ord(char) <= 0xFFFF else "\u25a1"  # emoji: not in the font
            if char == "\n" or column == columns:
                column, row = 0, row + 1
            if char != "\n":
                cells.append((column, row, char, palette[routes.experts[layer, t, 0]]))
                column += 1
    rows = row + 1
    fig = plt.figure(figsize=(columns * 0.09, rows * 0.17 + 0.5))
    ax = fig.add_axes((0, 0, 1, rows / (rows + 3)))
    ax.set_xlim(0, columns)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    font = {"family": "monospace", "fontsize": 8}
    for column, row, char, colour in cells:
        ax.add_patch(Rectangle((column, row), 1, 1, color=colour, linewidth=0))
        if not char.isspace():
            ax.text(column + 0.5, row + 0.55, char, ha="center", va="center", **font)
    fig.suptitle(f"first-choice expert per token, layer {layer}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    directory: str | Path,
    tokenizer: Tokenizer,
    routes: Mapping[str, Routes],
    num_experts: int,
    k: int,
    layers: Sequence[int],
    color_tokens: int = 400,
) -> dict:
    """Writes every figure into `directory`: routing.json (all figures),
    expert_shares.png/.svg (Figure 7), locality.md/.csv (Table 5), and per input set
    tokens_NAME.html and tokens_NAME_layerN.png (Figure 8). Returns the summary."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = summarise(routes, num_experts, k)
    summary["layers_shown"] = list(layers)
    (directory / "routing.json").write_text(json.dumps(summary, indent=1) + "\n")
    for suffix in ("png", "svg"):
        plot_shares(summary, layers, directory / f"expert_shares.{suffix}")
    num_layers = next(iter(routes.values())).experts.shape[0]
    markdown, csv = locality_table(summary, range(num_layers))
    (directory / "locality.md").write_text(markdown)
    (directory / "locality.csv").write_text(csv)
    for name, r in routes.items():
        page = tokens_html(tokenizer, r, layers, num_experts, color_tokens)
        (directory / f"tokens_{name}.html").write_text(page, encoding="utf-8")
        for layer in layers:
            png = directory / f"tokens_{name}_layer{layer}.png"
            plot_tokens(tokenizer, r, layer, num_experts, png, color_tokens)
    return summary

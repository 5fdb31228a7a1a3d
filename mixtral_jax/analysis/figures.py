"""The routing analysis drawn: expert shares (the paper's Figure 7), text coloured by
expert (Figure 8) as HTML and images, and the whole report written to a directory.

Needs matplotlib, the `.[plots]` extra: `pip install -e ".[plots]"`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixtral_jax.analysis.routing import RecordedRoutes, locality_table, summarise
from mixtral_jax.model.tokenizer import Tokenizer


def require_matplotlib():
    """matplotlib, drawing to files (no screen), or an error that names the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the routing figures need matplotlib, which the base install leaves out: "
            'pip install -e ".[plots]" (or pip install matplotlib)'
        ) from None
    matplotlib.use("Agg")
    return matplotlib


def expert_colors(num_experts: int) -> list[str]:
    """A light, distinct background colour per expert, as '#rrggbb'."""
    require_matplotlib()
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
    routes: RecordedRoutes,
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
    require_matplotlib()
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
    routes: RecordedRoutes,
    layer: int,
    num_experts: int,
    path: str | Path,
    max_tokens: int = 400,
    columns: int = 90,
) -> None:
    """Figure 8 as an image: the text in a monospace grid, each character on the
    colour of its token's first-choice expert in `layer`."""
    require_matplotlib()
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
    routes: Mapping[str, RecordedRoutes],
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

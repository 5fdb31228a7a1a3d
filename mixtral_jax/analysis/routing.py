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

`locality_table` tabulates them; `figures.py` draws them (matplotlib, `.[plots]`)
and writes the whole report. Long texts are cut into windows of `seq_len`
tokens routed on their own (a pair never spans two windows), `batch_size`
windows per call of the jitted forward: memory does not grow with the input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mixtral_jax.model.mixtral import Mixtral, with_config
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.training import steps


@dataclasses.dataclass(frozen=True)
class RecordedRoutes:
    """The routing of a run of tokens: ids [T], chosen experts and their weights
    [L, T, k] (best first), and which tokens start a window (no predecessor) [T]."""

    tokens: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    starts: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[RecordedRoutes]) -> RecordedRoutes:
        return RecordedRoutes(
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
) -> list[RecordedRoutes]:
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
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    routing = steps.jit_routing(model, mesh)
    steps.check_rows(batch_size, routing.batch_sharding)
    windows = [
        (i, start, np.asarray(s[start : start + seq_len], np.int32))
        for i, s in enumerate(sequences)
        for start in range(0, len(s), seq_len)
    ]
    pieces: list[list[RecordedRoutes]] = [[] for _ in sequences]
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
            pieces[i].append(RecordedRoutes(ids, experts[:, row, :n], weights[:, row, :n], starts))
    return [RecordedRoutes.concatenate(p) for p in pieces]


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


def summarise(routes: Mapping[str, RecordedRoutes], num_experts: int, k: int) -> dict:
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

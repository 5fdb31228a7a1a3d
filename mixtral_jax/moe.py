"""The sparse mixture-of-experts (SMoE) layer: router, experts, and two ways to dispatch.

Both give the reference's numbers; they differ in how the work is laid out.

`moe_impl="dense"`: GShard dispatch/combine einsums (routing.py has the tensors).
    logits   = x @ gate                                 [G, S, E] float32
    routes   = top-k of softmax(logits), renormalised   [G, S, k]
    dispatch, combine = slots in each expert's buffer   [G, S, E, C]
    x_e      = einsum(dispatch, x)                      [E, G, C, D]
    y_e      = w2 (silu(x_e w1) * (x_e w3))             [E, G, C, D]
    y        = einsum(combine, y_e)                     [G, S, D]
  With a capacity factor, C = ceil(k S / E * cf) and overflowing choices are
  dropped. Dropless (capacity_factor=None) must be exact, yet C = S would
  multiply the expert work by E / k; the layer instead measures the fullest
  expert and runs, under `lax.switch`, the smallest capacity of a short ladder
  that holds every choice. Shards over an `expert` mesh axis with all-to-alls.

`moe_impl="sorted"`: always dropless. The N*k (token, choice) rows are sorted
  by expert, so each expert's rows are contiguous; each expert multiplies its
  own rows in tiles of `TILE` rows and one last piece (a multiple of TILE / 16
  rows). The work is the routed work plus under TILE / 16 rows per expert,
  whatever the balance of the router, and an expert that no token chose is
  never read: a decoded token touches k experts, not E. A decode step on a CPU
  hands the sorted rows to one kernel call per layer instead (cpu_moe.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import cpu_moe, quantize, routing
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import attach_adapters, param, project, weight
from mixtral_jax.sharding import constrain

# Capacity factors the dense dropless dispatch tries, smallest first, before
# C = S. Only the chosen branch runs; each entry costs compile time only.
DROPLESS_LADDER = (1.0, 1.25, 1.5, 2.0)
# Row tile of the sorted dispatch (a power of two).
TILE = 512


class ExpertWeight(NamedTuple):
    """One of w1/w2/w3 for every expert, [..., E, X, Y], with its LoRA factors
    a [..., E, X, R] and b [..., E, R, Y] when it has an adapter."""

    w: jax.Array | quantize.QArray
    a: jax.Array | None = None
    b: jax.Array | None = None
    scale: float = 0.0

    def take(self, index: tuple, dtype: jnp.dtype) -> ExpertWeight:
        """The [X, Y] matrices (and factors) of one expert in `dtype`, a quantized
        weight dequantized; `index` leads to it."""

        def one(a):
            if not index:  # already one expert's
                return a
            rest = a.shape[len(index) :]  # [X, Y], or int4's [X / g, g, Y]
            start = (*index, *(0,) * len(rest))
            size = (*(1,) * len(index), *rest)
            return jax.lax.dynamic_slice(a, start, size).reshape(rest)

        if isinstance(self.w, quantize.QArray):  # only this expert's integers are read
            w = quantize.dequantize(one(self.w.qvalue), one(self.w.scale), dtype)
        else:
            w = one(self.w).astype(dtype)
        factors = (one(a).astype(dtype) if a is not None else None for a in (self.a, self.b))
        return ExpertWeight(w, *factors, self.scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., X] @ one expert's [X, Y] matrix (plus its adapter's term); an int4
        weight's [X / g, g, Y] contracts with x split alike."""
        if self.w.ndim == 3:
            groups, g, _ = self.w.shape
            y = jnp.einsum("...Gg,GgY->...Y", x.reshape(*x.shape[:-1], groups, g), self.w)
        else:
            y = x @ self.w
        if self.a is None:
            return y
        return y + ((x @ self.a) @ self.b) * jnp.asarray(self.scale, x.dtype)


def swiglu(x: jax.Array, w1: ExpertWeight, w2: ExpertWeight, w3: ExpertWeight) -> jax.Array:
    """One expert: w2(silu(x w1) * (x w3)); x [..., D], w1/w3 [D, F], w2 [F, D]."""
    return w2(jax.nn.silu(w1(x)) * w3(x))


# The experts' einsums (also what their LoRA adapters are derived from).
SPECS = {"w1": "EGCD,EDF->EGCF", "w3": "EGCD,EDF->EGCF", "w2": "EGCF,EFD->EGCD"}
AXES = {
    "w1": ("expert", "embed", "mlp"),
    "w3": ("expert", "embed", "mlp"),
    "w2": ("expert", "mlp", "embed"),
}


class Experts(nnx.Module):
    """E SwiGLU feed-forward networks stacked on a leading expert axis.

    w1 (gate) and w3 (up) are [E, D, F], w2 (down) is [E, F, D], so that each
    einsum contracts its weight's non-minor dimension with no transpose.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        E, D, F = c.num_experts, c.hidden_size, c.intermediate_size
        self.w1 = weight(rngs, c, "w1", (E, D, F), SPECS, AXES)
        self.w3 = weight(rngs, c, "w3", (E, D, F), SPECS, AXES)
        self.w2 = weight(rngs, c, "w2", (E, F, D), SPECS, AXES)
        attach_adapters(self, c, SPECS, AXES, rngs)

    def weights(self) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        """w1, w2, w3 with their adapters, as stored (with any leading layers axis);
        a quantized weight as qwix.QArray."""

        def weight(name):
            w = getattr(self, name)
            w = w.qarray(jnp.float32) if isinstance(w, quantize.QuantizedWeight) else w[...]
            adapter = getattr(self, f"{name}_lora")
            if adapter is None:
                return ExpertWeight(w)
            return ExpertWeight(w, adapter.a[...], adapter.b[...], adapter.scale)

        return weight("w1"), weight("w2"), weight("w3")

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [E, G, C, D] tokens in each expert's slots -> [E, G, C, D]."""
        x = constrain(x, ("expert", "group", "capacity", "embed"))
        hidden = ("expert", "group", "capacity", "mlp")
        gate = constrain(project(SPECS["w1"], x, self.w1, self.w1_lora), hidden)
        up = constrain(project(SPECS["w3"], x, self.w3, self.w3_lora), hidden)
        y = project(SPECS["w2"], jax.nn.silu(gate) * up, self.w2, self.w2_lora)
        return constrain(y, ("expert", "group", "capacity", "embed"))


# One expert's w1, w2, w3 (with their adapters), ready to multiply.
ExpertWeights = tuple[ExpertWeight, ExpertWeight, ExpertWeight]


def sorted_experts(
    x: jax.Array,
    routes: routing.Routes,
    token_mask: jax.Array,
    expert: Callable[[int | jax.Array], ExpertWeights],
    num_experts: int,
    unroll: bool = False,
    rows_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Dropless experts over rows sorted by expert. x: [N, D], routes [N, k] -> y [N, D].

    `expert(e)` gives expert e's weights in x's dtype (w1/w3 [D, F], w2 [F, D]); it
    is called with a traced index in a loop over the experts, or with each Python
    int when `unroll` (weights in buffers of their own, one per expert). Either
    way an expert no token chose is never read. `rows_fn(xs, start, count)`, if
    given, computes every expert's rows in one call instead (`cpu_moe.experts`).

    Row j of the sorted order is choice order[j] (token order[j] // k); expert
    e owns rows [start[e], start[e] + count[e]). Padding tokens sort last and
    are never computed (their output is 0).
    """
    N, D = x.shape
    k = routes.experts.shape[-1]
    E = num_experts
    n = N * k
    choice_expert = jnp.where(token_mask[:, None], routes.experts, E).reshape(n)
    order = jnp.argsort(choice_expert, stable=True)  # [n]
    count = jnp.bincount(choice_expert, length=E + 1)[:E]  # [E]
    start = jnp.cumsum(count) - count  # [E]
    if rows_fn is not None:
        ys = rows_fn(x[order // k], start, count)  # cpu_moe.experts casts them to int32
        return _combine(ys, order, routes.weights, token_mask)
    tile = min(TILE, next_power_of_two(n))
    # Every piece streams the expert's weights once, which costs about as much as
    # ~30 rows of work: an expert's rows are full tiles plus ONE last piece, a
    # multiple of `grain` rows (waste < grain rows per expert; a row or two at decode).
    grain = max(1, tile // 16)
    xs = jnp.pad(x[order // k], ((0, tile), (0, 0)))  # [n + tile, D] sorted rows + slack

    def rows_of_expert(ys, r0, size, w):
        """ys[r0:r0+size] = ffn(xs[r0:r0+size]). Rows past the expert's end get
        garbage that the next expert (or the padding mask) overwrites."""
        out = swiglu(jax.lax.dynamic_slice_in_dim(xs, r0, size), *w)
        return jax.lax.dynamic_update_slice_in_dim(ys, out, r0, 0)

    def one_expert(e, ys):
        w = expert(e)
        begin = start[e]
        full, rest = count[e] // tile, count[e] % tile

        def full_tile(i, ys):
            return jax.lax.cond(
                i < full,
                lambda ys: rows_of_expert(ys, begin + i * tile, tile, w),
                lambda ys: ys,
                ys,
            )

        # A static trip count keeps the loop reverse-differentiable; idle steps are skipped.
        ys = jax.lax.fori_loop(0, n // tile, full_tile, ys)
        last = [lambda ys: ys] + [
            lambda ys, size=size: rows_of_expert(ys, begin + full * tile, size, w)
            for size in range(grain, tile + 1, grain)
        ]
        return jax.lax.switch((rest + grain - 1) // grain, last, ys)

    def maybe_expert(e, ys):
        if unroll:
            return jax.lax.cond(count[e] > 0, functools.partial(one_expert, e), lambda ys: ys, ys)
        # e is the loop's traced index: one compiled body serves every expert.
        return jax.lax.cond(count[e] > 0, one_expert, lambda e, ys: ys, e, ys)

    ys = jnp.zeros((n + tile, D), x.dtype)
    if unroll:
        for e in range(E):
            ys = maybe_expert(e, ys)
    else:
        ys = jax.lax.fori_loop(0, E, maybe_expert, ys)
    return _combine(ys[:n], order, routes.weights, token_mask)


def _combine(ys: jax.Array, order: jax.Array, weights: jax.Array, token_mask: jax.Array):
    """ys [n, D] in sorted order -> y [N, D], each token's choices summed by weight [N, k]."""
    (n, D), (N, k) = ys.shape, weights.shape
    per_choice = jnp.zeros((n, D), ys.dtype).at[order].set(ys, unique_indices=True)
    weights = (weights * token_mask[:, None]).astype(jnp.float32)  # [N, k]
    # An elementwise weighted sum: as an einsum XLA:CPU makes it N tiny matmuls.
    y = jnp.sum(per_choice.reshape(N, k, D).astype(jnp.float32) * weights[..., None], axis=1)
    return y.astype(ys.dtype)


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, n - 1).bit_length()


class MoEOutput(NamedTuple):
    y: jax.Array  # [B, T, D]
    stats: routing.RouterStats
    weights: jax.Array  # [B, T, k] renormalised weights of the chosen experts
    experts: jax.Array  # [B, T, k] chosen experts, best first


class SparseMoE(nnx.Module):
    """Router (`gate`) plus `experts`; dispatch by `config.moe_impl`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        # The router's expert axis is never split: top-k needs every expert's
        # score where the token is.
        self.gate = param(
            rngs,
            (c.hidden_size, c.num_experts),
            ("embed", None),
            c.weight_dtype,
            nnx.initializers.normal(c.initializer_range),
        )
        self.experts = Experts(c, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        token_mask: jax.Array,
        layer: jax.Array | None = None,
        *,
        dropless: bool = False,
        sorted_: bool = False,
        experts: Sequence[nnx.State] | cpu_moe.PackedExperts | None = None,
    ) -> MoEOutput:
        """x: [B, T, D]; token_mask: [B, T] bool, False on padding.

        `layer`: with the sorted dispatch, the experts' weights may still carry the
        model's leading layers axis; `layer` selects the layer (see model.py).
        `dropless`: ignore the config's capacity factor (inference). `sorted_`: use
        the sorted dispatch whatever the config says (decode steps). `experts`: one
        state per expert (`model.LayerPieces`), read in place of `self.experts`' stacked
        weights by the sorted dispatch; or all of them packed for the CPU kernel, which
        then computes them (`cpu_moe`).
        """
        c = self.config
        B, T, D = x.shape
        num_tokens = B * T
        impl = "sorted" if sorted_ else c.moe_impl
        capacity_factor = None if dropless else c.capacity_factor
        S = min(c.group_size, num_tokens) if impl == "dense" else num_tokens
        G = -(-num_tokens // S)
        pad = G * S - num_tokens
        xg = jnp.pad(x.reshape(num_tokens, D), ((0, pad), (0, 0))).reshape(G, S, D)
        xg = constrain(xg, ("group", None, "embed"))
        mask = jnp.pad(token_mask.reshape(num_tokens), (0, pad)).reshape(G, S)

        # Top-k choices flip under reduced precision: the router is float32, HIGHEST.
        logits = jnp.einsum(
            "GSD,DE->GSE",
            xg.astype(jnp.float32),
            self.gate[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        logits = constrain(logits, ("group", None, None))
        routes = routing.route(logits, c.num_experts_per_tok)

        if impl == "sorted":
            flat = jax.tree.map(lambda a: a.reshape(S, *a.shape[2:]), routes)
            if isinstance(experts, cpu_moe.PackedExperts):
                rows_fn = functools.partial(cpu_moe.experts, packed=experts)
                y = sorted_experts(xg[0], flat, mask[0], None, c.num_experts, rows_fn=rows_fn)
            else:
                weights = self._expert_weights(x.dtype, layer, experts)
                y = sorted_experts(xg[0], flat, mask[0], *weights)
            y = y[None]
            kept = jnp.ones(routes.experts.shape, bool)
        elif capacity_factor is None:
            y, kept = self._dropless_dense(xg, routes, mask)
        else:
            capacity = routing.expert_capacity(
                S, c.num_experts, c.num_experts_per_tok, capacity_factor
            )
            y, kept = self._dense(xg, routes, mask, capacity)

        stats = routing.router_stats(logits, routes, kept, mask)

        def ungroup(a: jax.Array) -> jax.Array:
            return a.reshape(G * S, *a.shape[2:])[:num_tokens].reshape(B, T, *a.shape[2:])

        return MoEOutput(ungroup(y), stats, ungroup(routes.weights), ungroup(routes.experts))

    def _expert_weights(self, dtype, layer, experts):
        """sorted_experts' `expert`, `num_experts` and `unroll`: expert e's weights sliced
        from the stacked ones (at `layer` if they are stacked over layers too), or
        taken from its own state in `experts`."""
        E = self.config.num_experts
        if experts is None:
            stacked = self.experts.weights()
            at = (lambda e: (e,)) if layer is None else (lambda e: (layer, e))
            return (lambda e: tuple(w.take(at(e), dtype) for w in stacked)), E, False
        graphdef = nnx.graphdef(self.experts)
        own = [nnx.merge(graphdef, state).weights() for state in experts]
        return (lambda e: tuple(w.take((), dtype) for w in own[e])), E, True

    def _dense(
        self, x: jax.Array, routes: routing.Routes, mask: jax.Array, capacity: int
    ) -> tuple[jax.Array, jax.Array]:
        """x: [G, S, D] -> y [G, S, D] and kept [G, S, k] with `capacity` slots per expert."""
        d = routing.dispatch_and_combine(routes, mask, self.config.num_experts, capacity)
        # Expert parallelism: groups are sharded over every batch axis, `expert`
        # included, and dispatched where they are; the experts compute on [E, G, C, D]
        # sharded by expert. Each change of layout is one all-to-all.
        by_group = (None, "group", "capacity", "embed")
        x_e = jnp.einsum("GSEC,GSD->EGCD", d.dispatch.astype(x.dtype), x)  # [E, G, C, D]
        y_e = constrain(self.experts(constrain(x_e, by_group)), by_group)  # [E, G, C, D]
        y = jnp.einsum(
            "EGCD,GSEC->GSD",
            y_e,
            d.combine.astype(x.dtype),
            preferred_element_type=jnp.float32,
        )
        return constrain(y.astype(x.dtype), ("group", None, "embed")), d.kept

    def _dropless_dense(
        self, x: jax.Array, routes: routing.Routes, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Exact: the smallest capacity on the ladder that no expert overflows."""
        c = self.config
        S = x.shape[1]
        E, k = c.num_experts, c.num_experts_per_tok
        ladder = {routing.expert_capacity(S, E, k, cf) for cf in DROPLESS_LADDER}
        capacities = sorted(ladder | {S})
        if len(capacities) == 1:
            return self._dense(x, routes, mask, S)
        fullest = jnp.max(routing.expert_load(routes.experts, mask, E))
        branch = jnp.searchsorted(jnp.asarray(capacities), fullest)  # first C >= fullest
        branches = [functools.partial(self._dense, capacity=cap) for cap in capacities]
        return jax.lax.switch(branch, branches, x, routes, mask)

"""The sparse mixture-of-experts (SMoE) layer: router, experts, and two ways to dispatch.

All give the reference's numbers; they differ in how the work is laid out, chosen
by `config.moe_impl` (docs/moe.md has the table of when each wins):

`"dense"`: GShard dispatch/combine einsums (routing.py has the tensors).
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

`"sorted"`: always dropless. The N*k (token, choice) rows are sorted by expert,
  so each expert's rows are contiguous (`sorted_dispatch`); each expert multiplies
  its own rows in tiles of `TILE` rows and one last piece, a multiple of TILE / 16
  rows (`expert_rows`). The work is the routed work plus under TILE / 16 rows per
  expert, whatever the balance of the router, and an expert that no token chose
  is never read: a decoded token touches k experts, not E. Every decode step
  dispatches so (`DECODE_IMPL`), whatever the config says.

The sorted rows may also be computed by a function a backend hands the layer
(`experts_fn`: `backends.cpu` reads each expert from a buffer of its own, or runs
its kernel); the dispatch around them is the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model import quantized, routing
from mixtral_jax.model.config import MOE_IMPLS, ModelConfig
from mixtral_jax.model.layers import attach_adapters, bank_weights, param, project, weight
from mixtral_jax.parallel.rules import constrain

# Capacity factors the dense dropless dispatch tries, smallest first, before
# C = S. Only the chosen branch runs; each entry costs compile time only.
DROPLESS_LADDER = (1.0, 1.25, 1.5, 2.0)
# Row tile of the sorted dispatch (a power of two).
TILE = 512
# How every decode step dispatches: one token per row touches k experts, and the
# sorted dispatch reads only those (the dense one multiplies every expert's weights).
DECODE_IMPL = "sorted"
# xs [n, D] rows sorted by expert, start and count [E] (expert e owns rows
# start[e]..start[e] + count[e]) -> ys [n, D]: every row through its expert. Experts
# with a bank of adapters also take `ids=` [n], each row's adapter (-1: none).
ExpertsFn = Callable[..., jax.Array]


class ExpertWeight(NamedTuple):
    """One of w1/w2/w3 for every expert, [..., E, X, Y], with its LoRA factors
    a [..., E, X, R] and b [..., E, R, Y] when it has an adapter; a bank's
    a [..., E, J, X, R] and b [..., E, J, R, Y] (`layers.Adapter`), with scale 0."""

    w: jax.Array | quantized.QArray
    a: jax.Array | None = None
    b: jax.Array | None = None
    scale: float = 0.0

    def take(self, index: tuple, dtype: jnp.dtype) -> ExpertWeight:
        """The [X, Y] matrices (and factors) of the expert `index` leads to ((layer,
        expert), (expert,), or () when they are one expert's already) in `dtype`: a
        quantized weight dequantized (only this expert's integers are read), int4's
        groups merged back."""

        def one(a):
            if not index:
                return a
            rest = a.shape[len(index) :]  # [X, Y], or int4's [X / g, g, Y]
            start = (*index, *(0,) * len(rest))
            size = (*(1,) * len(index), *rest)
            return jax.lax.dynamic_slice(a, start, size).reshape(rest)

        if isinstance(self.w, quantized.QArray):
            w = quantized.dequantize(one(self.w.qvalue), one(self.w.scale), dtype)
            if self.w.qvalue.dtype == jnp.int4:  # [..., X / g, g, Y] -> [..., X, Y]
                w = w.reshape(*w.shape[:-3], -1, w.shape[-1])
        else:
            w = one(self.w).astype(dtype)
        factors = (one(a).astype(dtype) if a is not None else None for a in (self.a, self.b))
        return ExpertWeight(w, *factors, self.scale)

    def __call__(self, x: jax.Array, select: jax.Array | None = None) -> jax.Array:
        """x [..., X] @ one expert's [X, Y] matrix, plus its adapter's term (a bank's: the
        adapter each row `select`s, `layers.bank_weights`)."""
        y = x @ self.w
        if self.a is None:
            return y
        if self.a.ndim == 3:  # a bank: [J, X, R], [J, R, Y]
            weights = bank_weights(select, self.a.shape[0], x.dtype)
            h = jnp.einsum("...X,JXR->...JR", x, self.a) * weights[..., None]
            return y + jnp.einsum("...JR,JRY->...Y", h, self.b)
        return y + ((x @ self.a) @ self.b) * jnp.asarray(self.scale, x.dtype)


def swiglu(
    x: jax.Array,
    w1: ExpertWeight,
    w2: ExpertWeight,
    w3: ExpertWeight,
    select: jax.Array | None = None,
) -> jax.Array:
    """One expert: w2(silu(x w1) * (x w3)); x [..., D], w1/w3 [D, F], w2 [F, D]."""
    return w2(jax.nn.silu(w1(x, select)) * w3(x, select), select)


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
            w = w.qarray(jnp.float32) if isinstance(w, quantized.QuantizedWeight) else w[...]
            adapter = getattr(self, f"{name}_lora")
            if adapter is None:
                return ExpertWeight(w)
            scale = 0.0 if adapter.bank else adapter.scale  # a bank's: folded into B
            return ExpertWeight(w, adapter.a[...], adapter.b[...], scale)

        return weight("w1"), weight("w2"), weight("w3")

    @property
    def adapted(self) -> bool:
        """Whether any of w1, w2, w3 has an adapter."""
        return any(getattr(self, f"{name}_lora") is not None for name in SPECS)

    @property
    def trainable_in_place(self) -> bool:
        """Float weights without adapters: what `trainable_rows` differentiates."""
        return all(w.a is None and isinstance(w.w, jax.Array) for w in self.weights())

    def trainable_rows_fn(self, own: Experts, layer: jax.Array | None = None) -> ExpertsFn:
        """The sorted rows through these experts (layer `layer` of them when they are
        stacked over layers), differentiable through `own`, that layer's slice of the
        same weights (`trainable_rows`)."""
        stacked, mine = (tuple(w.w for w in e.weights()) for e in (self, own))
        return lambda xs, start, count: trainable_rows(xs, start, count, stacked, mine, layer)

    def __call__(self, x: jax.Array, select: jax.Array | None = None) -> jax.Array:
        """x: [E, G, C, D] tokens in each expert's slots -> [E, G, C, D]; `select`
        [E, G, C, J]: theirs, for a bank of adapters (one-hot weights)."""
        x = constrain(x, ("expert", "group", "capacity", "embed"))
        hidden = ("expert", "group", "capacity", "mlp")
        gate = constrain(project(SPECS["w1"], x, self.w1, self.w1_lora, select), hidden)
        up = constrain(project(SPECS["w3"], x, self.w3, self.w3_lora, select), hidden)
        y = project(SPECS["w2"], jax.nn.silu(gate) * up, self.w2, self.w2_lora, select)
        return constrain(y, ("expert", "group", "capacity", "embed"))


# One expert's w1, w2, w3 (with their adapters), ready to multiply.
ExpertWeights = tuple[ExpertWeight, ExpertWeight, ExpertWeight]


def sorted_dispatch(
    x: jax.Array,
    routes: routing.Routes,
    token_mask: jax.Array,
    num_experts: int,
    experts_fn: ExpertsFn,
    ids: jax.Array | None = None,
) -> jax.Array:
    """Dropless experts over rows sorted by expert. x: [N, D], routes [N, k] -> y [N, D].

    Row j of the sorted order is choice order[j] (token order[j] // k); expert e
    owns rows [start[e], start[e] + count[e]), which `experts_fn(xs, start, count)`
    computes (with `ids=` the rows' adapters, when the tokens' `ids` [N] are given).
    Padding tokens sort last, past every expert's rows: their output is never used.
    """
    N, D = x.shape
    k = routes.experts.shape[-1]
    E = num_experts
    n = N * k
    choice_expert = jnp.where(token_mask[:, None], routes.experts, E).reshape(n)
    order = jnp.argsort(choice_expert, stable=True)  # [n]
    count = jnp.bincount(choice_expert, length=E + 1)[:E]  # [E]
    start = jnp.cumsum(count) - count  # [E]
    rows = order // k
    if ids is None:
        ys = experts_fn(x[rows], start, count)  # [n, D]
    else:
        ys = experts_fn(x[rows], start, count, ids=ids[rows])
    return _combine(ys, order, routes.weights, token_mask)


def _pieces(
    carry,
    start: jax.Array,
    count: jax.Array,
    n: int,
    num_experts: int,
    per_expert: Callable,
    piece: Callable,
    unroll: bool = False,
):
    """Calls carry = piece(carry, per_expert(e), r0, size) over every expert e's sorted
    rows [start[e], start[e] + count[e]) of n: full tiles of `tile` rows, then ONE last
    piece, a multiple of `grain` rows (every piece streams the expert's weights once,
    which costs about as much as ~30 rows of work; waste < grain rows per expert). A
    piece may run past its expert's end into the next expert's rows (processed later)
    or the slack of `tile` rows after the last. An expert no row chose is skipped.
    `per_expert(e)` (e.g. its weights) runs once per expert, with a traced e in a loop,
    or with each Python int when `unroll`."""
    tile = slack(n)
    grain = max(1, tile // 16)

    def one_expert(e, carry):
        context = per_expert(e)
        begin = start[e]
        full, rest = count[e] // tile, count[e] % tile

        def full_tile(i, carry):
            return jax.lax.cond(
                i < full,
                lambda carry: piece(carry, context, begin + i * tile, tile),
                lambda carry: carry,
                carry,
            )

        # A static trip count keeps the loop reverse-differentiable; idle steps are skipped.
        carry = jax.lax.fori_loop(0, n // tile, full_tile, carry)
        last = [lambda carry: carry] + [
            lambda carry, size=size: piece(carry, context, begin + full * tile, size)
            for size in range(grain, tile + 1, grain)
        ]
        return jax.lax.switch((rest + grain - 1) // grain, last, carry)

    def maybe_expert(e, carry):
        if unroll:
            skip = lambda carry: carry  # noqa: E731
            return jax.lax.cond(count[e] > 0, functools.partial(one_expert, e), skip, carry)
        # e is the loop's traced index: one compiled body serves every expert.
        return jax.lax.cond(count[e] > 0, one_expert, lambda e, carry: carry, e, carry)

    if unroll:
        for e in range(num_experts):
            carry = maybe_expert(e, carry)
        return carry
    return jax.lax.fori_loop(0, num_experts, maybe_expert, carry)


def slack(n: int) -> int:
    """The tile of `_pieces` for n sorted rows, which is also the most rows past them
    that a last piece may write."""
    return min(TILE, next_power_of_two(n))


def expert_rows(
    xs: jax.Array,
    start: jax.Array,
    count: jax.Array,
    expert: Callable[[int | jax.Array], ExpertWeights],
    num_experts: int,
    unroll: bool = False,
    ids: jax.Array | None = None,
) -> jax.Array:
    """Every expert's sorted rows through its SwiGLU (an `ExpertsFn`): xs [n, D] -> [n, D].

    `expert(e)` gives expert e's weights in xs' dtype (w1/w3 [D, F], w2 [F, D]); it
    is called with a traced index in a loop over the experts, or with each Python
    int when `unroll` (weights in buffers of their own, one per expert). Either
    way an expert no row chose is never read. `ids` [n]: the rows' adapters (-1:
    none), for experts with a bank of adapters.
    """
    n, D = xs.shape
    xs = jnp.pad(xs, ((0, slack(n)), (0, 0)))  # sorted rows + slack
    if ids is not None:
        ids = jnp.pad(ids, (0, slack(n)), constant_values=-1)

    def rows_of_expert(ys, w, r0, size):
        """ys[r0:r0+size] = ffn(xs[r0:r0+size]). Rows past the expert's end get
        garbage that the next expert overwrites, or that nothing reads (padding)."""
        rows_ids = None if ids is None else jax.lax.dynamic_slice_in_dim(ids, r0, size)
        out = swiglu(jax.lax.dynamic_slice_in_dim(xs, r0, size), *w, rows_ids)
        return jax.lax.dynamic_update_slice_in_dim(ys, out, r0, 0)

    ys = jnp.zeros(xs.shape, xs.dtype)
    ys = _pieces(ys, start, count, n, num_experts, expert, rows_of_expert, unroll)
    return ys[:n]


def trainable_rows(xs, start, count, stacked, own, layer=None) -> jax.Array:
    """`expert_rows` for float expert weights, with a backward pass that loops over the
    same pieces. It keeps xs and the rows' gate and up activations [n, F], and adds each
    expert's weight gradients in place; differentiating `expert_rows` itself would keep
    the loops' carried [n, D] buffer once per piece.

    stacked: w1, w3 [L, E, D, F] and w2 [L, E, F, D] of every layer, read in place at
    [layer, e] and never differentiated. own: this layer's w1, w2, w3 ([E, ...], a scan's
    slice of the same weights), never read: the gradients come back through them. A scan
    over layers then slices nothing forward (XLA:CPU copies a slice that feeds a matmul,
    a second read of every expert weight), and the backward pass writes each layer's
    gradients into the stack's as for any scanned parameter. Without `layer`, stacked
    and own are both one layer's [E, ...] weights.
    """
    index = () if layer is None else (layer,)
    return _trainable_rows(xs, start, count, jax.lax.stop_gradient(stacked), own, index)


@jax.custom_vjp
def _trainable_rows(xs, start, count, stacked, own, index):
    def expert(e):  # not differentiated: `expert_rows`, which keeps no activations
        return tuple(ExpertWeight(w).take((*index, e), xs.dtype) for w in stacked)

    return expert_rows(xs, start, count, expert, own[0].shape[0])


def _weights(stacked, index, dtype):
    """Expert e's w1, w2, w3 in `dtype`, read at [*index, e] (with e, for the backward)."""
    return lambda e: (e, tuple(ExpertWeight(w).take((*index, e), dtype).w for w in stacked))


def _forward_rows(xs, start, count, stacked, index, E):
    """ys [n, D] and the gate and up activations [n + slack, F] of every row."""
    n, D = xs.shape
    F = stacked[0].shape[-1]
    xs_p = jnp.pad(xs, ((0, slack(n)), (0, 0)))

    def rows_of_expert(carry, context, r0, size):
        _, (a1, a2, a3) = context
        x = jax.lax.dynamic_slice_in_dim(xs_p, r0, size)
        gate, up = x @ a1, x @ a3  # [size, F]
        y = (jax.nn.silu(gate) * up) @ a2
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(buffer, value, r0, 0)
            for buffer, value in zip(carry, (y, gate, up), strict=True)
        )

    empty = (jnp.zeros(xs_p.shape, xs.dtype), *(jnp.zeros((len(xs_p), F), xs.dtype),) * 2)
    weights = _weights(stacked, index, xs.dtype)
    ys, gates, ups = _pieces(empty, start, count, n, E, weights, rows_of_expert)
    return ys[:n], gates, ups


def _trainable_rows_fwd(xs, start, count, stacked, own, index):
    ys, gates, ups = _forward_rows(xs, start, count, stacked, index, own[0].shape[0])
    # Of `own`, only the gradients' shapes and dtypes are kept (a layer of `stacked`'s).
    return ys, (xs, gates, ups, start, count, stacked, index)


def _trainable_rows_bwd(residuals, dys):
    xs, gates, ups, start, count, stacked, index = residuals
    n, D = xs.shape
    end = start + count  # [E]
    xs_p, dys_p = (jnp.pad(a, ((0, slack(n)), (0, 0))) for a in (xs, dys.astype(xs.dtype)))

    def grads_of_piece(carry, context, r0, size):
        dxs, dw1, dw2, dw3 = carry
        e, (a1, a2, a3) = context
        x, dy, gate, up = (
            jax.lax.dynamic_slice_in_dim(a, r0, size) for a in (xs_p, dys_p, gates, ups)
        )
        # Rows past the expert's end are the next expert's: they add nothing here.
        mine = (r0 + jnp.arange(size)) < end[e]
        dy = jnp.where(mine[:, None], dy, 0)
        sig = jax.nn.sigmoid(gate)
        act = gate * sig  # silu
        dh = dy @ a2.T  # [size, F]
        dgate = dh * up * sig * (1 + gate * (1 - sig))
        dup = dh * act
        dx = dgate @ a1.T + dup @ a3.T  # [size, D]
        dxs = jax.lax.dynamic_update_slice_in_dim(dxs, dx, r0, 0)

        def add(total, g):
            return total.at[e].add(g.astype(total.dtype))

        return dxs, add(dw1, x.T @ dgate), add(dw2, (act * up).T @ dy), add(dw3, x.T @ dup)

    zeros = tuple(jnp.zeros(w.shape[len(index) :], jnp.float32) for w in stacked)
    carry = (jnp.zeros(xs_p.shape, xs.dtype), *zeros)
    weights = _weights(stacked, index, xs.dtype)
    dxs, dw1, dw2, dw3 = _pieces(carry, start, count, n, len(end), weights, grads_of_piece)
    grads = tuple(g.astype(w.dtype) for g, w in zip((dw1, dw2, dw3), stacked, strict=True))
    return (dxs[:n], None, None, None, grads, None)


_trainable_rows.defvjp(_trainable_rows_fwd, _trainable_rows_bwd)


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
        impl: str | None = None,
        dropless: bool = False,
        experts_fn: ExpertsFn | None = None,
        lora_ids: jax.Array | None = None,
    ) -> MoEOutput:
        """x: [B, T, D]; token_mask: [B, T] bool, False on padding.

        `impl`: the dispatch ("dense" or "sorted"), default the config's
        `moe_impl`. `layer`: the experts' weights may still carry the model's leading
        layers axis (the sorted dispatch reads each expert at [layer, expert] itself);
        `layer` selects the layer. `dropless`: ignore the config's capacity factor
        (inference). `experts_fn`: computes the sorted rows in place of this layer's
        `experts` (a backend's, e.g. each expert read from a buffer of its own).
        `lora_ids` [B, T]: each token's adapter (-1: none), for a bank of adapters.
        """
        c = self.config
        B, T, D = x.shape
        num_tokens = B * T
        impl = impl or c.moe_impl
        if impl not in MOE_IMPLS:
            raise ValueError(f"unknown SMoE dispatch {impl!r}; choose one of {MOE_IMPLS}")
        if experts_fn is not None and impl != "sorted":
            raise ValueError(f"experts_fn computes the sorted dispatch's rows, not {impl!r}'s")
        capacity_factor = None if dropless else c.capacity_factor
        S = min(c.group_size, num_tokens) if impl == "dense" else num_tokens
        G = -(-num_tokens // S)
        pad = G * S - num_tokens
        xg = jnp.pad(x.reshape(num_tokens, D), ((0, pad), (0, 0))).reshape(G, S, D)
        xg = constrain(xg, ("group", None, "embed"))
        mask = jnp.pad(token_mask.reshape(num_tokens), (0, pad)).reshape(G, S)
        ids = None  # [G, S]: each token's adapter, when the experts hold a bank
        if lora_ids is not None and self.experts.adapted:
            ids = jnp.pad(lora_ids.reshape(num_tokens), (0, pad), constant_values=-1)
            ids = ids.reshape(G, S)

        logits = constrain(self.router_logits(xg), ("group", None, None))
        routes = routing.route(logits, c.num_experts_per_tok)

        if impl == "dense":
            if capacity_factor is None:
                y, kept = self._dropless_dense(xg, routes, mask, ids)
            else:
                capacity = routing.expert_capacity(
                    S, c.num_experts, c.num_experts_per_tok, capacity_factor
                )
                y, kept = self._dense(xg, routes, mask, ids, capacity)
        else:
            flat = jax.tree.map(lambda a: a.reshape(S, *a.shape[2:]), routes)
            rows = experts_fn or self._rows_fn(x.dtype, layer)
            rows_ids = None if ids is None else ids[0]
            y = sorted_dispatch(xg[0], flat, mask[0], c.num_experts, rows, rows_ids)[None]
            kept = jnp.ones(routes.experts.shape, bool)

        stats = routing.router_stats(logits, routes, kept, mask)

        def ungroup(a: jax.Array) -> jax.Array:
            return a.reshape(G * S, *a.shape[2:])[:num_tokens].reshape(B, T, *a.shape[2:])

        return MoEOutput(ungroup(y), stats, ungroup(routes.weights), ungroup(routes.experts))

    def router_logits(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> the router's logits [..., E]. Top-k choices flip under reduced
        precision: the router is float32, HIGHEST."""
        return jnp.einsum(
            "...D,DE->...E",
            x.astype(jnp.float32),
            self.gate[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )

    def _rows_fn(self, dtype: jnp.dtype, layer: jax.Array | None) -> ExpertsFn:
        """The sorted rows' computation from this layer's experts: expert e's weights
        sliced from the stack (at [layer, e] if it still carries the layers axis), one
        expert at a time. This layer's own float weights without adapters get
        `trainable_rows`, whose backward pass is a loop of its own."""
        if layer is None and self.experts.trainable_in_place:
            return self.experts.trainable_rows_fn(self.experts)
        stacked = self.experts.weights()

        def expert(e):
            return tuple(w.take((e,) if layer is None else (layer, e), dtype) for w in stacked)

        return functools.partial(expert_rows, expert=expert, num_experts=self.config.num_experts)

    def _dense(
        self,
        x: jax.Array,
        routes: routing.Routes,
        mask: jax.Array,
        ids: jax.Array | None,
        capacity: int,
    ) -> tuple[jax.Array, jax.Array]:
        """x: [G, S, D] -> y [G, S, D] and kept [G, S, k] with `capacity` slots per expert;
        `ids` [G, S] (or None): the tokens' adapters of a bank (-1: none)."""
        d = routing.dispatch_and_combine(routes, mask, self.config.num_experts, capacity)
        # Expert parallelism: groups are sharded over every batch axis, `expert`
        # included, and dispatched where they are; the experts compute on [E, G, C, D]
        # sharded by expert. Each change of layout is one all-to-all.
        by_group = (None, "group", "capacity", "embed")
        x_e = jnp.einsum("GSEC,GSD->EGCD", d.dispatch.astype(x.dtype), x)  # [E, G, C, D]
        select = None  # [E, G, C, J]: the tokens' adapters, one-hot, moved with them
        if ids is not None:
            onehot = bank_weights(ids, self.config.lora_bank, x.dtype)  # [G, S, J]
            select = jnp.einsum("GSEC,GSJ->EGCJ", d.dispatch.astype(x.dtype), onehot)
        y_e = constrain(self.experts(constrain(x_e, by_group), select), by_group)  # [E, G, C, D]
        y = jnp.einsum(
            "EGCD,GSEC->GSD",
            y_e,
            d.combine.astype(x.dtype),
            preferred_element_type=jnp.float32,
        )
        return constrain(y.astype(x.dtype), ("group", None, "embed")), d.kept

    def _dropless_dense(
        self, x: jax.Array, routes: routing.Routes, mask: jax.Array, ids: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Exact: the smallest capacity on the ladder that no expert overflows."""
        c = self.config
        S = x.shape[1]
        E, k = c.num_experts, c.num_experts_per_tok
        ladder = {routing.expert_capacity(S, E, k, cf) for cf in DROPLESS_LADDER}
        capacities = sorted(ladder | {S})
        if len(capacities) == 1:
            return self._dense(x, routes, mask, ids, S)
        fullest = jnp.max(routing.expert_load(routes.experts, mask, E))
        branch = jnp.searchsorted(jnp.asarray(capacities), fullest)  # first C >= fullest
        # Rematerialised: a backward pass through `switch` would otherwise hold the
        # residuals of every branch, not only of the one taken.
        branches = [
            jax.checkpoint(functools.partial(self._dense, capacity=cap)) for cap in capacities
        ]
        return jax.lax.switch(branch, branches, x, routes, mask, ids)

"""The sparse mixture-of-experts (SMoE) layer as dense dispatch/combine einsums.

    logits   = x @ gate                                 [G, S, E] float32
    routes   = top-k of softmax(logits), renormalised   [G, S, k]
    dispatch, combine = slots in each expert's buffer   [G, S, E, C]
    x_e      = einsum(dispatch, x)                      [E, G, C, D]
    y_e      = w2 (silu(x_e w1) * (x_e w3))             [E, G, C, D]
    y        = einsum(combine, y_e)                     [G, S, D]

With a capacity factor the layer is GShard's: C = ceil(k S / E * cf) slots per
expert and group, overflowing choices dropped. Dropless (capacity_factor=None)
must equal the reference exactly, yet C = S would multiply the expert work by
E / k. Instead the layer measures the fullest expert and runs, under
`lax.switch`, the smallest capacity from a short ladder that holds every
choice: the result is exact and the work stays near k S / E per expert.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import routing
from mixtral_jax.config import ModelConfig
from mixtral_jax.layers import param

# Capacity factors tried, smallest first, before falling back to C = S.
# Only the chosen branch runs; each entry costs compile time, not run time.
DROPLESS_LADDER = (1.0, 1.5, 2.0)


class Experts(nnx.Module):
    """E SwiGLU feed-forward networks stacked on a leading expert axis.

    w1 (gate) and w3 (up) are [E, D, F], w2 (down) is [E, F, D], so that each
    einsum contracts its weight's non-minor dimension with no transpose.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        init = nnx.initializers.normal(c.initializer_range)
        dt = c.weight_dtype
        E, D, F = c.num_experts, c.hidden_size, c.intermediate_size
        self.w1 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), dt, init)
        self.w3 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), dt, init)
        self.w2 = param(rngs, (E, F, D), ("expert", "mlp", "embed"), dt, init)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [E, G, C, D] tokens in each expert's slots -> [E, G, C, D]."""
        dt = x.dtype
        gate = jnp.einsum("EGCD,EDF->EGCF", x, self.w1[...].astype(dt))
        up = jnp.einsum("EGCD,EDF->EGCF", x, self.w3[...].astype(dt))
        return jnp.einsum("EGCF,EFD->EGCD", jax.nn.silu(gate) * up, self.w2[...].astype(dt))


class MoEOutput(NamedTuple):
    y: jax.Array  # [B, T, D]
    stats: routing.RouterStats
    weights: jax.Array  # [B, T, k] renormalised weights of the chosen experts
    experts: jax.Array  # [B, T, k] chosen experts, best first


class SparseMoE(nnx.Module):
    """Router (`gate`) plus `experts`, grouped GShard dispatch with capacity."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.gate = param(
            rngs,
            (c.hidden_size, c.num_experts),
            ("embed", "expert"),
            c.weight_dtype,
            nnx.initializers.normal(c.initializer_range),
        )
        self.experts = Experts(c, rngs=rngs)

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> MoEOutput:
        """x: [B, T, D]; token_mask: [B, T] bool, False on padding."""
        c = self.config
        B, T, D = x.shape
        num_tokens = B * T
        S = min(c.group_size, num_tokens)
        G = -(-num_tokens // S)
        pad = G * S - num_tokens
        xg = jnp.pad(x.reshape(num_tokens, D), ((0, pad), (0, 0))).reshape(G, S, D)
        mask = jnp.pad(token_mask.reshape(num_tokens), (0, pad)).reshape(G, S)

        # Top-k choices flip under reduced precision: the router is float32, HIGHEST.
        logits = jnp.einsum(
            "GSD,DE->GSE",
            xg.astype(jnp.float32),
            self.gate[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        routes = routing.route(logits, c.num_experts_per_tok)

        if c.capacity_factor is None:
            y, kept = self._dropless(xg, routes, mask)
        else:
            capacity = routing.expert_capacity(
                S, c.num_experts, c.num_experts_per_tok, c.capacity_factor
            )
            y, kept = self._dispatch(xg, routes, mask, capacity)

        stats = routing.router_stats(logits, routes, kept, mask)

        def ungroup(a: jax.Array) -> jax.Array:
            return a.reshape(G * S, *a.shape[2:])[:num_tokens].reshape(B, T, *a.shape[2:])

        return MoEOutput(ungroup(y), stats, ungroup(routes.weights), ungroup(routes.experts))

    def _dispatch(
        self, x: jax.Array, routes: routing.Routes, mask: jax.Array, capacity: int
    ) -> tuple[jax.Array, jax.Array]:
        """x: [G, S, D] -> y [G, S, D] and kept [G, S, k] with `capacity` slots per expert."""
        d = routing.dispatch_and_combine(routes, mask, self.config.num_experts, capacity)
        x_e = jnp.einsum("GSEC,GSD->EGCD", d.dispatch.astype(x.dtype), x)  # [E, G, C, D]
        y_e = self.experts(x_e)  # [E, G, C, D]
        y = jnp.einsum(
            "EGCD,GSEC->GSD",
            y_e,
            d.combine.astype(x.dtype),
            preferred_element_type=jnp.float32,
        )
        return y.astype(x.dtype), d.kept

    def _dropless(
        self, x: jax.Array, routes: routing.Routes, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Exact: the smallest capacity on the ladder that no expert overflows."""
        c = self.config
        S = x.shape[1]
        capacities = sorted(
            {
                routing.expert_capacity(S, c.num_experts, c.num_experts_per_tok, cf)
                for cf in DROPLESS_LADDER
            }
            | {S}
        )
        if len(capacities) == 1:
            return self._dispatch(x, routes, mask, S)
        fullest = jnp.max(routing.expert_load(routes.experts, mask, c.num_experts))
        branch = jnp.searchsorted(jnp.asarray(capacities), fullest)  # first C >= fullest
        branches = [functools.partial(self._dispatch, capacity=cap) for cap in capacities]
        return jax.lax.switch(branch, branches, x, routes, mask)

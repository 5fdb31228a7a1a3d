"""Top-k routing, GShard-style dispatch/combine tensors, and the router losses.

Pure functions of arrays; `moe.py` wraps them in a module.

Shapes (einsum letters):
  G groups of S tokens each (tokens are flattened batch-major, then grouped)
  E experts, k choices per token, C expert capacity (slots per expert per group)

  router logits    [G, S, E]  float32
  weights          [G, S, k]  renormalised top-k softmax weights (sum to 1)
  experts          [G, S, k]  int32 chosen expert ids, best first
  dispatch         [G, S, E, C] bool: token s of group g sits in slot c of expert e
  combine          [G, S, E, C] float32: dispatch * the token's weight for expert e

The combine weights are the *renormalised* top-k weights of the reference
(softmax over all E, keep the top k, divide by their sum), not the raw top-k
probabilities of GShard/Switch: for k = 2 the two give different outputs.

Capacity priority: all first choices of a group are placed before any second
choice, and within a choice rank earlier tokens go first. A choice that finds
its expert full is dropped: the token loses that expert's contribution (the
other weights are not renormalised again) and keeps its residual.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routes(NamedTuple):
    probs: jax.Array  # [..., E] float32 softmax over all experts
    weights: jax.Array  # [..., k] float32 renormalised weights of the chosen experts
    experts: jax.Array  # [..., k] int32 chosen experts, best first


def route(logits: jax.Array, top_k: int) -> Routes:
    """The reference router: softmax in float32, top-k, weights renormalised to sum to 1.

    Ties go to the lower expert index, as with `torch.topk`.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_probs, experts = jax.lax.top_k(probs, top_k)
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return Routes(probs, weights, experts.astype(jnp.int32))


def expert_capacity(
    group_size: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> int:
    """C = ceil(k * S / E * capacity_factor), clipped to [1, S]; S (dropless) when None.

    Any capacity_factor >= E / k gives C = S: nothing can be dropped.
    """
    if capacity_factor is None:
        return group_size
    capacity = math.ceil(top_k * group_size / num_experts * capacity_factor)
    return max(1, min(group_size, capacity))


class Dispatch(NamedTuple):
    dispatch: jax.Array  # [G, S, E, C] bool
    combine: jax.Array  # [G, S, E, C] float32
    kept: jax.Array  # [G, S, k] bool: the choice found a slot


def expert_load(experts: jax.Array, token_mask: jax.Array, num_experts: int) -> jax.Array:
    """Choices per expert in each group [G, E] (int32), padding tokens excluded."""
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [G, S, k, E]
    return jnp.einsum("GSKE,GS->GE", one_hot, token_mask.astype(jnp.int32))


def dispatch_and_combine(
    routes: Routes, token_mask: jax.Array, num_experts: int, capacity: int
) -> Dispatch:
    """Assigns each (token, choice) a slot in its expert's buffer of `capacity` slots.

    routes: weights/experts [G, S, k]; token_mask: [G, S] bool, False for
    padding (padding takes no slot). Priority is choice rank, then position.
    """
    G, S, k = routes.experts.shape
    choice = jax.nn.one_hot(routes.experts, num_experts, dtype=jnp.int32)  # [G, S, k, E]
    choice = choice * token_mask[:, :, None, None].astype(jnp.int32)
    # Rank-major order (all first choices, then all second ...) for the running count.
    by_rank = choice.transpose(0, 2, 1, 3).reshape(G, k * S, num_experts)
    slot = jnp.cumsum(by_rank, axis=1) - 1  # [G, k*S, E] slot index if chosen
    slot = slot.reshape(G, k, S, num_experts).transpose(0, 2, 1, 3)  # [G, S, k, E]
    fits = (choice == 1) & (slot < capacity)  # [G, S, k, E]
    kept = jnp.any(fits, axis=-1)  # [G, S, k]
    # A token picks each expert at most once, so summing over k merges the choices.
    slot_e = jnp.sum(jnp.where(fits, slot, 0), axis=2)  # [G, S, E]
    fits_e = jnp.any(fits, axis=2)  # [G, S, E]
    weight_e = jnp.sum(jnp.where(fits, routes.weights[..., None], 0.0), axis=2)  # [G, S, E]
    dispatch = fits_e[..., None] & (slot_e[..., None] == jnp.arange(capacity))  # [G, S, E, C]
    combine = jnp.where(dispatch, weight_e[..., None], 0.0)
    return Dispatch(dispatch, combine, kept)


class RouterStats(NamedTuple):
    """Per-layer routing statistics (padding excluded)."""

    expert_fraction: jax.Array  # [E] choices per token given to each expert (sums to k)
    router_prob: jax.Array  # [E] mean softmax probability of each expert
    z_loss: jax.Array  # [] mean over tokens of logsumexp(logits)^2
    dropped_fraction: jax.Array  # [] fraction of token choices that found no slot
    num_tokens: jax.Array  # [] tokens counted (not padding)


def router_stats(
    logits: jax.Array, routes: Routes, kept: jax.Array, token_mask: jax.Array
) -> RouterStats:
    """Statistics over all tokens: logits [..., E], experts/kept [..., k], mask [...]."""
    num_experts = logits.shape[-1]
    top_k = routes.experts.shape[-1]
    mask = token_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    chosen = jax.nn.one_hot(routes.experts, num_experts, dtype=jnp.float32)  # [..., k, E]
    expert_fraction = jnp.einsum("...KE,...->E", chosen, mask) / count
    router_prob = jnp.einsum("...E,...->E", routes.probs, mask) / count
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    z_loss = jnp.sum(jnp.square(lse) * mask) / count
    dropped = jnp.sum((~kept).astype(jnp.float32) * mask[..., None]) / (count * top_k)
    return RouterStats(expert_fraction, router_prob, z_loss, dropped, jnp.sum(mask))


def load_balancing_loss(expert_fraction: jax.Array, router_prob: jax.Array) -> jax.Array:
    """transformers' `load_balancing_loss_func`: E * sum_e fraction[e] * prob[e].

    With statistics stacked over layers [L, E], the fractions and probabilities
    are first averaged over layers, as transformers does by concatenating all
    layers' router logits. Equals k at perfect balance.
    """
    num_experts = expert_fraction.shape[-1]
    if expert_fraction.ndim == 2:
        expert_fraction = jnp.mean(expert_fraction, axis=0)
        router_prob = jnp.mean(router_prob, axis=0)
    return num_experts * jnp.sum(expert_fraction * router_prob)

"""Jitted forward and train step on a device mesh, with explicit shardings.

A model is split into its graph (static) and its parameters (an `nnx.State`).
The jitted functions take the parameters as an argument whose shardings come
from the logical-axis rules, trace the model inside `sharding.use_rules` so
that its activations are constrained by the same rules, and say every input's
and output's sharding (`jax.jit` with `in_shardings`/`out_shardings`, which is
what pjit became). The train step donates its state: parameters and optimizer
state are updated in place instead of being held twice.

A batch is a dict of [B, T] arrays: `tokens`, `targets` (next-token ids), and
optionally `weights` (loss weight per token, 0 on padding and prompts),
`positions` and `segment_ids` (packed sequences; see `Mixtral.forward`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax import sharding
from mixtral_jax.model import Mixtral

Batch = Mapping[str, jax.Array]
BATCH_AXES = ("batch", "length")
BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


def loss_fn(model: Mixtral, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted token cross-entropy + the config's router auxiliary and z losses."""
    c = model.config
    out = model.forward(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    ce = optax.softmax_cross_entropy_with_integer_labels(
        out.logits.astype(jnp.float32), batch["targets"]
    )  # [B, T]
    weights = batch.get("weights")
    weights = jnp.ones_like(ce) if weights is None else weights.astype(jnp.float32)
    cross_entropy = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    loss = (
        cross_entropy
        + c.router_aux_loss_coef * out.load_balancing_loss
        + c.router_z_loss_coef * out.z_loss
    )
    metrics = {
        "loss": loss,
        "cross_entropy": cross_entropy,
        "load_balancing_loss": out.load_balancing_loss,
        "z_loss": out.z_loss,
        "dropped_fraction": out.dropped_fraction,
        "expert_fraction": jnp.mean(out.routing.stats.expert_fraction, axis=0),  # [E]
    }
    return loss, metrics


def _split(model: Mixtral):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-parameter state; the sharded steps expect none")
    return graphdef, params, rest


def _check_batch(batch: Batch, batch_sharding: NamedSharding) -> None:
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown or "tokens" not in batch:
        raise ValueError(
            f"a batch is a dict with 'tokens' and optionally {list(BATCH_KEYS[1:])}; "
            f"got keys {sorted(batch)}"
        )
    _check_rows(batch["tokens"], batch_sharding)


def _check_rows(tokens, batch_sharding: NamedSharding) -> None:
    """The batch axis must split evenly over the mesh axes `batch` maps to."""
    axes = sharding.spec_axes(batch_sharding.spec[0] if len(batch_sharding.spec) else None)
    shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
    rows = tokens.shape[0] if tokens.ndim else 0
    if rows % shards:
        named = " x ".join(f"{a}={batch_sharding.mesh.shape[a]}" for a in axes)
        raise ValueError(
            f"a batch of {rows} rows does not split over the mesh axes {named}; use a "
            f"multiple of {shards} rows (pad with weight 0), or a mesh with fewer batch devices"
        )


@dataclasses.dataclass(frozen=True)
class Forward:
    """`forward(params, tokens, positions=None, segment_ids=None)` -> logits [B, T, V]."""

    fn: Callable
    params: nnx.State  # the model's parameters, placed by their shardings
    param_shardings: Any
    batch_sharding: NamedSharding

    def __call__(self, params, tokens, positions=None, segment_ids=None) -> jax.Array:
        _check_rows(tokens, self.batch_sharding)
        return self.fn(params, tokens, positions, segment_ids)


def jit_forward(
    model: Mixtral, mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
) -> Forward:
    """The model's forward pass jitted for `mesh`; its parameters are moved to their
    shardings (`Forward.params`), the input's batch axis is split over the mesh axes
    that `batch` maps to, and the logits come back sharded over batch and vocab."""
    graphdef, params, rest = _split(model)
    by_path = sharding.param_shardings(model, mesh, rules)
    param_sh = sharding.shardings_like(params, by_path, mesh)
    c = model.config
    batch_sh = sharding.named_sharding(BATCH_AXES, (mesh.size, 1), mesh, rules)
    logits_sh = sharding.named_sharding(
        (*BATCH_AXES, "vocab"), (mesh.size, 1, c.vocab_size), mesh, rules
    )

    def forward(params, tokens, positions, segment_ids):
        with sharding.use_rules(mesh, rules):
            return nnx.merge(graphdef, params, rest)(tokens, positions, segment_ids)

    fn = jax.jit(
        forward,
        in_shardings=(param_sh, batch_sh, batch_sh, batch_sh),
        out_shardings=logits_sh,
    )
    return Forward(fn, jax.device_put(params, param_sh), param_sh, batch_sh)


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """`init(model) -> TrainState`, `step(state, batch) -> (state, metrics)` for one mesh.

    `step` donates `state`: use the returned state, never the one passed in.
    """

    init_fn: Callable
    step_fn: Callable
    graphdef: Any
    rest: Any
    state_shardings: TrainState
    batch_sharding: NamedSharding

    def init(self, model: Mixtral) -> TrainState:
        """The model's parameters, moved to their shardings, and a fresh optimizer state."""
        _, params, _ = _split(model)
        return self.init_fn(params)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        _check_batch(batch, self.batch_sharding)
        return self.step_fn(state, dict(batch))

    def model(self, state: TrainState) -> Mixtral:
        """The model with `state`'s parameters (sharded as they are)."""
        return nnx.merge(self.graphdef, state.params, self.rest)


def jit_train_step(
    model: Mixtral,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    loss: Callable[[Mixtral, Batch], tuple[jax.Array, dict]] = loss_fn,
) -> TrainStep:
    """A jitted, sharded train step of `optimizer` on `loss` for `model`'s architecture.

    Parameters and the optimizer state leaves that mirror them (Adam's moments)
    are sharded alike by the rules, so `fsdp` splits both; counters are
    replicated. Metrics come back replicated.
    """
    graphdef, params, rest = _split(model)
    by_path = sharding.param_shardings(model, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = sharding.shardings_like(params, by_path, mesh)
    opt_sh = sharding.shardings_like(jax.eval_shape(optimizer.init, params), by_path, mesh)
    state_sh = TrainState(param_sh, opt_sh, replicated)
    batch_sh = sharding.named_sharding(BATCH_AXES, (mesh.size, 1), mesh, rules)

    def init(params):
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def step(state: TrainState, batch: Batch):
        with sharding.use_rules(mesh, rules):

            def loss_of(params):
                return loss(nnx.merge(graphdef, params, rest), batch)

            (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return TrainState(params, opt_state, state.step + 1), metrics

    return TrainStep(
        init_fn=jax.jit(init, in_shardings=(param_sh,), out_shardings=state_sh),
        step_fn=jax.jit(
            step,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        ),
        graphdef=graphdef,
        rest=rest,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
    )

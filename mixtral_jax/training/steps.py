"""Jitted forward and train step on a device mesh, with explicit shardings.

A model is split into its graph (static) and its parameters (an `nnx.State`).
The jitted functions take the parameters as an argument whose shardings come
from the logical-axis rules, trace the model inside `parallel.rules.use_rules` so
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

from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.parallel.placement import param_shardings, place, shardings_like
from mixtral_jax.parallel.rules import DEFAULT_RULES, Rules, named_sharding, spec_axes, use_rules

Batch = Mapping[str, jax.Array]
BATCH_AXES = ("batch", "length")
BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


def loss_fn(model: Mixtral, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted token cross-entropy + the config's router auxiliary and z losses."""
    c = model.config
    out = model.forward(
        batch["tokens"], batch.get("positions"), batch.get("segment_ids"), differentiable=True
    )
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


def token_nll(model: Mixtral, batch: Batch) -> dict[str, jax.Array]:
    """Summed weighted negative log-likelihood and the summed weights (tokens):
    sums, so that a perplexity over many batches is exp(sum nll / sum tokens)."""
    logits = model(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"]
    )  # [B, T]
    weights = batch.get("weights")
    weights = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
    return {"nll": jnp.sum(nll * weights), "tokens": jnp.sum(weights)}


class _Placement(NamedTuple):
    graphdef: Any
    params: nnx.State
    rest: Any
    by_path: dict  # {parameter path: NamedSharding}
    param_shardings: Any  # like params
    batch_sharding: NamedSharding


def _place(model: Mixtral, mesh: Mesh, rules: Rules) -> _Placement:
    """The model split into graph and parameters, and where parameters and batches go."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-parameter state; the sharded steps expect none")
    by_path = param_shardings(model, mesh, rules)
    param_sh = shardings_like(params, by_path, mesh)
    return _Placement(graphdef, params, rest, by_path, param_sh, batch_sharding(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Where a batch of rows [B, T] goes: rows split over the axes `batch` maps to."""
    return named_sharding(BATCH_AXES, (mesh.size, 1), mesh, rules)


def _check_batch(batch: Batch, batch_sharding: NamedSharding, accumulate: int) -> None:
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown or "tokens" not in batch or "targets" not in batch:
        raise ValueError(
            f"a batch is a dict with 'tokens', 'targets' and optionally "
            f"{list(BATCH_KEYS[2:])}; got keys {sorted(batch)}"
        )
    check_rows(batch["tokens"].shape[0], batch_sharding, accumulate)


def check_rows(rows: int, batch_sharding: NamedSharding, accumulate: int = 1) -> None:
    """A batch of `rows` must split evenly into micro-batches and over the mesh axes
    `batch` maps to."""
    axes = spec_axes(batch_sharding.spec[0] if len(batch_sharding.spec) else None)
    shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
    if rows % (shards * accumulate):
        named = " x ".join(f"{a}={batch_sharding.mesh.shape[a]}" for a in axes) or "none"
        raise ValueError(
            f"a batch of {rows} rows does not split into {accumulate} micro-batch(es) over "
            f"the batch mesh axes ({named}); use a multiple of {shards * accumulate} rows "
            "(pad with weight 0), or fewer batch devices or accumulation steps"
        )


@dataclasses.dataclass(frozen=True)
class Forward:
    """`forward(params, tokens, positions=None, segment_ids=None)` -> logits [B, T, V]."""

    fn: Callable
    params: nnx.State  # the model's parameters, placed by their shardings
    param_shardings: Any
    batch_sharding: NamedSharding

    def __call__(self, params, tokens, positions=None, segment_ids=None) -> jax.Array:
        check_rows(tokens.shape[0], self.batch_sharding)
        return self.fn(params, tokens, positions, segment_ids)


def jit_forward(model: Mixtral, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Forward:
    """The model's forward pass jitted for `mesh`; its parameters are moved to their
    shardings (`Forward.params`), the input's batch axis is split over the mesh axes
    that `batch` maps to, and the logits come back sharded over batch and vocab."""
    graphdef, params, rest, _, param_sh, batch_sh = _place(model, mesh, rules)
    logits_sh = named_sharding(
        (*BATCH_AXES, "vocab"), (mesh.size, 1, model.config.vocab_size), mesh, rules
    )

    def forward(params, tokens, positions, segment_ids):
        with use_rules(mesh, rules):
            return nnx.merge(graphdef, params, rest)(tokens, positions, segment_ids)

    fn = jax.jit(
        forward,
        in_shardings=(param_sh, batch_sh, batch_sh, batch_sh),
        out_shardings=logits_sh,
    )
    return Forward(fn, place(params, param_sh), param_sh, batch_sh)


def jit_routing(model: Mixtral, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Forward:
    """Like `jit_forward`, but returns what the routers chose instead of logits:
    (experts, weights), each [L, B, T, k], best choice first. The LM head is not
    computed."""
    graphdef, params, rest, _, param_sh, batch_sh = _place(model, mesh, rules)

    def routing(params, tokens, positions, segment_ids):
        with use_rules(mesh, rules):
            out = nnx.merge(graphdef, params, rest).forward(tokens, positions, segment_ids)
        return out.routing.experts, out.routing.weights

    fn = jax.jit(routing, in_shardings=(param_sh, batch_sh, batch_sh, batch_sh))
    return Forward(fn, place(params, param_sh), param_sh, batch_sh)


@dataclasses.dataclass(frozen=True)
class Eval:
    """`evaluate(params, batch)` -> e.g. {"nll": summed NLL, "tokens": summed weights}."""

    fn: Callable
    param_shardings: Any
    batch_sharding: NamedSharding

    def __call__(self, params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        _check_batch(batch, self.batch_sharding, 1)
        return self.fn(params, dict(batch))

    def place(self, model: Mixtral) -> nnx.State:
        """`model`'s parameters, moved to their shardings."""
        return place(nnx.state(model, nnx.Param), self.param_shardings)


def jit_eval(
    model: Mixtral,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    fn: Callable[[Mixtral, Batch], dict[str, jax.Array]] = token_nll,
) -> Eval:
    """`fn` (default `token_nll`) jitted for `mesh`, its results replicated; takes the
    parameters of `model`'s architecture (`nnx.state(model, nnx.Param)`, e.g. of a
    model being trained) placed by the rules."""
    graphdef, _, rest, _, param_sh, batch_sh = _place(model, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def evaluate(params, batch):
        with use_rules(mesh, rules):
            return fn(nnx.merge(graphdef, params, rest), batch)

    jitted = jax.jit(evaluate, in_shardings=(param_sh, batch_sh), out_shardings=replicated)
    return Eval(jitted, param_sh, batch_sh)


class TrainState(NamedTuple):
    params: nnx.State  # the trained parameters: all, or e.g. only the LoRA adapters
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """`init(model) -> TrainState`, `step(state, batch) -> (state, metrics)` for one mesh.

    `step` donates `state`: use the returned state, never the one passed in.
    Frozen parameters are not part of the state; the step holds them (`frozen`).
    """

    init_fn: Callable
    step_fn: Callable
    graphdef: Any
    trainable: nnx.filterlib.Filter
    frozen: nnx.State  # the parameters not trained, placed by their shardings
    rest: Any
    state_shardings: TrainState
    batch_sharding: NamedSharding
    accumulate: int

    def init(self, model: Mixtral) -> TrainState:
        """`model`'s trained parameters, moved to their shardings, and a fresh
        optimizer state."""
        _, params, _, _ = nnx.split(model, self.trainable, nnx.Param, ...)
        return self.init_fn(params)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        _check_batch(batch, self.batch_sharding, self.accumulate)
        return self.step_fn(state, self.frozen, dict(batch))

    def model(self, state: TrainState) -> Mixtral:
        """The model with `state`'s parameters (sharded as they are)."""
        return nnx.merge(self.graphdef, state.params, self.frozen, self.rest)


def jit_train_step(
    model: Mixtral,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    loss: Callable[[Mixtral, Batch], tuple[jax.Array, dict]] = loss_fn,
    *,
    trainable: nnx.filterlib.Filter = nnx.Param,
    accumulate: int = 1,
) -> TrainStep:
    """A jitted, sharded train step of `optimizer` on `loss` for `model`'s architecture.

    Only the parameters that match `trainable` (an nnx filter, e.g.
    `layers.LoRAParam`) get gradients and optimizer state; the others are frozen.
    Parameters and the optimizer state leaves that mirror them (Adam's moments)
    are sharded alike by the rules, so `fsdp` splits both; counters are
    replicated. With `accumulate` = A > 1 a batch of A x B rows is processed as A
    micro-batches of B rows in a loop and their gradients averaged: one update
    for the memory of B rows. Metrics come back replicated (micro-batch means).
    """
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer, got {accumulate!r}")
    _, _, _, by_path, _, batch_sh = _place(model, mesh, rules)
    graphdef, params, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    if not jax.tree.leaves(params):
        raise ValueError("no parameter matches the `trainable` filter; nothing would train")
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = shardings_like(params, by_path, mesh)
    frozen_sh = shardings_like(frozen, by_path, mesh)
    opt_sh = shardings_like(jax.eval_shape(optimizer.init, params), by_path, mesh)
    state_sh = TrainState(param_sh, opt_sh, replicated)

    def init(params):
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def grads_of(params, frozen, batch):
        def loss_of(params):
            return loss(nnx.merge(graphdef, params, frozen, rest), batch)

        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return grads, metrics

    def step(state: TrainState, frozen, batch: Batch):
        with use_rules(mesh, rules):
            if accumulate == 1:
                grads, metrics = grads_of(state.params, frozen, batch)
            else:
                # [A * B, T] -> [A, B, T]: micro-batch a holds rows a, a + A, ... so
                # that every micro-batch is split over the batch devices alike.
                micro = jax.tree.map(
                    lambda x: jnp.swapaxes(x.reshape(-1, accumulate, *x.shape[1:]), 0, 1),
                    batch,
                )

                def add(total, one):
                    grads, metrics = grads_of(state.params, frozen, one)
                    return jax.tree.map(jnp.add, total, (grads, metrics)), None

                zeros = jax.tree.map(
                    jnp.zeros_like,
                    jax.eval_shape(
                        grads_of, state.params, frozen, jax.tree.map(lambda x: x[0], micro)
                    ),
                )
                total, _ = jax.lax.scan(add, zeros, micro)
                grads, metrics = jax.tree.map(lambda x: x / accumulate, total)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return TrainState(params, opt_state, state.step + 1), metrics

    return TrainStep(
        init_fn=jax.jit(init, in_shardings=(param_sh,), out_shardings=state_sh),
        step_fn=jax.jit(
            step,
            in_shardings=(state_sh, frozen_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        ),
        graphdef=graphdef,
        trainable=trainable,
        frozen=place(frozen, frozen_sh),
        rest=rest,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
        accumulate=accumulate,
    )

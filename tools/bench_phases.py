"""Where our training step's time goes: each piece of it timed alone, forward and
backward (tools/bench.py --sections train ends with this table).

A piece is jitted on its own with random inputs of the step's shapes and
differentiated with respect to its parameters and its input, as the step does:
  attention          RMSNorm, q/k/v/o projections, RoPE, causal attention
  router             the gate's logits, top-k, the load-balancing statistics
  dispatch/combine   the SMoE layer with its experts replaced by the identity,
                     less the router
  experts            the whole SMoE layer less the two above
  embedding, head    the embedding, the final RMSNorm, the LM head, the loss
  optimizer          AdamW's update of every parameter
The layer pieces count once per layer. Pieces timed alone miss what XLA fuses
across their borders (and the residual adds), so the sum is set beside the whole
step measured in the same run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.model import routing
from mixtral_jax.model.mixtral import DecoderBlock
from tools.bench_common import interleaved

GATE = nnx.PathContains("gate")
PHASES = ("attention", "router", "dispatch/combine", "experts", "embedding, head", "optimizer")


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def _fwd_bwd(fn, module: nnx.Module, *inputs, wrt=nnx.Param) -> callable:
    """A timer of d(sum(fn(module, *inputs) * probe)) / d(parameters `wrt`, first input)."""
    graphdef, params, rest_params = nnx.split(module, wrt, ...)
    probe = None

    def objective(params, x, *rest):
        out = fn(nnx.merge(graphdef, params, rest_params), x, *rest)
        return jnp.sum(out * probe) if probe is not None else out

    probe_shape = jax.eval_shape(
        lambda p, *a: fn(nnx.merge(graphdef, p, rest_params), *a), params, *inputs
    )
    if probe_shape.shape:  # a fixed random cotangent, so nothing is optimised away
        probe = jnp.asarray(np.random.RandomState(0).randn(*probe_shape.shape), probe_shape.dtype)
    grad = jax.jit(jax.grad(objective, argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(params, *inputs))


def _router(moe, x, mask):
    """The router alone, as `SparseMoE` computes it: [G, S, D] -> weights [G, S, k]
    (plus the load-balancing loss, so that its statistics are differentiated too)."""
    c = moe.config
    logits = moe.router_logits(x)
    routes = routing.route(logits, c.num_experts_per_tok)
    stats = routing.router_stats(logits, routes, jnp.ones(routes.experts.shape, bool), mask)
    loss = routing.load_balancing_loss(stats.expert_fraction, stats.router_prob)
    return routes.weights + loss


def _moe(moe, x, mask, experts_fn=None):
    return moe(x, mask, experts_fn=experts_fn).y


def _head(model: Mixtral, x, tokens):
    """Embedding (its gradient is a scatter into [V, D]), final norm, LM head, loss."""
    h = x + model.embed(tokens, x.dtype)
    logits = jnp.einsum("BTD,DV->BTV", model.final_norm(h), model.lm_head[...].astype(x.dtype))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))


def phase_timers(config: ModelConfig, batch: int, length: int) -> dict[str, callable]:
    """Timers of the pieces (see the module docstring) for `config`'s step on
    [batch, length] tokens; the layer pieces are of one layer."""
    c = config
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(batch, length, c.hidden_size), c.compute_dtype)
    tokens = jnp.asarray(rng.randint(0, c.vocab_size, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = jnp.ones((batch, length), bool)
    block = DecoderBlock(c, rngs=nnx.Rngs(0))
    timers = {
        "attention": _fwd_bwd(
            lambda b, x: b.attention(b.attn_norm(x), positions, None)[0], block, x
        ),
        "router": _fwd_bwd(
            lambda m, x: _router(m, x.reshape(1, -1, c.hidden_size), mask.reshape(1, -1)),
            block.moe,
            x,
            wrt=GATE,  # the experts' gradients would be zeros, and cost their writing
        ),
        "moe": _fwd_bwd(lambda m, x: _moe(m, x, mask), block.moe, x),
    }
    bare = DecoderBlock(c, rngs=nnx.Rngs(0)).moe
    if c.moe_impl == "sorted":
        timers["moe, identity experts"] = _fwd_bwd(
            lambda m, x: _moe(m, x, mask, experts_fn=lambda xs, start, count: xs),
            bare,
            x,
            wrt=GATE,
        )
    else:
        bare.experts = _Identity()
        timers["moe, identity experts"] = _fwd_bwd(lambda m, x: _moe(m, x, mask), bare, x, wrt=GATE)
    model = Mixtral(c.replace(num_layers=1), rngs=nnx.Rngs(0))
    timers["embedding, head"] = _fwd_bwd(_head, model, x, tokens)
    full = nnx.eval_shape(lambda: Mixtral(c, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(full, nnx.Param))
    grads = jax.tree.map(jnp.ones_like, params)
    optimizer = optax.adamw(1e-5)
    holder = [optimizer.init(params), params]

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # in place, as in the step
    def update(opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    def optimize():
        holder[:] = update(*holder)
        jax.block_until_ready(holder)

    timers["optimizer"] = optimize
    return timers


def split(seconds: dict[str, float], num_layers: int) -> dict[str, float]:
    """The phases' seconds in one step from the pieces' timings."""
    L = num_layers
    return {
        "attention": L * seconds["attention"],
        "router": L * seconds["router"],
        "dispatch/combine": L * max(seconds["moe, identity experts"] - seconds["router"], 0.0),
        "experts": L * max(seconds["moe"] - seconds["moe, identity experts"], 0.0),
        "embedding, head": seconds["embedding, head"],
        "optimizer": seconds["optimizer"],
    }


def phases(
    args, config: ModelConfig, length: int, variants: dict[str, dict], whole: dict[str, float]
) -> None:
    """Prints the split of our full step for each of `variants` (name -> config
    changes) beside the whole step's time measured (`whole`, by name)."""
    B = args.train_batch
    print(f"\nWhere our full step's time goes, {B} x {length} tokens (pieces timed alone)")
    print(f"  {'':<20}" + "".join(f"{v:>32}" for v in variants))
    columns = []
    for changes in variants.values():
        timers = phase_timers(config.replace(**changes), B, length)
        columns.append(split(interleaved(timers, args.repeats), config.num_layers))
    for phase in PHASES:
        cells = (
            f"{1e3 * col[phase]:10.0f} ms {100 * col[phase] / sum(col.values()):5.1f}%"
            for col in columns
        )
        print(f"  {phase:<20}" + "".join(f"{cell:>32}" for cell in cells))
    total = (f"{1e3 * sum(col.values()):10.0f} ms" for col in columns)
    print(f"  {'sum of the pieces':<20}" + "".join(f"{t:>32}" for t in total))
    measured = (f"{1e3 * whole.get(v, float('nan')):10.0f} ms" for v in variants)
    print(f"  {'whole step':<20}" + "".join(f"{t:>32}" for t in measured))

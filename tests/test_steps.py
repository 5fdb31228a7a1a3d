"""The jitted steps on one device: the loss is what it says, the step trains and donates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.training import steps


@pytest.fixture(scope="module")
def setup():
    config = ModelConfig.from_dict(tiny.get_config()).replace(
        router_aux_loss_coef=0.02, router_z_loss_coef=0.001
    )
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 13))
    batch = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    return config, batch


def test_loss_is_weighted_cross_entropy_plus_router_losses(setup):
    config, batch = setup
    model = Mixtral(config, rngs=nnx.Rngs(0))
    weights = np.ones((2, 12), np.float32)
    weights[0, :5] = 0  # e.g. a prompt
    loss, metrics = steps.loss_fn(model, {**batch, "weights": jnp.asarray(weights)})

    out = model.forward(batch["tokens"])
    logp = np.asarray(jax.nn.log_softmax(out.logits.astype(jnp.float32)))
    targets = np.asarray(batch["targets"])
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ce = (nll * weights).sum() / weights.sum()
    expected = ce + 0.02 * float(out.load_balancing_loss) + 0.001 * float(out.z_loss)
    np.testing.assert_allclose(float(metrics["cross_entropy"]), ce, rtol=1e-6)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_train_step_lowers_the_loss_and_donates_its_state(setup):
    config, batch = setup
    model = Mixtral(config, rngs=nnx.Rngs(0))
    mesh = make_mesh(devices=jax.devices()[:1])
    train_step = steps.jit_train_step(model, optax.adam(1e-2), mesh)
    state = train_step.init(model)
    first = jax.tree.leaves(state.params)[0]
    losses = []
    for _ in range(5):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert first.is_deleted()  # updated in place, not held twice
    assert int(state.step) == 5
    assert losses[-1] < losses[0] - 0.1, losses
    # The trained parameters as a model.
    trained = train_step.model(state)
    assert float(steps.loss_fn(trained, batch)[0]) < losses[0]


def test_bad_batches_are_named(setup):
    config, batch = setup
    model = Mixtral(config, rngs=nnx.Rngs(0))
    train_step = steps.jit_train_step(model, optax.sgd(0.1), make_mesh(devices=jax.devices()[:1]))
    state = train_step.init(model)
    with pytest.raises(ValueError, match=r"got keys \['input_ids', 'targets'\]"):
        train_step(state, {"input_ids": batch["tokens"], "targets": batch["targets"]})

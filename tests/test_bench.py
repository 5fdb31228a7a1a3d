"""tools/bench.py's decode bound: the bytes a step reads and the experts it touches."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from mixtral_jax import Mixtral
from mixtral_jax.params import flat_params
from tools import bench


@pytest.fixture(scope="module")
def config():
    return bench.load_config("configs/tiny.py")


def test_a_step_over_every_expert_reads_every_weight_but_the_embedding(config):
    model = Mixtral(config, rngs=nnx.Rngs(0))
    params = flat_params(model)
    read = sum(v.nbytes for name, v in params.items() if name != ("embed", "embedding"))
    assert bench.active_weight_bytes(config, config.num_experts) == read
    # One token reads k of the E experts' weights and all the rest.
    experts = sum(v.nbytes for name, v in params.items() if "experts" in name)
    k, E = config.num_experts_per_tok, config.num_experts
    assert bench.active_weight_bytes(config) == read - experts * (E - k) / E


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_experts_touched_is_the_mean_of_uniform_routing(config, batch):
    E, k = config.num_experts, config.num_experts_per_tok
    rng = np.random.default_rng(batch)
    trials = 20_000
    # Each token picks k distinct experts, uniformly.
    picks = np.argsort(rng.random((trials, batch, E)), axis=-1)[..., :k]
    touched = np.zeros((trials, E), bool)
    np.put_along_axis(touched, picks.reshape(trials, batch * k), True, axis=1)
    mean = touched.sum(axis=1).mean()
    assert bench.experts_touched(config, batch) == pytest.approx(mean, abs=0.03)
    if batch == 1:
        assert bench.experts_touched(config, batch) == pytest.approx(k)


def test_a_decode_rate_needs_three_new_tokens(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "decode", "--new_tokens", "2"])
    assert "at least 3 new tokens" in capsys.readouterr().err

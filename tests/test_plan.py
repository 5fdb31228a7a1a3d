"""tools/plan.py: compiled plans on 8 virtual CPU devices, and on a TPU slice with libtpu."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mixtral_jax.planning.plan import active_params, num_params, training_flops
from mixtral_jax.planning.topology import PlanError, get_slice, topology_name
from tests import run_worker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results() -> dict:
    return run_worker("tests.plan_worker")


def test_parameter_and_cache_bytes_are_the_sharded_shapes(results):
    got = results["inference"]
    assert got["param_bytes"] == got["expected_param_bytes"]
    assert got["cache_bytes"] == got["expected_cache_bytes"]
    # The compiled programs take exactly these, plus the few bytes of tokens and key.
    for program in ("prefill_arguments", "decode_arguments"):
        extra = got[program] - got["param_bytes"] - got["cache_bytes"]
        assert 0 <= extra <= 1024, (program, extra)


def test_quantized_weights_take_their_integer_bytes(results):
    got = results["quantized"]
    if "skipped" in got:
        pytest.skip(got["skipped"])
    assert got["param_bytes"] == got["expected_param_bytes"] and got["fits"]
    # float32 weights become int4 (an eighth) plus float32 scales (one per 8 inputs);
    # the embedding and LM head (a third of this tiny model) stay float32.
    assert got["param_bytes"] < 0.45 * got["float_param_bytes"]
    assert got["num_params"] == results["inference"]["num_params"]  # scales not counted


def test_cost_twins_extrapolate_to_the_whole_model(results):
    got = results["inference"]
    assert got["prefill_flops"] == pytest.approx(got["unrolled_flops"], rel=1e-4)


def test_the_report_shows_memory_costs_collectives_and_verdict(results):
    got = results["inference"]
    report = got["report"]
    for line in ("parameters", "KV cache", "temporaries", "total", "FLOPs / step", "tokens/s"):
        assert line in report
    assert "collectives in prefill: all-gather" in report
    assert report.splitlines()[-1].startswith("verdict: fits")
    assert got["decode_tokens"] == 8 and got["fits"]
    # Expert parallelism moves tokens with all-to-alls.
    assert got["collectives"]["all-to-all"] >= 1


def test_lora_state_is_the_adapters_and_two_adam_moments(results):
    got = results["lora"]
    assert got["program"] == "train step" and got["fits"]
    assert got["param_bytes"] == got["expected_param_bytes"]  # base + adapters
    # mu and nu are sharded like the adapters; the step counts add a few bytes.
    assert 0 <= got["optimizer_bytes"] - 2 * got["adapter_bytes"] <= 64


def test_a_plan_that_does_not_fit_says_so_and_finds_one_that_does(results):
    got = results["too_small"]
    assert not got["squeezed_fits"] and got["squeezed_programs"] == 1  # the train step
    assert got["nearest_fits"] and got["nearest_peak"] <= got["usable"]
    # Fine-tuning tries other meshes first (its batch is the optimizer's): FSDP first.
    assert (got["nearest_mesh"], got["nearest_batch"]) == ("fsdp=8", 8)
    assert got["verdict"].startswith("does not fit: peak")
    assert "; fits with mesh fsdp=8, batch 8 (peak" in got["verdict"]
    # Weights that cannot fit are not compiled, and nothing is found.
    assert not got["hopeless_fits"] and got["hopeless_programs"] == 0
    assert not got["hopeless_nearest"]
    assert (
        "alone take" in got["hopeless_verdict"] and "use a larger slice" in got["hopeless_verdict"]
    )


def test_serving_plans_the_servers_programs_and_the_most_slots_that_fit(results):
    got = results["serving"]
    # The largest prefill call: 32 tokens in all, two prompts' 16 (Scheduler.shapes).
    assert got["programs"] == {"prefill": 32, "decode": 8} and got["fits"]
    assert got["cache_bytes"] == got["expected_cache_bytes"]
    # The largest batch fits, four more slots (one per data shard) do not.
    n = got["largest_batch"]
    assert got["largest_fits"] and got["largest_peak"] <= got["usable"]
    assert n > 8 and n % 4 == 0 and not got["more_fits"]
    assert got["text"].startswith(f"largest batch: {n} slots × 64 tokens (peak")
    assert got["none_text"] == "largest batch: not one slot of 64 tokens fits; use a larger slice"
    # A paged int8 cache: a pool for 8 requests of 24 tokens, not 8 slots of 64.
    paged = got["paged"]
    assert paged["programs"] == {"prefill": 32, "decode": 8} and paged["fits"]
    assert paged["cache_bytes"] == paged["expected_cache_bytes"]
    assert paged["cache"] == "pages of 16, 24 tokens a request on average, int8"


def test_the_tpu_compiler_plans_a_v5e_slice(results):
    got = results["tpu"]
    if "skipped" in got:
        pytest.skip(f"no libtpu here: {got['skipped']}")
    assert got["devices"] == ["tpu"] * 4 and got["kind"].startswith("TPU v5")
    assert got["param_bytes"] == got["expected_param_bytes"]
    assert got["prefill_arguments"] >= got["param_bytes"]
    assert got["prefill_flops"] > 0 and got["tokens_per_s"] > 0


def test_a_training_plan_sets_its_roofline_mfu_beside_maxtext_s(results):
    got = results["tpu_train"]
    if "skipped" in got:
        pytest.skip(f"no libtpu here: {got['skipped']}")
    assert got["model_flops"] == pytest.approx(got["expected_model_flops"])
    # The compiled step does at least the work itself (and dispatch, norms, softmax).
    assert got["model_flops"] < got["flops"] and 0 < got["mfu"] < 1
    assert "MFU at roofline" in got["report"] and "54.9% on v5p-128" in got["report"]


def test_a_mesh_the_torus_cannot_hold_is_named_not_raised():
    """expert=8 on a v6e-256's 16x16 torus: a plan error, which a search skips."""
    from mixtral_jax.planning.plan import slice_mesh

    try:
        slice_ = get_slice("v6e-256")
    except PlanError as error:
        pytest.skip(f"no libtpu here: {error}")
    with pytest.raises(PlanError, match="cannot be laid out on v6e-256"):
        slice_mesh({"expert": 8, "fsdp": 32}, slice_)


def test_training_flops_are_six_per_active_parameter_plus_causal_attention():
    from configs import mixtral_8x7b
    from mixtral_jax import ModelConfig

    c = ModelConfig.from_dict(mixtral_8x7b.get_config())
    T = 4096
    attention = 3 * c.num_layers * 4 * c.num_heads * c.head_dim * T * (T + 1) / 2
    # active_params counts the norms too (0.002% of the matmul weights).
    expected = 6 * T * active_params(c) + attention
    assert training_flops(c, 1, T) == pytest.approx(expected, rel=1e-4)
    assert training_flops(c, 2, T, lora=True) == pytest.approx(2 * expected * 2 / 3, rel=1e-4)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("v5e-8", ("v5e", "v5e:2x4")),
        ("v5e-16", ("v5e", "v5e:4x4")),
        ("v6e-1", ("v6e", "v6e:1x1")),
        ("v5p-8", ("v5p", "v5p:2x2x1")),  # slice names count cores: 4 chips
        ("v4-16", ("v4", "v4:2x2x2")),
        ("v5p:2x2x2", ("v5p", "v5p:2x2x2")),
        ("cpu:8", ("cpu", "cpu:8")),
    ],
)
def test_slice_names_become_topologies(name, expected):
    assert topology_name(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [("v9-8", "unknown topology"), ("v5e-3", "no v5e slice with 3 cores"), ("v5p-6", "v5p-8")],
)
def test_unknown_topologies_name_the_choices(name, message):
    with pytest.raises(PlanError, match=message):
        topology_name(name)


def test_the_cli_explains_bad_input(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import plan as cli  # tools/plan.py
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert cli.main(["--topology", "v9-8"]) == 2
    assert "unknown topology 'v9-8'" in capsys.readouterr().err
    assert cli.main(["--config", "configs/missing.py", "--topology", "cpu:1"]) == 2
    assert "config file configs/missing.py not found" in capsys.readouterr().err
    tiny = str(ROOT / "configs/tiny.py")
    assert cli.main(["--config", tiny, "--topology", "cpu:1", "--seq_len", "4096"]) == 2
    assert "exceeds the model's max_position_embeddings=128" in capsys.readouterr().err
    assert cli.main(["--config", tiny, "--topology", "cpu:1", "--mesh", "tensor=2"]) == 2
    assert "mesh tensor=2 on cpu:1" in capsys.readouterr().err
    assert cli.main(["--config", tiny, "--topology", "cpu:1", "--mesh", "model=8"]) == 2
    assert "write AXIS=SIZE" in capsys.readouterr().err


@pytest.mark.parametrize("name, total, active", [("8x7b", 46.70, 12.75), ("8x22b", 140.63, 38.96)])
def test_parameter_counts_of_the_released_models(name, total, active):
    """The paper's 46.7 B / 12.9 B for 8x7B (its active count includes the embedding
    table, 0.13 B, which a token reads one row of) and 141 B / 39 B for 8x22B."""
    from mixtral_jax.model.config import ModelConfig, load_config_file

    config = ModelConfig.from_dict(load_config_file(ROOT / f"configs/mixtral_{name}.py"))
    assert num_params(config) / 1e9 == pytest.approx(total, abs=0.01)
    assert active_params(config) / 1e9 == pytest.approx(active, abs=0.01)


@pytest.mark.parametrize("name, chips", [("v5e-8", 8), ("v4-16", 8), ("v5p-8", 4), ("v6e-1", 1)])
def test_tpu_slices_have_one_device_per_chip(name, chips):
    """v4 and v5p chips have two TensorCores that JAX runs as one device (megacore)."""
    try:
        slice_ = get_slice(name)
    except PlanError as error:
        pytest.skip(f"no libtpu here: {error}")
    assert slice_.size == chips
    assert len({d.id for d in slice_.devices}) == chips


def test_the_slot_search_steps_past_a_try_the_compiler_refused(monkeypatch):
    """The TPU compiler refuses a program that cannot fit and reports what it asked for
    when it gave up, far above the line through the plans around it. A line through
    that figure crept up from a few slots (24 of 51 found on v5e-8); the search instead
    halves the bracket and follows the plans that fit, to the largest batch."""
    from mixtral_jax.planning import plan
    from mixtral_jax.planning.topology import Chip, TpuSlice

    weights, cache, GiB = 4 << 30, 100 << 20, 1 << 30
    chip = Chip("a chip", 16 * GiB)
    usable = int(chip.hbm * (1 - plan.HEADROOM))

    def peak(batch):  # weights, cache and step temporaries that grow with the slots
        return weights + batch * cache + (1 << 30) + batch * (90 << 20)

    largest = max(b for b in range(1, 1000) if peak(b) <= usable)
    tries = []

    def make_plan(config, slice_, *, batch, **kwargs):
        tries.append(batch)
        temporaries = peak(batch) - weights - batch * cache
        refusal = ""
        if peak(batch) > usable:  # as the compiler says: far more than the line's
            temporaries, refusal = 4 * temporaries, "RESOURCE_EXHAUSTED: out of memory"
        static = weights + batch * cache
        program = plan.Program("prefill", 32, static, 0, 0, temporaries, 0, {}, exhausted=refusal)
        return plan.Plan(
            "m", "serve", slice_, {}, batch, 64, 0, weights, 0, batch * cache, (program,)
        )

    monkeypatch.setattr(plan, "make_plan", make_plan)
    found = plan.largest_batch(None, TpuSlice("x", "x", chip, ()), seq_len=64, mesh={})
    assert found.batch == largest and found.fits, (found.batch, largest, tries)
    assert len(tries) <= 5, tries  # the batch of 1 and at most four more

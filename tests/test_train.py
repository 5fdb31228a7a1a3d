"""The training entry point: schedule, freezing, accumulation, overfitting, exact resume,
LoRA export, and errors that name the problem."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import finetune_lora, finetune_tiny, tiny
from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.checkpoints.load import load, load_tokenizer
from mixtral_jax.checkpoints.store import save
from mixtral_jax.model.tokenizer import Tokenizer
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.params import flat_params
from mixtral_jax.training import evaluate, lora, steps, train

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "The router picks two experts for every token and mixes their outputs with the "
    "renormalised softmax weights. Each expert is a SwiGLU feed-forward network; the "
    "attention layers use grouped queries and rotary position embeddings. "
)


def small_config(**changes):
    """finetune_tiny shrunk for tests: a few steps, short rows, no export."""
    c = finetune_tiny.get_config()
    c.model.update(hidden_size=32, intermediate_size=48, head_dim=8, group_size=64)
    c.data.update(seq_len=32, batch_size=4, eval_batches=2)
    c.update(steps=6, log_every=1, eval_every=3, checkpoint_every=3, export=False)
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return c


def test_learning_rate_warms_up_then_decays_to_its_floor():
    opt = finetune_tiny.get_config().optimizer
    opt.update(learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1)
    schedule = train.learning_rate_schedule(opt, 110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(schedule(60), 0.1 + 0.9 * 0.5, rtol=1e-6)  # half-way: cosine 0
    np.testing.assert_allclose(schedule(110), 0.1, rtol=1e-6)


def test_frozen_router_and_undecayed_norms():
    config = small_config(**{"optimizer.freeze_router": True, "optimizer.weight_decay": 0.5})
    model = Mixtral(ModelConfig.from_dict(config.model), rngs=nnx.Rngs(0))
    before = {p: np.asarray(v) for p, v in flat_params(model).items()}
    mesh = make_mesh(devices=jax.devices()[:1])
    # A zero gradient leaves only weight decay: it must shrink weights, never norms.
    zero_loss = lambda model, batch: (0.0 * steps.loss_fn(model, batch)[0], {})  # noqa: E731
    train_step = steps.jit_train_step(
        model,
        train.make_optimizer(config.optimizer, 10),
        mesh,
        loss=zero_loss,
        trainable=train.trainable_filter(config),
    )
    state = train_step.init(model)
    assert not any("gate" in p for p in flat_params(state.params))
    tokens = jnp.ones((2, 8), jnp.int32)
    for _ in range(3):
        state, _ = train_step(state, {"tokens": tokens, "targets": tokens})
    after = flat_params(train_step.model(state))
    for path, value in before.items():
        if path[-1] in ("gate", "scale"):
            np.testing.assert_array_equal(after[path], value, err_msg=str(path))
        else:
            assert np.abs(np.asarray(after[path])).sum() < np.abs(value).sum(), path


def test_accumulated_micro_batches_equal_one_batch():
    # Without the router losses (nonlinear in batch statistics) and dropping (a
    # capacity factor of E / k leaves room for every token), the mean of the
    # micro-batches' gradients is the gradient of the whole batch.
    config = ModelConfig.from_dict(tiny.get_config()).replace(
        router_aux_loss_coef=0.0, router_z_loss_coef=0.0, capacity_factor=4.0
    )
    model = Mixtral(config, rngs=nnx.Rngs(0))
    mesh = make_mesh(devices=jax.devices()[:1])
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (4, 9))
    batch = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    results = []
    for accumulate in (1, 4):
        train_step = steps.jit_train_step(model, optax.sgd(1.0), mesh, accumulate=accumulate)
        state, metrics = train_step(train_step.init(model), batch)
        results.append((flat_params(state.params), float(metrics["loss"])))
    for params, loss in results[1:]:
        np.testing.assert_allclose(loss, results[0][1], rtol=1e-6)
        for path, value in params.items():
            np.testing.assert_allclose(value, results[0][0][path], atol=1e-6, err_msg=str(path))
    with pytest.raises(ValueError, match="does not split into 3 micro-batch"):
        train_step = steps.jit_train_step(model, optax.sgd(1.0), mesh, accumulate=3)
        train_step(train_step.init(model), batch)


def unigram_entropy(ids: list[int]) -> float:
    counts = np.asarray(list(Counter(ids).values()), np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_model_overfits_a_small_text(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT * 2)
    config = small_config(
        **{
            "data.train": str(tmp_path / "text.txt"),
            "data.eval": "",
            "steps": 80,
            "log_every": 80,
            "checkpoint_every": 80,
            "optimizer.learning_rate": 1e-2,
            "optimizer.warmup_steps": 5,
        }
    )
    result = train.train(config, tmp_path / "run")
    # Predicting from token frequencies alone costs the text's unigram entropy (~4.5
    # nats); a model that has memorised the text predicts each next token from its
    # context, and the loss falls far below that. A tenth of it is a clear margin.
    ids = Tokenizer.from_file(config.tokenizer).encode(TEXT * 2)
    threshold = 0.1 * unigram_entropy(ids)
    assert result["cross_entropy"] < threshold, (result["cross_entropy"], threshold)
    # Resuming with another seed would replay another data order: refused.
    config.seed = 1
    with pytest.raises(train.ConfigError, match="from a run with seed 0, not config.seed=1"):
        train.train(config, tmp_path / "run")


def losses(workdir: Path) -> dict[int, float]:
    """Per-step training losses from metrics.jsonl; a step logged twice (rerun after a
    kill) must have logged the same loss both times."""
    seen: dict[int, float] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            step, loss = record["step"], record["loss"]
            assert seen.setdefault(step, loss) == loss, (step, seen[step], loss)
    return seen


RUN = [
    "--config.steps=40",
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.data.eval=",
    "--config.export=False",
    "--config.data.seq_len=32",
    "--config.data.batch_size=4",
]


def run_training(workdir: Path, cache: Path, kill_at: int | None = None, sig=signal.SIGTERM):
    """Runs the CLI in a subprocess; sends `sig` once step `kill_at` is printed.
    The runs share a compilation cache: the same program, compiled once."""
    command = [sys.executable, "-m", "mixtral_jax.train", "--config=configs/finetune_tiny.py"]
    proc = subprocess.Popen(
        [*command, f"--workdir={workdir}", *RUN],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,  # one CPU device (conftest.py)
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        },
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if kill_at is not None and line.startswith(f"step {kill_at}/"):
            proc.send_signal(sig)
            kill_at = None
    return proc.wait(), "".join(output)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compile_cache) -> dict[int, float]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, output = run_training(workdir, compile_cache)
    assert code == 0, output
    return losses(workdir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_and_restarted_run_reproduces_the_losses(
    tmp_path, compile_cache, uninterrupted, sig
):
    assert sorted(uninterrupted) == list(range(1, 41))
    code, output = run_training(tmp_path, compile_cache, kill_at=10, sig=sig)
    if sig == signal.SIGTERM:  # saves after the step it is in, then exits
        assert code == train.PREEMPTED_EXIT and "SIGTERM: saved step" in output, output
    else:  # dies at once: the rerun starts from the last checkpoint and repeats steps
        assert code == -signal.SIGKILL, output
    assert max(losses(tmp_path)) < 40
    code, output = run_training(tmp_path, compile_cache)
    assert code == 0 and "resumed from step" in output, output
    assert losses(tmp_path) == uninterrupted  # losses() also checks repeated steps


def test_lora_run_exports_a_merged_checkpoint(tmp_path):
    base_config = small_config().model
    base = Mixtral(ModelConfig.from_dict(base_config), rngs=nnx.Rngs(3))
    save(tmp_path / "base", flat_params(base), base.config)
    config = finetune_lora.get_config()
    config.model.update(dtype="float32", param_dtype="float32", group_size=64)
    config.data.update(seq_len=32, batch_size=4, eval_batches=100)
    config.update(
        checkpoint=str(tmp_path / "base"),
        tokenizer=finetune_tiny.get_config().tokenizer,
        steps=4,
        log_every=4,
        eval_every=4,
        checkpoint_every=4,
        export=True,
    )
    config.optimizer.update(learning_rate=1e-2, warmup_steps=1)
    config.lora.update(rank=2, targets="q_proj,w1,w2")
    result = train.train(config, tmp_path / "run")

    exported = load(tmp_path / "run" / "export")
    assert exported.config.lora_rank == 0
    changed = [
        p
        for p, v in flat_params(exported).items()
        if not np.array_equal(np.asarray(v), np.asarray(flat_params(base)[p]))
    ]
    assert sorted({p[-1] for p in changed}) == ["q_proj", "w1", "w2"]
    # The merged export scores the held-out file as the adapted model did in training.
    tokenizer = load_tokenizer(tmp_path / "run" / "export")
    again = evaluate.perplexity(
        exported, tokenizer, [config.data.eval], seq_len=32, batch_size=4, max_batches=100
    )
    np.testing.assert_allclose(again["loss"], result["eval_loss"], rtol=1e-5)
    assert math.isclose(again["perplexity"], math.exp(again["loss"]))
    # The adapters alone, put back on the base, are the merged export's function.
    adapted = lora.load_adapters(base, tmp_path / "run" / "adapters")
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, base.config.vocab_size, (2, 16)))
    np.testing.assert_allclose(
        np.asarray(adapted(tokens)), np.asarray(exported(tokens)), rtol=1e-4, atol=1e-4
    )
    # The finished run's command run again resumes at the last step and exports anew.
    train.train(config, tmp_path / "run")
    reexported = flat_params(load(tmp_path / "run" / "export"))
    for p, v in flat_params(exported).items():
        np.testing.assert_array_equal(np.asarray(reexported[p]), np.asarray(v))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.steps=0"], "config.steps must be a positive integer"),
        (["--config.model.hiden_size=8"], "hiden_size"),
        (["--config.optimizer.accumulate=3"], "accumulate=3 must be a positive integer that"),
        (["--config.data.train=EMPTY"], "the file is empty"),
        (["--config.data.train=missing.jsonl"], "missing.jsonl: no such file"),
    ],
)
def test_bad_configs_and_data_are_named(tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [a.replace("EMPTY", str(empty)) for a in args]
    argv = ["--config=configs/finetune_tiny.py", f"--workdir={tmp_path / 'run'}", *args]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = train.main(argv)
    finally:
        os.chdir(cwd)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_lora_config_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(train.ConfigError, match="config.checkpoint is not set"):
        train.train(finetune_lora.get_config(), tmp_path)

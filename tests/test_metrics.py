"""Metrics: TensorBoard reads our event files; model FLOPs match Mixtral's active size."""

from __future__ import annotations

import json

import pytest

from configs import mixtral_8x7b
from mixtral_jax import ModelConfig
from mixtral_jax.training import metrics


def test_tensorboard_reads_the_scalars(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    writer = metrics.SummaryWriter(tmp_path)
    writer.scalars(1, {"loss": 2.5, "learning_rate": 1e-3})
    writer.scalars(2, {"loss": 2.25})
    writer.close()
    reader = event_accumulator.EventAccumulator(str(tmp_path))
    reader.Reload()
    assert sorted(reader.Tags()["scalars"]) == ["learning_rate", "loss"]
    assert [(e.step, e.value) for e in reader.Scalars("loss")] == [(1, 2.5), (2, 2.25)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 2, "loss": 2.25}


def test_a_log_cut_mid_line_by_a_kill_resumes_on_a_fresh_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    writer = metrics.SummaryWriter(tmp_path)
    writer.scalars(2, {"loss": 2.25})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.25},
    ]


def test_model_flops_count_mixtral_8x7b_active_parameters():
    config = ModelConfig.from_dict(mixtral_8x7b.get_config())
    # With no attention scores and everything trained, 6 FLOPs per active weight; the
    # paper's 12.9B active parameters include the embedding table (a lookup, no FLOPs).
    active = metrics.flops_per_token(config, seq_len=0) / 6
    embedding = config.vocab_size * config.hidden_size
    assert abs(active + embedding - 12.9e9) / 12.9e9 < 0.01
    # LoRA: no weight gradients for the frozen base, 4 FLOPs per weight instead of 6.
    frozen = metrics.flops_per_token(config, seq_len=0, trained_fraction=0.0)
    assert frozen / (active * 6) == pytest.approx(4 / 6)

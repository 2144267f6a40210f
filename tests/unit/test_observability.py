"""Metric sinks, phase timings, MFU and logs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import tiny_config
from trntrain.config import ConfigError, validate
from trntrain.distributed import World
from trntrain.metrics.flops import flops_per_token, mfu
from trntrain.models import build_model, count_parameters
from trntrain.models.llama.costs import matmul_parameters
from trntrain.run_dir import setup_logging
from trntrain.trainer import Trainer

SINKS = "logging.sinks=[console,jsonl,tensorboard]"


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    Trainer(tiny_config("train.max_steps=6", "train.eval_every=3", "logging.every=2", SINKS),
            World(), run_dir=tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "time_optimizer_s"} <= tags
    for tag in tags:
        from_jsonl = {r["step"]: r[tag] for r in records if r.get(tag) is not None}
        from_tb = {e.step: e.value for e in events.Scalars(tag)}
        assert from_tb.keys() == from_jsonl.keys(), tag
        for step, value in from_jsonl.items():
            assert from_tb[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)


def test_phase_times_account_for_the_step(tmp_path):
    records = Trainer(tiny_config("train.max_steps=8", "logging.every=4", "train.eval_every=0"),
                      World(), run_dir=tmp_path).fit()
    last = records[-1]
    phases = sum(last[f"time_{p}_s"] for p in ("data", "forward_backward", "grad_sync",
                                                "optimizer"))
    assert 0.5 * last["step_time_s"] < phases <= last["step_time_s"] * 1.01
    assert last["time_forward_backward_s"] > last["time_optimizer_s"] > 0
    assert "mfu" not in last  # CPU: no meaningful peak


def test_mfu_by_hand():
    cfg = tiny_config().model
    with torch.device("meta"):
        total = count_parameters(build_model(cfg))
    # Matmul parameters: everything but the norms and the embedding lookup.
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    assert matmul_parameters(cfg) == total - norms - cfg.vocab_size * cfg.dim
    per_token = 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.dim * 128
    assert flops_per_token(cfg, 128) == per_token
    assert mfu(1000.0, cfg, 128, devices=2, peak_flops=1e12) == pytest.approx(
        1000 * per_token / 2e12)
    assert mfu(1000.0, cfg, 128, devices=1, peak_flops=None) is None


def test_per_rank_logs_and_warnings_once(tmp_path):
    setup_logging(tmp_path, World(rank=1, world_size=2, local_rank=1), "INFO")
    log = logging.getLogger("trntrain")
    for _ in range(3):
        log.warning("data file shorter than expected")
    log.info("step 1")
    text = (tmp_path / "logs" / "rank_1.log").read_text()
    assert text.count("data file shorter than expected") == 1
    assert "[rank 1] INFO step 1" in text
    assert not (tmp_path / "train.log").exists()  # rank 0 writes that one


def test_unknown_sink_is_a_config_error():
    with pytest.raises(ConfigError, match="logging.sinks"):
        validate(tiny_config("logging.sinks=[console,graphite]"), 1)

"""Every name the config chooses comes from a registry that a package can extend: a
plugin put there is valid (validation reads the registry), built and used by the
trainer, and an unknown name lists what is registered."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.backend import BACKENDS, CpuBackend, build_backend
from trntrain.config import ConfigError, validate
from trntrain.distributed import World
from trntrain.metrics import SINKS, Sink
from trntrain.optim import OPTIMIZERS
from trntrain.parallel.pipeline import TRANSPORTS, AllGatherTransport
from trntrain.parallel.pipeline_schedule import SCHEDULES, gpipe_actions
from trntrain.trainer import Trainer


def sgd(decayed, undecayed, optim_cfg):
    return torch.optim.SGD([*decayed, *undecayed], lr=optim_cfg.lr)


def test_a_registered_optimizer_takes_the_step_torch_takes(monkeypatch):
    monkeypatch.setitem(OPTIMIZERS, "sgd", sgd)
    # One step at optim.lr: no warm-up, no decay, no clipping.
    cfg = tiny_config("optim.name=sgd", "train.max_steps=1", "optim.max_grad_norm=0",
                      "optim.decay=constant", "optim.warmup_steps=0")
    validate(cfg, 1)
    trainer = Trainer(cfg, World())
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    # The reference: the same initial weights and batch, the SGD step taken by hand.
    model = Trainer(cfg, World()).model
    (batch,) = next(trainer.train_batches.steps(0, 1))
    trainer.fit()
    logits = model(batch.inputs)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten()).backward()
    for (name, p), (_, trained) in zip(model.named_parameters(),
                                       trainer.model.named_parameters(), strict=True):
        torch.testing.assert_close(trained.detach(), p.detach() - cfg.optim.lr * p.grad,
                                   rtol=1e-5, atol=1e-7, msg=name)


def test_unknown_names_list_the_registered_ones(monkeypatch):
    monkeypatch.setitem(OPTIMIZERS, "sgd", sgd)
    for override, key, listed in [
        ("optim.name=lion", "optim.name", "'sgd'"),
        ("backend.name=tpu", "backend.name", "'xla'"),
        ("parallel.schedule=zb", "parallel.schedule", "'interleaved_1f1b'"),
        ("parallel.pp_transport=rdma", "parallel.pp_transport", "'allgather'"),
        ("logging.sinks=[console,stdout]", "logging.sinks", "tensorboard"),
    ]:
        with pytest.raises(ConfigError) as info:
            validate(tiny_config(override), 1)
        assert info.value.key == key and listed in str(info.value), (override, info.value)


class RecordingSink(Sink):
    """Writes nothing: also the runs without a run directory get it."""

    writes_files = False
    records: list[dict] = []

    @classmethod
    def for_run(cls, run_dir, cfg, max_steps):
        return cls()

    def log(self, record):
        self.records.append(record)


def test_a_registered_sink_receives_every_record(monkeypatch):
    monkeypatch.setitem(SINKS, "recording", RecordingSink)
    monkeypatch.setattr(RecordingSink, "records", [])
    cfg = tiny_config("logging.sinks=[recording]", "train.max_steps=4")
    validate(cfg, 1)
    records = Trainer(cfg, World()).fit()
    assert RecordingSink.records == records and len(records) == 4


def test_a_registered_backend_is_built_by_name(monkeypatch):
    class OtherCpu(CpuBackend):
        name = "other_cpu"

    monkeypatch.setitem(BACKENDS, "other_cpu", OtherCpu)
    cfg = tiny_config("backend.name=other_cpu")
    validate(cfg, 1)
    assert type(build_backend(cfg.backend)) is OtherCpu


def test_registered_schedule_and_transport_run_the_pipeline(distributed, monkeypatch):
    # Under other names, the built-in gpipe and all-gather transport: the same losses.
    monkeypatch.setitem(SCHEDULES, "my_gpipe", gpipe_actions)
    monkeypatch.setitem(TRANSPORTS, "my_allgather", AllGatherTransport)
    base = ("parallel.pp=2", "train.max_steps=3", "train.micro_batch_size=2")
    plugin = tiny_config(*base, "parallel.schedule=my_gpipe", "parallel.pp_transport=my_allgather")
    validate(plugin, 2)
    got = distributed(pipeline_losses, 2, (*base, "parallel.schedule=my_gpipe",
                                           "parallel.pp_transport=my_allgather"))
    built_in = distributed(pipeline_losses, 2, (*base, "parallel.schedule=gpipe",
                                                "parallel.pp_transport=allgather"))
    assert got == built_in


def pipeline_losses(rank: int, world_size: int, overrides: tuple[str, ...]) -> list[float]:
    # Forked workers inherit the parent's registries, the monkeypatched names included.
    records = Trainer(tiny_config(*overrides), World(rank, world_size, rank)).fit()
    return [r["loss"] for r in records]

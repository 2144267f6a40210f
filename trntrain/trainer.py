"""Builds everything from the config and runs the training loop.

The step (`train_step`) reads no value back to the host: losses and norms stay
device tensors until a logging step, where a lazy backend would otherwise pay a
device round trip every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from trntrain.backend import Backend, build_backend
from trntrain.config import data_parallel_size, micro_batch_size
from trntrain.data import Batch, StepBatches, build_data_source
from trntrain.distributed import World
from trntrain.metrics import MetricsLogger
from trntrain.models import build_model, count_parameters, materialize
from trntrain.optim import build_lr_scheduler, build_optimizer, lr_factor
from trntrain.parallel import GradientReducer, Mesh, ParallelDims, build_mesh, clip_grad_norm_
from trntrain.parallel.tensor_parallel import vocab_parallel_cross_entropy

logger = logging.getLogger("trntrain")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def build_loss_fn(model: torch.nn.Module, mesh: Mesh) -> Callable:
    """Cross-entropy on full logits, or on this rank's vocabulary slice under tp."""
    if mesh.tp_group is None:
        return causal_lm_loss
    return lambda logits, labels: vocab_parallel_cross_entropy(
        logits, labels, model.output.start, mesh.tp_group)


class Trainer:
    def __init__(self, cfg: DictConfig, world: World, run_dir: Path | None = None,
                 backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.world = world
        self.run_dir = run_dir
        self.backend = backend or build_backend(cfg.backend, world.local_rank,
                                                cfg.train.precision)
        dims = ParallelDims(cfg.parallel.tp, cfg.parallel.pp,
                            data_parallel_size(cfg, world.world_size))
        self.mesh: Mesh = build_mesh(dims, world.rank)

        with torch.device("meta"):
            model = build_model(cfg.model, self.mesh.tp_group, cfg.parallel.sequence_parallel)
        self.model = self.backend.prepare_model(
            materialize(model, self.backend.device, cfg.train.seed))
        self.loss_fn = build_loss_fn(self.model, self.mesh)
        self.num_params = count_parameters(self.model)

        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        bucket_mb = cfg.parallel.bucket_mb
        self.tp_grad_reducer = GradientReducer(
            [p for p in self.params if getattr(p, "tp_grad_reduce", False)], self.mesh.tp_group,
            bucket_mb, average=False)
        self.dp_grad_reducer = GradientReducer(self.params, self.mesh.dp_group, bucket_mb,
                                               average=True)

        t = cfg.train
        self.micro_batch_size = micro_batch_size(cfg, world.world_size)
        self.data = build_data_source(cfg)
        self.train_batches = StepBatches(self.data, "train", t.global_batch_size,
                                         self.micro_batch_size, self.mesh.dp_rank, dims.dp, t.seed)
        self.val_batches = StepBatches(self.data, "val", t.global_batch_size,
                                       self.micro_batch_size, self.mesh.dp_rank, dims.dp, t.seed,
                                       shuffle=False)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        # neuron_parallel_compile only needs each graph traced once.
        self.max_steps = min(t.max_steps, self.backend.step_limit() or t.max_steps)

    # -- the step ---------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches: (mean loss, gradient norm)."""
        mean_loss = self.forward_backward(micro_batches)
        grad_norm = clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm, self.mesh.tp_group)
        self.backend.optimizer_step(self.optimizer)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backend.step_boundary()
        return mean_loss, grad_norm

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Accumulate the gradient of the mean loss, reduced over tp and dp; returns the loss."""
        accumulation = len(micro_batches)
        loss_sum = torch.zeros((), device=self.backend.device)
        for inputs, labels in micro_batches:
            with self.backend.autocast(self.cfg.train.precision):
                loss = self.loss_fn(self.model(inputs), labels)
            (loss / accumulation).backward()
            loss_sum += loss.detach()
        self.tp_grad_reducer.reduce()
        self.dp_grad_reducer.reduce()
        return loss_sum / accumulation

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first train.eval_batches global batches of the validation split."""
        self.model.eval()
        total = torch.zeros((), device=self.backend.device)
        count = 0
        batches = self.val_batches.steps(0, self.cfg.train.eval_batches)
        for micro_batches in self.backend.batches(batches):
            for inputs, labels in micro_batches:
                with self.backend.autocast(self.cfg.train.precision):
                    total += self.loss_fn(self.model(inputs), labels)
                count += 1
            # One small graph per batch, the same each time, rather than one per evaluation.
            self.backend.step_boundary()
        self.model.train()
        return self.mean_over_dp(total / count)

    def mean_over_dp(self, value: torch.Tensor) -> float:
        if self.mesh.dp_group is not None:
            value = value.clone()
            dist.all_reduce(value, group=self.mesh.dp_group)
            value /= self.mesh.dims.dp
        return value.item()

    # -- the loop ---------------------------------------------------------------------------

    def should_log(self, step: int) -> bool:
        return (step == 1 or step % self.cfg.logging.every == 0 or step == self.max_steps
                or self.should_eval(step))

    def should_eval(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and (step % every == 0 or step == self.max_steps)

    def fit(self) -> list[dict[str, Any]]:
        """Train for train.max_steps; returns the logged records."""
        t = self.cfg.train
        is_main = self.world.is_main
        jsonl = self.run_dir / "metrics.jsonl" if is_main and self.run_dir is not None else None
        metrics = MetricsLogger(jsonl, console=is_main, max_steps=self.max_steps)
        logger.info(
            "model %s: %.2f M parameters on this rank | %s backend | tp=%d%s dp=%d | "
            "%d micro-batches of %d x %d tokens per step | %.1f M train tokens",
            self.cfg.model.name, self.num_params / 1e6, self.backend.name, self.mesh.dims.tp,
            " (sequence parallel)" if self.cfg.parallel.sequence_parallel else "",
            self.mesh.dims.dp,
            self.train_batches.accumulation_steps, self.micro_batch_size, t.seq_len,
            self.data.num_tokens("train") / 1e6,
        )
        bar = tqdm(total=self.max_steps, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (is_main and self.cfg.logging.progress_bar), mininterval=1.0)
        records = []
        steps = self.backend.batches(self.train_batches.steps(0, self.max_steps))
        window_start, window_steps = time.perf_counter(), 0
        try:
            for step, micro_batches in enumerate(steps, start=1):
                loss, grad_norm = self.train_step(micro_batches)
                window_steps += 1
                bar.update(1)
                if not self.should_log(step):
                    continue
                self.backend.synchronize()
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": self.mean_over_dp(loss),
                    "lr": self.cfg.optim.lr * lr_factor(step - 1, self.cfg.optim, t.max_steps),
                    "grad_norm": grad_norm.item(),
                    "tokens_per_s": window_steps * self.tokens_per_step / elapsed,
                    "step_time_s": elapsed / window_steps,
                    "tokens": step * self.tokens_per_step,
                }
                if self.should_eval(step):
                    record["eval_loss"] = self.evaluate()
                record.update(self.backend.metrics())
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                metrics.log(record)
                records.append(record)
                window_start, window_steps = time.perf_counter(), 0
        finally:
            bar.close()
            metrics.close()
        return records

"""Builds everything from the config and runs the training loop.

The step (`train_step`) reads no value back to the host: losses and norms stay
device tensors until a logging step, where a lazy backend would otherwise pay a
device round trip every step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from trntrain.backend import Backend, build_backend
from trntrain.backend.recompile import RecompileWatch, Signature, signature
from trntrain.checkpoint import CHECKPOINTERS, States
from trntrain.checkpoint.hf import load_hf_weights
from trntrain.checkpoint.manager import (
    CheckpointManager,
    checkpoint_dir,
    verify_checksums_agreed,
)
from trntrain.checkpoint.state import (
    DataState,
    HostLayout,
    LRScheduleState,
    ModelState,
    OptimizerState,
    Progress,
)
from trntrain.config import context_attention, data_parallel_size, micro_batch_size
from trntrain.data import Batch, StepBatches, build_data_source
from trntrain.distributed import World, broadcast_object, host_copy, host_group
from trntrain.faults import (
    NonFiniteError,
    StopRequest,
    Watchdog,
    inject_fault,
    note,
    with_nan_fault,
)
from trntrain.metrics import MetricsLogger, build_metrics_logger
from trntrain.metrics.flops import mfu
from trntrain.metrics.goodput import GOODPUT_FILE, Goodput
from trntrain.metrics.memory import static_memory
from trntrain.models import build_model, family_of, materialize, partition_model
from trntrain.models.moe import (
    is_expert_parameter,
    moe_blocks_by_layer,
    moe_metrics,
    set_aux_loss_scale,
)
from trntrain.objective import build_objective
from trntrain.objective.preference import METRICS as PREFERENCE_METRICS
from trntrain.objective.reference import (
    REFERENCE_FILE,
    LogpsForward,
    ModelReference,
    PrecomputedReference,
    compute_tables,
    load_tables,
    reference_key,
    save_tables,
)
from trntrain.optim import build_lr_scheduler, lr_factor, uses_stochastic_rounding
from trntrain.parallel import GradientReducer, Mesh, ParallelDims, build_mesh
from trntrain.parallel.activation_checkpointing import apply_activation_checkpointing
from trntrain.parallel.comm import all_reduce
from trntrain.parallel.context import apply_context_parallel
from trntrain.parallel.gradients import ReplicatedOptimizer, accumulate_in_fp32
from trntrain.parallel.pipeline import (
    PipelineGroups,
    PipelineRunner,
    build_transport,
    transport_for,
)
from trntrain.parallel.zero import ShardedOptimizer
from trntrain.peft import adapters_disabled, apply_lora, init_adapters, lora_enabled
from trntrain.peft.base import BaseWeights, base_fingerprint
from trntrain.run_dir import METRICS_FILE

logger = logging.getLogger("trntrain")


def build_model_chunks(cfg: DictConfig, mesh: Mesh, device: torch.device
                       ) -> dict[int, nn.Module]:
    """This rank's model chunks by global chunk index: the whole model without
    pipelining, else chunks stage, stage + pp, ... of the pp * virtual_pp chunks; under
    peft=lora with the adapters applied and the base frozen."""
    p, v, m = cfg.parallel.pp, cfg.parallel.virtual_pp, cfg.model
    if p == 1:
        v = 1
    bounds = partition_model(m, cfg.train.seq_len, p * v)
    chunks = {}
    for local in range(v):
        index = local * p + mesh.pp_rank
        with torch.device("meta"):
            model = build_model(m, mesh.tp_group, cfg.parallel.sequence_parallel)
        family_of(m).keep_chunk(model, bounds[index], first=index == 0,
                                last=index == p * v - 1)
        if mesh.ep_group is not None:
            family_of(m).parallelize_experts(model, mesh.ep_group)
        apply_context_parallel(model, mesh.cp_group, context_attention(cfg), cfg.train.seq_len)
        lora = lora_enabled(cfg.get("peft"))
        if lora:
            apply_lora(model, m, cfg.peft)
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, device)
        chunks[index] = materialize(model, device, cfg.train.seed)
        if mesh.ep_group is not None:
            for name, param in chunks[index].named_parameters():
                if is_expert_parameter(name):
                    param.ep_expert = True  # reduced over the ranks holding it (edp)
        if lora:
            init_adapters(chunks[index], cfg.train.seed)
    return chunks


class Trainer:
    def __init__(self, cfg: DictConfig, world: World, run_dir: Path | None = None,
                 backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.world = world
        self.backend = backend or build_backend(cfg.backend, world.local_rank,
                                                cfg.train.precision, cfg.train.master_weights,
                                                cfg.parallel.zero1, cfg.train.stochastic_rounding)
        # Precompiling traces placeholder values: no checkpoint or metrics of them may
        # be left where a later run would resume from or append to them.
        self.run_dir = None if self.backend.precompiling else run_dir
        run_dir = self.run_dir
        dims = ParallelDims(cfg.parallel.tp, cfg.parallel.pp,
                            data_parallel_size(cfg, world.world_size), cfg.parallel.ep,
                            cfg.parallel.cp)
        self.mesh: Mesh = build_mesh(dims, world.rank, self.backend.group_options)
        # DCP's DeviceMesh of tp shards: host tensors over gloo (checkpoint/state.py).
        self.host_tp_group = host_copy(self.mesh.tp_group, dims.group_ranks("tp"))

        chunks = build_model_chunks(cfg, self.mesh, self.backend.device)
        if cfg.checkpoint.init_from:
            load_hf_weights(Path(cfg.checkpoint.init_from), chunks.values(), cfg.model)
        self.chunks = {i: self.backend.prepare_model(c) for i, c in chunks.items()}
        last = self.chunks.get(dims.pp * max(cfg.parallel.virtual_pp, 1) - 1
                               if dims.pp > 1 else 0)
        # The summed loss of a micro-batch and what it is a sum over (trained tokens, or
        # preference pairs); under tp from this rank's vocabulary slice of the logits.
        self.objective = build_objective(
            cfg.get("objective"),
            last.output.start if last is not None and self.mesh.tp_group is not None else None,
            self.mesh.tp_group)
        self.loss_fn = with_nan_fault(self.objective.loss, lambda: self.step, world)
        self.params = list({id(p): p for c in self.chunks.values() for p in c.parameters()
                            if p.requires_grad}.values())
        # The frozen base of a LoRA run: weights only (no gradient, state or master).
        self.frozen = list({id(p): p for c in self.chunks.values() for p in c.parameters()
                            if not p.requires_grad}.values())
        self.num_params = sum(p.numel() for p in self.params)
        # Embedding and head tied across the first and last stage: their gradients add up,
        # and the norm counts the pair once (on the first stage). Marked before anything
        # (the sharded optimizer's buckets) sorts parameters by it.
        tied = []
        if dims.pp > 1 and cfg.model.tie_embeddings:
            for chunk in self.chunks.values():
                if chunk.tok_embeddings is not None:
                    tied.append(chunk.tok_embeddings.weight)
                if chunk.output is not None:
                    chunk.output.weight.pp_duplicate = True
                    tied.append(chunk.output.weight)
            tied = [p for p in tied if p.requires_grad]  # a frozen pair has no gradient

        # ZeRO-1 and bf16 master weights step fp32 slices of flat buckets (bf16 for pure
        # bf16); they are taken from the fp32 initial weights, before the model itself is
        # cast to bf16.
        t = cfg.train
        bucket_mb = cfg.parallel.bucket_mb
        # The optimizer reduces the dp gradients too: reduce-scattered into ZeRO's slices,
        # or all-reduced for the plain one.
        # Pure bf16 (no master weights): bf16 weights and moments, rounded stochastically
        # by the optimizer on eager backends (train.stochastic_rounding).
        pure_bf16 = t.precision == "bf16" and not t.master_weights
        rounding_seed = t.seed if uses_stochastic_rounding(t, self.backend.name) else None
        if cfg.parallel.zero1 or (t.precision == "bf16" and t.master_weights):
            self.stepper: ShardedOptimizer | ReplicatedOptimizer = ShardedOptimizer(
                self.params, cfg.optim, self.mesh.dp_cp_group, bucket_mb,
                cfg.parallel.zero1_comm_dtype, t.fp32_grad_accumulation,
                torch.bfloat16 if pure_bf16 else torch.float32, rounding_seed,
                self.mesh.edp_group)
        else:
            self.stepper = ReplicatedOptimizer(self.params, cfg.optim, self.mesh.dp_cp_group,
                                               bucket_mb, rounding_seed, self.mesh.ep_group,
                                               self.mesh.edp_group)
        # What a checkpoint reads of the sharded layout (None: per-parameter state).
        self.sharded = self.stepper if isinstance(self.stepper, ShardedOptimizer) else None
        if t.precision == "bf16":
            for p in self.params:
                p.data = p.data.to(torch.bfloat16)
                if t.fp32_grad_accumulation:
                    p.register_post_accumulate_grad_hook(accumulate_in_fp32)
            for p in self.frozen:
                p.data = p.data.to(torch.bfloat16)
        self.optimizer = self.stepper.optimizer  # the torch optimizer: its param groups' lr
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.tp_grad_reducer = GradientReducer(
            [p for p in self.params if getattr(p, "tp_grad_reduce", False)], self.mesh.tp_group,
            bucket_mb, average=False)
        self.tied_grad_reducer = GradientReducer(tied, self.mesh.embedding_group, bucket_mb,
                                                 average=False)

        self.micro_batch_size = micro_batch_size(cfg, world.world_size)
        self.data = build_data_source(cfg)
        # Each micro-batch's auxiliary (MoE) losses weigh one over the micro-batches of
        # the global batch; the dp average of the gradients divides by dp, so a rank
        # weighs them one over its own micro-batches (as `trained_tokens` does the loss).
        self.moe = {i: m for c in self.chunks.values() for i, m in moe_blocks_by_layer(c).items()}
        accumulation = t.global_batch_size // (self.micro_batch_size * dims.dp)
        for chunk in self.chunks.values():
            set_aux_loss_scale(chunk, 1.0 / accumulation)
        # Only the first stage embeds the inputs and only the last scores the labels.
        reads = {"inputs": self.mesh.pp_rank == 0, "labels": self.mesh.pp_rank == dims.pp - 1,
                 "vocab_size": cfg.model.vocab_size if self.data.ids_unchecked else None,
                 "context": (self.mesh.cp_rank, dims.cp)}
        self.train_batches = StepBatches(self.data, "train", t.global_batch_size,
                                         self.micro_batch_size, self.mesh.dp_rank, dims.dp,
                                         **reads)
        self.val_batches = StepBatches(self.data, "val", t.global_batch_size,
                                       self.micro_batch_size, self.mesh.dp_rank, dims.dp,
                                       shuffle=False, **reads)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        # neuron_parallel_compile only needs each graph traced once.
        self.max_steps = min(t.max_steps, self.backend.step_limit() or t.max_steps)
        self.pipeline = self.build_pipeline() if dims.pp > 1 else None
        self.reference = self.build_reference() if self.objective.needs_reference else None
        self.checkpointer = CHECKPOINTERS[cfg.checkpoint.name](cfg.checkpoint)
        self.progress = Progress()  # the optimizer step being taken (1-based)
        self.skipped_steps: list[int] = []
        # Host seconds per phase since the last metrics record (on a lazy backend: the
        # time to trace, not to run).
        self.phase_s: dict[str, float] = defaultdict(float)
        # The same, since the last step's end: goodput's split of each step.
        self.step_phase_s: dict[str, float] = defaultdict(float)
        self.recompiles = RecompileWatch(cfg.backend.recompile)
        self.eval_inputs: Signature = ()
        self.eval_metrics: dict[str, float] = {}  # a preference objective's, at evaluation
        self.save_blocking_s: list[float] = []
        # What checkpointers save and restore, part by part (the step first: the others'
        # loading reads it); they receive these, never the trainer.
        model_state = ModelState(cfg.model, self.chunks, self.mesh,
                                 HostLayout(self.host_tp_group,
                                            self.sharded.dp if self.sharded else 1),
                                 peft=cfg.peft if lora_enabled(cfg.get("peft")) else None)
        self.states: States = {
            "trainer": self.progress,
            "model": model_state,
            "optimizer": OptimizerState(self.optimizer, self.sharded, model_state),
            "lr_schedule": LRScheduleState(self.lr_scheduler, cfg.optim, t.max_steps,
                                           self.progress),
            "data": DataState(self.train_batches, self.progress),
        }
        if model_state.peft is not None:
            # One rank reads the base to fingerprint it; every rank checks a resume.
            init_from = cfg.checkpoint.init_from
            fingerprint = broadcast_object(
                base_fingerprint(init_from, t.seed) if world.is_main else None)
            self.states["peft"] = BaseWeights(cfg.peft, init_from, fingerprint)
        self.checkpoints = None
        if run_dir is not None and cfg.checkpoint.name != "none":
            self.checkpoints = CheckpointManager(checkpoint_dir(cfg, run_dir),
                                                 cfg.checkpoint.every,
                                                 cfg.checkpoint.keep, world.is_main)

    def build_pipeline(self) -> PipelineRunner:
        cfg, dims = self.cfg, self.mesh.dims
        transport = transport_for(cfg.parallel.pp_transport, self.backend.lazy)
        seq = cfg.train.seq_len // dims.cp // (dims.tp if cfg.parallel.sequence_parallel else 1)
        groups = PipelineGroups(
            dims.pp, self.mesh.pp_rank, self.mesh.pp_pairs,
            [dims.rank_of(s, self.mesh.dp_rank, self.mesh.tp_rank, self.mesh.cp_rank)
             for s in range(dims.pp)])
        shape = (self.micro_batch_size, seq, cfg.model.dim)
        return PipelineRunner(
            self.chunks, groups, cfg.parallel.schedule, cfg.parallel.virtual_pp,
            self.train_batches.accumulation_steps,
            build_transport(transport, groups, shape, self.params[0].dtype, self.backend.device),
            self.loss_fn, lambda: self.backend.autocast(cfg.train.precision),
            self.backend.cut_graph)

    def build_reference(self) -> ModelReference | PrecomputedReference:
        """DPO's reference log-probabilities (objective.reference): a forward per step of
        a frozen copy of the initial weights (or, under LoRA, of the policy with its
        adapters off), or tables computed once before training and kept in run.dir."""
        cfg, backend = self.cfg, self.backend
        lora = lora_enabled(cfg.get("peft"))

        def forward(chunks, context=contextlib.nullcontext) -> LogpsForward:
            return LogpsForward(chunks, self.pipeline, self.objective.policy_logps,
                                lambda: backend.autocast(cfg.train.precision),
                                backend.cut_graph, context)

        if cfg.objective.reference == "model":
            if lora:
                chunks = list(self.chunks.values())
                return ModelReference(forward(self.chunks, lambda: adapters_disabled(chunks)))
            return ModelReference(forward(self.frozen_copy()))
        # Precomputed: the policy holds the reference weights until the first step.
        num_pairs = {s: self.data.num_samples(s) for s in ("train", "val")}
        data_key = self.data.fingerprint()
        ref_key = reference_key(base_fingerprint(cfg.checkpoint.init_from, cfg.train.seed),
                                cfg.model.name, cfg.train.precision)
        path = self.run_dir / REFERENCE_FILE if self.run_dir is not None else None
        stored = load_tables(path, data_key, ref_key, num_pairs) if path else None
        if stored is not None:
            logger.info("reference log-probabilities: read from %s", path)
            return PrecomputedReference({s: t.to(backend.device) for s, t in stored.items()})
        start = time.perf_counter()
        g = cfg.train.global_batch_size

        def split_steps(split: str) -> Iterator[list[Batch]]:
            """The split's pairs in order, a global batch a step, through one device loader."""
            reader = StepBatches(self.data, split, g, self.micro_batch_size, self.mesh.dp_rank,
                                 self.mesh.dims.dp, shuffle=False,
                                 inputs=self.train_batches.inputs,
                                 labels=self.train_batches.labels)
            return backend.batches(reader.steps(0, -(-num_pairs[split] // g)))

        tables = compute_tables(forward(self.chunks), num_pairs, split_steps, backend.device,
                                [self.mesh.dp_group, self.mesh.pp_group])
        if path is not None and self.world.is_main:
            save_tables(path, tables, data_key, ref_key)
        logger.info("reference log-probabilities of %d pairs computed in %.1f s%s",
                    sum(num_pairs.values()), time.perf_counter() - start,
                    f", stored in {path}" if path else "")
        return PrecomputedReference(tables)

    def frozen_copy(self) -> dict[int, nn.Module]:
        """The initial weights again, as this rank's chunks, frozen (DPO's reference)."""
        cfg = self.cfg
        chunks = build_model_chunks(cfg, self.mesh, self.backend.device)
        if cfg.checkpoint.init_from:
            load_hf_weights(Path(cfg.checkpoint.init_from), chunks.values(), cfg.model)
        for chunk in chunks.values():
            for p in chunk.parameters():
                p.requires_grad_(False)
                if cfg.train.precision == "bf16":
                    p.data = p.data.to(torch.bfloat16)
        return {i: self.backend.prepare_model(c) for i, c in chunks.items()}

    @property
    def model(self) -> nn.Module:
        """The model, when this rank holds it whole (no pipeline)."""
        if len(self.chunks) != 1 or 0 not in self.chunks:
            raise AttributeError("this rank holds pipeline chunks: see Trainer.chunks")
        return self.chunks[0]

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        """Write a checkpoint of `step` (the manager commits an asynchronous one when it is
        done, at the next save or at the end of training)."""
        start = time.perf_counter()
        with self.timed("checkpoint"):
            self.checkpoints.save(step, self.checkpointer, self.states,
                                  lambda: inject_fault("save", step, self.world))
        self.save_blocking_s.append(time.perf_counter() - start)

    def finish_pending_save(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.finish_pending()

    def load_checkpoint(self, directory: Path) -> int:
        """Restore every part of the state from `directory`; returns its step."""
        self.checkpointer.load(directory, self.states)
        return self.progress.step

    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    def resume_step(self) -> int:
        """The step to start from: that of the checkpoint checkpoint.resume names, or 0."""
        resume = self.cfg.checkpoint.resume
        if self.checkpoints is None or not self.checkpointer.resumable or resume == "never":
            return 0
        self.checkpoints.remove_temporary()
        if resume == "auto":
            directory = self.checkpoints.find_resumable(start_over=self.cfg.run.overwrite)
            if directory is None:
                return 0
        else:
            directory = Path(resume)
            verify_checksums_agreed(directory, self.world.is_main)
        step = self.load_checkpoint(directory)
        logger.info("resumed from %s at step %d", directory, step)
        return step

    def memory_bytes(self) -> dict[str, int]:
        """Parameter, gradient and optimizer-state bytes on this rank."""
        return static_memory(self.params, self.stepper.state_bytes(), self.frozen)

    # -- the step ---------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches: (mean loss, gradient norm)."""
        if self.objective.stats is not None:
            self.objective.stats = {}
        mean_loss = self.forward_backward(micro_batches)
        max_norm, mesh, optimizer = self.cfg.optim.max_grad_norm, self.mesh, self.stepper
        with self.timed("optimizer"):
            grad_norm = optimizer.clip_grad_norm_(max_norm, mesh.tp_group, mesh.pp_group)
            skipped = self.nonfinite_step(mean_loss, grad_norm)
            if not skipped:  # skipped: weights and optimizer state unchanged
                self.backend.optimizer_step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            if not skipped:
                self.lr_scheduler.step()
            self.backend.cut_graph()
        return mean_loss, grad_norm

    def nonfinite_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Apply train.nonfinite to this step; True if it is to be skipped.

        The gradient norm is global (every rank computes the same value after the
        reductions), so all ranks take the same decision. Reading it is a host
        synchronisation: on a lazy backend `stop` is checked at logging steps only,
        while `skip` must decide before the optimizer step and pays one device read
        per step (the micro-batch graphs are already cut, so only the norm waits).
        """
        policy = self.cfg.train.nonfinite
        if policy == "ignore" or (self.backend.lazy and policy == "stop"):
            return False
        if torch.isfinite(grad_norm).item():
            return False
        bad_ranks = [None] * self.world.world_size
        local = bool(torch.isfinite(loss).item())
        if dist.is_initialized():
            dist.all_gather_object(bad_ranks, None if local else self.world.rank,
                                   group=host_group())
        else:
            bad_ranks = [None if local else 0]
        seen = [r for r in bad_ranks if r is not None]
        where = (f"the loss of rank(s) {seen}" if seen
                 else "the gradients (every rank's loss was finite)")
        message = (f"step {self.step}: non-finite gradient norm ({grad_norm.item()}), first "
                   f"seen in {where}")
        if policy == "stop":
            raise NonFiniteError(
                f"{message}; stopped before applying it (train.nonfinite=stop): the weights "
                f"and the last checkpoint are those of step {self.step - 1} or earlier.")
        logger.warning("%s; skipped (train.nonfinite=skip): weights unchanged", message)
        self.skipped_steps.append(self.step)
        return True

    def trained_tokens(self, micro_batches: list[Batch]) -> torch.Tensor | None:
        """The labels the loss counts in the global batch, divided by dp x cp (the ranks
        the gradients are averaged over): each rank's summed loss over it is its share
        of the mean over all of them, whatever the number of micro-batches and their
        masks (None on stages without labels)."""
        if not micro_batches[0].labels.numel():
            return None
        count = sum(self.objective.count(b) for b in micro_batches).float()
        if self.mesh.dp_cp_group is not None:
            count = all_reduce(count, self.mesh.dp_cp_group)
        return count / self.mesh.dp_cp

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Accumulate the gradient of the mean loss over the global batch's trained tokens,
        reduced over tp, tied stages and dp.

        Returns this rank's share of that loss (under pipelining: on the last stage, zero
        elsewhere)."""
        if self.reference is not None:
            with self.timed("reference"):
                micro_batches = self.reference.attach("train", micro_batches)
        tokens = self.trained_tokens(micro_batches)
        if self.pipeline is not None:
            mean_loss = self.pipeline.forward_backward(micro_batches, tokens)
            # The pipeline times itself: its waits for neighbours are the bubble.
            self.add_time("forward_backward", self.pipeline.compute_s)
            self.add_time("pipeline_wait", self.pipeline.step_s - self.pipeline.compute_s)
        else:
            with self.timed("forward_backward"):
                mean_loss = torch.zeros((), device=self.backend.device)
                for batch in micro_batches:
                    with self.backend.autocast(self.cfg.train.precision):
                        logits = self.model(batch.inputs, **batch.model_kwargs())
                        loss = self.loss_fn(logits, batch) / tokens
                    loss.backward()
                    mean_loss += loss.detach()
                    # One graph per micro-batch, the same for each but the first (which
                    # creates the gradients): its size does not grow with the count.
                    self.backend.cut_graph()
        with self.timed("grad_sync"):
            self.tp_grad_reducer.reduce()
            self.tied_grad_reducer.reduce()
            self.stepper.reduce_gradients()
        return mean_loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first train.eval_batches global batches of the validation split."""
        for chunk in self.chunks.values():
            chunk.eval()
        train_stats = self.objective.stats
        if train_stats is not None:
            self.objective.stats = {}
        total = torch.zeros((), device=self.backend.device)
        batches = self.val_batches.steps(0, self.cfg.train.eval_batches)
        self.eval_inputs = ()
        # A few batches read once: copied on this thread, not by a second loader thread
        # running beside the training loader's (which keeps prefetching meanwhile).
        for micro_batches in self.backend.batches(batches, prefetch=False):
            if not self.eval_inputs:
                self.eval_inputs = signature(micro_batches)
            if self.reference is not None:
                micro_batches = self.reference.attach("val", micro_batches)
            tokens = self.trained_tokens(micro_batches)
            if self.pipeline is not None:
                total += self.pipeline.forward(micro_batches, tokens)
                continue
            for batch in micro_batches:
                with self.backend.autocast(self.cfg.train.precision):
                    logits = self.model(batch.inputs, **batch.model_kwargs())
                    total += self.loss_fn(logits, batch) / tokens
                # One small graph per micro-batch, the same each time.
                self.backend.cut_graph()
        for chunk in self.chunks.values():
            chunk.train()
        if train_stats is not None:
            self.eval_metrics = self.objective_metrics("eval_")
            self.objective.stats = train_stats
        return self.reduce_loss(total / self.cfg.train.eval_batches)

    def objective_metrics(self, prefix: str = "") -> dict[str, float]:
        """A preference objective's metrics over the pairs it saw since its stats were
        reset (the last step's, or the evaluation's), averaged over pp and dp."""
        if self.objective.stats is None:
            return {}
        stats = self.objective.stats
        names = [*PREFERENCE_METRICS, "pairs"]
        zero = torch.zeros((), device=self.backend.device)
        values = torch.stack([torch.as_tensor(stats.get(n, zero), device=zero.device).float()
                              for n in names])  # zero on stages without the labels
        values = all_reduce(values, self.mesh.pp_group)
        if self.mesh.dp_group is not None:
            values = all_reduce(values, self.mesh.dp_group)
        values = values.tolist()
        pairs = max(values[-1], 1.0)
        return {prefix + n: v / pairs for n, v in zip(PREFERENCE_METRICS, values, strict=False)}

    def reduce_loss(self, value: torch.Tensor) -> float:
        """The loss of the whole pipeline (held by the last stage), averaged over dp x cp."""
        value = all_reduce(value.clone(), self.mesh.pp_group)
        if self.mesh.dp_cp_group is not None:
            value = all_reduce(value, self.mesh.dp_cp_group) / self.mesh.dp_cp
        return value.item()

    # -- the loop ---------------------------------------------------------------------------

    def should_log(self, step: int) -> bool:
        return (step == 1 or step % self.cfg.logging.every == 0 or step == self.max_steps
                or self.should_eval(step))

    def should_eval(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and (step % every == 0 or step == self.max_steps)

    def check_nonfinite_at_logging(self, step: int, grad_norm: torch.Tensor) -> None:
        """train.nonfinite=stop on a lazy backend, which reads the norm at logging steps
        only (every step would be a host synchronisation)."""
        if self.backend.lazy and self.cfg.train.nonfinite == "stop" and not math.isfinite(
                grad_norm.item()):
            raise NonFiniteError(
                f"non-finite gradient norm seen at logging step {step} (on a lazy backend "
                f"train.nonfinite is checked at logging steps only; the weights may already "
                f"hold it, resume from the last checkpoint)")

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the host seconds of the block to `phase` (time_<phase>_s in the records; on
        a lazy backend the time to trace, not to run)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(phase, time.perf_counter() - start)

    def add_time(self, phase: str, seconds: float) -> None:
        self.phase_s[phase] += seconds
        self.step_phase_s[phase] += seconds

    def log_record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                   window_steps: int, elapsed: float, eval_loss: float | None
                   ) -> dict[str, Any]:
        """The metrics of a logging step: the only place values are read from the device."""
        record = {
            "step": step,
            "loss": self.reduce_loss(loss),
            "lr": self.cfg.optim.lr * lr_factor(step - 1, self.cfg.optim,
                                                self.cfg.train.max_steps),
            "grad_norm": grad_norm.item(),
            "tokens_per_s": window_steps * self.tokens_per_step / elapsed,
            "step_time_s": elapsed / window_steps,
            "tokens": step * self.tokens_per_step,
        }
        utilisation = mfu(record["tokens_per_s"], self.cfg.model, self.cfg.train.seq_len,
                          self.world.world_size, self.backend.peak_flops())
        if utilisation is not None:
            record["mfu"] = utilisation
        record.update({f"time_{phase}_s": seconds / window_steps
                       for phase, seconds in self.phase_s.items()})
        self.phase_s.clear()
        record.update(self.objective_metrics())
        if eval_loss is not None:
            record["eval_loss"] = eval_loss
            record.update(self.eval_metrics)
        if self.cfg.model.num_experts:
            record.update(moe_metrics(self.moe, self.cfg.model.n_layers,
                                      self.cfg.model.num_experts, self.backend.device,
                                      [self.mesh.dp_group, self.mesh.pp_group]))
        record.update(self.backend.metrics())
        record.update({f"mem_{k}_gib": v / 2**30 for k, v in self.memory_bytes().items()})
        return record

    def timed_evaluation(self, step: int) -> float:
        """evaluate(), timed, its compilations after warm-up reported."""
        compiled = self.backend.compile_count()
        with self.timed("evaluation"):
            eval_loss = self.evaluate()
        compiled = self.backend.compile_count() - compiled
        self.recompiles.observe("evaluation", step, compiled, self.eval_inputs)
        return eval_loss

    def timed_data(self, batches: Iterator[list[Batch]]) -> Iterator[list[Batch]]:
        """The batches, the time spent waiting for each counted as the data phase."""
        iterator = iter(batches)
        while True:
            with self.timed("data"):
                item = next(iterator, None)
            if item is None:
                return
            yield item

    def fit(self) -> list[dict[str, Any]]:
        """Train for train.max_steps; returns the logged records."""
        t = self.cfg.train
        is_main = self.world.is_main
        jsonl = self.run_dir / METRICS_FILE if is_main and self.run_dir is not None else None
        if self.backend.peak_flops() is None:
            logger.info("MFU: not reported, the %s backend has no meaningful peak FLOP/s",
                        self.backend.name)
        logger.info(
            "model %s: %.2f M parameters on this rank | %s backend | tp=%d%s%s pp=%d dp=%d | "
            "%d micro-batches of %d x %d tokens per step | %.1f M train tokens",
            self.cfg.model.name, self.num_params / 1e6, self.backend.name, self.mesh.dims.tp,
            " (sequence parallel)" if self.cfg.parallel.sequence_parallel else "",
            f" cp={self.mesh.dims.cp} ({context_attention(self.cfg)})"
            if self.mesh.dims.cp > 1 else "", self.mesh.dims.pp, self.mesh.dims.dp,
            self.train_batches.accumulation_steps, self.micro_batch_size, t.seq_len,
            self.data.num_tokens("train") / 1e6,
        )
        bar = tqdm(total=self.max_steps, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (is_main and self.cfg.logging.progress_bar), mininterval=1.0)
        records = []
        start = self.resume_step()
        if jsonl is not None:
            MetricsLogger.truncate_after(jsonl, start)
        metrics = build_metrics_logger(self.cfg, self.run_dir, is_main, self.max_steps)
        goodput = Goodput(self.run_dir / GOODPUT_FILE if is_main and self.run_dir else None,
                          start)
        bar.update(start)
        steps = self.timed_data(
            self.backend.batches(self.train_batches.steps(start, self.max_steps)))
        window_start, window_steps = time.perf_counter(), 0
        goodput.start()
        try:
            with StopRequest() as stop, Watchdog(self.cfg.train.watchdog_s, self.world):
                for step, micro_batches in enumerate(steps, start=start + 1):
                    self.step = step
                    note(f"step {step}")
                    inject_fault("start", step, self.world)
                    compiled = self.backend.compile_count()
                    loss, grad_norm = self.train_step(micro_batches)
                    compiled = self.backend.compile_count() - compiled
                    goodput.reached(step, self.step_phase_s, compiled > 0)
                    self.step_phase_s.clear()
                    self.recompiles.observe("step", step, compiled, signature(micro_batches))
                    window_steps += 1
                    bar.update(1)
                    inject_fault("step", step, self.world)
                    stopping = stop.agreed(self.world)
                    # The record before the checkpoint: a kill between the two then loses
                    # nothing, the resume truncates the record and writes it again.
                    if self.should_log(step) or stopping:
                        self.backend.synchronize()
                        elapsed = time.perf_counter() - window_start
                        self.check_nonfinite_at_logging(step, grad_norm)
                        eval_loss = None
                        if self.should_eval(step):
                            eval_loss = self.timed_evaluation(step)
                        with self.timed("logging"):
                            record = self.log_record(step, loss, grad_norm, window_steps,
                                                     elapsed, eval_loss)
                            record["goodput"] = goodput.fraction()
                            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                            metrics.log(record)
                        inject_fault("log", step, self.world)
                        records.append(record)
                        window_start, window_steps = time.perf_counter(), 0
                    if self.checkpoints is not None and (
                            stopping or self.checkpoints.should_save(step, self.max_steps)):
                        self.save_checkpoint(step)
                        goodput.saved(step)
                    if stopping:
                        logger.warning("stopped after step %d on SIGTERM%s", step,
                                       "; resume with the same run.dir"
                                       if self.checkpoints is not None else "")
                        break
            with self.timed("checkpoint"):
                self.finish_pending_save()
            goodput.finish(self.step_phase_s)
        finally:
            bar.close()
            metrics.close()
        return records

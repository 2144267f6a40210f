"""The training state as a layout-free dict of named logical tensors.

Whatever the layout (tp, pp, dp, ZeRO-1, master weights), a checkpoint names the
same things: `model.<param>` for every parameter of the plain model,
`optim.<param>.exp_avg` / `.exp_avg_sq` / `.master` for AdamW's moments and the
fp32 master weights, and a few scalars (`trainer.step`, `optim.step`, and
`data.consumed_samples`, the position in the data), each with its full logical
shape, so that any layout can read the parts it needs (DCP computes the overlaps
of the chunks saved and the chunks asked for). A tied head is stored once, as the
embedding.

DCP only ever sees host (CPU) tensors, on every backend, as AWS's trainers save:
the device state is copied to the host in one transfer after one sync
(`to_host`), and loading reads into host tensors that are then copied onto the
device. Who stores what:

- a tensor-parallel shard is a DTensor (Shard on its split dimension) on a `cpu`
  DeviceMesh over a gloo copy of the tp group (`Trainer.host_tp_group`): a mesh
  of device type `xla` has no coordinates, which DCP's planner needs;
- a sharded optimizer's state (ZeRO-1, bf16 master weights over dp) is saved as
  each dp rank holds it: its slice of a flat bucket covers a contiguous range of
  each parameter's flattened (tp-local) tensor, which is at most three boxes of a
  matrix (a partial first row, whole rows, a partial last row), stored as chunks
  of the logical tensor (a ShardedTensor with several local shards). No rank
  gathers the optimizer state, and loading asks for this rank's chunks only;
- without dp (one process, dp=1) the optimizer state is per-parameter tensors
  like the weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from trntrain.optim import lr_factor
from trntrain.parallel.zero import MOMENTS, ShardedOptimizer, SlicePart

if TYPE_CHECKING:
    from trntrain.data import StepBatches
    from trntrain.parallel import Mesh
    from trntrain.parallel.comm import Group

# A box of a tensor: (offsets, sizes, index of its first element in the flattened tensor).
Box = tuple[tuple[int, ...], tuple[int, ...], int]


class Stateful(Protocol):
    """A part of the training state (torch.distributed.checkpoint's Stateful): its
    entries of the checkpoint's flat, layout-free dict, and how to take them back."""

    def state_dict(self) -> dict[str, Any]:
        """This part's entries: tensors, or `Staged` tensors for the checkpointer to
        copy to the host (all of them at once) and place in their logical tensor."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this part's entries back from the loaded (host) dict of every part."""


@dataclass
class Staged:
    """A live (device) tensor, and how its host copy becomes the logical tensor that DCP
    stores (a DTensor of a tp shard, the chunks of a ZeRO-1 slice). Entries may share
    a tensor (the parameters of one flat bucket): it is copied once."""

    tensor: torch.Tensor
    place: Callable[[torch.Tensor], Any]

    def empty(self) -> Any:
        """A host tensor of this layout to load into."""
        return self.place(torch.zeros(self.tensor.shape, dtype=self.tensor.dtype))


def host_state_dict(states: dict[str, Stateful], private: bool = False) -> dict[str, Any]:
    """Every part's entries on the host: the staged device tensors after one sync and in
    one transfer. `private`: copies that nothing else changes (for an asynchronous
    save); else CPU tensors may be the live ones."""
    entries: dict[str, Any] = {}
    for part in states.values():
        entries.update(part.state_dict())
    staged = {k: v for k, v in entries.items() if isinstance(v, Staged)}
    tensors = list({id(v.tensor): v.tensor for v in staged.values()}.values())
    hosts = dict(zip((id(t) for t in tensors), to_host(tensors, private), strict=True))
    for key, value in staged.items():
        entries[key] = value.place(hosts[id(value.tensor)])
    return entries


def param_key(name: str, tied: bool) -> str:
    return "tok_embeddings.weight" if tied and name == "output.weight" else name


class ModelState:
    """`model.<param>` for every parameter of this rank's pipeline chunks, by its name in
    the plain model (a tied head under the embedding's). A LoRA run (`peft`) holds its
    adapters only (`model.layers.0.attention.wq.lora_A`): the frozen base is
    checkpoint.init_from's, recorded by its fingerprint (`peft.base.BaseWeights`)."""

    def __init__(self, model_cfg: DictConfig, chunks: dict[int, nn.Module], mesh: Mesh,
                 layout: HostLayout, peft: DictConfig | None = None) -> None:
        self.model_cfg = model_cfg
        self.chunks = chunks  # by global chunk index
        self.mesh = mesh
        self.layout = layout
        self.peft = peft

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        tied = self.model_cfg.tie_embeddings
        out, seen = [], set()
        for chunk in self.chunks.values():
            for name, p in chunk.named_parameters():
                if id(p) not in seen and (self.peft is None or p.requires_grad):
                    seen.add(id(p))
                    out.append((param_key(name, tied), p))
        return out

    def logical_names(self) -> set[str]:
        """The `model.*` keys of the whole model's checkpoint (every stage's)."""
        from trntrain.models import build_model
        from trntrain.peft import adapter_names

        if self.peft is not None:
            return {f"model.{n}" for n in adapter_names(self.model_cfg, self.peft)}
        with torch.device("meta"):  # the whole model's names: a pipeline rank holds a part
            return {f"model.{name}" for name, _ in build_model(self.model_cfg).named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        return {f"model.{key}": Staged(p.detach(), functools.partial(self.layout.tp_tensor, p))
                for key, p in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, p in self.named_parameters():
            p.copy_(local(state[f"model.{key}"]))


class OptimizerState:
    """AdamW's moments (`optim.<param>.exp_avg`, `.exp_avg_sq`), the fp32 masters of a
    sharded optimizer (`.master`) and the step count (`optim.step`): per-parameter
    tensors, or each dp rank's slices of the flat buckets as chunks of the logical
    tensors (ZeRO-1, bf16 master weights)."""

    def __init__(self, optimizer: torch.optim.Optimizer, sharded: ShardedOptimizer | None,
                 model: ModelState) -> None:
        self.optimizer = optimizer  # the torch optimizer: per-parameter state
        self.sharded = sharded
        self.model = model

    def _keys(self) -> dict[int, str]:
        return {id(p): key for key, p in self.model.named_parameters()}

    def _count(self) -> float:
        for s in self.optimizer.state.values():
            if "step" in s:
                return float(s["step"])
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        layout, keys = self.model.layout, self._keys()
        out: dict[str, Any] = {"optim.step": torch.tensor(self._count(), dtype=torch.float32)}
        sharded = self.sharded
        if sharded is not None:
            for b in sharded.buckets:
                parts = [part for part in sharded.slice_parts(b) if not _is_duplicate(part.param)]
                for name, tensor in sharded.state_slices(b).items():
                    # The whole slice is copied once; each part places its run of it.
                    for part in parts:
                        out[f"optim.{keys[id(part.param)]}.{name}"] = Staged(
                            tensor, lambda host, part=part: layout.slice_part(
                                part, host[part.offset:part.offset + part.numel]))
            return out
        for key, p in self.model.named_parameters():
            state = self.optimizer.state.get(p, {})
            for name in MOMENTS:
                if name in state and not _is_duplicate(p):
                    out[f"optim.{key}.{name}"] = Staged(
                        state[name], functools.partial(layout.tp_tensor, p))
        return out

    def empty_state_dict(self) -> dict[str, Any]:
        """Every entry this optimizer could load, as host tensors of this rank's layout
        (its moments exist only after a step, so state_dict() cannot tell them)."""
        layout, keys = self.model.layout, self._keys()
        out: dict[str, Any] = {"optim.step": torch.zeros((), dtype=torch.float32)}
        sharded = self.sharded
        if sharded is not None:
            for b in sharded.buckets:
                for part in sharded.slice_parts(b):
                    for name in (*MOMENTS, "master"):
                        out[f"optim.{keys[id(part.param)]}.{name}"] = layout.slice_part(
                            part, torch.zeros(part.numel, dtype=torch.float32))
            return out
        for key, p in self.model.named_parameters():
            for name in MOMENTS:
                out[f"optim.{key}.{name}"] = layout.tp_tensor(
                    p, torch.empty(p.shape, dtype=torch.float32))
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint without moments (weights alone) leaves the optimizer fresh; one
        without masters (saved with fp32 weights) takes them from its weights."""
        if not any(k.endswith(".exp_avg") for k in state):
            return
        count = float(state["optim.step"])
        params = self.model.named_parameters()
        sharded = self.sharded
        if sharded is None:
            for key, p in params:
                self.optimizer.state[p] = {
                    "step": torch.tensor(count, dtype=torch.float32),
                    **{m: local(state[f"optim.{key}.{m}"]).to(p.device, p.dtype)
                       for m in MOMENTS},
                }
            return
        keys = {id(p): key for key, p in params}
        slices = []
        for b in sharded.buckets:
            by_name = {}
            for name in ("master", *MOMENTS):
                flat = torch.zeros(b.padded // b.size, dtype=torch.float32)
                for part in sharded.slice_parts(b):
                    key = keys[id(part.param)]
                    saved = state.get(f"optim.{key}.{name}")
                    values = (local(saved) if saved is not None else
                              local(state[f"model.{key}"]).reshape(-1)[part.start:part.stop])
                    flat[part.offset:part.offset + part.numel] = values.reshape(-1)
                by_name[name] = flat
            slices.append(by_name)
        sharded.load_state_slices(slices, count)


class Progress:
    """`trainer.step`: the last optimizer step taken (what the checkpoint is of)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"trainer.step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["trainer.step"])


class DataState:
    """`data.consumed_samples`: where the run reads next (the loader's position)."""

    def __init__(self, batches: StepBatches, progress: Progress) -> None:
        self.batches = batches
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        consumed = self.batches.consumed_samples(self.progress.step)
        return {"data.consumed_samples": torch.tensor(consumed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = self.progress.step  # loaded first (`states` is in that order)
        consumed = state.get("data.consumed_samples")  # absent: saved before it was
        self.batches.resume(step, int(consumed) if consumed is not None
                            else step * self.batches.global_batch_size)


class LRScheduleState:
    """`lr_schedule.last_epoch`: the schedule's position; the rates follow from it."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler, optim_cfg: DictConfig,
                 max_steps: int, progress: Progress) -> None:
        self.scheduler = scheduler
        self.optim_cfg = optim_cfg
        self.max_steps = max_steps
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        return {"lr_schedule.last_epoch": torch.tensor(self.scheduler.last_epoch,
                                                       dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("lr_schedule.last_epoch")  # absent: one step per optimizer step
        epoch = int(saved) if saved is not None else self.progress.step
        self.scheduler.last_epoch = epoch
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs,
                               strict=True):
            group["lr"] = base * lr_factor(epoch, self.optim_cfg, self.max_steps)


def empty_state_dict(states: dict[str, Stateful]) -> dict[str, Any]:
    """Host tensors of this rank's layout for DCP to load every part's entries into."""
    out: dict[str, Any] = {}
    for part in states.values():
        if isinstance(part, OptimizerState):
            out.update(part.empty_state_dict())
            continue
        for key, value in part.state_dict().items():
            out[key] = value.empty() if isinstance(value, Staged) else torch.zeros_like(value)
    return out


def load_state_dicts(states: dict[str, Stateful], loaded: dict[str, Any]) -> None:
    """Hand the loaded dict to every part, in order (the step before the data position)."""
    for part in states.values():
        part.load_state_dict(loaded)


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """Boxes that tile the elements [start, stop) of a row-major tensor of `shape`, in
    order: for a matrix a partial first row, the whole rows, a partial last row (at
    most 2 * ndim - 1 boxes, each a contiguous run of the flattened tensor)."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,), start)]
    row = math.prod(shape[1:])
    first, begin = divmod(start, row)
    last, end = divmod(stop, row)

    def in_row(r: int, boxes: list[Box]) -> list[Box]:
        return [((r, *o), (1, *s), r * row + f) for o, s, f in boxes]

    if first == last:
        return in_row(first, flat_range_boxes(shape[1:], begin, end))
    out = []
    if begin:
        out += in_row(first, flat_range_boxes(shape[1:], begin, row))
        first += 1
    if last > first:
        out.append(((first, *[0] * (len(shape) - 1)), (last - first, *shape[1:]), first * row))
    if end:
        out += in_row(last, flat_range_boxes(shape[1:], 0, end))
    return out


def to_host(tensors: list[torch.Tensor], private: bool) -> list[torch.Tensor]:
    """Host copies of `tensors`: device tensors after one sync, all in one transfer.
    Tensors already on the CPU are returned as they are, or cloned if `private` (an
    asynchronous save writes them while training changes the originals)."""
    moved = [i for i, t in enumerate(tensors) if t.device.type != "cpu"]
    out = [t.clone() if private and t.device.type == "cpu" else t for t in tensors]
    if moved:
        for i, host in zip(moved, _device_to_host([tensors[i] for i in moved]), strict=True):
            out[i] = host
    return out


def _device_to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if tensors[0].device.type == "xla":
        # torch_xla.core.xla_model's own save path: run whatever is pending for these
        # tensors as one graph, then one transfer of all of them (a `.cpu()` per tensor
        # would be a device round trip each).
        import torch_xla

        torch_xla._XLAC._xla_sync_multi(tensors, devices=[], wait=True, sync_xla_data=False)
        return torch_xla._XLAC._xla_get_cpu_tensors(tensors)
    # Eager devices: queue every copy, then wait once.
    copies = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.accelerator.synchronize()
    return copies



class HostLayout:
    """How this rank's tensors map onto the logical ones, as DCP objects on the host."""

    def __init__(self, host_tp_group: Group | None, dp: int) -> None:
        self.mesh = None
        if host_tp_group is not None:
            from torch.distributed.device_mesh import DeviceMesh

            self.mesh = DeviceMesh.from_group(host_tp_group, "cpu")
        self.dp = dp
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def tp_tensor(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        """`local` (this rank's tp shard of `param`, on the host) as the logical tensor."""
        if self.mesh is None or not hasattr(param, "tp_shard"):
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh, [Shard(param.tp_shard[0])], run_check=False,
                                  shape=torch.Size(param.tp_full_shape),
                                  stride=torch.empty(param.tp_full_shape, device="meta").stride())

    def slice_part(self, part: SlicePart, values: torch.Tensor) -> torch.Tensor:
        """`values` (1-D, host: the elements `part` holds) as the logical tensor."""
        if self.dp == 1:  # the slice is the whole bucket: whole parameters
            return self.tp_tensor(part.param, values.view(part.param.shape))
        return self._chunks(part, values)

    def _chunks(self, part: SlicePart, values: torch.Tensor) -> torch.Tensor:
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import (
            ShardedTensorMetadata,
            TensorProperties,
        )

        p = part.param
        local_shape = tuple(p.shape)
        full_shape = tuple(getattr(p, "tp_full_shape", local_shape))
        origin = [0] * len(local_shape)
        outside: list[tuple[list[int], list[int]]] = []  # the other tp ranks' blocks
        if hasattr(p, "tp_shard"):
            dim, begin, length = p.tp_shard
            origin[dim] = begin
            for lo, hi in ((0, begin), (begin + length, full_shape[dim])):
                if hi > lo:
                    offsets, sizes = [0] * len(full_shape), list(full_shape)
                    offsets[dim], sizes[dim] = lo, hi - lo
                    outside.append((offsets, sizes))

        def placed(boxes: list[Box]) -> list[tuple[list[int], list[int], int]]:
            return [([o + c for o, c in zip(offsets, origin, strict=True)], list(sizes), flat)
                    for offsets, sizes, flat in boxes]

        shards = [
            Shard(values[flat - part.start:flat - part.start + math.prod(sizes)].view(sizes),
                  ShardMetadata(offsets, sizes, f"rank:{self.rank}/cpu"))
            for offsets, sizes, flat in placed(flat_range_boxes(local_shape, part.start,
                                                                part.stop))]
        # A ShardedTensor's metadata must tile the whole tensor; only the local shards
        # are read (by DCP, here), so the rest is attributed to another rank as DCP's
        # own _flatten_sharded_tensors does, instead of listing every rank's chunks.
        other = f"rank:{(self.rank + 1) % self.world_size}/cpu"
        numel = math.prod(local_shape)
        rest = [(o, s) for o, s, _ in placed(flat_range_boxes(local_shape, 0, part.start)
                                            + flat_range_boxes(local_shape, part.stop, numel))]
        metadata = ShardedTensorMetadata(
            [s.metadata for s in shards] + [ShardMetadata(o, s, other) for o, s in rest + outside],
            torch.Size(full_shape), TensorProperties(dtype=values.dtype))
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata)


def _is_duplicate(p: nn.Parameter) -> bool:
    # A tied head on the last pipeline stage: its optimizer state equals the embedding's
    # (same gradients, same updates) but is sliced by other buckets; the first stage
    # stores it (chunks of two slicings of one tensor would overlap).
    return getattr(p, "pp_duplicate", False)


def local(tensor: Any) -> torch.Tensor:
    """This rank's part of a loaded value, flattened where it is several chunks."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(tensor, ShardedTensor):
        # The chunks of one contiguous range, in order (flat_range_boxes).
        return torch.cat([s.tensor.reshape(-1) for s in tensor.local_shards()])
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor

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

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from trntrain.parallel.zero import MOMENTS, SlicePart

if TYPE_CHECKING:
    from trntrain.checkpoint import TrainState

# A box of a tensor: (offsets, sizes, index of its first element in the flattened tensor).
Box = tuple[tuple[int, ...], tuple[int, ...], int]


def param_key(name: str, tied: bool) -> str:
    return "tok_embeddings.weight" if tied and name == "output.weight" else name


def named_parameters(train: TrainState) -> list[tuple[str, nn.Parameter]]:
    """Every parameter this rank holds, by its name in the plain model (tied head
    under the embedding's name)."""
    tied = train.model_cfg.tie_embeddings
    out, seen = [], set()
    for chunk in train.chunks.values():
        for name, p in chunk.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((param_key(name, tied), p))
    return out


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


class _Layout:
    """How this rank's tensors map onto the logical ones, as DCP objects on the host."""

    def __init__(self, train: TrainState) -> None:
        self.mesh = None
        group = train.host_tp_group
        if group is not None:
            from torch.distributed.device_mesh import DeviceMesh

            self.mesh = DeviceMesh.from_group(group, "cpu")
        self.dp = train.sharded.dp if train.sharded is not None else 1
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


def _scalars(train: TrainState, step: int) -> dict[str, torch.Tensor]:
    count = 0.0
    for s in train.optimizer.state.values():
        if "step" in s:
            count = float(s["step"])
            break
    return {
        "trainer.step": torch.tensor(step, dtype=torch.int64),
        "optim.step": torch.tensor(count, dtype=torch.float32),
        "data.consumed_samples": torch.tensor(train.data.consumed_samples(step),
                                              dtype=torch.int64),
    }


def state_dict(train: TrainState, step: int, private: bool = False) -> dict[str, Any]:
    """What a checkpoint holds, on the host. `private`: copies that nothing else
    changes (for an asynchronous save); else CPU tensors may be the live ones."""
    layout = _Layout(train)
    params = named_parameters(train)
    keys = {id(p): key for key, p in params}
    # Every device tensor to copy, and what becomes of its host copy.
    sources: list[torch.Tensor] = []
    builders: list[Callable[[torch.Tensor], dict[str, Any]]] = []
    for key, p in params:
        sources.append(p.detach())
        builders.append(lambda host, key=key, p=p: {f"model.{key}": layout.tp_tensor(p, host)})
    sharded = train.sharded
    if sharded is not None:
        for b in sharded.buckets:
            parts = [part for part in sharded.slice_parts(b) if not _is_duplicate(part.param)]
            for name, tensor in sharded.state_slices(b).items():
                sources.append(tensor)
                builders.append(lambda host, parts=parts, name=name: {
                    f"optim.{keys[id(part.param)]}.{name}": layout.slice_part(
                        part, host[part.offset:part.offset + part.numel]) for part in parts})
    else:
        for key, p in params:
            state = train.optimizer.state.get(p, {})
            for name in MOMENTS:
                if name in state and not _is_duplicate(p):
                    sources.append(state[name])
                    builders.append(lambda host, key=key, p=p, name=name: {
                        f"optim.{key}.{name}": layout.tp_tensor(p, host)})
    out: dict[str, Any] = _scalars(train, step)
    for build, host in zip(builders, to_host(sources, private), strict=True):
        out.update(build(host))
    return out


def empty_like_state(train: TrainState, with_optimizer: bool = True,
                     with_master: bool = True) -> dict[str, Any]:
    """Host tensors of this rank's layout for DCP to load into (its chunks only)."""
    layout = _Layout(train)
    params = named_parameters(train)
    keys = {id(p): key for key, p in params}
    out: dict[str, Any] = {
        "trainer.step": torch.zeros((), dtype=torch.int64),
        "optim.step": torch.zeros((), dtype=torch.float32),
        "data.consumed_samples": torch.zeros((), dtype=torch.int64),
    }
    for key, p in params:
        out[f"model.{key}"] = layout.tp_tensor(p, torch.empty(p.shape, dtype=p.dtype))
    if not with_optimizer:
        return out
    sharded = train.sharded
    if sharded is not None:
        names = MOMENTS + (("master",) if with_master else ())
        for b in sharded.buckets:
            for part in sharded.slice_parts(b):
                for name in names:
                    out[f"optim.{keys[id(part.param)]}.{name}"] = layout.slice_part(
                        part, torch.zeros(part.numel, dtype=torch.float32))
    else:
        for key, p in params:
            for name in MOMENTS:
                out[f"optim.{key}.{name}"] = layout.tp_tensor(
                    p, torch.empty(p.shape, dtype=torch.float32))
    return out


def local(tensor: Any) -> torch.Tensor:
    """This rank's part of a loaded value, flattened where it is several chunks."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(tensor, ShardedTensor):
        # The chunks of one contiguous range, in order (flat_range_boxes).
        return torch.cat([s.tensor.reshape(-1) for s in tensor.local_shards()])
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def apply_state(train: TrainState, loaded: dict[str, Any], with_optimizer: bool = True) -> int:
    """Copy a loaded (host) state onto the trainer's model and optimizer; returns the step."""
    step = int(loaded["trainer.step"])
    # The data position: where the run that saved it would have read next.
    consumed = loaded.get("data.consumed_samples")
    train.data.resume(step, int(consumed) if consumed is not None
                                 else step * train.global_batch_size)
    params = named_parameters(train)
    weights = {key: local(loaded[f"model.{key}"]) for key, _ in params}
    for key, p in params:
        p.copy_(weights[key])
    if not with_optimizer:
        return step
    count = float(loaded["optim.step"])
    sharded = train.sharded
    if sharded is not None:
        keys = {id(p): key for key, p in params}
        slices = []
        for b in sharded.buckets:
            by_name = {}
            for name in ("master", *MOMENTS):
                flat = torch.zeros(b.padded // sharded.dp, dtype=torch.float32)
                for part in sharded.slice_parts(b):
                    key = keys[id(part.param)]
                    saved = loaded.get(f"optim.{key}.{name}")
                    # A checkpoint without masters (fp32 weights): they are the weights.
                    values = (local(saved).reshape(-1) if saved is not None else
                              weights[key].reshape(-1)[part.start:part.stop])
                    flat[part.offset:part.offset + part.numel] = values
                by_name[name] = flat
            slices.append(by_name)
        sharded.load_state_slices(slices, count)
    else:
        for key, p in params:
            train.optimizer.state[p] = {
                "step": torch.tensor(count, dtype=torch.float32),
                **{m: local(loaded[f"optim.{key}.{m}"]).to(p.device, p.dtype) for m in MOMENTS},
            }
    return step

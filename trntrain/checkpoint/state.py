"""The training state as a layout-free dict of named logical tensors.

Whatever the layout (tp, pp, dp, ZeRO-1, master weights), a checkpoint names the
same things: `model.<param>` for every parameter of the plain model,
`optim.<param>.exp_avg` / `.exp_avg_sq` / `.master` for AdamW's moments and the
fp32 master weights, and a few scalars (`trainer.step`, `optim.step`, and
`data.consumed_samples`, the position in the data). A tensor-
parallel shard is a DTensor over its tp group (Shard on its split dimension), so
torch.distributed.checkpoint stores the full logical tensor and any other layout
can read the parts it needs. A tied head is stored once, as the embedding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from trntrain.trainer import Trainer

MOMENTS = ("exp_avg", "exp_avg_sq")


def param_key(name: str, tied: bool) -> str:
    return "tok_embeddings.weight" if tied and name == "output.weight" else name


def named_parameters(trainer: Trainer) -> list[tuple[str, nn.Parameter]]:
    """Every parameter this rank holds, by its name in the plain model (tied head
    under the embedding's name)."""
    tied = trainer.cfg.model.tie_embeddings
    out, seen = [], set()
    for chunk in trainer.chunks.values():
        for name, p in chunk.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((param_key(name, tied), p))
    return out


class _Sharding:
    """Wraps tp shards as DTensors over this rank's tp group."""

    def __init__(self, trainer: Trainer) -> None:
        self.group = trainer.mesh.tp_group
        self.mesh = None
        if self.group is not None:
            from torch.distributed.device_mesh import DeviceMesh

            self.mesh = DeviceMesh.from_group(self.group, trainer.backend.device.type)

    def wrap(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        if self.mesh is None or not hasattr(param, "tp_shard"):
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh, [Shard(param.tp_shard[0])], run_check=False,
                                  shape=torch.Size(param.tp_full_shape),
                                  stride=torch.empty(param.tp_full_shape, device="meta").stride())


def optimizer_tensors(trainer: Trainer) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
    """Per parameter (this rank's shard of it): moments and, where kept, the master."""
    if trainer.sharded is not None:
        return trainer.sharded.per_parameter_state()
    state = {}
    for p in trainer.params:
        s = trainer.optimizer.state.get(p, {})
        state[p] = {m: s[m] for m in MOMENTS if m in s}
    return state


def optimizer_step_count(trainer: Trainer) -> float:
    for s in trainer.optimizer.state.values():
        if "step" in s:
            return float(s["step"])
    return 0.0


def state_dict(trainer: Trainer, step: int) -> dict[str, torch.Tensor]:
    """What a checkpoint holds, as tensors (DTensors for tp shards)."""
    sharding = _Sharding(trainer)
    out: dict[str, torch.Tensor] = {
        "trainer.step": torch.tensor(step, dtype=torch.int64),
        "optim.step": torch.tensor(optimizer_step_count(trainer), dtype=torch.float32),
        "data.consumed_samples": torch.tensor(trainer.train_batches.consumed_samples(step),
                                              dtype=torch.int64),
    }
    per_param = optimizer_tensors(trainer)
    for key, p in named_parameters(trainer):
        out[f"model.{key}"] = sharding.wrap(p, p.detach())
        for name, tensor in per_param.get(p, {}).items():
            out[f"optim.{key}.{name}"] = sharding.wrap(p, tensor)
    return out


def empty_like_state(trainer: Trainer, with_optimizer: bool = True,
                     with_master: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of this rank's layout for DCP to load into."""
    sharding = _Sharding(trainer)
    device = trainer.backend.device
    out: dict[str, torch.Tensor] = {
        "trainer.step": torch.zeros((), dtype=torch.int64),
        "optim.step": torch.zeros((), dtype=torch.float32),
        "data.consumed_samples": torch.zeros((), dtype=torch.int64),
    }
    for key, p in named_parameters(trainer):
        out[f"model.{key}"] = sharding.wrap(p, torch.empty_like(p.detach()))
        if not with_optimizer:
            continue
        names = MOMENTS + (("master",) if with_master else ())
        for name in names:
            local = torch.empty(p.shape, dtype=torch.float32, device=device)
            out[f"optim.{key}.{name}"] = sharding.wrap(p, local)
    return out


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def apply_state(trainer: Trainer, loaded: dict[str, torch.Tensor], with_optimizer: bool = True
                ) -> int:
    """Copy a loaded state into the trainer's model and optimizer; returns the step."""
    step = int(loaded["trainer.step"])
    # The data position: where the run that saved it would have read next.
    consumed = loaded.get("data.consumed_samples")
    trainer.train_batches.resume(step, int(consumed) if consumed is not None
                                 else step * trainer.cfg.train.global_batch_size)
    params = named_parameters(trainer)
    for key, p in params:
        p.copy_(local(loaded[f"model.{key}"]))
    if not with_optimizer:
        return step
    per_param = {p: {name: local(loaded[f"optim.{key}.{name}"]) for name in MOMENTS}
                 for key, p in params}
    masters = {p: local(loaded[f"optim.{key}.master"]) for key, p in params
               if f"optim.{key}.master" in loaded}
    count = float(loaded["optim.step"])
    if trainer.sharded is not None:
        trainer.sharded.load_per_parameter_state(per_param, masters, count)
    else:
        for p, moments in per_param.items():
            trainer.optimizer.state[p] = {
                "step": torch.tensor(count, dtype=torch.float32),
                # The loaded tensors are fresh and ours: no copy beyond the device move.
                **{m: v.to(p.device, p.dtype) for m, v in moments.items()},
            }
    return step

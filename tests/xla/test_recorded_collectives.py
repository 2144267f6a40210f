"""What the distributed code would ask of torch-xla's process group, checked against it.

XLA:CPU cannot run several processes, so the tp, sp, pp, dp, ZeRO-1 and checkpoint
paths run on gloo ranks here, with every process-group call recorded: each call of a
`ProcessGroup` method, each object collective and barrier of `torch.distributed`, and
each group creation. On Trainium the default group and every mesh group are
`ProcessGroupXla`, so the recording is checked against that class as installed:
- every call on a device group is a method `ProcessGroupXla` implements with a real
  collective (its source calls torch-xla's `xm.*`); a barrier there returns at once,
  an unimplemented method raises;
- no barrier and no object collective goes to a device group: they need a host
  (gloo) group;
- every device group is created with the mesh of its axis (`pg_options`'
  `xla_pg_options.mesh`): the group's own ranks and its peers', each rank once.
"""

from __future__ import annotations

import inspect
import re
import threading
from pathlib import Path

import pytest
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup

from tests.conftest import tiny_config
from trntrain.backend.cpu import CpuBackend
from trntrain.backend.xla import XlaBackend
from trntrain.distributed import World
from trntrain.trainer import Trainer

PG_METHODS = ("allreduce", "allreduce_coalesced", "allgather", "_allgather_base",
              "allgather_coalesced", "allgather_into_tensor_coalesced", "reduce_scatter",
              "_reduce_scatter_base", "reduce_scatter_tensor_coalesced", "broadcast",
              "barrier", "reduce", "gather", "scatter", "alltoall", "alltoall_base", "send",
              "recv", "recv_anysource", "monitored_barrier")
HOST_ONLY_APIS = ("barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list",
                  "gather_object", "scatter_object_list", "send_object_list",
                  "recv_object_list")


def xla_collectives() -> set[str]:
    """ProcessGroupXla's methods that run a torch-xla collective (read from its source)."""
    from torch_xla.distributed.xla_backend import ProcessGroupXla

    real = set()
    for name, member in vars(ProcessGroupXla).items():
        if not callable(member):
            continue
        source = inspect.getsource(member)
        if "raise NotImplementedError" not in source and re.search(r"\bxm\.\w+\(", source):
            real.add(name)
    return real


class XlaGroupsOnCpu(CpuBackend):
    """The cpu backend creating its groups with the options the xla backend gives."""

    def group_options(self, axis_groups):
        return XlaBackend.group_options(self, axis_groups)


class Recorder:
    """Records process-group traffic in this process (patches undone by `close`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []  # (api or method, kind, group id)
        self.created: list[dict] = []  # every new_group call, in order
        self.groups: dict[int, dict] = {}  # id(group) -> its creation, for member groups
        self._inside = threading.local()
        self._undo = []

    def kind(self, group) -> str:
        if group is None or group is dist.group.WORLD:
            return "device"  # the default group: xla on Trainium
        created = self.groups.get(id(group))
        if created is None:
            return "unknown"
        return "host" if created["backend"] == "gloo" else "device"

    def _patch(self, owner, name, wrapper_of) -> None:
        original = getattr(owner, name)
        setattr(owner, name, wrapper_of(original))
        self._undo.append((owner, name, original))

    def start(self) -> Recorder:
        def method(name):
            def wrap(original):
                def recorded(pg, *args, **kwargs):
                    if not getattr(self._inside, "api", None):
                        self.calls.append((name, self.kind(pg), id(pg)))
                    return original(pg, *args, **kwargs)
                return recorded
            return wrap

        for name in PG_METHODS:
            if hasattr(ProcessGroup, name):
                self._patch(ProcessGroup, name, method(name))

        def api(name):
            def wrap(original):
                def recorded(*args, **kwargs):
                    group = kwargs.get("group")
                    self.calls.append((name, self.kind(group), id(group)))
                    self._inside.api = name
                    try:
                        return original(*args, **kwargs)
                    finally:
                        self._inside.api = None
                return recorded
            return wrap

        for name in HOST_ONLY_APIS:
            self._patch(dist, name, api(name))

        def new_group(original):
            def recorded(ranks=None, *args, **kwargs):
                group = original(ranks, *args, **kwargs)
                options = kwargs.get("pg_options")
                self.created.append({
                    "ranks": sorted(ranks) if ranks is not None else None,
                    "backend": kwargs.get("backend"),
                    "mesh": (options or {}).get("xla_pg_options", {}).get("mesh"),
                })
                if isinstance(group, ProcessGroup):  # not the non-member placeholder
                    self.groups[id(group)] = self.created[-1]
                return group
            return recorded

        self._patch(dist, "new_group", new_group)
        return self

    def close(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def record_runs(rank: int, world_size: int, run_dir: str, runs: list[tuple[str, ...]]) -> dict:
    import trntrain.distributed as distributed

    recorder = Recorder().start()
    try:
        # What init_process_group creates beside an xla default group.
        distributed._host_group = dist.new_group(backend="gloo")
        world = World(rank, world_size, rank)
        for index, overrides in enumerate(runs):
            cfg = tiny_config("train.max_steps=4", "train.micro_batch_size=2", *overrides)
            Trainer(cfg, world, run_dir=Path(run_dir) / str(index),
                    backend=XlaGroupsOnCpu(rank, cfg.backend)).fit()
        return {"calls": recorder.calls, "groups": recorder.created}
    finally:
        distributed._host_group = None
        recorder.close()


DCP = ("checkpoint=dcp", "checkpoint.every=2", "train.eval_every=2", "train.eval_batches=1")
LAYOUTS = {
    "tp2_sp_pp2_allgather_async_dcp": [
        ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2",
         "parallel.pp_transport=allgather", "checkpoint.async=true", *DCP)],
    "tp2_dp2_zero1_bf16_dcp_and_resume": [
        ("parallel.tp=2", "parallel.zero1=true", "train.precision=bf16", *DCP),
        ("parallel.tp=2", "parallel.zero1=true", "train.precision=bf16", *DCP,
         "train.max_steps=6", "checkpoint.resume=auto")],
    # The ep and expert-dp groups are device groups made with their axis' mesh: on XLA
    # the dispatch passes that mesh to torch-xla's all-to-all (test_moe_xla.py).
    "moe_ep2_dp4_capacity_dcp": [
        ("model=mixtral_tiny", "model.n_layers=2", "model.capacity_factor=1.25",
         "parallel.ep=2", *DCP)],
    # Context parallelism's all-gather attention (keys and values gathered, their
    # gradients reduce-scattered) beside sp, and its dp x cp group under ZeRO-1.
    "cp2_tp2_sp_then_cp2_dp2_zero1_dcp": [
        ("parallel.cp=2", "parallel.cp_attention=allgather", "parallel.tp=2",
         "parallel.sequence_parallel=true", *DCP),
        ("parallel.cp=2", "parallel.cp_attention=allgather", "parallel.dp=2",
         "parallel.zero1=true", *DCP)],
    "pp2_dp2_tied_hf_export": [
        ("parallel.pp=2", "parallel.pp_transport=allgather", "model.tie_embeddings=true",
         "checkpoint=hf", "checkpoint.every=0")],
}


@pytest.mark.parametrize("runs", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_collective_is_one_torch_xla_implements(distributed, tmp_path, runs):
    for index, overrides in enumerate(runs[1:], start=1):  # resumes read the first run
        runs[index] = tuple(o.replace("checkpoint.resume=auto",
                                      f"checkpoint.dir={tmp_path / '0' / 'checkpoints'}")
                            for o in overrides)
    supported = xla_collectives()
    assert {"allreduce", "_allgather_base", "_reduce_scatter_base"} <= supported
    assert "barrier" not in supported  # it returns at once: the reason for the rules
    for result in distributed(record_runs, 4, str(tmp_path), runs, timeout_s=300):
        calls, groups = result["calls"], result["groups"]
        on_device = {name for name, kind, _ in calls if kind == "device"}
        assert not {name for name, kind, _ in calls if kind == "unknown"}
        assert not on_device & set(HOST_ONLY_APIS), on_device
        assert on_device <= supported, on_device - supported
        assert on_device  # the run did use the device groups
        assert {name for name, kind, _ in calls if kind == "host"} & set(HOST_ONLY_APIS)
        device_groups = [g for g in groups if g["backend"] != "gloo"]
        assert device_groups
        for group in device_groups:
            mesh = group["mesh"]
            assert mesh is not None, group
            assert group["ranks"] in mesh
            flat = [r for ranks in mesh for r in ranks]
            assert len(flat) == len(set(flat)), mesh  # each rank in one group of the mesh
            created = {tuple(g["ranks"]) for g in device_groups if g["mesh"] == mesh}
            assert created == {tuple(r) for r in mesh}  # every group of the mesh exists


def test_pp_transport_isend_is_refused_on_xla_backends():
    from trntrain.config import validate
    from trntrain.errors import UserError

    for backend in ("xla", "neuron"):
        cfg = tiny_config("parallel.pp=2", "parallel.pp_transport=isend", f"backend={backend}")
        with pytest.raises(UserError, match=r"parallel.pp_transport='isend' is invalid: "
                                            r"torch-xla runs every send and receive"):
            validate(cfg, 2)
    validate(tiny_config("parallel.pp=2", "parallel.pp_transport=isend", "backend=cpu"), 2)


def test_the_isend_transport_is_what_torch_xla_runs_one_sync_at_a_time(distributed, tmp_path):
    """Why `isend` is refused on xla: its transfers reach ProcessGroupXla's send and recv,
    each a collective_permute followed by a graph sync (read from their source), while
    the allgather transport's are all-gathers inside the traced graph."""
    from torch_xla.distributed.xla_backend import ProcessGroupXla

    for method in ("send", "recv"):
        source = inspect.getsource(getattr(ProcessGroupXla, method))
        assert "collective_permute" in source and "torch_xla.sync()" in source
    runs = [("parallel.pp=2", "parallel.pp_transport=isend", "train.eval_every=0")]
    calls = distributed(record_runs, 4, str(tmp_path), runs, timeout_s=300)[0]["calls"]
    on_device = {name for name, kind, _ in calls if kind == "device"}
    assert {"send", "recv"} & on_device
    runs = [("parallel.pp=2", "parallel.pp_transport=allgather", "train.eval_every=0")]
    calls = distributed(record_runs, 4, str(tmp_path / "ag"), runs, timeout_s=300)[0]["calls"]
    on_device = {name for name, kind, _ in calls if kind == "device"}
    assert not {"send", "recv"} & on_device and "_allgather_base" in on_device

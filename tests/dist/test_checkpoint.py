"""Checkpoints: exact resume, resharding between layouts, atomicity, corruption."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import tiny_config
from trntrain.checkpoint.manager import LATEST, step_dir_name, write_checksums
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.trainer import Trainer

BASE = ("train.max_steps=20", "train.eval_every=0", "train.micro_batch_size=2",
        "checkpoint=dcp", "checkpoint.every=10", "checkpoint.keep=0")
TP2_PP2 = ("parallel.tp=2", "parallel.pp=2")
DP2_ZERO1 = ("parallel.zero1=true",)


def run(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    trainer = Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank),
                      run_dir=Path(run_dir))
    records = trainer.fit()
    params = {name: p.detach().clone() for chunk in trainer.chunks.values()
              for name, p in chunk.named_parameters()}
    return {"loss": {r["step"]: r["loss"] for r in records},
            "params": {k: v.flatten()[:64].tolist() for k, v in params.items()}}


@pytest.mark.parametrize(("world_size", "layout"), [(4, TP2_PP2), (2, DP2_ZERO1)])
def test_resume_is_bitwise_equal_to_a_straight_run(distributed, tmp_path, world_size, layout):
    straight = distributed(run, world_size, str(tmp_path / "a"), layout)
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(10)
    assert halfway.is_dir() and (tmp_path / "a" / "checkpoints" / step_dir_name(20)).is_dir()
    resumed = distributed(run, world_size, str(tmp_path / "b"),
                          (*layout, f"checkpoint.resume={halfway}"))
    for a, b in zip(straight, resumed, strict=True):
        assert sorted(b["loss"]) == list(range(11, 21))
        assert all(b["loss"][s] == a["loss"][s] for s in range(11, 21))  # bitwise
        assert b["params"] == a["params"]


def test_checkpoint_reshards_to_other_layouts(distributed, tmp_path):
    straight = distributed(run, 4, str(tmp_path / "a"), TP2_PP2)[0]["loss"]
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(10)
    for world_size, layout in [(1, ()), (4, ()), (2, ("parallel.tp=2", "parallel.zero1=true"))]:
        target = str(tmp_path / f"to-{world_size}-{'-'.join(layout)}")
        overrides = (*layout, f"checkpoint.resume={halfway}")
        if world_size == 1:
            result = run(0, 1, target, overrides)
        else:
            result = distributed(run, world_size, target, overrides)[0]
        assert [result["loss"][s] for s in range(11, 21)] == pytest.approx(
            [straight[s] for s in range(11, 21)], rel=1e-5)


def test_pytorch_tools_read_the_checkpoint(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    trained = run(0, 1, str(tmp_path / "run"), ())["params"]
    checkpoint = tmp_path / "run" / "checkpoints" / step_dir_name(20)
    dcp_to_torch_save(checkpoint, tmp_path / "flat.pt")
    state = torch.load(tmp_path / "flat.pt", weights_only=True)
    trainer = Trainer(tiny_config(*BASE, f"checkpoint.resume={checkpoint}"), World(),
                      run_dir=tmp_path / "again")
    trainer.load_checkpoint(checkpoint)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(state[f"model.{name}"], p.detach())
    # The flat file holds the weights the run trained to step 20, every one of them.
    assert {k for k in state if k.startswith("model.")} == {f"model.{n}" for n in trained}
    for name, head in trained.items():
        assert state[f"model.{name}"].flatten()[:64].tolist() == head
    assert int(state["trainer.step"]) == 20
    assert state["optim.layers.0.attention.wq.weight.exp_avg"].shape == (128, 128)


def test_incomplete_and_corrupt_checkpoints_fall_back(tmp_path):
    run(0, 1, str(tmp_path / "run"), ())
    checkpoints = tmp_path / "run" / "checkpoints"
    latest = checkpoints / step_dir_name(20)
    # A save killed midway leaves a .tmp directory: never read.
    shutil.copytree(latest, checkpoints / f"{step_dir_name(30)}.tmp")
    # Truncate the newest complete checkpoint's data file.
    data = next(latest.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    trainer = Trainer(tiny_config(*BASE, "train.max_steps=12"), World(), run_dir=tmp_path / "run")
    assert trainer.resume_step() == 10
    assert (checkpoints / LATEST).read_text().strip() == step_dir_name(20)
    explicit = Trainer(tiny_config(*BASE, f"checkpoint.resume={latest}"), World(),
                       run_dir=tmp_path / "other")
    with pytest.raises(UserError, match=rf"{data.name} is truncated"):
        explicit.resume_step()


def test_keep_prunes_old_checkpoints(tmp_path):
    run(0, 1, str(tmp_path / "run"), ("checkpoint.every=5", "checkpoint.keep=2"))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == [LATEST, step_dir_name(15), step_dir_name(20)]


def test_async_save_equals_sync_save(distributed, tmp_path):
    sync = distributed(run, 2, str(tmp_path / "sync"), DP2_ZERO1)
    asynchronous = distributed(run, 2, str(tmp_path / "async"),
                               (*DP2_ZERO1, "checkpoint.async=true"))
    assert asynchronous[0]["loss"] == sync[0]["loss"]
    for step in (10, 20):
        name = step_dir_name(step)
        a = dcp.FileSystemReader(str(tmp_path / "async" / "checkpoints" / name)).read_metadata()
        b = dcp.FileSystemReader(str(tmp_path / "sync" / "checkpoints" / name)).read_metadata()
        assert a.state_dict_metadata.keys() == b.state_dict_metadata.keys()
    resumed = distributed(run, 2, str(tmp_path / "resumed"), (
        *DP2_ZERO1, f"checkpoint.resume={tmp_path / 'async' / 'checkpoints' / step_dir_name(10)}"))
    assert all(resumed[0]["loss"][s] == sync[0]["loss"][s] for s in range(11, 21))


# -- what is saved by whom: ZeRO-1 slices as chunks, host copies, one gloo group -------------

@pytest.mark.parametrize(("shape", "start", "stop"), [
    ((7, 5), 0, 35), ((7, 5), 3, 4), ((7, 5), 3, 22), ((7, 5), 5, 30), ((7, 5), 12, 13),
    ((3, 4, 5), 7, 53), ((3, 4, 5), 20, 40), ((9,), 2, 7), ((7, 5), 4, 4)])
def test_flat_range_boxes_tile_exactly_the_range(shape, start, stop):
    from trntrain.checkpoint.state import flat_range_boxes

    numbered = torch.arange(math.prod(shape)).view(shape)
    boxes = flat_range_boxes(shape, start, stop)
    assert len(boxes) <= 2 * len(shape) - 1
    pieces = []
    for offsets, sizes, flat in boxes:
        box = numbered[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
        assert box.flatten()[0] == flat if box.numel() else True
        pieces.append(box.flatten())
    got = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    assert torch.equal(got, torch.arange(start, stop))  # in order, disjoint, complete


ZERO_DP3 = ("parallel.zero1=true", "train.global_batch_size=12", "train.micro_batch_size=2",
            "train.max_steps=10", "checkpoint.every=0")


def device_all_gathers() -> tuple[list[int], object]:
    """Count every tensor all-gather and reduce-scatter (trntrain's and torch's)."""
    import torch.distributed as dist

    import trntrain.parallel.comm as comm

    counted, undo = [], []
    for owner, name in ((comm, "all_gather_single"), (comm, "_reduce_scatter_single"),
                        (dist, "all_gather_into_tensor"), (dist, "reduce_scatter_tensor")):
        original = getattr(owner, name)

        def wrapper(*args, original=original, **kwargs):
            counted.append(args[0].numel())
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        undo.append((owner, name, original))
    return counted, lambda: [setattr(o, n, f) for o, n, f in undo]


def zero_save(rank: int, world_size: int, run_dir: str) -> dict:
    from trntrain.checkpoint.state import host_state_dict, local

    trainer = Trainer(tiny_config(*BASE, *ZERO_DP3), World(rank, world_size, rank),
                      run_dir=Path(run_dir))
    trainer.fit()  # saves step 10 at the end
    counted, undo = device_all_gathers()
    try:
        trainer.save_checkpoint(11)
        staged = host_state_dict(trainer.states)
    finally:
        undo()
    return {"gathers": counted,
            "optim_bytes": sum(local(v).nbytes for k, v in staged.items()
                               if k.startswith("optim.")),
            "param_bytes": sum(p.nbytes for p in trainer.params)}


def loaded_optimizer_state(rank: int, world_size: int, checkpoint: str, reference: str,
                           overrides: tuple[str, ...]) -> int:
    """Load `checkpoint` into this layout; compare every value this rank now holds with
    the full tensors DCP's own converter wrote to `reference`. Returns values checked."""
    full = torch.load(reference, weights_only=True)
    trainer = Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank))
    counted, undo = device_all_gathers()
    try:
        assert trainer.load_checkpoint(Path(checkpoint)) == 10
    finally:
        undo()
    assert counted == []  # no rank gathers the state to load its part of it
    keys = {id(p): key for key, p in trainer.states["model"].named_parameters()}

    def mine(p, tensor):  # this rank's tp block of a logical tensor
        if hasattr(p, "tp_shard"):
            dim, start, length = p.tp_shard
            tensor = tensor.narrow(dim, start, length)
        return tensor.reshape(-1)

    checked = 0
    if trainer.sharded is not None:
        for b in trainer.sharded.buckets:
            state = trainer.sharded.optimizer.state[b.master]
            for part in trainer.sharded.slice_parts(b):
                key = keys[id(part.param)]
                for name, held in (("exp_avg", state["exp_avg"]),
                                   ("exp_avg_sq", state["exp_avg_sq"]),
                                   ("master", b.master)):
                    # fp32 weights are their own masters: the checkpoint has model.* only.
                    saved = full.get(f"optim.{key}.{name}", full[f"model.{key}"])
                    expected = mine(part.param, saved)[part.start:part.stop]
                    assert torch.equal(held[part.offset:part.offset + part.numel], expected)
                    checked += part.numel
    else:
        for key, p in trainer.states["model"].named_parameters():
            for name in ("exp_avg", "exp_avg_sq"):
                expected = mine(p, full[f"optim.{key}.{name}"])
                assert torch.equal(trainer.optimizer.state[p][name].reshape(-1), expected)
                checked += expected.numel()
    return checked


def test_zero1_saves_slices_without_gathering_and_loads_into_other_layouts(distributed,
                                                                            tmp_path):
    """dp=3 ZeRO-1 (slices that cut rows: partial-row chunks) saves each rank's slices
    as they are, with no all-gather; its optimizer state equals the unsharded run's;
    and tp=2 x dp=2 ZeRO-1, dp=4 ZeRO-1 and one process load exactly its values."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    saved = distributed(zero_save, 3, str(tmp_path / "zero"))
    for rank in saved:
        assert rank["gathers"] == []
        # 1/3 of the two fp32 moments of every parameter (fp32 weights: no masters).
        assert rank["optim_bytes"] == pytest.approx(2 * rank["param_bytes"] / 3, rel=0.01)
    checkpoint = tmp_path / "zero" / "checkpoints" / step_dir_name(10)
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    chunks = {tuple(c.sizes) for m in metadata.values() for c in getattr(m, "chunks", [])}
    assert any(len(s) == 2 and s[0] == 1 for s in chunks)  # a partial row was stored
    dcp_to_torch_save(checkpoint, tmp_path / "zero.pt")
    full = torch.load(tmp_path / "zero.pt", weights_only=True)

    # The same state as unsharded AdamW over the same batches: to the round-off of sums
    # taken in another order, which AdamW's normalised step amplifies where a gradient is
    # near zero (the embedding of a rare token moves by up to 2e-4 of the largest weight);
    # a chunk stored at a wrong place would be off by the size of the values.
    run(0, 1, str(tmp_path / "plain"), ZERO_DP3[1:])
    dcp_to_torch_save(tmp_path / "plain" / "checkpoints" / step_dir_name(10),
                      tmp_path / "plain.pt")
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain.keys() == full.keys()
    for key, value in plain.items():
        assert full[key].shape == value.shape
        if value.is_floating_point():
            scale = value.abs().max().item()
            assert torch.allclose(full[key], value, rtol=1e-3, atol=1e-3 * scale), key

    args = (str(checkpoint), str(tmp_path / "zero.pt"))
    total = sum(p.numel() for k, p in full.items() if k.startswith("model."))
    base = ("train.global_batch_size=12", "train.micro_batch_size=1")
    # Master and moments: every element once over dp=4, at least once under tp=2 (each
    # tp rank holds the replicated parameters' state too); moments alone in one process.
    over_dp = distributed(loaded_optimizer_state, 4, *args, (*base, "parallel.zero1=true"))
    assert sum(over_dp) == 3 * total and min(over_dp) > 0
    over_tp = distributed(loaded_optimizer_state, 4, *args,
                          (*base, "parallel.tp=2", "parallel.zero1=true"))
    assert sum(over_tp) > 3 * total and min(over_tp) > 0
    assert loaded_optimizer_state(0, 1, *args, base) == 2 * total


def threads_and_groups(rank: int, world_size: int, run_dir: str,
                       overrides: tuple[str, ...]) -> dict:
    """Which thread issues each host collective, and which gloo groups get created."""
    import threading

    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter

    calls, created, undo = [], [], []

    def record(owner, name, log):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            log.append((name, threading.current_thread() is threading.main_thread(),
                        kwargs.get("backend")))
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)
        undo.append((owner, name, original))

    for name in ("gather_object", "scatter_object_list", "broadcast_object_list",
                 "all_gather_object", "all_reduce", "barrier"):
        record(dist, name, calls)
    record(dist, "new_group", created)
    record(FileSystemWriter, "write_data", calls)
    try:
        Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank),
                run_dir=Path(run_dir)).fit()
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)
    return {"calls": calls, "created": created}


def test_async_save_collectives_stay_on_the_main_thread(distributed, tmp_path):
    """The SIGTERM vote all-reduces on the host group every step: an asynchronous save
    plans and finishes on the main thread too, only its file writes run in the
    background, and it opens no gloo group of its own."""
    layout = ("parallel.tp=2", "parallel.zero1=true", "checkpoint.every=5")
    sync = distributed(threads_and_groups, 4, str(tmp_path / "sync"), layout)
    asynchronous = distributed(threads_and_groups, 4, str(tmp_path / "async"),
                               (*layout, "checkpoint.async=true"))
    for s, a in zip(sync, asynchronous, strict=True):
        assert a["created"] == s["created"]  # the same groups: the mesh's
        assert all(backend is None for _, _, backend in a["created"])  # none gloo-only
        names = {name for name, _, _ in a["calls"]}
        assert {"gather_object", "scatter_object_list", "broadcast_object_list",
                "write_data"} <= names
        assert all(on_main for name, on_main, _ in a["calls"] if name != "write_data")
        writes = [on_main for name, on_main, _ in a["calls"] if name == "write_data"]
        assert len(writes) == 4 and not any(writes)  # steps 5, 10, 15, 20, in background
        assert all(on_main for _, on_main, _ in s["calls"])


class _Touch:
    """Unpickled by plain pickle, this creates `path`: code run from a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_metadata_that_would_run_code_is_refused(tmp_path):
    import pickle

    run(0, 1, str(tmp_path / "run"), ("train.max_steps=2",))
    checkpoint = tmp_path / "run" / "checkpoints" / step_dir_name(2)
    marker = tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    trainer = Trainer(tiny_config(*BASE, "train.max_steps=2"), World())
    with pytest.raises(UserError, match=r"\.metadata is missing, truncated or corrupt"):
        trainer.load_checkpoint(checkpoint)  # every rank checks .metadata's checksum first
    write_checksums(checkpoint)  # whoever could write the payload could list it too
    with pytest.raises(UserError, match=r"no readable DCP metadata .*pathlib.*Path.touch"):
        trainer.load_checkpoint(checkpoint)
    assert not marker.exists()
    pickle.loads((checkpoint / ".metadata").read_bytes())  # what DCP's own reader does
    assert marker.exists()


def failing_background_write(rank: int, world_size: int, run_dir: str) -> str:
    """Train with asynchronous saves at steps 5 and 10; rank 1's write of step 10 fails."""
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if rank == 1 and step_dir_name(10) in str(self.path):
            raise OSError("disk full (injected)")
        return original(self, plan, planner)

    FileSystemWriter.write_data = write_data
    try:
        Trainer(tiny_config(*BASE, *DP2_ZERO1, "train.max_steps=10", "checkpoint.every=5",
                            "checkpoint.async=true"),
                World(rank, world_size, rank), run_dir=Path(run_dir)).fit()
    except Exception as err:  # noqa: BLE001 - the error is the result
        return f"{type(err).__name__}: {err}"
    finally:
        FileSystemWriter.write_data = original
    return "finished"


def test_a_failed_background_write_is_raised_on_every_rank_and_not_committed(distributed,
                                                                              tmp_path):
    for message in distributed(failing_background_write, 2, str(tmp_path)):
        assert message.startswith("UserError: the checkpoint of step 10 could not be written")
        assert "on rank 1: disk full (injected)" in message
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == step_dir_name(5)
    assert not (checkpoints / step_dir_name(10)).exists()
    assert not (checkpoints / f"{step_dir_name(10)}.tmp" / ".metadata").exists()

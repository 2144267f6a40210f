"""checkpoint=dcp: torch.distributed.checkpoint, every rank writing its own shards.

The files are an ordinary DCP checkpoint (`.metadata` and `__<rank>_0.distcp`)
of the logical state of `state.py`: PyTorch's own tools read them
(`torch.distributed.checkpoint.format_utils`), and any layout loads them.

A save runs `dcp.save`'s protocol itself (state_dict_saver._save_state_dict: plan
on every rank, gather the plans to the coordinator, global plan, scatter, write,
gather the write results, metadata) so that it can split it around the writes.
Every collective runs on the calling (main) thread over the host gloo group
(`trntrain.distributed.host_group`), never on the xla or nccl group and never
from a second thread: the training loop keeps using that group (the SIGTERM vote),
and two threads issuing collectives on one gloo group would pair them up
differently on different ranks. With `checkpoint.async=true` only the file
writes (the storage writer's `write_data`) run in a background thread; the
metadata is gathered and written when the trainer completes the save
(`result()`, at the next save or the end of training), and only then is the
checkpoint committed.

Loading goes through DCP's reader, with the metadata read by a restricted
unpickler that admits only DCP's metadata classes, and tensors by
`torch.load(weights_only=True)` (DCP's own): no code runs from a checkpoint.
"""

from __future__ import annotations

import pickle
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from trntrain.checkpoint import Checkpointer, States
from trntrain.checkpoint.manager import CHECKSUMS, verify_listed_file
from trntrain.checkpoint.state import empty_state_dict, host_state_dict, load_state_dicts
from trntrain.distributed import host_group
from trntrain.errors import UserError
from trntrain.models import build_model

MODEL_CONFIG = "model.yaml"
COORDINATOR = 0  # rank of the host group that plans and writes `.metadata`, as in dcp.save

# One process (no_dist=True) is intended here; DCP warns about it on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
# torch 2.9's file-system writer reads tensor.storage() itself, for every tensor.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated",
                        module="torch.distributed.checkpoint")

T = TypeVar("T")

# -- reading metadata without running code -------------------------------------------------------

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a DCP metadata class; refusing to unpickle it")


class MetadataSafeReader(dcp.FileSystemReader):
    """DCP's file-system reader, its `.metadata` unpickled by an allow-list (DCP's own
    reader unpickles it with `pickle.load`, which can run any code)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        directory = Path(str(self.path))
        if (directory / CHECKSUMS).is_file():  # trntrain's own: verified on every rank
            verify_listed_file(directory, Path(str(path)).name)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not "
                                         f"DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_checkpoint_metadata(directory: Path) -> Metadata:
    try:
        return MetadataSafeReader(str(directory)).read_metadata()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is the same user error
        raise UserError(f"checkpoint {directory} has no readable DCP metadata ({err}); valid: "
                        f"a directory written by checkpoint=dcp.") from None


def checkpoint_keys(directory: Path) -> set[str]:
    return set(read_checkpoint_metadata(directory).state_dict_metadata)


def model_defaults() -> dict[str, Any]:
    """The model config's keys that have a default in the schema, with it."""
    import dataclasses

    from trntrain.config.schema import ModelConfig

    return {f.name: f.default for f in dataclasses.fields(ModelConfig)
            if f.default is not dataclasses.MISSING}


def check_fits(directory: Path, metadata: Metadata, state: dict[str, Any],
               model: DictConfig, whole: set[str] | None = None) -> None:
    """Refuse, in one line, a checkpoint of another model than the run's: a differing
    recorded model config, parameters it has and the run has not (or the reverse), or
    a tensor of another shape. Without this, fewer layers would resume silently and
    another width end in DCP's own traceback. `whole`: the `model.*` keys of the whole
    model's checkpoint (default: every parameter of `model`)."""
    recorded = directory / MODEL_CONFIG
    if recorded.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(recorded), resolve=True)
        # A key the recorded config lacks (written before the key existed, or by a
        # converter that leaves it out) has the schema's default.
        saved = {**model_defaults(), **saved}
        ours = OmegaConf.to_container(model, resolve=True)
        differing = sorted(k for k in set(saved) | set(ours)
                           if k != "name" and saved.get(k) != ours.get(k))
        if differing:
            shown = ", ".join(f"model.{k}={saved.get(k)!r} there, {ours.get(k)!r} here"
                              for k in differing[:4])
            raise UserError(f"checkpoint {directory} is of another model: {shown}; valid: the "
                            f"model.* settings it was saved with ({recorded}), or "
                            f"checkpoint.init_from to start from other weights.")
    saved_md = metadata.state_dict_metadata
    if whole is None:
        with torch.device("meta"):  # the whole model's names: a pipeline rank holds a part
            whole = {f"model.{name}" for name, _ in build_model(model).named_parameters()}
    extra = sorted(k for k in saved_md if k.startswith("model.") and k not in whole)
    missing = sorted(k for k in state if k not in saved_md)
    wrong = sorted(k for k in state if k in saved_md and (
        not isinstance(saved_md[k], TensorStorageMetadata)
        or tuple(saved_md[k].size) != tuple(state[k].shape)))
    for what, keys in (("has parameters this model has not", extra),
                       ("lacks", missing), ("has other shapes or kinds for", wrong)):
        if keys:
            raise UserError(f"checkpoint {directory} does not fit this model: it {what} "
                            f"{keys[:3]} ({len(keys)} keys); valid: a checkpoint of the same "
                            f"model.* config.")


# -- saving --------------------------------------------------------------------------------------

class _Failures:
    """The exceptions of one or more ranks, by rank, in the form of DCP's own
    CheckpointException.failures (exception, its stack), so that every rank raises
    what DCP would raise."""

    def __init__(self, failures: dict[int, tuple[BaseException, traceback.StackSummary]]
                 ) -> None:
        self.failures = failures

    @classmethod
    def of(cls, rank: int, error: BaseException) -> _Failures:
        try:  # it travels to the other ranks pickled; not every exception pickles
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - replaced by its text
            error = RuntimeError("".join(traceback.format_exception_only(error)).strip())
        return cls({rank: (error, traceback.extract_tb(error.__traceback__))})

    @classmethod
    def among(cls, values: list[Any]) -> _Failures | None:
        failures = {r: f for v in values if isinstance(v, _Failures)
                    for r, f in v.failures.items()}
        return cls(failures) if failures else None


class _HostGroup:
    """Exception-safe object collectives over the host group, as DCP's _DistWrapper
    (torch/distributed/checkpoint/utils.py): a rank that fails still takes part in
    every collective, and every rank then raises the failure."""

    def __init__(self) -> None:
        self.group = host_group()
        self.use_dist = dist.is_initialized()
        self.rank = dist.get_rank(self.group) if self.use_dist else 0
        self.size = dist.get_world_size(self.group) if self.use_dist else 1
        self.is_coordinator = self.rank == COORDINATOR
        # The object collectives take the coordinator's global rank.
        self.coordinator = (dist.get_global_rank(self.group, COORDINATOR)
                            if self.use_dist and self.group is not None else COORDINATOR)

    def _run(self, fn: Callable[[], T]) -> T | _Failures:
        try:
            return fn()
        except BaseException as err:  # noqa: BLE001 - raised on every rank by _check
            return _Failures.of(self.rank, err)

    def _gather(self, value: Any) -> list[Any] | None:
        if not self.use_dist:
            return [value]
        box = [None] * self.size if self.is_coordinator else None
        dist.gather_object(value, box, dst=self.coordinator, group=self.group)
        return box

    def _central(self, gathered: list[Any] | None, central: Callable[[list[Any]], Any]) -> Any:
        """On the coordinator: `central` of the gathered values, or the failures."""
        if not self.is_coordinator:
            return None
        return _Failures.among(gathered) or self._run(lambda: central(gathered))

    @staticmethod
    def _check(what: str, value: Any) -> Any:
        if isinstance(value, _Failures):
            raise CheckpointException(what, value.failures)
        return value

    def gather_scatter(self, what: str, local: Callable[[], T],
                       central: Callable[[list[T]], list[Any]]) -> Any:
        """`local` on every rank, `central` of all of them on the coordinator (one item
        per rank), each rank receiving its item."""
        outcome = self._central(self._gather(self._run(local)), central)
        replies = None
        if self.is_coordinator:
            replies = [outcome] * self.size if isinstance(outcome, _Failures) else outcome
        if not self.use_dist:
            return self._check(what, replies[0])
        box = [None]
        dist.scatter_object_list(box, replies, src=self.coordinator, group=self.group)
        return self._check(what, box[0])

    def gather_broadcast(self, what: str, local: Callable[[], T],
                         central: Callable[[list[T]], Any]) -> Any:
        """`local` on every rank, `central` of all of them on the coordinator, its result
        on every rank."""
        outcome = self._central(self._gather(self._run(local)), central)
        if self.use_dist:
            box = [outcome]
            dist.broadcast_object_list(box, src=self.coordinator, group=self.group)
            outcome = box[0]
        return self._check(what, outcome)


class DcpSave:
    """One DCP save, planned on construction (collective). `start` writes this rank's
    files, in a background thread or not; `result` (collective, on every rank's main
    thread) waits for them and writes the metadata on the coordinator."""

    def __init__(self, state: dict[str, Any], directory: Path, step: int) -> None:
        self.step = step
        self.hosts = _HostGroup()
        self.planner = dcp.DefaultSavePlanner()
        self.writer = dcp.FileSystemWriter(str(directory))
        self.metadata: Metadata | None = None
        self.writes: Future | None = None
        is_coordinator = self.hosts.is_coordinator

        def local_plan() -> Any:
            self.planner.set_up_planner(state_dict=state, storage_meta=self.writer.storage_meta(),
                                        is_coordinator=is_coordinator)
            self.writer.set_up_storage_writer(is_coordinator, rank=self.hosts.rank,
                                              use_collectives=True)
            return self.writer.prepare_local_plan(self.planner.create_local_plan())

        def global_plan(plans: list[Any]) -> list[Any]:
            plans, self.metadata = self.planner.create_global_plan(plans)
            return self.writer.prepare_global_plan(plans)

        central = self.hosts.gather_scatter(f"planning checkpoint {step}", local_plan,
                                            global_plan)
        self.plan = self.planner.finish_plan(central)

    def _write(self) -> list[Any]:
        written = self.writer.write_data(self.plan, self.planner)
        written.wait()
        return written.value()

    def start(self, background: bool) -> DcpSave:
        if background:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trntrain-dcp-write")
            self.writes = executor.submit(self._write)
            executor.shutdown(wait=False)  # the thread ends with its one task
        else:
            self.writes = Future()
            try:
                self.writes.set_result(self._write())
            except BaseException as err:  # noqa: BLE001 - reported on every rank in result()
                self.writes.set_exception(err)
        return self

    def result(self) -> Metadata:
        """Wait for this rank's writes, then the coordinator writes `.metadata` from every
        rank's results; raises on every rank if any rank failed."""
        writes = self.writes

        def finish(results: list[Any]) -> Metadata:
            self.writer.finish(metadata=self.metadata, results=results)
            return self.metadata

        return self.hosts.gather_broadcast(f"writing checkpoint {self.step}",
                                           lambda: writes.result(), finish)


class DcpCheckpointer(Checkpointer):
    def save(self, directory: Path, states: States) -> DcpSave | None:
        step, model = states["trainer"].step, states["model"]
        if _rank() == 0:
            # The model's shape travels with the weights, for `trntrain convert`.
            OmegaConf.save(model.model_cfg, directory / MODEL_CONFIG)
            if "peft" in states:  # and a LoRA run's settings and base, for --merge
                states["peft"].write_record(directory)
        background = bool(self.cfg["async"])
        # An asynchronous save writes while training changes the weights: private copies.
        save = DcpSave(host_state_dict(states, private=background), directory, step)
        save.start(background)
        if background:
            return save
        save.result()
        return None

    def load(self, directory: Path, states: States) -> None:
        metadata = read_checkpoint_metadata(directory)
        saved = set(metadata.state_dict_metadata)
        state = empty_state_dict(states)
        # Entries a checkpoint may lack, which the parts then derive (the masters from
        # the weights, the data position and schedule from the step, no moments: a
        # fresh optimizer): left out of the request; any other is checked below.
        optional = (".master", ".exp_avg", ".exp_avg_sq", "optim.step",
                    "data.consumed_samples", "lr_schedule.last_epoch")
        for key in [k for k in state if k not in saved and k.endswith(optional)]:
            del state[key]
        check_fits(directory, metadata, state, states["model"].model_cfg,
                   states["model"].logical_names())
        try:
            dcp.load(state, storage_reader=MetadataSafeReader(str(directory)),
                     process_group=host_group(), no_dist=not dist.is_initialized())
        except (CheckpointException, OSError, RuntimeError, ValueError,
                pickle.UnpicklingError) as err:
            cause = err
            failures = getattr(err, "failures", None)
            if isinstance(failures, dict) and failures:
                cause = sorted(failures.items())[0][1][0]
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise UserError(f"checkpoint {directory} could not be read ({first}); valid: a "
                            f"complete checkpoint as trntrain wrote it.") from None
        load_state_dicts(states, state)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0

"""Damaged files and failed writes: each a clear UserError naming the file, or repaired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trntrain.checkpoint.hf import hf_files, hf_tensor
from trntrain.checkpoint.manager import CHECKSUMS, verify_checksums, write_checksums
from trntrain.errors import UserError
from trntrain.metrics import JsonlSink, MetricsLogger


def checkpoint_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "step_00000001"
    directory.mkdir()
    (directory / "__0_0.distcp").write_bytes(b"x" * 100)
    (directory / ".metadata").write_bytes(b"y" * 10)
    write_checksums(directory)
    return directory


@pytest.mark.parametrize("listing", [
    "{not json", "[1, 2]", '{"__0_0.distcp": 3}', '{"__0_0.distcp": {"crc32": 1}}',
    '{"../outside": {"crc32": "00000000", "bytes": 0}}', "\xff\xfe garbage",
])
def test_a_garbage_checksum_listing_is_a_damaged_checkpoint(tmp_path, listing):
    directory = checkpoint_dir(tmp_path)
    (directory / CHECKSUMS).write_text(listing, errors="surrogateescape")
    with pytest.raises(UserError, match="is damaged: .*checksums.json is not a listing"):
        verify_checksums(directory)


def test_a_file_added_after_the_save_is_refused(tmp_path):
    directory = checkpoint_dir(tmp_path)
    verify_checksums(directory)
    (directory / "payload.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(UserError, match="payload.pkl is not in .*checksums.json"):
        verify_checksums(directory)


def write_model(directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(exist_ok=True)
    save_file({"model.norm.weight": torch.ones(4)}, str(directory / "model.safetensors"))


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_safetensors_name_the_file(tmp_path, damage):
    write_model(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"random": bytes(range(256)) * 4, "truncated": data[:-8],
                      "empty": b""}[damage])
    with pytest.raises(UserError, match=r"model.safetensors is not a readable safetensors file"):
        files = hf_files(tmp_path)
        with hf_tensor(files, "norm.weight", [4], False, "src", "m", "fix") as view:
            view[:]


@pytest.mark.parametrize("index", [
    "{not json", '{"weight_map": {"model.norm.weight": "weights.pkl"}}',
    '{"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}', '{"other": 1}',
])
def test_a_damaged_index_names_itself(tmp_path, index):
    write_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError, match="model.safetensors.index.json is not a safetensors "
                                        "index"):
        hf_files(tmp_path)


def test_a_torn_last_metrics_record_is_dropped_and_others_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
                    + '{"step": 4, "lo')
    MetricsLogger.truncate_after(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl line 2 is not a metrics record"):
        MetricsLogger.truncate_after(path, 5)


def test_a_metrics_write_on_a_full_disk_is_one_clear_error():
    sink = JsonlSink(Path("/dev/full"))  # every write: ENOSPC
    with pytest.raises(UserError, match=r"writing /dev/full failed: No space left on device"):
        sink.log({"step": 1, "loss": 2.0})
    sink.close()


@pytest.mark.parametrize(("override", "recorded", "message"), [
    ("model.n_layers=3", True, "is of another model: model.n_layers=4 there, 3 here"),
    ("model.dim=64", True, "is of another model: model.dim=128 there, 64 here"),
    ("model.n_layers=3", False, "it has parameters this model has not ['model.layers.3."),
    ("model.dim=64", False, "it has other shapes or kinds for"),
])
def test_resuming_another_model_names_what_differs(tmp_path, override, recorded, message):
    from tests.conftest import tiny_config
    from trntrain.checkpoint.dcp import MODEL_CONFIG
    from trntrain.distributed import World
    from trntrain.trainer import Trainer

    base = ("checkpoint=dcp", "train.max_steps=2")
    Trainer(tiny_config(*base), World(), run_dir=tmp_path / "run").fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    if not recorded:  # a checkpoint without model.yaml: the tensors themselves are compared
        (checkpoint / MODEL_CONFIG).unlink()
        write_checksums(checkpoint)
    other = Trainer(tiny_config(*base, override, f"checkpoint.resume={checkpoint}"), World(),
                    run_dir=tmp_path / "other")
    with pytest.raises(UserError) as raised:
        other.resume_step()
    assert message in str(raised.value) and "\n" not in str(raised.value)

"""`trntrain convert SRC DST`: between DCP checkpoints and Hugging Face directories.

SRC may be a run directory (its latest checkpoint), a DCP checkpoint directory or
a Hugging Face directory; the target format is the other one unless `--to` says.
One process, full tensors in host memory: for a model larger than that, export
from training with checkpoint=hf, which writes one file per pipeline stage.

`--merge`: a LoRA run's adapters (its DCP checkpoint, or a PEFT adapter directory
as checkpoint=hf writes it) added into their base weights, written as a full Hugging
Face model; the base is the run's recorded checkpoint.init_from (verified by its
fingerprint) or the adapter's base_model_name_or_path, unless `--base` names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf

from trntrain.checkpoint.dcp import (
    MODEL_CONFIG,
    MetadataSafeReader,
    checkpoint_keys,
    read_checkpoint_metadata,
)
from trntrain.checkpoint.hf import hf_files, hf_tensor, write_hf
from trntrain.checkpoint.manager import LATEST, checkpoint_dir, verify_checksums, write_checksums
from trntrain.errors import UserError
from trntrain.models import MODEL_FAMILIES, family_for_hf, family_of
from trntrain.peft.base import base_fingerprint, read_record
from trntrain.peft.hf import ADAPTER_CONFIG, merge, peft_name, read_adapter


def model_config_from_hf(config: dict) -> DictConfig:
    """The model config of a Hugging Face config.json, through the family that reads its
    `model_type` (KeyError: a key it lacks)."""
    model_type = config.get("model_type", "llama")
    family = family_for_hf(model_type)
    if family is None:
        raise UserError(f"convert: config.json has model_type={model_type!r}, which no model "
                        f"family reads; valid: one of "
                        f"{sorted(t for f in MODEL_FAMILIES.values() for t in f.hf.model_types)}.")
    return family.hf.model_config(config)


def parameter_shapes(model: DictConfig) -> dict[str, tuple[int, ...]]:
    from trntrain.models import build_model

    with torch.device("meta"):
        plain = build_model(model)
    return {name: tuple(p.shape) for name, p in plain.named_parameters()}


def holds_adapters(src: Path) -> bool:
    """Whether `src` holds LoRA adapters: a PEFT adapter directory, or a LoRA run (its
    latest checkpoint) or one of its DCP checkpoints."""
    try:
        kind, directory = resolve_source(src)
    except (UserError, OSError, ValueError):
        return False
    return kind == "peft" or (kind == "dcp" and read_record(directory) is not None)


def resolve_source(src: Path) -> tuple[str, Path]:
    """('dcp' | 'hf', directory) of a run directory (its latest checkpoint, in the
    checkpoint.dir of its config.yaml) or of a checkpoint directory."""
    config = src / "config.yaml"
    checkpoints = checkpoint_dir(OmegaConf.load(config) if config.is_file() else OmegaConf.create(),
                                 src)
    if (checkpoints / LATEST).is_file():
        src = checkpoints / (checkpoints / LATEST).read_text().strip()
    if (src / ".metadata").is_file():
        return "dcp", src
    if (src / ADAPTER_CONFIG).is_file():
        return "peft", src
    if (src / "config.json").is_file():
        return "hf", src
    raise UserError(f"convert: {src} is neither a run directory with checkpoints, a DCP "
                    f"checkpoint (.metadata) nor a Hugging Face directory (config.json).")


def dcp_to_hf(src: Path, dst: Path) -> None:
    verify_checksums(src)
    model = OmegaConf.load(src / MODEL_CONFIG)
    shapes = parameter_shapes(model)
    keys = checkpoint_keys(src)
    state = {f"model.{n}": torch.empty(s) for n, s in shapes.items() if f"model.{n}" in keys}
    dcp.load(state, storage_reader=MetadataSafeReader(str(src)), no_dist=True)
    to_hf_name = family_of(model).hf.to_hf_name
    tensors = {to_hf_name(k.removeprefix("model.")): v for k, v in state.items()}
    write_hf(dst, {"model.safetensors": tensors}, model, next(iter(tensors.values())).dtype)


def hf_to_dcp(src: Path, dst: Path) -> None:
    try:
        model = model_config_from_hf(json.loads((src / "config.json").read_bytes()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"convert: {src / 'config.json'} is not a readable Hugging Face "
                        f"model config; valid: the config.json that transformers writes "
                        f"beside the weights.") from None
    files = hf_files(src, f"convert: {src}")
    state: dict[str, torch.Tensor] = {
        "trainer.step": torch.tensor(0, dtype=torch.int64),
        "optim.step": torch.tensor(0.0),
    }
    for name, shape in parameter_shapes(model).items():
        with hf_tensor(files, name, shape, model, f"convert: {src}",
                       "the model its config.json describes",
                       "a Hugging Face directory whose config.json matches its "
                       "tensors") as view:
            state[f"model.{name}"] = view[(slice(None),) * len(shape)]
    dst.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=str(dst), no_dist=True)
    OmegaConf.save(model, dst / MODEL_CONFIG)
    write_checksums(dst)


def convert(src: Path, dst: Path, to: str | None = None) -> str:
    kind, directory = resolve_source(src)
    if kind == "peft":
        raise UserError(f"convert: {src} is a PEFT adapter directory; valid: --merge, which "
                        f"writes its base with the adapters merged in.")
    target = to or ("hf" if kind == "dcp" else "dcp")
    if target == kind:
        raise UserError(f"convert: {src} is already a {kind} checkpoint; valid: --to "
                        f"{'hf' if kind == 'dcp' else 'dcp'}.")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"convert: {dst} exists and is not empty; valid: a new directory.")
    (dcp_to_hf if kind == "dcp" else hf_to_dcp)(directory, dst)
    return target


def base_tensors(base: Path) -> tuple[DictConfig, dict[str, torch.Tensor]]:
    """The model config and every tensor (HF names) of a Hugging Face directory."""
    try:
        model = model_config_from_hf(json.loads((base / "config.json").read_bytes()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"convert --merge: {base} is not a Hugging Face model directory with "
                        f"a readable config.json; valid: the base model (--base DIR).") from None
    from trntrain.checkpoint.hf import safetensors_file

    tensors = {}
    for name, path in hf_files(base, f"convert --merge: base {base}").items():
        with safetensors_file(path) as f:
            tensors[name] = f.get_tensor(name)
    return model, tensors


def dcp_adapters(src: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA run's DCP checkpoint: its adapters under PEFT's names, and its peft.yaml."""
    record = read_record(src)
    if record is None:
        raise UserError(f"convert --merge: {src} is not a checkpoint of a LoRA run (no "
                        f"peft.yaml beside it); valid: a checkpoint of a peft=lora run.")
    verify_checksums(src)
    model = OmegaConf.load(src / MODEL_CONFIG)
    metadata = read_checkpoint_metadata(src).state_dict_metadata
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in metadata.items() if k.startswith("model.")}
    dcp.load(state, storage_reader=MetadataSafeReader(str(src)), no_dist=True)
    return {peft_name(model, k.removeprefix("model.")): v for k, v in state.items()}, record


def merge_adapters(src: Path, dst: Path, base: Path | None = None) -> Path:
    """`trntrain convert SRC DST --merge [--base DIR]`: the merged full model. Returns
    the base directory the adapters were merged into."""
    kind, directory = resolve_source(src)
    if kind == "dcp":
        adapters, record = dcp_adapters(directory)
        base = base or (Path(record["init_from"]) if record.get("init_from") else None)
        scaling = record["alpha"] / record["rank"]
        if base is None:
            raise UserError(f"convert --merge: {directory} was trained on a random base "
                            f"(peft.allow_random_base), which has no files; valid: --base DIR.")
        if base_fingerprint(str(base), 0) != record["base_sha256"]:
            raise UserError(f"convert --merge: {base} is not the base {directory}'s adapters "
                            f"were trained on (fingerprints differ); valid: --base naming it.")
    elif kind == "peft":
        config, adapters = read_adapter(directory)
        named = config.get("base_model_name_or_path")
        base = base or (Path(named) if named else None)
        scaling = config["lora_alpha"] / config["r"]
        if base is None or not base.is_dir():
            raise UserError(f"convert --merge: the base of {directory} ({named!r}) is not a "
                            f"local directory; valid: --base DIR.")
    else:
        raise UserError(f"convert --merge: {src} holds no LoRA adapters; valid: a LoRA run's "
                        f"directory or checkpoint, or a PEFT adapter directory.")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"convert: {dst} exists and is not empty; valid: a new directory.")
    model, tensors = base_tensors(base)
    merged = merge(tensors, adapters, scaling)
    write_hf(dst, {"model.safetensors": merged}, model, next(iter(merged.values())).dtype)
    return base

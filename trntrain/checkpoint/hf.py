"""Hugging Face checkpoints: safetensors with HF names plus config.json, named and
configured by the model family's adapter (`ModelFamily.hf`).

Export (checkpoint=hf, `trntrain convert`): one safetensors file per pipeline
stage, written by that stage's first tp and dp rank after gathering its tp
shards, an index when there are several, and `config.json` for `transformers`
(`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...). Import (`checkpoint.init_from=DIR`):
every rank reads, lazily, only the slices of the tensors it holds. Weights only: a run
cannot resume from it (use dcp). A LoRA run exports its adapters instead, as a PEFT
adapter directory (`trntrain.peft.hf`), and its import skips them (they start as
initialised: B zero).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from trntrain.checkpoint import Checkpointer
from trntrain.distributed import barrier
from trntrain.errors import UserError
from trntrain.models import family_of
from trntrain.parallel.comm import all_gather_dim
from trntrain.peft import is_adapter

if TYPE_CHECKING:
    from trntrain.checkpoint import States
    from trntrain.checkpoint.state import ModelState

INDEX = "model.safetensors.index.json"
def full_tensors(train: ModelState) -> dict[str, torch.Tensor]:
    """This rank's parameters with tp shards gathered, under their HF names (collective
    over the tp group)."""
    out = {}
    tied = train.model_cfg.tie_embeddings
    to_hf_name = family_of(train.model_cfg).hf.to_hf_name
    for chunk in train.chunks.values():
        for name, p in chunk.named_parameters():
            if tied and name == "output.weight":
                continue  # HF ties lm_head to the embedding
            tensor = p.detach()
            if hasattr(p, "tp_shard"):
                tensor = all_gather_dim(tensor, p.tp_shard[0], train.mesh.tp_group)
            out[to_hf_name(name)] = tensor.cpu().contiguous()
    return out


def write_hf(directory: Path, tensors_by_file: dict[str, dict[str, torch.Tensor]],
             model: DictConfig, dtype: torch.dtype) -> None:
    """Safetensors files, their index when several, and config.json (one process)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for filename, tensors in tensors_by_file.items():
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
    write_hf_metadata(directory, weight_map, model, dtype)


def write_hf_metadata(directory: Path, weight_map: dict[str, str], model: DictConfig,
                      dtype: torch.dtype, metadata: dict[str, Any] | None = None) -> None:
    """config.json, and the index (tensor name -> file) when the tensors span several files."""
    if len(set(weight_map.values())) > 1:
        (directory / INDEX).write_text(
            json.dumps({"metadata": metadata or {}, "weight_map": weight_map}, indent=1))
    config = family_of(model).hf.hf_config(model, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=1))


def save_adapter(directory: Path, states: States) -> None:
    """A LoRA run's adapters as a PEFT adapter directory: each pipeline stage's first tp
    and dp rank writes its gathered adapters, the first rank joins them into
    adapter_model.safetensors and writes adapter_config.json."""
    from safetensors.torch import load_file, save_file

    from trntrain.peft.hf import adapter_config, peft_name, write_adapter
    from trntrain.peft.lora import LoRALinear

    train = states["model"]
    mesh, cfg = train.mesh, train.model_cfg
    tensors, targets = {}, set()
    for chunk in train.chunks.values():
        for name, module in chunk.named_modules():
            if isinstance(module, LoRALinear):
                targets.add(peft_name(cfg, f"{name}.lora_A").split(".")[-3])
        for name, p in chunk.named_parameters():
            if is_adapter(name):
                tensor = p.detach()
                if hasattr(p, "tp_shard"):
                    tensor = all_gather_dim(tensor, p.tp_shard[0], mesh.tp_group)
                tensors[peft_name(cfg, name)] = tensor.float().cpu().contiguous()
    part = directory / f"adapter-stage-{mesh.pp_rank:05d}.safetensors"
    if mesh.tp_rank == 0 and mesh.dp_rank == 0 and mesh.cp_rank == 0:
        save_file(tensors, str(part), metadata={"targets": ",".join(sorted(targets))})
    barrier()  # over gloo: an xla group's barrier returns at once
    if not dist.is_initialized() or dist.get_rank() == 0:
        from safetensors import safe_open

        joined, all_targets = {}, set()
        for path in sorted(directory.glob("adapter-stage-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                all_targets.update(filter(None, f.metadata()["targets"].split(",")))
            joined.update(load_file(str(path)))
            path.unlink()
        peft = states["peft"]
        write_adapter(directory, joined,
                      adapter_config(cfg, train.peft, peft.init_from, sorted(all_targets)))
    barrier()


class HfCheckpointer(Checkpointer):
    resumable = False

    def save(self, directory: Path, states: States) -> None:
        """Synchronous whatever checkpoint.async says: the gathers are collectives."""
        from safetensors.torch import save_file

        if states["model"].peft is not None:
            save_adapter(directory, states)
            return
        train, step = states["model"], states["trainer"].step
        tensors = full_tensors(train)
        mesh, stages = train.mesh, train.mesh.dims.pp
        # Expert parallelism: each rank of the first ep group writes its own experts
        # (the first also the rest), a file per (stage, ep rank).
        ep = mesh.dims.ep
        if mesh.dp_rank % ep:
            tensors = {k: v for k, v in tensors.items() if ".experts." in k}
        files, index = stages * ep, mesh.pp_rank * ep + mesh.dp_rank % ep
        name = ("model.safetensors" if files == 1
                else f"model-{index + 1:05d}-of-{files:05d}.safetensors")
        if mesh.tp_rank == 0 and mesh.cp_rank == 0 and mesh.dp_rank < ep:
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
        barrier()  # over gloo: an xla group's barrier returns at once
        if not dist.is_initialized() or dist.get_rank() == 0:
            from safetensors import safe_open

            weight_map = {}
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), path.name))
            dtype = next(p for c in train.chunks.values() for p in c.parameters()).dtype
            write_hf_metadata(directory, weight_map, train.model_cfg, dtype, {"step": step})

    def load(self, directory: Path, states: States) -> None:
        model = states["model"]
        load_hf_weights(directory, model.chunks.values(), model.model_cfg)


def hf_files(directory: Path, source: str | None = None) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it; `source` names the directory in
    errors (default: as checkpoint.init_from)."""
    index = directory / INDEX
    if index.is_file():
        return index_files(index)
    single = directory / "model.safetensors"
    if not single.is_file():
        source = source or f"checkpoint.init_from={str(directory)!r}"
        raise UserError(f"{source} holds neither "
                        f"model.safetensors nor {INDEX}; valid: a Hugging Face model "
                        f"directory with safetensors weights.")
    with safetensors_file(single) as f:
        return dict.fromkeys(f.keys(), single)


def index_files(index: Path) -> dict[str, Path]:
    """The weight map of a safetensors index, each file checked to be a .safetensors file
    beside it (UserError naming the index otherwise)."""
    damaged = (f"{index} is not a safetensors index; valid: JSON with a 'weight_map' of "
               f"tensor names to .safetensors files in the same directory")
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{damaged}.") from None
    if not isinstance(weight_map, dict):
        raise UserError(f"{damaged}.")
    files = {}
    for name, file in weight_map.items():
        path = index.parent / str(file)
        if not (isinstance(file, str) and file.endswith(".safetensors")
                and path.resolve().parent == index.parent.resolve()):
            raise UserError(f"{damaged}: it names {file!r} for {name!r}.")
        files[name] = path
    return files


@contextmanager
def safetensors_file(path: Path) -> Iterator[Any]:
    """safe_open of `path`; an unreadable, truncated or foreign file (on opening or on
    reading a tensor inside the block) is one UserError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); valid: the "
                        f"file as a Hugging Face checkpoint holds it, complete.") from None


@contextmanager
def hf_tensor(files: dict[str, Path], name: str, shape: Iterable[int], model_cfg: DictConfig,
              source: str, model: str, fix: str) -> Iterator[Any]:
    """The lazy safetensors view (index it to read) of the HF tensor that holds trntrain
    parameter `name` of a `model_cfg` model (named by its family's adapter), the
    embedding for the lm_head of a tied model saved without one. UserError when it is
    missing or its shape is not `shape`: `source` names the directory, `model` the
    model it should fit and `fix` what makes the shapes agree."""
    to_hf_name = family_of(model_cfg).hf.to_hf_name
    hf_name = to_hf_name(name)
    if hf_name not in files and model_cfg.tie_embeddings and name == "output.weight":
        hf_name = to_hf_name("tok_embeddings.weight")
    if hf_name not in files:
        raise UserError(f"{source} has no tensor {hf_name!r} (for {name}); valid: a Hugging "
                        f"Face checkpoint of {model}.")
    with safetensors_file(files[hf_name]) as f:
        view = f.get_slice(hf_name)
        found, expected = list(view.get_shape()), list(shape)
        if found != expected:
            raise UserError(f"{files[hf_name]}: {hf_name} has shape {found} but {model} "
                            f"needs {expected}; valid: {fix}.")
        yield view


@torch.no_grad()
def load_hf_weights(directory: Path, chunks: Iterable[nn.Module], model_cfg: DictConfig
                    ) -> None:
    """Set this rank's parameters (its tp slices) from a Hugging Face directory."""
    if not directory.is_dir():
        raise UserError(f"checkpoint.init_from={str(directory)!r} is not a directory; valid: "
                        f"a Hugging Face model directory (config.json, *.safetensors).")
    files = hf_files(directory)
    for chunk in chunks:
        for name, p in chunk.named_parameters(remove_duplicate=False):
            if is_adapter(name):
                continue  # a LoRA run's adapters start as initialised
            full_shape = tuple(getattr(p, "tp_full_shape", p.shape))
            index = [slice(None)] * len(full_shape)
            if hasattr(p, "tp_shard"):
                dim, start, length = p.tp_shard
                index[dim] = slice(start, start + length)
            with hf_tensor(files, name, full_shape, model_cfg,
                           f"checkpoint.init_from={str(directory)!r}", "the configured model",
                           "model.* settings matching the checkpoint's config.json") as view:
                values = view[tuple(index)]
            p.copy_(values.to(p.dtype))

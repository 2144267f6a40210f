"""LoRA adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`
with PEFT's tensor names (`base_model.model.<HF module>.lora_A.weight`), which
`peft.PeftModel.from_pretrained` loads onto the Hugging Face base; and the merge of
adapters into the base weights (W + alpha / r * B A)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from trntrain.errors import UserError
from trntrain.peft.lora import hf_module_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_name(model_cfg: DictConfig, name: str) -> str:
    """`layers.0.attention.wq.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj
    .lora_A.weight`."""
    module, which = name.rsplit(".", 1)
    return f"{PREFIX}{hf_module_name(model_cfg, module)}.{which}.weight"


def adapter_config(model_cfg: DictConfig, peft: DictConfig, base: str | None,
                   targets: list[str]) -> dict[str, Any]:
    """adapter_config.json of a LoRA run (PEFT's LoraConfig keys)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": peft.rank, "lora_alpha": peft.alpha, "lora_dropout": peft.dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
                  ) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the adapter tensors of a PEFT LoRA directory."""
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_bytes())
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise UserError(f"{directory} is not a readable PEFT adapter directory ({err}); valid: "
                        f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} as PEFT writes them.") from None
    if config.get("peft_type") != "LORA" or config.get("use_rslora"):
        raise UserError(f"{directory / ADAPTER_CONFIG}: peft_type={config.get('peft_type')!r}, "
                        f"use_rslora={config.get('use_rslora')!r}; valid: a plain LoRA adapter.")
    return config, tensors


@torch.no_grad()
def merge(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scaling: float
          ) -> dict[str, torch.Tensor]:
    """The base's tensors (HF names) with every adapter's B A (PEFT names) added, scaled,
    in fp32 and returned in each weight's own dtype."""
    merged = dict(base)
    for key, a in adapters.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = adapters[f"{PREFIX}{module}.lora_B.weight"]
        name = f"{module}.weight"
        if name not in merged:
            raise UserError(f"the adapter {key} has no base weight {name}; valid: the base "
                            f"model the adapters were trained on.")
        w = merged[name]
        merged[name] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return merged

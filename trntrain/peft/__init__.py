"""Parameter-efficient fine-tuning: LoRA adapters over the tp layers (`lora.py`), the
frozen base they belong to (`base.py`), and the PEFT-format adapter directory and merge
(`hf.py`)."""

from __future__ import annotations

from trntrain.peft.lora import (
    LoRALinear,
    adapter_names,
    adapters_disabled,
    apply_lora,
    init_adapters,
    is_adapter,
    lora_enabled,
)

__all__ = ["LoRALinear", "adapter_names", "adapters_disabled", "apply_lora", "init_adapters",
           "is_adapter", "lora_enabled"]

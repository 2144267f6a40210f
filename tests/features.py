"""The single-process features every backend is checked on against eager CPU (XLA:CPU in
tests/xla/test_xla_features.py, CUDA in tests/gpu/parity.py): overrides by name."""

from __future__ import annotations

FP32_FEATURES: dict[str, list[str]] = {
    "checkpointing_full": ["parallel.activation_checkpointing=full"],
    "checkpointing_selective": ["parallel.activation_checkpointing=selective"],
    "accumulation_4_micro_batches": ["train.micro_batch_size=2"],
    "zero1_code_path_dp1": ["parallel.zero1=true"],
    # Chat SFT: whole conversations packed per row, block-diagonal attention, positions
    # restarting per conversation, loss on the assistant's tokens.
    "chat_sft_packed": ["data=chat", "train.seq_len=128"],
    "document_masking_pretraining": ["data.document_masking=true"],
    # LoRA on a frozen (seeded random) base; with full checkpointing, XLA's reentrant
    # checkpoint back-propagates into the first block's adapters only because the frozen
    # embedding's output is made to require a gradient.
    "lora": ["peft=lora", "peft.allow_random_base=true", "optim.lr=3e-3"],
    "lora_checkpointing_full": ["peft=lora", "peft.allow_random_base=true", "optim.lr=3e-3",
                                "parallel.activation_checkpointing=full"],
}

BF16_FEATURES: dict[str, list[str]] = {
    "bf16_master_weights": ["train.precision=bf16"],
    # Round-to-nearest: stochastic rounding is the optimizer's on cpu (its own generator
    # per device) and the runtime's on neuron, refused on xla.
    "bf16_pure": ["train.precision=bf16", "train.master_weights=false",
                  "train.stochastic_rounding=false"],
    "bf16_autocast": ["train.precision=bf16_autocast"],
    "bf16_checkpointing_fp32_accumulation": [
        "train.precision=bf16", "parallel.activation_checkpointing=full",
        "train.fp32_grad_accumulation=true", "train.micro_batch_size=4"],
}

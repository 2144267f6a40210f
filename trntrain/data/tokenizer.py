"""The built-in byte-level tokenizer: token i < 256 is byte i, 256 ends a document."""

from __future__ import annotations

import torch


class ByteTokenizer:
    vocab_size = 257
    eot_id = 256

    def encode(self, data: bytes | str) -> torch.Tensor:
        """Token ids (int16) of `data`, without an end-of-text token."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.int16)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16)

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

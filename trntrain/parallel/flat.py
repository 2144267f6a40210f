"""Tensors packed into one flat buffer for a single collective, and views back into it."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def pack(tensors: list[torch.Tensor], dtype: torch.dtype | None = None,
         numel: int | None = None) -> torch.Tensor:
    """The tensors one after another in a new 1-D tensor of `dtype` (theirs by default),
    zero-padded to `numel` elements where given (a length the collective divides)."""
    dtype = dtype or tensors[0].dtype
    pieces = [t.reshape(-1).to(dtype) for t in tensors]
    if numel is None:
        return torch.cat(pieces)
    flat = torch.zeros(numel, dtype=dtype, device=tensors[0].device)
    torch.cat(pieces, out=flat[:sum(p.numel() for p in pieces)])
    return flat


def unpack(flat: torch.Tensor, like: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Views of `flat` shaped as each of `like` in turn: the inverse of pack."""
    offset = 0
    for t in like:
        yield flat[offset:offset + t.numel()].view_as(t)
        offset += t.numel()

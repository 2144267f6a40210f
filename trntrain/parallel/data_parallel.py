"""Data parallelism: average gradients over the dp group in flat buckets.

One all-reduce per bucket rather than per parameter: a small collective costs
about as much as a large one on gloo and on EFA, so few large ones win.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def gradient_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters grouped up to `bucket_bytes` each, one dtype per bucket."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if buckets and size + nbytes <= bucket_bytes and buckets[-1][0].dtype == p.dtype:
            buckets[-1].append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


class GradientAverager:
    """Averages .grad of `model`'s parameters over `group` after gradient accumulation."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None, bucket_mb: float) -> None:
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        # Reverse order: the last layers' gradients are ready first, should overlap come.
        params = [p for p in model.parameters() if p.requires_grad][::-1]
        self.buckets = gradient_buckets(params, int(bucket_mb * 2**20))

    @torch.no_grad()
    def all_reduce(self) -> None:
        if self.size == 1:
            return
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.size)
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for p, g in zip(bucket, grads, strict=True):
                n = g.numel()
                p.grad = flat[offset:offset + n].view_as(g)
                offset += n

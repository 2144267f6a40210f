"""Memory per rank, measured: parameters, gradients, optimizer state, activations.

The static parts are sums over tensors; activations are the tensors autograd
saves for backward, counted once per storage while they are alive, through
`torch.autograd.graph.saved_tensors_hooks` (the same on every device, exact for
what a step keeps, blind to transient buffers inside kernels).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (moments; not steps)."""
    return sum(tensor_bytes(v for v in state.values()
                            if isinstance(v, torch.Tensor) and v.ndim > 0)
               for state in optimizer.state.values())


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class ActivationMemory:
    """Within the context, the live and peak bytes of tensors saved for backward
    (parameters excluded; a storage saved by several operations counted once)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._refs: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        holder = _Saved(tensor)
        # A view of a weight (the transpose a matmul saves) holds the weight's storage:
        # not an activation either.
        if (isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
                or tensor.device.type == "meta"):
            return holder
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if self._refs.get(key, 0) == 0:
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self._refs[key] = self._refs.get(key, 0) + 1
        weakref.finalize(holder, self._release, key, storage.nbytes())
        return holder

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= nbytes

    @staticmethod
    def _unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor

    def __enter__(self) -> ActivationMemory:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def static_memory(params: list[nn.Parameter], optimizer_bytes: int,
                  frozen: list[nn.Parameter] = ()) -> dict[str, int]:
    """Bytes of parameters (the trained and the `frozen` ones), of the trained ones'
    gradients (one per parameter, as during backward) and of the optimizer state on
    this rank."""
    return {
        "params": tensor_bytes(params) + tensor_bytes(frozen),
        "grads": tensor_bytes(params),
        "optimizer": optimizer_bytes,
    }

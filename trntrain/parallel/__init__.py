"""Parallelism over torch.distributed collectives: the rank mesh, tensor and
sequence parallel layers, and gradient reduction over tp and dp."""

from trntrain.parallel.gradients import GradientReducer, clip_grad_norm_, gradient_buckets
from trntrain.parallel.mesh import Mesh, ParallelDims, build_mesh

__all__ = [
    "GradientReducer",
    "Mesh",
    "ParallelDims",
    "build_mesh",
    "clip_grad_norm_",
    "gradient_buckets",
]

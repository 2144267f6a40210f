"""Parallelism over torch.distributed collectives: the rank mesh and data parallelism."""

from trntrain.parallel.data_parallel import GradientAverager, gradient_buckets
from trntrain.parallel.mesh import Mesh, ParallelDims, build_mesh

__all__ = ["GradientAverager", "Mesh", "ParallelDims", "build_mesh", "gradient_buckets"]

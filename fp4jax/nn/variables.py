"""Variable types that tag NVFP4 leaves, so they can be filtered in a model."""

from flax import nnx


class NVFP4Param(nnx.Param):
  """A leaf of an NVFP4 layer: packed weights, scales, or derived factors."""

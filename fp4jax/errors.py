"""Exceptions fp4jax raises for bad input. All are ValueError subclasses."""


class NVFP4Error(ValueError):
  """Base class: input that is not valid NVFP4 data."""


class CheckpointError(NVFP4Error):
  """A checkpoint file, tensor or config is malformed; the message names it."""


class TransformError(NVFP4Error):
  """A param tree cannot be prepared (missing or inconsistent leaves)."""

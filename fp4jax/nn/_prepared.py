"""Shared state handling for modules that hold NVFP4 leaves."""

from flax import nnx

from fp4jax.nn import variables


class NotPreparedError(RuntimeError):
  """A module holding source NVFP4 leaves was called before prepare."""


class NVFP4Leaves(nnx.Module):
  """Base for modules whose NVFP4Param leaves `fp4jax.transform` rewrites.

  After a restore the module holds checkpoint (source) leaves; after
  `prepare_model` it holds the prepared ones. `prepared` says which.
  """

  prepared: bool = False
  # (mesh, kind, axis) once prepared shard by shard (fp4jax.sharding);
  # None runs on one device.
  parallel: tuple | None = None

  def nvfp4_leaves(self) -> dict:
    """The module's NVFP4 leaves as a plain dict of arrays."""
    return nnx.to_pure_dict(nnx.state(self, variables.NVFP4Param))

  def replace_nvfp4_leaves(self, leaves: dict) -> None:
    """Swaps in a new leaf set (from `prepare`), dropping absent leaves."""
    held = self.nvfp4_leaves()
    for name in held:
      if name not in leaves:
        delattr(self, name)
    for name, value in leaves.items():
      if name in held:
        getattr(self, name).set_value(value)
      else:
        setattr(self, name, variables.NVFP4Param(value))
    self.prepared = True

  def require_prepared(self) -> dict:
    if not self.prepared:
      raise NotPreparedError(
        f"{type(self).__name__} holds checkpoint (source) leaves"
        f" {sorted(self.nvfp4_leaves())}; call fp4jax.prepare_model(model)"
        " once after restoring weights"
      )
    return self.nvfp4_leaves()

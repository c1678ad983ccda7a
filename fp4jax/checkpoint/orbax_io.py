"""Saves and restores param trees with Orbax, through abstract trees.

Restoring from ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape``)
places each array straight onto its target sharding, so a sharded model never
materialises on one device. Packed uint8, float8_e4m3fn block scales, bf16
and float32 scalars round-trip bit for bit.
"""

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from fp4jax import errors

CheckpointError = errors.CheckpointError
PathLike = str | os.PathLike


def _absolute(path: PathLike) -> pathlib.Path:
  # Orbax (etils.epath) needs absolute paths.
  return pathlib.Path(path).expanduser().absolute()


def save_params(path: PathLike, params: Any) -> None:
  """Writes a param tree as an Orbax checkpoint and waits for it to finish.

  Args:
    path: checkpoint directory; must not exist yet.
    params: pytree (nested dicts) of ``jax.Array`` or numpy leaves.

  Raises:
    CheckpointError: the directory already exists.
  """
  path = _absolute(path)
  if path.exists():
    raise CheckpointError(f"{path}: already exists; not overwriting")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()


def _stored_tree(checkpointer: ocp.StandardCheckpointer, path: pathlib.Path):
  """The checkpoint's own tree as ShapeDtypeStructs, without reading data."""
  metadata = checkpointer.metadata(path).item_metadata
  if metadata is None:
    raise CheckpointError(f"{path}: no tree metadata")
  return jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata.tree
  )


def _place(abstract: Any, sharding: Any) -> Any:
  """Gives every abstract leaf a sharding (the restore target placement)."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def leaf(x, s=None):
    if s is None and isinstance(x, (jax.ShapeDtypeStruct, jax.Array)):
      s = x.sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s or default)

  if sharding is None:
    return jax.tree.map(leaf, abstract)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: leaf(x, sharding), abstract)
  try:
    return jax.tree.map(leaf, abstract, sharding)
  except ValueError as e:
    raise ValueError(
      f"sharding must be one Sharding or a tree like the params: {e}"
    ) from e


def restore_params(
  path: PathLike, *, abstract_params: Any = None, sharding: Any = None
) -> Any:
  """Restores a param tree written by `save_params`.

  Args:
    path: checkpoint directory.
    abstract_params: the expected tree, with ``jax.ShapeDtypeStruct`` (or
      array) leaves, e.g. ``jax.eval_shape(init)``; leaf shardings are used
      when ``sharding`` is None. If None, the tree stored in the checkpoint's
      metadata is used.
    sharding: one ``jax.sharding.Sharding`` for every leaf, or a tree of
      them shaped like the params. Leaves without one go to the first
      device.

  Returns:
    The params, with ``jax.Array`` leaves placed on their shardings.

  Raises:
    CheckpointError: the checkpoint is missing or does not match
      ``abstract_params``.
  """
  path = _absolute(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: no such checkpoint directory")
  with ocp.StandardCheckpointer() as checkpointer:
    if abstract_params is None:
      abstract_params = _stored_tree(checkpointer, path)
    target = _place(abstract_params, sharding)
    try:
      return checkpointer.restore(path, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{path}: cannot restore: {e}") from e

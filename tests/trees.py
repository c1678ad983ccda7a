"""Tree comparisons shared by the tests."""

import jax
import numpy as np


def assert_bit_equal(expected, actual, *, device_arrays: bool = False):
  """Same structure, dtypes, shapes and bytes; optionally jax.Array leaves."""
  assert jax.tree.structure(expected) == jax.tree.structure(actual)
  for (path, want), got in zip(
    jax.tree_util.tree_leaves_with_path(expected),
    jax.tree.leaves(actual),
    strict=True,
  ):
    where = jax.tree_util.keystr(path)
    if device_arrays:
      assert isinstance(got, jax.Array), where
    want, got = np.asarray(want), np.asarray(got)
    assert (got.dtype, got.shape) == (want.dtype, want.shape), where
    assert got.tobytes() == want.tobytes(), where

"""The 128x4 block-scale swizzle against its closed-form byte offset."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from fp4jax.format import swizzle
from tests import numpy_reference as ref


@settings(max_examples=40)
@given(
  rows=st.integers(1, 300), cols=st.integers(1, 20), batch=st.integers(0, 2)
)
def test_swizzle_matches_closed_form_and_inverts(rows, cols, batch):
  lead = (2,) * batch
  size = int(np.prod(lead, dtype=int)) * rows * cols
  # Distinct nonzero values (as int16) make the placement check exact.
  s = (np.arange(size, dtype=np.int32) % 30000 + 1).astype(np.int16)
  s = s.reshape(*lead, rows, cols)
  out = np.asarray(swizzle.swizzle_block_scale(jnp.asarray(s)))
  rows_p, cols_p = swizzle.padded_shape(rows, cols)
  assert out.shape == (*lead, rows_p, cols_p)
  flat = out.reshape(*lead, -1)
  offsets = ref.swizzle_offsets(rows, cols)
  np.testing.assert_array_equal(flat[..., offsets], s)
  # Every other byte is padding, and padding is zero.
  mask = np.ones(rows_p * cols_p, bool)
  mask[offsets.ravel()] = False
  assert not flat[..., mask].any()
  np.testing.assert_array_equal(
    np.asarray(swizzle.unswizzle_block_scale(jnp.asarray(out), rows, cols)), s
  )
  np.testing.assert_array_equal(swizzle.offset_table(rows, cols), offsets)


def test_swizzle_is_a_bijection_on_aligned_shapes():
  rows, cols = 256, 8
  offsets = ref.swizzle_offsets(rows, cols).ravel()
  assert sorted(offsets) == list(range(rows * cols))


def test_swizzle_keeps_float8_bytes():
  rng = np.random.default_rng(0)
  s = rng.uniform(0.01, 400, (130, 6)).astype(ml_dtypes.float8_e4m3fn)
  out = swizzle.swizzle_block_scale(jnp.asarray(s))
  assert out.dtype == jnp.float8_e4m3fn
  back = swizzle.unswizzle_block_scale(out, 130, 6)
  np.testing.assert_array_equal(
    np.asarray(back).view(np.uint8), s.view(np.uint8)
  )


def test_unswizzle_rejects_wrong_shape():
  with pytest.raises(ValueError, match="does not hold"):
    swizzle.unswizzle_block_scale(jnp.zeros((128, 4)), 129, 4)

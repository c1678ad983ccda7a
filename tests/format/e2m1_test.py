"""E2M1 codes: golden values, rounding, packing."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fp4jax.format import e2m1
from tests import numpy_reference as ref


def test_decode_all_16_codes():
  codes = jnp.arange(16, dtype=jnp.uint8)
  got = np.asarray(e2m1.decode(codes))
  want = [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]
  np.testing.assert_array_equal(got, np.array(want, np.float32))
  # ModelOpt decodes code 8 to +0.0, not -0.0.
  assert not np.signbit(got[8])


def test_encode_golden_ties_and_saturation():
  x = np.array(
    [
      0.25,
      0.75,
      1.25,
      1.75,
      2.5,
      3.5,
      5.0,
      5.01,
      7.0,
      1e9,
      0.2499,
      0.2501,
      -0.25,
      -0.26,
      -0.1,
      0.0,
      -0.0,
      -5.0,
      -6.5,
    ],
    np.float32,
  )
  want = [0, 2, 2, 4, 4, 6, 6, 7, 7, 7, 0, 1, 8, 9, 8, 0, 0, 14, 15]
  np.testing.assert_array_equal(np.asarray(e2m1.encode(jnp.asarray(x))), want)


def test_encode_matches_modelopt_cast_on_dense_grid():
  x = np.linspace(-8, 8, 64001, dtype=np.float32)
  np.testing.assert_array_equal(
    np.asarray(e2m1.encode(jnp.asarray(x))), ref.cast_fp4(x)
  )


def test_round_to_values_is_decode_of_encode():
  x = np.concatenate(
    [
      np.linspace(-8, 8, 64001, dtype=np.float32),
      np.array(
        [0.25, 0.75, 1.75, 3.5, 5.0, -0.1, -0.0, 1e9, np.nan], np.float32
      ),
    ]
  )
  got = np.asarray(e2m1.round_to_values(jnp.asarray(x)))
  want = np.asarray(e2m1.decode(e2m1.encode(jnp.asarray(x))))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_encode_decode_is_identity_on_representable_values():
  values = e2m1.E2M1_VALUES
  codes = np.asarray(e2m1.encode(jnp.asarray(values)))
  np.testing.assert_array_equal(e2m1.E2M1_VALUES[codes], values)


def test_pack_puts_even_element_in_low_nibble():
  codes = jnp.array([[1, 2, 15, 8]], jnp.uint8)
  np.testing.assert_array_equal(np.asarray(e2m1.pack(codes)), [[0x21, 0x8F]])


# Each new shape compiles pack and unpack again (~0.35 s a shape on CPU).
@settings(max_examples=20)
@given(
  hnp.arrays(
    np.uint8,
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=16).map(
      lambda s: (*s[:-1], 2 * s[-1])
    ),
    elements=st.integers(0, 15),
  )
)
def test_pack_unpack_round_trip(codes):
  packed = e2m1.pack(jnp.asarray(codes))
  np.testing.assert_array_equal(np.asarray(packed), ref.pack(codes))
  np.testing.assert_array_equal(np.asarray(e2m1.unpack(packed)), codes)

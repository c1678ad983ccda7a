"""The pure-jnp reference ("xla") on the shared suite, and API dispatch."""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from tests.pallas_kernels.nvfp4_matmul import test_base


class TestReference(test_base.NVFP4MatmulTestBase):
  IMPLEMENTATION = "xla"
  # The reference accumulates in f32 at HIGHEST precision: only the bf16
  # output rounding remains.
  RTOL = 2.0**-8


class TestDefaultDispatch(test_base.NVFP4MatmulTestBase):
  IMPLEMENTATION = None


def test_unknown_implementation_is_an_error(rng):
  layer, _ = test_base.make_layer(rng, 32, 32)
  with pytest.raises(ValueError, match="implementation"):
    pallas_kernels.nvfp4_matmul(
      jnp.ones((1, 32), jnp.bfloat16), layer, implementation="cuda"
    )


def test_default_matches_reference_bit_for_bit(rng):
  layer, _ = test_base.make_layer(rng, 64, 64)
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
  a = pallas_kernels.nvfp4_matmul(x, layer)
  b = pallas_kernels.nvfp4_matmul(x, layer, implementation="xla")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""quantize / dequantize / quantize_activation against independent numpy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import fp4jax
from fp4jax.format import nvfp4
from tests import numpy_reference as ref


def hard_weights(rng: np.random.Generator, n=64, k=128) -> np.ndarray:
  """bf16 weights with the cases that break sloppy quantizers."""
  w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
  w[3] *= 100  # outlier row
  w[5, 16:32] = 0  # all-zero block
  w[6] = 0  # all-zero row
  w[7, :16] = rng.standard_normal(16) * 1e-9  # scale clamps at 2**-9
  w[8, :16] = rng.standard_normal(16) * 1e-5  # subnormal E4M3 scales
  w[9, :16] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6] * 2) * 0.01
  w[10, :16] = -w[9, :16]
  return w.astype(ml_dtypes.bfloat16)


def assert_quantized_equal(t: fp4jax.NVFP4Tensor, packed, sf, gs):
  np.testing.assert_array_equal(np.asarray(t.packed), packed)
  np.testing.assert_array_equal(
    np.asarray(t.block_scale).view(np.uint8), sf.view(np.uint8)
  )
  np.testing.assert_array_equal(np.asarray(t.global_scale), gs)


def test_quantize_matches_modelopt_formula_bit_for_bit(rng):
  w = hard_weights(rng)
  t = fp4jax.quantize(jnp.asarray(w))
  assert_quantized_equal(t, *ref.quantize(w.astype(np.float32)))


def test_quantize_under_jit_matches_eager(rng):
  w = jnp.asarray(hard_weights(rng))
  eager = fp4jax.quantize(w)
  jitted = jax.jit(fp4jax.quantize)(w)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_array_equal(
      np.asarray(a).reshape(-1).view(np.uint8),
      np.asarray(b).reshape(-1).view(np.uint8),
    )


def test_quantize_with_given_global_scale(rng):
  w = hard_weights(rng).astype(np.float32)
  gs = np.float32(np.abs(w).max() / 2688 * rng.uniform(1.0, 3.0))
  t = fp4jax.quantize(jnp.asarray(w), global_scale=gs)
  assert_quantized_equal(t, *ref.quantize(w, gs))


def test_quantize_stacked_matrices_have_one_global_scale_each(rng):
  w = rng.standard_normal((3, 32, 64)).astype(np.float32)
  w[1] *= 10
  t = fp4jax.quantize(jnp.asarray(w))
  assert t.global_scale.shape == (3,)
  for e in range(3):
    one = fp4jax.NVFP4Tensor(t.packed[e], t.block_scale[e], t.global_scale[e])
    assert_quantized_equal(one, *ref.quantize(w[e]))


def test_dequantize_matches_modelopt_formula_bit_for_bit(rng):
  w = hard_weights(rng).astype(np.float32)
  t = fp4jax.quantize(jnp.asarray(w))
  want = ref.dequantize(*ref.quantize(w))
  np.testing.assert_array_equal(np.asarray(fp4jax.dequantize(t)), want)


@settings(max_examples=25)
@given(log_scale=st.floats(-12, 12), seed=st.integers(0, 2**32 - 1))
def test_dequantize_error_is_within_one_step(log_scale, seed):
  # Round-to-nearest moves a value by at most half an E2M1 gap (<= 1 unit
  # of sf * gs); saturation after the E4M3 rounding of sf moves it by less.
  w = np.random.default_rng(seed).standard_normal((24, 80))
  w = (w * 2.0**log_scale).astype(np.float32)
  t = fp4jax.quantize(jnp.asarray(w))
  err = np.abs(np.asarray(fp4jax.dequantize(t)) - w)
  unit = np.asarray(t.block_scale).astype(np.float32) * np.asarray(
    t.global_scale
  )
  bound = np.repeat(unit, 16, axis=-1) * (1 + 1e-6)
  assert np.all(np.isfinite(err))
  assert np.all(err <= np.maximum(bound, np.abs(w)))


def test_all_zero_block_gets_scale_one_and_zero_codes():
  w = np.zeros((1, 32), np.float32)
  w[0, 16:] = 1.0
  t = fp4jax.quantize(jnp.asarray(w))
  sf = np.asarray(t.block_scale).astype(np.float32)
  assert sf[0, 0] == 1.0
  assert not np.asarray(t.packed)[0, :8].any()


def test_quantize_rejects_bad_input():
  with pytest.raises(fp4jax.NVFP4Error, match="multiple of 16"):
    fp4jax.quantize(jnp.ones((4, 24)))
  with pytest.raises(fp4jax.NVFP4Error, match="NaN or inf"):
    fp4jax.quantize(jnp.full((4, 16), jnp.nan))
  with pytest.raises(fp4jax.NVFP4Error, match="N, K"):
    fp4jax.quantize(jnp.ones((16,)))


def test_global_scale_from_amax_is_true_division(rng):
  amax = rng.uniform(1e-3, 1e3, 4096).astype(np.float32)
  got = np.asarray(jax.jit(nvfp4.global_scale_from_amax)(jnp.asarray(amax)))
  np.testing.assert_array_equal(got, amax / np.float32(2688))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_quantize_activation_matches_sglang_semantics(rng, dtype):
  x = rng.standard_normal((33, 96)).astype(np.float32) * 3
  x[2, :16] = 0  # zero block: scale 0, codes 0
  x[4] *= 1000  # beyond the calibrated range: scales saturate, values clip
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  inv = np.float32(2688.0 / 20.0)
  packed, sf = nvfp4.quantize_activation(jnp.asarray(x, dtype), inv)
  want_packed, want_sf = ref.quantize_activation(x, inv)
  np.testing.assert_array_equal(np.asarray(packed), want_packed)
  np.testing.assert_array_equal(
    np.asarray(sf).view(np.uint8), want_sf.view(np.uint8)
  )
  sf32 = np.asarray(sf).astype(np.float32)
  assert sf32[2, 0] == 0 and not np.asarray(packed)[2, :8].any()
  assert sf32[4].max() == 448.0


def test_quantize_activation_per_row_scales(rng):
  x = rng.standard_normal((8, 32)).astype(np.float32)
  inv = rng.uniform(10, 1000, 8).astype(np.float32)
  packed, sf = nvfp4.quantize_activation(jnp.asarray(x), jnp.asarray(inv))
  want_packed, want_sf = ref.quantize_activation(x, inv)
  np.testing.assert_array_equal(np.asarray(packed), want_packed)
  np.testing.assert_array_equal(
    np.asarray(sf).view(np.uint8), want_sf.view(np.uint8)
  )


@pytest.mark.parametrize("per_row", [False, True])
def test_fake_quantize_activation_is_quantize_then_dequantize(rng, per_row):
  x = rng.standard_normal((24, 128)).astype(np.float32) * 4
  x[1, :16] = 0
  x[3] *= 1000
  x = jnp.asarray(x, jnp.bfloat16)
  inv = rng.uniform(10, 1000, 24) if per_row else 2688.0 / 20.0
  inv = jnp.asarray(inv, jnp.float32)
  got = np.asarray(nvfp4.fake_quantize_activation(x, inv))
  want = np.asarray(nvfp4.dequantize_blocks(*nvfp4.quantize_activation(x, inv)))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_activation_round_trip_error_is_small(rng):
  x = rng.standard_normal((16, 256)).astype(np.float32)
  inv = np.float32(2688.0 / np.abs(x).max())
  packed, sf = nvfp4.quantize_activation(jnp.asarray(x), inv)
  back = np.asarray(nvfp4.dequantize_blocks(packed, sf)) / inv
  rel = np.linalg.norm(back - x) / np.linalg.norm(x)
  assert rel < 0.12, rel  # FP4 with per-16 scales: ~9% RMS on Gaussians


def test_nvfp4tensor_validates_shapes():
  with pytest.raises(fp4jax.NVFP4Error, match="do not describe"):
    fp4jax.NVFP4Tensor(
      jnp.zeros((4, 8), jnp.uint8),
      jnp.zeros((4, 2), jnp.float8_e4m3fn),
      jnp.float32(1),
    )
  t = fp4jax.quantize(jnp.ones((4, 32)))
  assert t.shape == (4, 32) and t.nbytes == 4 * 16 + 4 * 2 + 4

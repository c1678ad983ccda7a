"""The fusible activation quantizer equals the reference bit for bit.

The same checks run jitted on the CPU and, in the GPU tier, on the GPU,
where XLA's fusion and LLVM's rewrites are what the integer roundings guard
against.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fp4jax.format import nvfp4
from pallas_kernels import activation_quant

BACKENDS = [
  pytest.param("cpu"),
  pytest.param("gpu", marks=pytest.mark.gpu),
]


def _every_bf16_value(rng) -> np.ndarray:
  """All finite bf16 values, shuffled into [rows, 16 * blocks]."""
  bits = np.arange(1 << 16, dtype=np.uint16)
  values = bits.view(ml_dtypes.bfloat16)
  values = values[np.isfinite(values.astype(np.float32))]
  values = rng.permutation(values)
  return values[: values.size // 256 * 256].reshape(-1, 256)


def _on_threshold_blocks(rng, rows: int) -> np.ndarray:
  """Blocks whose elements sit at E2M1 thresholds of their block max."""
  block_max = np.exp2(rng.integers(-20, 20, (rows, 16, 1))).astype(np.float32)
  fractions = np.array(
    [0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6], np.float32
  ) / np.float32(6)
  picks = rng.choice(fractions, (rows, 16, 16))
  picks[..., 0] = 1.0
  signs = rng.choice(np.array([-1, 1], np.float32), picks.shape)
  return (block_max * picks * signs).reshape(rows, 256)


def _inputs(rng):
  gaussian = rng.standard_normal((64, 256)).astype(np.float32)
  gaussian *= np.exp2(rng.integers(-30, 30, (64, 1))).astype(np.float32)
  gaussian[1, :16] = 0
  gaussian[2, :16] = 3.0
  return np.concatenate(
    [
      _every_bf16_value(rng).astype(np.float32),
      _on_threshold_blocks(rng, 64),
      gaussian,
    ]
  )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("stored_scales", [False, True])
def test_equals_reference_bit_for_bit(
  rng, backend, per_row, stored_scales, monkeypatch
):
  x = _inputs(rng)
  rows = x.shape[0]
  if per_row:  # scales from 1e-3 to 1e6, and ones that make E4M3 subnormal
    inv = np.exp(rng.uniform(np.log(1e-3), np.log(1e6), rows))
  else:
    inv = np.float32(rng.uniform(10, 1000))
  if stored_scales:  # the prefill form: block scales computed once
    monkeypatch.setattr(activation_quant, "RECOMPUTE_SCALES_MAX_ELEMENTS", 0)
  device = jax.devices(backend)[0]
  x = jax.device_put(jnp.asarray(x, jnp.bfloat16), device)
  inv = jax.device_put(jnp.asarray(inv, jnp.float32), device)
  got = np.asarray(jax.jit(activation_quant.fake_quantize_rows)(x, inv))
  want = np.asarray(jax.jit(nvfp4.fake_quantize_activation)(x, inv))
  assert not np.isnan(want).any()
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reciprocal_is_correctly_rounded(rng, backend):
  # Normal divisors (XLA flushes subnormal inputs to zero): the quotients
  # span f32's normals and subnormals.
  bits = rng.integers(0x00800000, 0x7F800000, 1 << 16, dtype=np.uint32)
  edges = np.array(
    [0x00800000, 0x00800001, 0x3F800000, 0x3F800001, 0x7E800000, 0x7F7FFFFF],
    np.uint32,
  )
  d = np.concatenate([bits, edges]).view(np.float32)
  got = jax.jit(activation_quant._reciprocal)(
    jax.device_put(jnp.asarray(d), jax.devices(backend)[0])
  )
  with np.errstate(over="ignore"):
    want = np.float32(1) / d  # numpy's f32 division is IEEE
  np.testing.assert_array_equal(
    np.asarray(got).view(np.uint32), want.view(np.uint32)
  )


@pytest.mark.parametrize("backend", BACKENDS)
def test_e4m3_rounding_matches_a_cast(rng, backend):
  v = np.concatenate(
    [
      rng.uniform(0, 448, 1 << 15),
      np.exp2(rng.uniform(-16, 8.8, 1 << 15)),
      ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max * np.ones(1),
      np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)[:127],
    ]
  ).astype(np.float32)
  v = np.minimum(v, np.float32(448))
  # Midpoints between neighbouring E4M3 values: ties go to the even one.
  grid = np.arange(127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  grid = grid.astype(np.float32)
  v = np.concatenate([v, (grid[:-1] + grid[1:]) / 2])
  got = jax.jit(activation_quant._round_to_e4m3)(
    jax.device_put(jnp.asarray(v), jax.devices(backend)[0])
  )
  want = v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("stored_scales", [False, True])
def test_nan_activations_stay_nan(stored_scales, monkeypatch):
  if stored_scales:
    monkeypatch.setattr(activation_quant, "RECOMPUTE_SCALES_MAX_ELEMENTS", 0)
  x = jnp.ones((2, 32), jnp.bfloat16).at[1, 3].set(jnp.nan)
  got = np.asarray(activation_quant.fake_quantize_rows(x, jnp.float32(100)))
  assert np.isnan(got[1, :16]).all()
  assert not np.isnan(got[0]).any() and not np.isnan(got[1, 16:]).any()


def test_rejects_k_not_a_multiple_of_16():
  with pytest.raises(ValueError, match="K=24"):
    activation_quant.fake_quantize_rows(
      jnp.zeros((2, 24), jnp.bfloat16), jnp.float32(1)
    )

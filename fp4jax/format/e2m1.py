"""FP4 E2M1 codes: the 16-value table, rounding, and two-per-byte packing.

A code has sign = bit 3, exponent = bits 2..1, mantissa = bit 0. Two codes
share a uint8 along the last axis; the even element sits in the LOW nibble
(ModelOpt, and PTX `cvt.rn.satfinite.e2m1x2.f32`).
"""

import jax.numpy as jnp
import numpy as np

# ModelOpt's table (nvfp4_tensor.py): code 8 decodes to +0.0, not -0.0.
E2M1_VALUES = np.array(
  [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6],
  dtype=np.float32,
)
E2M1_MAX = 6.0

# Rounding thresholds between neighbouring magnitudes. A value exactly on a
# threshold rounds to the even code: up at 0.75, 1.75 and 3.5, down elsewhere.
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_ROUNDED_UP = (0.75, 1.75, 3.5)


def decode(codes: jnp.ndarray) -> jnp.ndarray:
  """Maps uint8 codes in [0, 16) to their float32 values."""
  return jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]


def encode(x: jnp.ndarray) -> jnp.ndarray:
  """Rounds float values to E2M1 codes (uint8), ties to even, saturating at 6.

  Bit-exact with ModelOpt's `_cast_fp4` and PTX `cvt.rn.satfinite`: a
  negative value that rounds to zero keeps its sign (code 8).
  """
  x = x.astype(jnp.float32)
  sign = (x < 0).astype(jnp.uint8) << 3
  return sign | _magnitude_order(x, jnp.uint8)


def _magnitude_order(x: jnp.ndarray, dtype) -> jnp.ndarray:
  """Index 0..7 of the E2M1 magnitude |x| rounds to (ties to even, <= 6)."""
  mag = jnp.abs(x)
  order = jnp.zeros(x.shape, dtype)
  for bound in _BOUNDS:
    order += (mag > bound).astype(dtype)
  for tie in _TIES_ROUNDED_UP:
    order += (mag == tie).astype(dtype)
  return order


def round_to_values(x: jnp.ndarray) -> jnp.ndarray:
  """`decode(encode(x))` as float32 without a table: one fusible pass.

  Zero stays +0.0 for negative inputs too (code 8 decodes to +0.0).
  """
  x = x.astype(jnp.float32)
  order = _magnitude_order(x, jnp.float32)
  # Magnitudes 0, .5, 1, 1.5 | 2, 3 | 4, 6 for order 0..3 | 4, 5 | 6, 7.
  value = jnp.where(
    order < 4, order * 0.5, jnp.where(order < 6, order - 2, 2 * order - 8)
  )
  return jnp.where((x < 0) & (order > 0), -value, value)


def pack(codes: jnp.ndarray) -> jnp.ndarray:
  """Packs codes `[..., K]` into uint8 `[..., K/2]`, even element low."""
  if codes.shape[-1] % 2:
    raise ValueError(f"last dim must be even to pack, got {codes.shape=}")
  codes = codes.astype(jnp.uint8)
  return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack(packed: jnp.ndarray) -> jnp.ndarray:
  """Unpacks uint8 `[..., K/2]` into codes `[..., K]`."""
  low = packed & 0x0F
  high = packed >> 4
  return jnp.stack([low, high], axis=-1).reshape(
    *packed.shape[:-1], 2 * packed.shape[-1]
  )

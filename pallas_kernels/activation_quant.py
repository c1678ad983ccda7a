"""W4A4's activation quantization as one fusible XLA pass.

`fake_quantize_rows(x, input_scale_inv)` equals
`nvfp4.fake_quantize_activation` bit for bit, but without the optimization
barriers the reference needs, so XLA can fuse it with its consumer (the
kernels' activation split). The reference's barriers split it into eight
small kernels, ~9 us of launches that made W4A4 decode 13-81% slower than
W4A16 (NOTES, ninth session).

The reference needs them for two roundings XLA's GPU pipeline does not keep;
here both are integer operations, which no pass rewrites:
- f32 -> E4M3 -> f32 (XLA drops the round trip as excess precision): the
  mantissa is rounded on the f32 bits, subnormal scales by `round(v * 2^9)`;
- IEEE f32 reciprocals (XLA emits `div.full`, and LLVM narrows an f64
  quotient's `fptrunc` back to it): the quotient is taken in f64 and rounded
  to f32 on its bits.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.format import e2m1
from fp4jax.format import nvfp4

# Above this many elements the per-block scales are computed once and
# stored; below, each element recomputes its block's (one kernel, decode).
# At prefill sizes XLA splits the pass anyway (H200, M = 2048, K = 7168:
# block max 12.6 us, quantization 24.0, activation split 19.8); looking the
# output scales up by E4M3 code instead of dividing per block changed
# nothing (117.3 vs 118.4 us a layer), and quantizing after the split (on
# the split values, with the scales spread the same way) made XLA keep
# three f32 intermediates (135 -> 187 us; tenth session), so neither was
# kept. Recomputing the scales at every size gives the same kernels.
RECOMPUTE_SCALES_MAX_ELEMENTS = 1 << 20

E4M3_MIN_NORMAL = np.float32(2.0**-6)
E4M3_SUBNORMAL_STEPS = np.float32(2.0**9)  # E4M3 subnormals: k * 2^-9


def fake_quantize_rows(x: jax.Array, input_scale_inv: jax.Array) -> jax.Array:
  """`nvfp4.fake_quantize_activation(x, input_scale_inv)`, fusible.

  Args:
    x: activations `[..., K]`, K a multiple of 16.
    input_scale_inv: float32 scalar, or one per row (`x.shape[:-1]`).

  Returns:
    float32 `[..., K]`: each value its E2M1 value times its E4M3 block scale
    (exact in bf16).
  """
  gs = jnp.asarray(input_scale_inv, jnp.float32)
  if gs.ndim:
    gs = gs[..., None]
  k = x.shape[-1]
  if k % nvfp4.BLOCK_SIZE:
    raise ValueError(f"K={k} must be a multiple of {nvfp4.BLOCK_SIZE}")
  blocks = x.reshape(*x.shape[:-1], k // nvfp4.BLOCK_SIZE, nvfp4.BLOCK_SIZE)
  # A max over slices, not a reduce: XLA fuses slices into the consumer.
  magnitudes = jnp.abs(blocks)
  block_max = magnitudes[..., 0]
  for i in range(1, nvfp4.BLOCK_SIZE):
    block_max = jnp.maximum(block_max, magnitudes[..., i])
  block_max = block_max.astype(jnp.float32)
  sf = _round_to_e4m3(
    jnp.minimum(gs * (block_max * np.float32(1.0 / 6.0)), nvfp4.E4M3_MAX)
  )
  safe = jnp.where(sf == 0, np.float32(1.0), sf)
  out_scale = jnp.where(
    sf == 0, np.float32(0.0), _reciprocal(safe * _reciprocal(gs))
  )
  if x.size > RECOMPUTE_SCALES_MAX_ELEMENTS:
    sf, out_scale = jax.lax.optimization_barrier((sf, out_scale))
  values = e2m1.round_to_values(
    blocks.astype(jnp.float32) * out_scale[..., None]
  )
  return (values * sf[..., None]).reshape(x.shape)


def _round_to_e4m3(v: jax.Array) -> jax.Array:
  """Non-negative f32 at most 448 -> the nearest E4M3 value (ties to even),
  as f32."""
  bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
  # Keep 3 of the 23 mantissa bits: add just under half the dropped unit,
  # plus the kept lowest bit (ties to even), then clear the dropped bits.
  lowest_kept = (bits >> 20) & 1
  normal = jax.lax.bitcast_convert_type(
    (bits + 0x7FFFF + lowest_kept) & np.uint32(0xFFF00000), jnp.float32
  )
  subnormal = jnp.round(v * E4M3_SUBNORMAL_STEPS) * np.float32(2.0**-9)
  return jnp.where(v >= E4M3_MIN_NORMAL, normal, subnormal)


def _reciprocal(d: jax.Array) -> jax.Array:
  """Correctly rounded f32 `1 / d` for normal d > 0 (0 -> inf)."""
  with jax.enable_x64(True):
    quotient = 1.0 / d.astype(jnp.float64)  # IEEE in f64 on CPU and GPU
    return _f64_to_f32_bits(quotient)


def _f64_to_f32_bits(q: jax.Array) -> jax.Array:
  """Rounds non-negative f64 to f32 (nearest, ties to even) on the bits, so
  that no `fptrunc` is left for LLVM to fuse with the division."""
  bits = jax.lax.bitcast_convert_type(q, jnp.uint64)
  exponent = ((bits >> 52) & 0x7FF).astype(jnp.int32) - (1023 - 127)
  significand = (bits & np.uint64((1 << 52) - 1)) | np.uint64(1 << 52)
  # f32 normals drop 29 bits; subnormals (exponent <= 0) drop more.
  shift = (29 + jnp.clip(1 - exponent, 0, 34)).astype(jnp.uint64)
  kept = significand >> shift
  dropped = significand & ((np.uint64(1) << shift) - np.uint64(1))
  half = np.uint64(1) << (shift - np.uint64(1))
  round_up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
  base = (jnp.maximum(exponent - 1, 0).astype(jnp.uint64)) << 23
  # A carry out of the mantissa lands in the exponent: still the right bits.
  out = (base + kept + round_up.astype(jnp.uint64)).astype(jnp.uint32)
  out = jnp.where(exponent >= 255, np.uint32(0x7F800000), out)
  out = jnp.where(q == 0, np.uint32(0), out)
  out = jnp.where(jnp.isnan(q), np.uint32(0x7FC00000), out)
  return jax.lax.bitcast_convert_type(out, jnp.float32)

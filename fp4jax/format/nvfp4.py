"""NVFP4 tensors and THE numerical reference: quantize and dequantize.

`W[n, k] ~= e2m1(code[n, k]) * (f32(block_scale[n, k // 16]) * global_scale)`

`quantize` reproduces NVIDIA ModelOpt's `NVFP4QTensor` bit for bit, and
`quantize_activation` follows SGLang's activation-quantization kernel. Every
kernel in `pallas_kernels` is tested against these functions.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import errors
from fp4jax.format import e2m1

BLOCK_SIZE = 16
E4M3_MAX = 448.0
# ModelOpt clamps block scales to the smallest E4M3 subnormal.
E4M3_MIN_SCALE = 2.0**-9
# weight_scale_2 = amax / (6 * 448): the largest block then gets scale 448.
GLOBAL_SCALE_DIVISOR = e2m1.E2M1_MAX * E4M3_MAX


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4Tensor:
  """A block-scaled FP4 matrix (or a stack of them along leading dims).

  Invariant: `W ~= dequantize(self)`, with

  Attributes:
    packed: uint8 `[..., N, K/2]`, two E2M1 codes per byte, even k low.
    block_scale: float8_e4m3fn `[..., N, K/16]`, row-major (not swizzled).
    global_scale: float32 `[...]`, ModelOpt's `weight_scale_2`.
  """

  packed: jax.Array
  block_scale: jax.Array
  global_scale: jax.Array

  def __post_init__(self):
    # Pytree machinery rebuilds instances with placeholder leaves; validate
    # only real arrays.
    leaves = (self.packed, self.block_scale)
    if not all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
      return
    *batch, n, half_k = self.packed.shape
    if self.block_scale.shape != (*batch, n, half_k * 2 // BLOCK_SIZE) or (
      half_k * 2 % BLOCK_SIZE
    ):
      raise errors.NVFP4Error(
        f"packed {self.packed.shape} and block_scale"
        f" {self.block_scale.shape} do not describe one NVFP4 tensor"
      )

  @property
  def shape(self) -> tuple[int, ...]:
    """Logical shape `[..., N, K]` of the unpacked matrix."""
    *lead, half_k = self.packed.shape
    return (*lead, 2 * half_k)

  @property
  def ndim(self) -> int:
    return len(self.packed.shape)

  @property
  def nbytes(self) -> int:
    return sum(
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      for x in (self.packed, self.block_scale, self.global_scale)
    )


def _true_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """Correctly rounded float32 division, on every backend, under jit too.

  XLA does not give IEEE f32 division: its simplifier turns division by a
  broadcast or constant into a reciprocal multiply (format doc §1.5), and its
  GPU backend lowers f32 division to `div.full` (up to 2 ulp off). Either
  moves codes and block scales. Float64 division is IEEE on CPU and GPU, and
  rounding a float64 quotient of two float32 values to float32 gives the
  correctly rounded float32 quotient (53 >= 2 * 24 + 2 bits). The barriers
  keep that exact, both seen on the H200: fused, LLVM narrows
  `fptrunc(fdiv(fpext a, fpext b))` back to an f32 `div.full`; and unless
  the f32 result is materialized, XLA's GPU fusion compares the unrounded
  float64 quotient with the E2M1 thresholds (excess precision), which moves
  every value that rounds onto a threshold.
  """
  with jax.enable_x64(True):
    num64, den64 = jax.lax.optimization_barrier(
      (num.astype(jnp.float64), jnp.asarray(den).astype(jnp.float64))
    )
    quotient = jax.lax.optimization_barrier(num64 / den64)
    return jax.lax.optimization_barrier(quotient.astype(jnp.float32))


def _blocks(x: jax.Array) -> jax.Array:
  """`[..., K]` -> `[..., K/16, 16]`."""
  k = x.shape[-1]
  if k % BLOCK_SIZE:
    raise errors.NVFP4Error(f"K={k} must be a multiple of {BLOCK_SIZE}")
  return x.reshape(*x.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)


def _to_e4m3(x: jax.Array) -> jax.Array:
  """Rounds to E4M3 (nearest even), saturating at 448.

  XLA maps overflow to NaN, hence the clamp. The barrier keeps the rounding:
  XLA's GPU pipeline drops an f32 -> e4m3 -> f32 round trip as "excess
  precision", so later math would use the unrounded scale (seen on the H200).
  """
  return jax.lax.optimization_barrier(
    jnp.minimum(x, E4M3_MAX).astype(jnp.float8_e4m3fn)
  )


def _check_finite(name: str, x) -> None:
  if isinstance(x, jax.core.Tracer):
    return
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))):
    raise errors.NVFP4Error(f"{name} has NaN or inf values")


def global_scale_from_amax(amax: jax.Array) -> jax.Array:
  """ModelOpt's `weight_scale_2` (or `input_scale`): `amax / 2688`, exact."""
  amax = jnp.asarray(amax, jnp.float32)
  return _true_divide(amax, jnp.float32(GLOBAL_SCALE_DIVISOR))


def quantize(w: jax.Array, *, global_scale=None) -> NVFP4Tensor:
  """Quantizes `w[..., N, K]` to NVFP4 exactly as ModelOpt 0.47 does.

  Args:
    w: weights of any float dtype; K must be a multiple of 16. Leading dims
      are a stack of matrices (e.g. experts), each with its own global scale.
    global_scale: float32 per matrix (shape `[...]` or scalar). Defaults to
      `amax(|w|) / 2688` per matrix.

  Returns:
    An `NVFP4Tensor`. Block scale `e4m3(clamp(block_amax / (6 * gs), 2**-9,
    448))`, all-zero blocks get 1.0; codes round half to even and saturate at
    6. Divisions are IEEE (not reciprocal multiplies), as in ModelOpt.
  """
  if w.ndim < 2:
    raise errors.NVFP4Error(f"expected [..., N, K] weights, got {w.shape=}")
  _check_finite("weights", w)
  if global_scale is not None:
    _check_finite("global_scale", global_scale)
    global_scale = jnp.asarray(global_scale, jnp.float32)
  return _quantize(jnp.asarray(w), global_scale)


@jax.jit
def _quantize(w: jax.Array, global_scale: jax.Array | None) -> NVFP4Tensor:
  w = w.astype(jnp.float32)
  batch = w.shape[:-2]
  if global_scale is None:
    amax = jnp.max(jnp.abs(w), axis=(-2, -1))
    global_scale = global_scale_from_amax(amax)
  else:
    global_scale = jnp.broadcast_to(global_scale, batch)
  gs = global_scale[..., None, None]  # per matrix -> per block

  blocks = _blocks(w)
  block_amax = jnp.max(jnp.abs(blocks), axis=-1)
  scale_hp = _true_divide(block_amax, 6.0 * gs)
  scale_hp = jnp.where(scale_hp == 0, 1.0, scale_hp)
  block_scale = _to_e4m3(jnp.maximum(scale_hp, E4M3_MIN_SCALE))

  per_block = block_scale.astype(jnp.float32) * gs
  scaled = _true_divide(blocks, per_block[..., None])
  codes = e2m1.encode(scaled).reshape(w.shape)
  return NVFP4Tensor(
    packed=e2m1.pack(codes),
    block_scale=block_scale,
    global_scale=global_scale,
  )


@jax.jit
def dequantize_blocks(packed: jax.Array, block_scale: jax.Array) -> jax.Array:
  """`e2m1(code) * f32(block_scale)` as float32 `[..., K]`, no global scale.

  Every product is exact in float32 (and in bf16: 3 + 2 significant bits).
  """
  values = e2m1.decode(e2m1.unpack(packed))
  scale = block_scale.astype(jnp.float32)
  return (_blocks(values) * scale[..., None]).reshape(values.shape)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(t: NVFP4Tensor, dtype=jnp.float32) -> jax.Array:
  """ModelOpt's dequantization: `e2m1(code) * (f32(block_scale) * gs)`.

  The bracket is evaluated first, as ModelOpt does, so the result is
  bit-identical to its `NVFP4QTensor.dequantize` in float32.
  """
  values = e2m1.decode(e2m1.unpack(t.packed))
  gs = jnp.asarray(t.global_scale, jnp.float32)[..., None, None]
  per_block = t.block_scale.astype(jnp.float32) * gs
  out = _blocks(values) * per_block[..., None]
  return out.reshape(values.shape).astype(dtype)


@jax.jit
def quantize_activation(
  x: jax.Array, input_scale_inv: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Quantizes activations `x[..., M, K]` to NVFP4 the way SGLang does.

  Follows `cvt_warp_fp16_to_fp4` (sgl-kernel): the block max is taken in
  x's own dtype (exact), `sf = e4m3_satfinite(gs * (vmax * (1/6)))`, the
  output scale is `1 / (f32(sf) * (1/gs))` (0 where sf is 0), and codes are
  `e2m1_rn_satfinite(x * out_scale)`, so values above the calibrated range
  clip at 6.

  The CUDA kernel computes the three reciprocals with `rcp.approx.ftz`; this
  reference uses IEEE reciprocals. The two can differ by one ulp of the output
  scale, which moves a code only when `x * out_scale` lands exactly on a
  rounding threshold (rare; such elements go to the neighbouring code).

  Args:
    x: activations, bf16 or f16 (f32 works too); K a multiple of 16.
    input_scale_inv: float32, `1 / input_scale` = 2688 / act_amax: a scalar,
      or one per row (`[..., M]`).

  Returns:
    `(packed, block_scale)`: uint8 `[..., M, K/2]` and float8_e4m3fn
    `[..., M, K/16]` in row-major layout. Dequantize with
    `dequantize_blocks`; the matmul epilogue multiplies by `alpha`.
  """
  blocks, sf, out_scale = _activation_scales(x, input_scale_inv)
  scaled = blocks.astype(jnp.float32) * out_scale[..., None]
  codes = e2m1.encode(scaled).reshape(x.shape)
  return e2m1.pack(codes), sf


@jax.jit
def fake_quantize_activation(
  x: jax.Array, input_scale_inv: jax.Array
) -> jax.Array:
  """`dequantize_blocks(*quantize_activation(x, input_scale_inv))`, fused.

  The same float32 values, bit for bit, without packing codes: what a
  bf16-MMA W4A4 matmul multiplies (every value is exact in bf16 too).
  """
  blocks, sf, out_scale = _activation_scales(x, input_scale_inv)
  values = e2m1.round_to_values(
    blocks.astype(jnp.float32) * out_scale[..., None]
  )
  return (values * sf.astype(jnp.float32)[..., None]).reshape(x.shape)


def _activation_scales(x, input_scale_inv):
  """-> (x as [..., K/16, 16] blocks, E4M3 block scales, output scales)."""
  gs = jnp.asarray(input_scale_inv, jnp.float32)
  if gs.ndim:  # one scale per row, e.g. rows routed to different experts
    gs = gs[..., None]
  blocks = _blocks(x)
  block_max = jnp.max(jnp.abs(blocks), axis=-1).astype(jnp.float32)
  sf = _to_e4m3(gs * (block_max * np.float32(1.0 / 6.0)))
  sf32 = sf.astype(jnp.float32)
  safe = jnp.where(sf32 == 0, 1.0, sf32)
  one = jnp.float32(1.0)
  out_scale = jnp.where(
    sf32 == 0, 0.0, _true_divide(one, safe * _true_divide(one, gs))
  )
  return blocks, sf, out_scale

"""W4A4's activations in one memory pass on sm90: quantize, pad and split.

`quantize_planes(x, input_scale_inv, rows)` is meant to equal, bit for
bit, `split_activations` of `fake_quantize_rows(x, input_scale_inv)` in
bf16, padded with zero rows to `rows`: the stacked planes the sm90 matmul
reads. With `planes=False` it writes the same values in natural K order
(`[rows, K]`, what the row-pair kernel reads). At >= 1M elements XLA runs
that as three passes over x (block max, quantization, activation split:
14.0 + 24.0 + 19.8 us at 7168x2048, M = 2048, on the H200), which is why
W4A4 trailed W4A16 most on small layers before this kernel.

Four threads per 32-column group of a row, each loading 16 consecutive
bytes (8 values; a warp reads 512 contiguous bytes): a block of 16 is two
threads, whose maxima meet by one butterfly shuffle. Each takes the E4M3
scale and the output scale as the reference does (f32 products, the E4M3
rounding on the bits, IEEE reciprocals by `rcp.rn.f32`), rounds its values
to E2M1 (ties to even, as three `roundeven`s and selects), and writes them
as four bf16x2 words, two per plane, in `split_activations`' order (thread
t of a group holds columns 8t..8t+7, which land on plane columns 8h + 2t
+ e).

Inline Mosaic GPU code, so the CPU interpreter cannot run it: callers use
the XLA pass there. On the H200 it equals the reference bit for bit (GPU
tests) and W4A4 calls through it are faster at every size measured
(`pallas_mosaic_gpu.QUANTIZE_PLANES_MIN_ELEMENTS`, NOTES.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax._src.lib.mlir.dialects import llvm
from jax._src.lib.mlir.dialects import math as mlir_math
from jax._src.lib.mlir.dialects import vector
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4jax.format import nvfp4
from pallas_kernels import activation_quant

GROUP = 32  # K columns of one group: two blocks, 16 of each plane
THREADS_PER_GROUP = 4  # each loads 8 columns (16 bytes)
THREADS = 128  # one warpgroup per CTA


def plane_position(i: int) -> tuple[int, int]:
  """(plane, column in the group's 16) of column `i` of a 32-column group:
  `i = 8t + 4e + 2h + n` sits at plane n, column 8h + 2t + e
  (`split_activations`)."""
  t, rest = divmod(i, 8)
  e, rest = divmod(rest, 4)
  h, n = divmod(rest, 2)
  return n, 8 * h + 2 * t + e


def quantize_planes(
  x: jax.Array, input_scale_inv: jax.Array, rows: int, planes: bool = True
) -> jax.Array:
  """bf16 `[M, K]` -> bf16 `[2, rows, K/2]`: the fake-quantized activations
  as the sm90 kernel's stacked planes, rows past M zero.

  Args:
    x: bf16 activations, K a multiple of 64.
    input_scale_inv: float32 scalar (one per layer).
    rows: padded row count, >= M.
    planes: False writes `[rows, K]` in natural order instead.
  """
  m, k = x.shape
  if x.dtype != jnp.bfloat16 or k % 64 or rows < m or m < 1:
    raise ValueError(
      f"quantize_planes takes bf16 [M >= 1, K % 64 == 0] and rows >= M;"
      f" got {x.dtype} {x.shape}, {rows=}"
    )
  groups = k // GROUP
  padded_pairs = rows * groups  # (row, group) pairs of the output
  ctas = -(-padded_pairs * THREADS_PER_GROUP // THREADS)

  def kernel(x_gmem, s_gmem, o_gmem):
    _quantize_groups(x_gmem, s_gmem, o_gmem)

  out_shape = (2, padded_pairs, 16) if planes else (1, padded_pairs, GROUP)
  call = plgpu.kernel(
    kernel,
    out_type=jax.ShapeDtypeStruct(out_shape, jnp.bfloat16),
    grid=(ctas,),
    grid_names=("group_tiles",),
  )
  scale = jnp.asarray(input_scale_inv, jnp.float32).reshape(1)
  out = call(x.reshape(m * groups, GROUP), scale)
  return out.reshape(2, rows, k // 2) if planes else out.reshape(rows, k)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 3)
def _quantize_groups(_, x_ref, s_ref, o_ref):
  i32 = ir.IntegerType.get_signless(32)
  i8 = ir.IntegerType.get_signless(8)
  f32 = ir.F32Type.get()
  words4 = ir.VectorType.get((4,), i32)
  pairs = ir.MemRefType(x_ref.type).shape[0]
  n_planes, padded_pairs, _ = ir.MemRefType(o_ref.type).shape
  per_group = THREADS_PER_GROUP

  def const(v):
    return arith.constant(i32, v)

  def fconst(v):
    return arith.constant(f32, float(np.float32(v)))

  thread = arith.addi(
    arith.muli(mgpu_utils.block_idx(), const(THREADS)),
    mgpu_utils.thread_idx(),
  )
  pair = arith.divui(thread, const(per_group))
  quarter = arith.remui(thread, const(per_group))  # columns 8q .. 8q + 7
  valid = arith.cmpi(arith.CmpIPredicate.slt, pair, const(pairs))
  in_output = arith.cmpi(arith.CmpIPredicate.slt, pair, const(padded_pairs))
  # Padding rows read the last group (any in-bounds one) and store zeros.
  source = arith.select(valid, pair, const(pairs - 1))

  def offset_of(group, quarter):  # bytes: a group's 32 bf16, 16 a quarter
    return arith.addi(
      arith.muli(group, const(2 * GROUP)), arith.muli(quarter, const(16))
    )

  vec = llvm.load(
    words4,
    mgpu_utils.getelementptr(
      mgpu_utils.memref_ptr(x_ref), [offset_of(source, quarter)], i8
    ),
    alignment=16,
  )
  values = []
  for w in range(4):
    word = vector.extract(vec, dynamic_position=[], static_position=[w])
    low = arith.shli(word, const(16))
    high = arith.andi(word, const(-65536))  # 0xFFFF0000
    values += [arith.bitcast(f32, low), arith.bitcast(f32, high)]
  scale_inv = llvm.load(f32, mgpu_utils.memref_ptr(s_ref))
  # IEEE reciprocal (the reference rounds 1 / d correctly too).
  inv_scale_inv = _rcp(scale_inv)

  # The block's other 8 values are the neighbouring thread's (quarter ^ 1).
  block_max = _abs(values[0])
  for v in values[1:]:
    block_max = arith.maximumf(block_max, _abs(v))
  block_max = arith.maximumf(block_max, mgpu_utils.shfl_bfly(block_max, 1))
  scaled = arith.mulf(scale_inv, arith.mulf(block_max, fconst(1.0 / 6.0)))
  sf = _round_to_e4m3(arith.minimumf(scaled, fconst(nvfp4.E4M3_MAX)))
  zero_scale = arith.cmpf(arith.CmpFPredicate.OEQ, sf, fconst(0.0))
  safe = arith.select(zero_scale, fconst(1.0), sf)
  out_scale = arith.select(
    zero_scale, fconst(0.0), _rcp(arith.mulf(safe, inv_scale_inv))
  )
  out = [
    arith.mulf(_round_to_e2m1(arith.mulf(v, out_scale)), sf) for v in values
  ]

  o_base = mgpu_utils.memref_ptr(o_ref)
  if n_planes == 1:  # natural order: the thread's 8 columns, 16 bytes
    words = [
      arith.select(valid, _pack_bf16x2(out[2 * w], out[2 * w + 1]), const(0))
      for w in range(4)
    ]
    with mgpu_utils.when(in_output):
      llvm.store(
        vector.from_elements(words4, words),
        mgpu_utils.getelementptr(o_base, [offset_of(pair, quarter)], i8),
        alignment=16,
      )
    return
  # Value j = 4e + 2h + n of this thread (column 8q + j) goes to plane n,
  # column 8h + 2q + e: word (n, h) holds e = 0 low, e = 1 high.
  with mgpu_utils.when(in_output):
    for n in range(2):
      for h in range(2):
        word = _pack_bf16x2(out[2 * h + n], out[4 + 2 * h + n])
        word = arith.select(valid, word, const(0))
        row = arith.addi(arith.muli(const(n), const(padded_pairs)), pair)
        column = arith.addi(const(8 * h), arith.muli(quarter, const(2)))
        offset = arith.muli(
          arith.addi(arith.muli(row, const(16)), column), const(2)
        )
        llvm.store(
          word, mgpu_utils.getelementptr(o_base, [offset], i8), alignment=4
        )


def _abs(v):
  """|v| on the bits (as jnp.abs: NaN stays NaN)."""
  i32 = ir.IntegerType.get_signless(32)
  bits = arith.bitcast(i32, v)
  return arith.bitcast(
    v.type, arith.andi(bits, arith.constant(i32, 0x7FFFFFFF))
  )


def _rcp(v):
  """Correctly rounded f32 1 / v."""
  return mgpu_utils.inline_ptx(
    "rcp.rn.f32 $0, $1;", v, result_types=ir.F32Type.get()
  )


def _round_to_e4m3(v):
  """`activation_quant._round_to_e4m3`: non-negative f32 <= 448 -> the
  nearest E4M3 value (ties to even), as f32."""
  i32 = ir.IntegerType.get_signless(32)
  f32 = ir.F32Type.get()
  bits = arith.bitcast(i32, v)
  lowest_kept = arith.andi(
    arith.shrui(bits, arith.constant(i32, 20)), arith.constant(i32, 1)
  )
  rounded = arith.addi(
    arith.addi(bits, arith.constant(i32, 0x7FFFF)), lowest_kept
  )
  normal = arith.bitcast(
    f32, arith.andi(rounded, arith.constant(i32, -(1 << 20)))
  )
  steps = mlir_math.roundeven(
    arith.mulf(
      v, arith.constant(f32, float(activation_quant.E4M3_SUBNORMAL_STEPS))
    )
  )
  subnormal = arith.mulf(
    steps, arith.constant(f32, 1 / float(activation_quant.E4M3_SUBNORMAL_STEPS))
  )
  is_normal = arith.cmpf(
    arith.CmpFPredicate.OGE,
    v,
    arith.constant(f32, float(activation_quant.E4M3_MIN_NORMAL)),
  )
  return arith.select(is_normal, normal, subnormal)


def _round_to_e2m1(v):
  """`e2m1.round_to_values`: the nearest E2M1 value (ties to even, at most
  6 in magnitude; NaN and -0 give +0). Steps of 0.5 below 2, 1 below 4, 2
  above: each a `roundeven`, whose even integers are the even codes."""
  f32 = ir.F32Type.get()

  def c(x):
    return arith.constant(f32, x)

  magnitude = _abs(v)
  halves = arith.mulf(
    mlir_math.roundeven(arith.mulf(magnitude, c(2.0))), c(0.5)
  )
  ones = mlir_math.roundeven(magnitude)
  twos = arith.minimumf(
    arith.mulf(mlir_math.roundeven(arith.mulf(magnitude, c(0.5))), c(2.0)),
    c(6.0),
  )

  def below(x):
    return arith.cmpf(arith.CmpFPredicate.OLT, magnitude, c(x))

  at_least_four = arith.cmpf(arith.CmpFPredicate.OGE, magnitude, c(4.0))
  value = arith.select(
    below(2.0),
    halves,
    arith.select(below(4.0), ones, arith.select(at_least_four, twos, c(0.0))),
  )
  negative = arith.andi(
    arith.cmpf(arith.CmpFPredicate.OLT, v, c(0.0)),
    arith.cmpf(arith.CmpFPredicate.OGT, value, c(0.0)),
  )
  return arith.select(negative, arith.negf(value), value)


def _pack_bf16x2(low, high):
  """Two f32 (exact in bf16) -> one bf16x2 word, `low` in bits 0..15."""
  return mgpu_utils.inline_ptx(
    "cvt.rn.bf16x2.f32 $0, $1, $2;",
    high,
    low,
    result_types=ir.IntegerType.get_signless(32),
  )

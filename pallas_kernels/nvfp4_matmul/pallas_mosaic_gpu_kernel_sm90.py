"""The sm90 (Hopper) NVFP4 x bf16 matmul body: decode in registers, bf16 wgmma.

Hopper has no FP4 MMA, so every pipeline step decodes a packed weight tile
into bf16 in registers and feeds it to wgmma as the A operand, with float32
accumulation. Weights are the MMA's M side (rows = output features) and
tokens its N side, so even one token fills the MMA's rows.

Layout choices (no weight byte moves between rows or K groups; at most the
bits inside each 4-byte group are permuted, at prepare time):
- Natural NVFP4 order packs k = 2j in the low nibble and k = 2j + 1 in the
  high one. The kernel decodes the low and the high nibble plane into two A
  tiles and multiplies them with the even and the odd activation columns
  (two planes `[2, M, K/2]`, split by the caller or written so by a previous
  kernel's `planes_out`): two wgmmas into one accumulator.
  In a plane, the 16 values of one block scale are 8 adjacent columns, which
  is exactly one register column group of the WGMMA layout.
- Row pairs (`weight_layout="sm90_row_pairs"`, `Config.row_pairs`):
  weights regrouped by `sm90_layout.to_row_pairs`, each register one k16 A
  fragment of rows r and r + 8, multiply the activations in natural K
  order (no split), at twice the block-scale conversions per weight.
- Block scales are read from the checkpoint's 128x4 swizzled layout as
  int32 words: word `(r % 32) * 4 + r // 32` of a 512-byte chunk holds the
  four E4M3 scales of row `r` for four consecutive K blocks.
- Two compute warpgroups take 64 weight rows each of a 128-row tile (one
  swizzle tile of scales); a third warpgroup issues the TMA loads
  (`emit_pipeline_warp_specialized`). Or (`Config.cta_rows=64`, decode
  tiles) a CTA is one warpgroup on 64 rows that issues its own loads
  (`emit_pipeline`), several CTAs per SM.
- Small token counts split K across CTAs (`splits`) so that all SMs stream
  weights; partial sums come back in float32 and the caller adds them.
- `Config.async_mma` splits a K step into two parts: each part's wgmmas run
  while the next part decodes, and a wait always covers a wgmma before its
  A registers are rewritten (a whole step left in flight gave NaNs).
- `Config.warp_mma` (64-row CTAs): warp-level `mma.sync` instead of wgmma,
  the decoded registers taken as its A operand as they are, the
  accumulators carried by the pipeline: no warpgroup fence or wait.

Decoding (GPU, inline PTX per register, see `_decode_ptx`): the E2M1 code's
sign and magnitude bits are moved into a bf16 pattern worth `value * 2**-126`
(a subnormal for 0.5, exact on the GPU) and multiplied by the block scale
times `2**118`, so products carry a `2**-8` factor that the epilogue removes
together with the tensor scale. Every E2M1 x E4M3 product is exact in bf16.
From natural order that is 15 integer operations per 8 codes; from the
`fp4jax.format.sm90_layout` order (`Config.twiddled`) 9; block scales are
turned into bf16 by a byte permute and a shift, two to a register, and each
multiply takes its scale as a half of that register. Integer
ops issue at half rate on Hopper; at decode sizes neither the decode nor
the MMA bounds the kernel alone, they share the warpgroup's issue slots
(NOTES.md, `scripts/diag_decode_bound.py`).

Mosaic GPU's CPU interpreter cannot run inline PTX or register-A wgmma, so
with `interpret=True` the same kernel decodes with jnp ops into SMEM and
runs wgmma from there (`_decode_jnp`); tiling, pipelining, the scale layout,
split-K and the epilogues are the same code in both modes.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax._src.lib.mlir.dialects import llvm
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from fp4jax.format import sm90_layout
from pallas_kernels import common
from pallas_kernels.nvfp4_matmul import config as config_lib

WG_ROWS = config_lib.WGMMA_ROWS  # weight rows per compute warpgroup
TILE_ROWS = 2 * WG_ROWS  # rows per CTA = one 128-row tile of swizzled scales
PLANE_COLUMNS_PER_BLOCK = 8  # 16 values of a block scale in one nibble plane
SCALE_CHUNK_K = 64  # K covered by one 512-byte chunk (4 blocks of 16)
PRODUCT_EXPONENT = -8  # decoded weight x scale carries 2**-8 (module doc)
# Bottleneck experiments only (`scripts/diag_decode_bound.py`; results are
# wrong with any of them): "no_decode" feeds each code word to wgmma as it
# is (no integer work, no scales), "no_scales" decodes with a constant
# scale (no scale loads or conversions), "no_mma" decodes and issues no
# wgmma (the registers are kept alive by empty volatile asm); the block
# scales' cost apart: "one_scale_load" loads one scale word per row half
# and step (each chunk's word is it XOR the chunk: conversions stay),
# "raw_scales" loads every word and multiplies by it unconverted.
DIAGNOSTIC = ""
# Block scales as one bf16x2 register {s_even, s_odd} per word of four, each
# decode multiply taking its half as a broadcast operand (`mov.b32 {h, h}`)
# rather than a copy made by a byte permute (two per word of scales). H200,
# kernel time (`diag_decode_bound.py`, seventeenth session): 8192x28672 M =
# 1 42.6 -> 42.0 us, M = 16 48.4 -> 45.7; 28672x8192 M = 1 41.3 -> 38.8,
# M = 16 44.9 -> 40.6; MoE layers (one call each) DeepSeek-V3 T = 1 73.8
# -> 71.1, T = 16 782 -> 761; Mixtral-8x7B 74.9 -> 73.1, 261 -> 253.
SCALE_HALF_OPERANDS = True
# Stacked activation planes `[2, M, K/2]` load as one TMA copy a step (one
# block of both planes) rather than one copy per plane.
ONE_ACTIVATION_COPY = True


def _swizzled(bits: int, row_bytes: int, gmem_row_bytes: int | None = None):
  """Tiling and swizzle of an SMEM tile of `row_bytes` per row: the widest
  swizzle (<= 128 B) whose tiles also divide the GMEM rows it is copied
  from, which Mosaic GPU tiles alike (a K that is no whole number of steps,
  e.g. 2880 in steps of 128, then takes a narrower one)."""
  swizzle = min(128, row_bytes)
  while gmem_row_bytes is not None and gmem_row_bytes % swizzle:
    swizzle //= 2
  if swizzle < 32:
    raise ValueError(f"no swizzle tiles rows of {gmem_row_bytes} bytes")
  return (
    plgpu.TilingTransform((8, swizzle * 8 // bits)),
    plgpu.SwizzleTransform(swizzle),
  )


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static geometry of one call."""

  n: int
  k: int
  m: int  # padded token count
  splits: int
  config: config_lib.Config

  @property
  def k_steps(self) -> int:
    """K steps; a last partial one reads zeros past K (TMA fills them)."""
    return -(-self.k // self.config.block_k)

  @property
  def steps_per_split(self) -> int:
    return self.k_steps // self.splits

  @property
  def plane_k(self) -> int:
    return self.config.block_k // 2

  @property
  def scale_chunks(self) -> int:
    return self.config.block_k // SCALE_CHUNK_K

  @property
  def parts(self) -> int:
    """K parts of a step that decode and MMA in turn (`async_mma`)."""
    return self.config.mma_parts if self.config.async_mma else 1

  @property
  def part_k(self) -> int:
    """Plane columns of one part: the K of its A tiles."""
    return self.plane_k // self.parts


# ----------------------------------------------------------------- decoding
# Weights load in WGMMA_8BIT layout: one 32-bit register holds the 4 packed
# bytes 16j + 4t + (0..3) of a row for lane % 4 = t (measured on the H200
# with one-hot activations: scripts/diag_matmul.py). Each register decodes
# into two bf16x2 registers of each plane's A tile, which fixes the order of
# K inside every 16-column group of A: A column 8h + 2t + e holds plane
# column 4t + 2e + h. `split_activations` orders the activations the same
# way, so the products are unchanged; the order stays inside this module.


def split_activations(rows: jax.Array) -> jax.Array:
  """bf16 `[M, K]` -> `[2, M, K/2]`: the even and the odd K columns (the
  low and the high nibble planes), each in A column order."""
  m, k = rows.shape
  # [m, group, t, e, h, nibble]: k = 32 group + 8t + 4e + 2h + nibble sits
  # at plane column 16 group + 8h + 2t + e (`sm90_layout.to_plane_rows`
  # orders weight rows the same way).
  x = rows.reshape(m, k // 32, 4, 2, 2, 2)
  return x.transpose(5, 0, 1, 4, 2, 3).reshape(2, m, k // 2)


def _decode_ptx(
  w,
  s_smem,
  plan: Plan,
  row_base: int | None = None,
  part: int = 0,
  warp_mma: bool = False,
):
  """u8 [64, plane_k] (WGMMA_8BIT) -> scaled bf16 (lo, hi) A tiles of K
  part `part` (`plan.part_k` columns each), PTX; with `config.row_pairs`
  a tuple of one A tile of the part's natural K columns (`2 *
  plan.part_k`).

  The 64 rows start at `row_base` of the 128-row scale tile, or (None) at
  64 times this thread's warpgroup index. With `warp_mma` the tiles come in
  the A layout of warp-level `mma.sync` (`plgpu.mma`): the same element per
  register, another order of the register array.
  """
  layout = (
    plgpu.Layout.MMA_LHS(jnp.bfloat16) if warp_mma else plgpu.Layout.WGMMA
  )
  row_pairs = plan.config.row_pairs
  bf16_type = plgpu.ShapeDtypeStruct(
    (WG_ROWS, plan.part_k * (2 if row_pairs else 1)),
    jnp.bfloat16,
    layout=layout,
  )

  @plgpu.inline_mgpu(
    arg_types=(plgpu.Layout.WGMMA_8BIT, plgpu.RefType()),
    return_type=bf16_type if row_pairs else (bf16_type, bf16_type),
  )
  def decode(_, codes, scales):
    i32 = ir.IntegerType.get_signless(32)
    i8 = ir.IntegerType.get_signless(8)

    def const(v):
      return arith.constant(i32, v)

    tid = mgpu_utils.thread_idx()
    in_wg = arith.remui(tid, const(128))
    # Row of this thread inside the 128-row tile (row half 0; half 1 is +8).
    if row_base is None:
      first = arith.muli(arith.divui(tid, const(128)), const(WG_ROWS))
    else:
      first = const(row_base)
    row = arith.addi(
      arith.addi(first, arith.muli(arith.divui(in_wg, const(32)), const(16))),
      arith.divui(arith.remui(in_wg, const(32)), const(4)),
    )
    # Lane t holds block 2j + (t >> 1) of register j: bytes b and 2 + b of
    # a word of 4 scales (b = t >> 1), picked into the low bytes of the two
    # 16-bit halves by prmt (zeros above them).
    upper_lane = arith.andi(arith.shrui(in_wg, const(1)), const(1))
    pick = arith.addi(const(0x4240), arith.muli(upper_lane, const(0x0101)))
    base = mgpu_utils.memref_ptr(scales)

    def load_word(r, chunk):
      word = arith.addi(
        arith.muli(arith.remui(r, const(32)), const(4)),
        arith.divui(r, const(32)),
      )
      offset = arith.addi(arith.muli(word, const(4)), const(chunk * 512))
      ptr = mgpu_utils.getelementptr(base, [offset], i8)
      return llvm.load(i32, ptr)

    def pair_scales(word):
      """-> bf16x2 {s, s} * 2**118 for the even and the odd j of a chunk.

      Bytes b and b + 2 of the word go into the low byte of each half;
      shifted left by 4, an E4M3 byte (>= 0) is the bf16 of its value times
      2**-120, subnormals included; then twice * 2**119 (2**238 is beyond
      bf16). Four integer ops per two scales; cvt.f16x2.e4m3x2 and a rebias
      took five and a cvt, 3-6% more kernel time at decode (NOTES.md)."""
      return mgpu_utils.inline_ptx(
        """{
        .reg .b32 p, b, two119, zero;
        mov.b32 two119, 0x7B007B00;
        mov.b32 zero, 0;
        prmt.b32 p, $2, zero, $3;
        shl.b32 b, p, 4;
        mul.rn.bf16x2 b, b, two119;
        mul.rn.bf16x2 b, b, two119;
        prmt.b32 $0, b, b, 0x1010;
        prmt.b32 $1, b, b, 0x3232;
        }""",
        word,
        pick,
        result_types=[i32, i32],
      )

    def scale_halves(word):
      """`pair_scales` without the broadcasts: one bf16x2 {s_even, s_odd}."""
      return mgpu_utils.inline_ptx(
        """{
        .reg .b32 p, two119, zero;
        mov.b32 two119, 0x7B007B00;
        mov.b32 zero, 0;
        prmt.b32 p, $1, zero, $2;
        shl.b32 p, p, 4;
        mul.rn.bf16x2 p, p, two119;
        mul.rn.bf16x2 $0, p, two119;
        }""",
        word,
        pick,
        result_types=[i32],
      )[0]

    # Register j holds plane columns [16j, 16j + 16): this part's are
    # `first` to `first + count`, scaled by chunk j // 2.
    count = codes.registers.shape[1] // plan.parts
    first = part * count
    if row_pairs:
      if DIAGNOSTIC not in ("", "no_mma"):
        raise ValueError(f"row_pairs has no {DIAGNOSTIC=} decode")
      return _decode_row_pairs(codes, row, load_word, first, count)
    scale_regs = {}
    halves = SCALE_HALF_OPERANDS and DIAGNOSTIC in ("", "no_mma")
    chunks = range(first // 2, -(-(first + count) // 2))
    for half in range(2):
      r = arith.addi(row, const(8 * half))
      if DIAGNOSTIC == "one_scale_load":
        shared_word = load_word(r, chunks[0])
      for chunk in chunks:
        if DIAGNOSTIC == "no_scales":
          even = odd = const(0x7A807A80)  # bf16 {2**118, 2**118}
        elif DIAGNOSTIC == "one_scale_load":
          even, odd = pair_scales(arith.xori(shared_word, const(chunk)))
        elif DIAGNOSTIC == "raw_scales":
          even = odd = load_word(r, chunk)
        elif halves:
          even = odd = scale_halves(load_word(r, chunk))
        else:
          even, odd = pair_scales(load_word(r, chunk))
        scale_regs[half, 2 * chunk] = even
        scale_regs[half, 2 * chunk + 1] = odd

    bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
    out_shape = list(codes.registers.shape)
    out_shape[1] = 2 * count
    lo_regs = np.empty(out_shape, dtype=object)
    hi_regs = np.empty(out_shape, dtype=object)
    for idx, reg in np.ndenumerate(codes.registers):
      j, half = idx[1], idx[4]
      if not first <= j < first + count:
        continue
      word = mgpu_utils.bitcast(reg, i32)
      if DIAGNOSTIC == "no_decode":
        hi1 = lo1 = hi0 = lo0 = word
      else:
        # Both decoders put each code's sign at bit 15 of its bf16 half and
        # its magnitude at bits 6..8 (a bf16 worth code * 2**-126).
        decode_ptx = _decode_text(
          _TWIDDLED_DECODE if plan.config.twiddled else _NATURAL_DECODE,
          (j % 2,) * 4 if halves else None,
        )
        hi1, lo1, hi0, lo0 = mgpu_utils.inline_ptx(
          decode_ptx,
          word,
          scale_regs[half, j],
          result_types=[i32] * 4,
        )
      for sub, (lo, hi) in enumerate(((lo0, hi0), (lo1, hi1))):
        out_idx = list(idx)
        out_idx[1] = 2 * (j - first) + sub
        lo_regs[tuple(out_idx)] = mgpu_utils.bitcast(lo, bf16x2)
        hi_regs[tuple(out_idx)] = mgpu_utils.bitcast(hi, bf16x2)

    def array(regs):
      if not warp_mma:
        return mgpu.FragmentedArray(
          _registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None
        )
      # Register (0, c, 0, 0, h) of the WGMMA layout holds columns 8c +
      # 2 (lane % 4) + {0, 1} of row 8h + lane / 4 of the warp's 16; the
      # mma.sync A layout holds the same in register (0, c // 2, 0, c % 2,
      # h): a reshape.
      lhs = mgpu.MMALayouts(ir.BF16Type.get(), m_warps=4).lhs
      shape = lhs.registers_shape((WG_ROWS, plan.part_k))
      return mgpu.FragmentedArray(
        _registers=regs.reshape(shape), _layout=lhs, _is_signed=None
      )

    return array(lo_regs), array(hi_regs)

  tiles = decode(w, s_smem)
  return (tiles,) if row_pairs else tiles


def _decode_row_pairs(codes, row, load_word, first: int, count: int):
  """`_decode_ptx` of a `sm90_layout.to_row_pairs` tile (registers `first`
  to `first + count` along K): one bf16 A tile in natural K order.

  Register (j, h) holds 16-column chunk c = 2j + h of rows `row` and `row +
  8`; its decode outputs (n0, n4), (n1, n5) go to A registers (2c, 2c + 1)
  of the first row and (n2, n6), (n3, n7) to those of the second, scaled
  by the halves of one bf16x2 {s(row, c), s(row + 8, c)}.
  """
  i32 = ir.IntegerType.get_signless(32)

  def const(v):
    return arith.constant(i32, v)

  def row_scales(chunk: int):
    """bf16x2 {s(row, b), s(row + 8, b)} * 2**118 of 16-column chunk
    `chunk` of the step (b = chunk % 4 of scale chunk chunk // 4)."""
    b = chunk % 4
    # prmt picks byte b of each row's word into the low byte of each half;
    # selector bit 3 copies a byte's sign bit, so 8 | b gives a zero byte
    # (block scales are non-negative).
    pick = b | (8 | b) << 4 | (4 + b) << 8 | (8 | (4 + b)) << 12
    return mgpu_utils.inline_ptx(
      f"""{{
      .reg .b32 p, two119;
      mov.b32 two119, 0x7B007B00;
      prmt.b32 p, $1, $2, {pick};
      shl.b32 p, p, 4;
      mul.rn.bf16x2 p, p, two119;
      mul.rn.bf16x2 $0, p, two119;
      }}""",
      load_word(row, chunk // 4),
      load_word(arith.addi(row, const(8)), chunk // 4),
      result_types=[i32],
    )[0]

  # $3, $2: the first row's registers; $1, $0: the second row's.
  decode_ptx = _decode_text(_TWIDDLED_DECODE, halves=(1, 1, 0, 0))
  bf16x2 = ir.VectorType.get((2,), ir.BF16Type.get())
  out_shape = list(codes.registers.shape)
  out_shape[1] = 4 * count  # 8-column groups of the part's 32 count columns
  out_shape[4] = 2
  regs = np.empty(out_shape, dtype=object)
  for idx, reg in np.ndenumerate(codes.registers):
    j, half = idx[1], idx[4]
    if not first <= j < first + count:
      continue
    chunk = 2 * j + half
    o3, o2, o1, o0 = mgpu_utils.inline_ptx(
      decode_ptx,
      mgpu_utils.bitcast(reg, i32),
      row_scales(chunk),
      result_types=[i32] * 4,
    )
    local = chunk - 2 * first
    for value, group, row_half in (
      (o0, 2 * local, 0),
      (o1, 2 * local + 1, 0),
      (o2, 2 * local, 1),
      (o3, 2 * local + 1, 1),
    ):
      out_idx = list(idx)
      out_idx[1], out_idx[4] = group, row_half
      regs[tuple(out_idx)] = mgpu_utils.bitcast(value, bf16x2)
  return mgpu.FragmentedArray(
    _registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None
  )


# Natural order: each 16-bit half's top nibble is one code, so the word is
# shifted by 4 between codes; 15 integer operations per 8 codes.
_NATURAL_DECODE = """{
        .reg .b32 q4, q8, q12, m;
        SCALE_SETUP
        shl.b32 q4, $4, 4;
        shl.b32 q8, $4, 8;
        shl.b32 q12, $4, 12;
        and.b32 m, $4, 0x70007000;
        shr.b32 m, m, 6;
        lop3.b32 m, $4, m, 0x80008000, 0xEC;
        mul.rn.bf16x2 $0, m, SCALE;
        and.b32 m, q4, 0x70007000;
        shr.b32 m, m, 6;
        lop3.b32 m, q4, m, 0x80008000, 0xEC;
        mul.rn.bf16x2 $1, m, SCALE;
        and.b32 m, q8, 0x70007000;
        shr.b32 m, m, 6;
        lop3.b32 m, q8, m, 0x80008000, 0xEC;
        mul.rn.bf16x2 $2, m, SCALE;
        and.b32 m, q12, 0x70007000;
        shr.b32 m, m, 6;
        lop3.b32 m, q12, m, 0x80008000, 0xEC;
        mul.rn.bf16x2 $3, m, SCALE;
        }"""

# `sm90_layout` order: outputs (n0, n4), (n1, n5), (n2, n6) are the word
# rotated left by 2, 6 and 12 and masked; (n3, n7) is the word masked, with
# its mantissa bits from the word rotated by 8 (prmt); 9 integer operations.
_TWIDDLED_DECODE = """{
        .reg .b32 r, mask, keep, mant;
        SCALE_SETUP
        mov.b32 mask, 0x81C081C0;
        mov.b32 keep, 0x81808180;
        mov.b32 mant, 0x00400040;
        shf.l.wrap.b32 r, $4, $4, 2;
        and.b32 r, r, mask;
        mul.rn.bf16x2 $3, r, SCALE;
        shf.l.wrap.b32 r, $4, $4, 6;
        and.b32 r, r, mask;
        mul.rn.bf16x2 $2, r, SCALE;
        shf.l.wrap.b32 r, $4, $4, 12;
        and.b32 r, r, mask;
        mul.rn.bf16x2 $1, r, SCALE;
        prmt.b32 r, $4, $4, 0x2103;
        and.b32 keep, $4, keep;
        lop3.b32 r, r, mant, keep, 0xEA;
        mul.rn.bf16x2 $0, r, SCALE;
        }"""


def _decode_text(decode_ptx: str, halves: tuple[int, ...] | None = None) -> str:
  """`decode_ptx` multiplying by its scale operand ($5) as it is, or, with
  `halves`, output $o by half `halves[o]` of it (0 low, 1 high) broadcast
  to both (`SCALE_HALF_OPERANDS`: one half for all four; `Config.row_pairs`:
  $2 and $3 the low one, $0 and $1 the high one)."""
  if halves is None:
    return decode_ptx.replace("        SCALE_SETUP\n", "").replace(
      "SCALE", "$5"
    )
  used = sorted(set(halves))
  setup = "\n        ".join(
    [
      ".reg .b16 lo, hi;",
      ".reg .b32 " + ", ".join(f"s{h}" for h in used) + ";",
      "mov.b32 {lo, hi}, $5;",
      *(f"mov.b32 s{h}, {('{lo, lo}', '{hi, hi}')[h]};" for h in used),
    ]
  )
  lines = decode_ptx.replace("SCALE_SETUP", setup).split("\n")
  for i, line in enumerate(lines):
    if "SCALE" in line:  # mul.rn.bf16x2 $o, value, SCALE;
      out = int(line.split("$")[1][0])
      lines[i] = line.replace("SCALE", f"s{halves[out]}")
  return "\n".join(lines)


def _keep_alive(*tiles, layout=plgpu.Layout.WGMMA):
  """Empty volatile asm that reads every register of `tiles` (in
  `layout`), so that their computation is not removed (`DIAGNOSTIC`)."""

  @plgpu.inline_mgpu(arg_types=(layout,) * len(tiles))
  def sink(_, *arrays):
    i32 = ir.IntegerType.get_signless(32)
    for array in arrays:
      for reg in array.registers.flat:
        mgpu_utils.inline_ptx(
          "", mgpu_utils.bitcast(reg, i32), has_side_effects=True
        )

  sink(*tiles)


def _decode_jnp(w, s_smem, wg, plan: Plan, part: int = 0):
  """The same numbers and column order with jnp ops, for the interpreter
  (a tuple of one natural-order tile with `config.row_pairs`)."""
  if plan.config.twiddled:
    w = sm90_layout.untwiddle(w)
  if plan.config.row_pairs:
    w = sm90_layout.from_row_pairs(w)
  codes = w.astype(jnp.int32)
  scale_bytes = lax.bitcast_convert_type(s_smem[...], jnp.uint8)
  scale_bytes = scale_bytes.reshape(plan.scale_chunks, 512)
  # Byte 4 * (rr * 4 + r // 32) + q of a chunk: row r = 32 * (r // 32) + rr,
  # block q of the chunk.
  scale_bytes = scale_bytes.reshape(plan.scale_chunks, 32, 4, 4)
  scale_bytes = scale_bytes.transpose(2, 1, 0, 3).reshape(TILE_ROWS, -1)
  scale_bytes = lax.dynamic_slice_in_dim(scale_bytes, wg * WG_ROWS, WG_ROWS)
  scales = lax.bitcast_convert_type(scale_bytes, jnp.float8_e4m3fn)
  scales = jnp.repeat(
    scales.astype(jnp.float32), PLANE_COLUMNS_PER_BLOCK, axis=1
  )

  def values(c, scales):
    # f16 bit pattern of the code times 2**14 (flush-safe on CPU).
    bits = ((c & 8) << 12) | ((c & 7) << 9)
    half = lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16)
    value = half.astype(jnp.float32) * 2.0**14
    return value * scales * 2.0**PRODUCT_EXPONENT

  def plane(c):
    value = values(c, scales)
    # plane column 4t + 2e + h -> A column 8h + 2t + e
    value = value.reshape(WG_ROWS, -1, 4, 2, 2).transpose(0, 1, 4, 2, 3)
    return value.reshape(WG_ROWS, -1).astype(jnp.bfloat16)

  if plan.config.row_pairs:  # natural K order, two codes a byte
    natural = jnp.stack([codes & 0xF, codes >> 4], axis=-1)
    natural = natural.reshape(WG_ROWS, -1)
    value = values(natural, jnp.repeat(scales, 2, axis=1))
    width = 2 * plan.part_k
    return (value[:, part * width : (part + 1) * width].astype(jnp.bfloat16),)
  columns = slice(part * plan.part_k, (part + 1) * plan.part_k)
  return plane(codes & 0xF)[:, columns], plane(codes >> 4)[:, columns]


def uses_row_pairs(weight_layout: str, config: config_lib.Config) -> bool:
  """Whether `kernel_weight` gives the row-pair kernel (`Config.row_pairs`,
  or a layer stored so)."""
  return config.row_pairs or weight_layout == "sm90_row_pairs"


def kernel_weight(weight, weight_layout: str, config: config_lib.Config):
  """(weight, config) for `matmul`: `sm90_layout` weights get the matching
  decoder (row-pair weights the row-pair kernel); a natural weight under a
  `twiddled` config, or any other under a `row_pairs` one, is rearranged
  per call (a copy, for tuning)."""
  if uses_row_pairs(weight_layout, config):
    if weight_layout != "sm90_row_pairs":  # regrouped per call (Config doc)
      natural = common.natural_weight(weight, weight_layout)
      weight = sm90_layout.twiddle(sm90_layout.to_row_pairs(natural))
    return weight, dataclasses.replace(config, twiddled=True, row_pairs=True)
  if weight_layout in common.TWIDDLED:
    return weight, dataclasses.replace(config, twiddled=True)
  if config.twiddled:
    return sm90_layout.twiddle(weight), config
  return weight, config


# ------------------------------------------------------------------- kernel
def matmul(
  packed: jax.Array,  # uint8 [E, N, K/2]: E = 1 for one layer
  # bf16 [2, M, K/2] in `split_activations` order, or its two planes
  # [M, K/2] as separate arrays (XLA gathers rows into two arrays faster
  # than into one stacked array: 69 vs 121 us for Qwen3-30B-A3B's MoE).
  x_planes: jax.Array | tuple[jax.Array, jax.Array],
  scale_chunks: jax.Array,  # e4m3 [E, ceil(N/128), ceil(K/64), 2, 256]
  # float32 [E, ceil(N/64)]: the epilogue scale per 64 rows of each weight;
  # or a tuple of float32 [E] whose product scales all of weight e's rows
  # (the prepared leaves as they are: no XLA pass builds a table per call).
  factor: jax.Array | tuple[jax.Array, ...],
  tile_expert: jax.Array | None = None,  # int32 [M / block_m]
  used_tiles: jax.Array | None = None,  # int32: tiles with tile_expert >= 0
  *,
  config: config_lib.Config,
  shared_rows: bool = False,
  float32_out: bool = False,
  swiglu: bool = False,
  planes_out: bool = False,
  num_sms: int = config_lib.H200_SMS,
  interpret: bool = False,
) -> jax.Array:
  """`x @ deq(W[e]).T * factor[e]`, one weight matrix `e` per token tile.

  With `swiglu`, W's rows are [gate; up] (N = 2I, I % 64 == 0) and the
  kernel returns `silu(gate) * up`, bf16 `[M, ceil128(I)]` (columns past
  I undefined): each warpgroup keeps a gate and an up accumulator for the
  same 64 columns, so the epilogue needs no exchange. Where I % 128 == 0,
  rows r and I + r of W sit in the same half of their 128-row scale tiles;
  else (gpt-oss: I = 2880) a 128-row tile's up rows start mid-tile, load at
  an element offset and take their scales from two scale tiles, the other
  half of each. Needs `splits == 1`.

  With `config.row_tiles == 2` each warpgroup multiplies two 64-row blocks
  by the same activation tile into two accumulators and stores them one
  after the other: in 128-row CTAs rows `64 wg` and `128 + 64 wg` of a
  256-row output tile (each with its own 128-row scale tile; ceil(N / 128)
  must be even), in 64-row CTAs the two halves of one 128-row tile.

  `tile_expert[i]` names the weight matrix of tokens `[i * block_m, (i + 1)
  * block_m)` (grouped GEMM over experts; tokens sorted and padded per
  expert by the caller); a negative entry skips the tile and leaves its
  output rows undefined. None: all tiles use matrix 0 (E = 1). With
  `shared_rows` the activations are one tile of `block_m` rows that every
  token tile multiplies (one token's top-k experts at decode: the
  activation split is then of one tile, not of top_k), and the output
  still has a tile of rows per `tile_expert`. With `config.persistent`,
  `used_tiles` (the tiles with an expert, which must come first) bounds
  the walk: `num_sms` CTAs loop over output tiles.

  Returns bf16 `[M, ceil128(N)]` when `splits == 1` and not
  `float32_out`, else float32 partial sums `[splits, ceil128(N), M]` (the
  caller adds them and slices), both times `factor`. `planes_out` (bf16
  only) writes the bf16 output as the planes `[2, M, ceil128(N) / 2]` of a
  next kernel's activations instead: 64-row block `b` of each 128-row tile
  becomes plane `b % 2`, columns `64 (b // 2) + [0, 64)`, which is
  `split_activations` of the output when W's rows are in
  `sm90_layout.to_plane_rows` order.

  N need not fill whole 128-row tiles: the last tile reads past the weight
  (TMA fills zeros); the swizzled scales are padded to whole 128x4 tiles
  already. K need not be a whole number of `block_k` steps: the last
  step's weights, scales and activations past K read as zeros, and the
  swizzle narrows so that its tiles divide K (Mosaic GPU tiles the GMEM
  view too). N % 8 == 0 and K % 64 == 0.
  """
  n_mats, n, half_k = packed.shape
  splits = config.splits
  if swiglu and (splits != 1 or float32_out or n % (2 * WG_ROWS)):
    raise ValueError(
      f"swiglu needs splits == 1, bf16 output and N % 128 == 0 ({n=})"
    )
  bf16_out = splits == 1 and not float32_out
  direct_partials = not bf16_out and config.direct_partials
  if planes_out and not bf16_out:
    raise ValueError("planes_out needs splits == 1 and bf16 output")
  row_pairs = config.row_pairs
  if row_pairs and (swiglu or planes_out or isinstance(x_planes, tuple)):
    raise ValueError(
      "row_pairs takes natural activations [M, K] and no swiglu or planes_out"
    )
  row_tiles = config.row_tiles
  # 128-row CTAs store both tiles' bf16 blocks from one SMEM slot a
  # warpgroup; 64-row CTAs store float32 partial sums too.
  if row_tiles > 1 and (
    swiglu or planes_out or (not bf16_out and config.cta_rows != WG_ROWS)
  ):
    raise ValueError(
      f"row_tiles={row_tiles} takes no swiglu or planes_out, and bf16"
      " output in 128-row CTAs"
    )
  stacked = not isinstance(x_planes, tuple)
  one_copy = stacked and (ONE_ACTIVATION_COPY or row_pairs)
  planes = (x_planes, x_planes) if stacked else x_planes
  m = planes[0].shape[-2]
  if shared_rows and (tile_expert is None or m != config.block_m):
    raise ValueError(
      f"shared_rows needs tile_expert and one tile of activations ({m=})"
    )
  if row_pairs:  # natural activations, not planes
    want = (m, 2 * half_k)
  else:
    want = (2, m, half_k) if stacked else (m, half_k)
  if any(p.shape != want for p in planes):
    shapes = [p.shape for p in planes]
    raise ValueError(f"activation planes {shapes} != {want} ({stacked=})")
  if shared_rows:  # one output tile of rows per token tile
    m = tile_expert.shape[0] * config.block_m
  plan = Plan(n=n, k=2 * half_k, m=m, splits=splits, config=config)
  cfg = config
  if (
    plan.m % cfg.block_m
    or plan.k % SCALE_CHUNK_K
    or plan.k_steps % splits
    or n % (sm90_layout.ROW_PAIR_ROWS if row_pairs else 8)
  ):
    raise ValueError(
      f"shapes {packed.shape}, {want} not tiled by {cfg}, {splits=}"
    )
  weight_tiles, m_tiles = -(-n // TILE_ROWS), plan.m // cfg.block_m
  single = cfg.cta_rows == WG_ROWS  # one warpgroup per CTA (Config doc)
  # 128-row scale tiles a CTA reads per step (a 64-row CTA reads a whole
  # one, of which it takes one half or, with two row tiles, both).
  cta_scale_tiles = 1 if single else row_tiles
  if weight_tiles % cta_scale_tiles:
    raise ValueError(f"{n=} rows are not whole tiles of {row_tiles} x 128")
  # Output tiles; with swiglu the up rows start `up_blocks` 64-row blocks
  # down, mid-tile when that count is odd.
  inter = n // 2 if swiglu else 0
  n_tiles = (
    -(-inter // TILE_ROWS) if swiglu else weight_tiles // cta_scale_tiles
  )
  out_tile_rows = TILE_ROWS * cta_scale_tiles  # rows of one output tile
  # Accumulators per warpgroup: gate and up with SwiGLU, else one per
  # 64-row block it multiplies.
  n_accs = 2 if swiglu else row_tiles
  up_blocks = inter // WG_ROWS
  up_mid_tile = up_blocks % 2 == 1
  chunks = -(-plan.k // SCALE_CHUNK_K)
  if scale_chunks.shape != (n_mats, weight_tiles, chunks, 2, 256):
    raise ValueError(f"scale chunks {scale_chunks.shape} do not match {n=}")
  per_block = not isinstance(factor, tuple)
  factors = (factor,) if per_block else factor
  want_factor = (n_mats, 2 * weight_tiles) if per_block else (n_mats,)
  if not factors or any(
    f.shape != want_factor or f.dtype != jnp.float32 for f in factors
  ):
    got = [(f.dtype, f.shape) for f in factors]
    raise ValueError(f"factor {got} != float32 {want_factor}")
  grouped = tile_expert is not None
  if grouped and tile_expert.shape != (m_tiles,):
    raise ValueError(f"tile_expert {tile_expert.shape} != ({m_tiles},)")
  if not grouped:
    tile_expert = jnp.zeros((m_tiles,), jnp.int32)
  steps = plan.steps_per_split
  release = 1 if cfg.async_mma else 0  # input slots held one step longer
  a_in_smem = interpret
  compute_wgs = 1 if single else 2

  def kernel(w_gmem, xe_gmem, xo_gmem, s_gmem, e_gmem, v_gmem, *refs):
    f_gmems, (o_gmem, *rest) = refs[: len(factors)], refs[len(factors) :]
    o_smem = None if direct_partials else rest.pop(0)
    a_smem = rest[0] if a_in_smem else None
    acc_type = plgpu.ACC((WG_ROWS, cfg.block_m), jnp.float32)

    def in_specs(rows, row_block, mi, k0, expert):
      """Pipeline inputs of one output tile: weight rows `[row_block *
      rows, +rows)`, both activation planes, the 128-row scale tiles
      holding them (`cta_scale_tiles`), and with SwiGLU the up rows (I rows
      down) and their scales."""
      # The block of `cta_scale_tiles` scale tiles holding the rows.
      tile = row_block * rows // (TILE_ROWS * cta_scale_tiles)
      scale_tiles = (
        (None, None) if cta_scale_tiles == 1 else (None, cta_scale_tiles)
      )
      xi = 0 if shared_rows else mi  # the activation tile

      def spec(shape, index_map, transforms=()):
        return plgpu.BlockSpec(
          shape, index_map, transforms=transforms, delay_release=release
        )

      def weight(block, scale_tile):
        return [
          spec(
            (None, rows, plan.plane_k),
            lambda k: (expert, block, k0 + k),
            _swizzled(8, plan.plane_k, half_k),
          ),
          spec(
            (*scale_tiles, plan.scale_chunks, 2, 256),
            lambda k: (expert, scale_tile, k0 + k, 0, 0),
          ),
        ]

      w_spec, s_spec = weight(row_block, tile)

      # Swizzled per K part, so that a part is whole tiles for wgmma.
      transforms = _swizzled(16, 2 * plan.part_k, 2 * half_k)

      def x_spec(plane):
        if not stacked:
          return spec(
            (cfg.block_m, plan.plane_k), lambda k: (xi, k0 + k), transforms
          )
        return spec(
          (None, cfg.block_m, plan.plane_k),
          lambda k: (plane, xi, k0 + k),
          transforms,
        )

      if row_pairs:
        x_specs = [
          spec(
            (cfg.block_m, cfg.block_k),
            lambda k: (xi, k0 + k),
            _swizzled(16, 4 * plan.part_k, 4 * half_k),
          )
        ]
      elif one_copy:
        x_specs = [
          spec(
            (2, cfg.block_m, plan.plane_k),
            lambda k: (0, xi, k0 + k),
            transforms,
          )
        ]
      else:
        x_specs = [x_spec(0), x_spec(1)]
      specs = [w_spec, *x_specs, s_spec]
      if not swiglu:
        return specs
      if rows == WG_ROWS or not up_mid_tile:  # whole 64-row blocks
        up_block = row_block * rows // WG_ROWS + up_blocks
        return specs + weight(
          up_block * WG_ROWS // rows, up_block * WG_ROWS // TILE_ROWS
        )
      # 128 up rows from row I + 128 row_block (an element offset), and the
      # two scale tiles they span.
      return specs + [
        spec(
          (None, pl.Element(rows), plan.plane_k),
          lambda k: (expert, inter + row_block * rows, k0 + k),
          _swizzled(8, plan.plane_k, half_k),
        ),
        spec(
          (None, pl.Element(2), plan.scale_chunks, 2, 256),
          lambda k: (expert, tile + up_blocks // 2, k0 + k, 0, 0),
        ),
      ]

    def body_refs(refs):
      """(weights, even plane, odd plane, scales, the rest) of a pipeline
      body's SMEM refs (one stacked activation block with `one_copy`)."""
      if one_copy:
        w_smem, x_smem, s_smem, *rest = refs
        if row_pairs:  # natural activations: one [block_m, block_k] tile
          return w_smem, x_smem, None, s_smem, rest
        return w_smem, x_smem.at[0], x_smem.at[1], s_smem, rest
      w_smem, xe_smem, xo_smem, s_smem, *rest = refs
      return w_smem, xe_smem, xo_smem, s_smem, rest

    def decode_registers(w, scales, *, part=0, warp_mma=False):
      """`_decode_ptx` of a weight tile whose `scales` are (the 128-row
      scale tile, the half its rows are in, whether that half is the
      warpgroup index of a two-warpgroup CTA)."""
      s_ref, half, own_half = scales
      if own_half:  # rows from the thread's warpgroup index
        return _decode_ptx(w, s_ref, plan, part=part, warp_mma=warp_mma)
      # The block's scale words start 2 * half words into each chunk.
      words = s_ref.at[:, :, pl.ds(8 * half, 256 - 8)]
      return _decode_ptx(
        w, words, plan, row_base=0, part=part, warp_mma=warp_mma
      )

    def decode_and_mma(w, scales, xe_smem, xo_smem, acc_ref, *, slot, part):
      """Decodes K part `part` of a [64, plane_k] weight tile and issues
      both nibble planes' wgmmas (two groups); -> the wgmmas issued.
      `scales`: (the 128-row scale tile, the half its rows are in, whether
      that half is the warpgroup index of a two-warpgroup CTA). With
      `row_pairs`: one A tile of natural K columns and one wgmma against
      the natural activations (`xe_smem`)."""
      if a_in_smem:
        s_ref, half, _ = scales
        tiles = _decode_jnp(w, s_ref, half, plan, part)
        a_ref = a_smem.at[slot[0], slot[1]]
        for i, tile in enumerate(tiles):
          a_ref[i] = tile
        plgpu.commit_smem()
        tiles = [a_ref.at[i] for i in range(len(tiles))]
      else:
        tiles = decode_registers(w, scales, part=part)
      if DIAGNOSTIC == "no_mma" and not a_in_smem:
        _keep_alive(*tiles)
        return 0
      width = plan.part_k * (2 if row_pairs else 1)  # K columns of a tile
      columns = pl.ds(part * width, width)
      sources = (xe_smem,) if row_pairs else (xe_smem, xo_smem)
      for tile, x_smem in zip(tiles, sources, strict=True):
        plgpu.wgmma(acc_ref, tile, x_smem.at[:, columns].T)
      return len(sources)  # wgmmas issued, each its own commit group

    def step(weights, xe_smem, xo_smem, accs, *, slot):
      """One K step: decode and MMA each (weight, scales) into its
      accumulator (`scales` as `decode_and_mma` takes them).

      With `async_mma` the step runs in two K parts, and each part's
      wgmmas run while the next part decodes. A part's A registers are
      rewritten (next step) only after a wait that covers its wgmmas:
      register A operands must not change while a wgmma reads them
      (leaving a whole step in flight instead gave NaNs on the H200). The
      last part's wgmmas still read their input slot when the step ends,
      so slots are released a step late (`delay_release`).
      """
      # Each tile's codes load just before their first decode (fewer live
      # registers with SwiGLU's second weight).
      codes = [None] * len(weights)
      for part in range(plan.parts):
        issued = 0
        for i, ((w_ref, scales), acc_ref) in enumerate(
          zip(weights, accs, strict=True)
        ):
          if codes[i] is None:
            codes[i] = plgpu.load(w_ref, layout=plgpu.Layout.WGMMA_8BIT)
          issued += decode_and_mma(
            codes[i],
            scales,
            xe_smem,
            xo_smem,
            acc_ref,
            slot=(slot, part * len(accs) + i),  # interpreter A tile
            part=part,
          )
          if not cfg.async_mma:
            plgpu.wgmma_wait(0)
        if cfg.async_mma:
          # All but this part's groups. Counting what was issued, not
          # assuming two a weight: row pairs issue one, and a wait for two
          # left the previous part's wgmmas in flight while the next
          # decode reused their A registers (garbage outputs on the H200).
          plgpu.wgmma_wait(issued)

    def warp_mma_step(weights, xe_smem, xo_smem, accs):
      """One K step with warp-level `mma.sync` (`Config.warp_mma`): the
      activations load once into the B layout, each weight tile decodes
      into A registers, and the accumulators (values the pipeline carries)
      come back; no warpgroup fences or waits between decode and MMA."""
      if not a_in_smem:
        rhs = plgpu.Layout.MMA_RHS(jnp.bfloat16)
        xe = plgpu.load(xe_smem.T, layout=rhs)
        xo = plgpu.load(xo_smem.T, layout=rhs)
      out = []
      for (w_ref, scales), acc in zip(weights, accs, strict=True):
        codes = plgpu.load(w_ref, layout=plgpu.Layout.WGMMA_8BIT)
        if a_in_smem:  # the interpreter has no mma.sync: plain dots
          s_ref, half, _ = scales
          lo, hi = _decode_jnp(codes, s_ref, half, plan)
          for tile, x_ref in ((lo, xe_smem), (hi, xo_smem)):
            acc = acc + jnp.dot(
              tile, x_ref[...].T, preferred_element_type=jnp.float32
            )
          out.append(acc)
          continue
        lo, hi = decode_registers(codes, scales, warp_mma=True)
        if DIAGNOSTIC == "no_mma":
          _keep_alive(lo, hi, layout=plgpu.Layout.MMA_LHS(jnp.bfloat16))
          out.append(acc)
          continue
        out.append(plgpu.mma(plgpu.mma(acc, lo, xe), hi, xo))
      return tuple(out)

    def acc_groups(accs):
      """Accumulators that finish together: gate and up (or one block's
      accumulator), or each of two row tiles' blocks one after the other."""
      return [accs] if row_tiles == 1 else [[acc] for acc in accs]

    def finish(accs, block, expert, mi, si, slot):
      """Scales the accumulators of 64-row block `block` (and applies
      SwiGLU), then stores them from SMEM slot `slot`. `accs`: wgmma
      accumulator refs, or values (`Config.warp_mma`)."""

      def scaled(acc_ref, factor_block):
        if per_block:
          scale = f_gmems[0][expert, factor_block]
        else:  # in the order XLA would multiply them
          scale = f_gmems[0][expert]
          for f_gmem in f_gmems[1:]:
            scale = scale * f_gmem[expert]
        acc = acc_ref if cfg.warp_mma else acc_ref[...]
        return acc * (scale * (2.0**-PRODUCT_EXPONENT))

      acc = scaled(accs[0], block)
      if swiglu:
        # Past I (the last tile when I % 128 == 64) the up rows are past
        # the weight (zeros): any table entry will do, so stay inside it.
        up = scaled(
          accs[1], jnp.minimum(block + up_blocks, 2 * weight_tiles - 1)
        )
        acc = acc / (1.0 + jnp.exp(-acc)) * up
      rows = pl.ds(block * WG_ROWS, WG_ROWS)
      tokens = pl.ds(mi * cfg.block_m, cfg.block_m)
      if bf16_out:
        o_smem.at[slot].T[...] = acc.astype(jnp.bfloat16)
        plgpu.commit_smem()
        if planes_out:
          columns = pl.ds((block // 2) * WG_ROWS, WG_ROWS)
          dst = o_gmem.at[block % 2, tokens, columns]
        else:
          dst = o_gmem.at[tokens, rows]
        plgpu.copy_smem_to_gmem(o_smem.at[slot], dst)
      elif direct_partials:
        # Straight from the accumulator layout: a warp's store writes whole
        # 32-byte sectors (8 rows of 8 tokens), and nothing waits on it.
        o_gmem.at[si, rows, tokens][...] = acc
        return
      else:
        o_smem[slot] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[slot], o_gmem.at[si, rows, tokens])
      # o_smem is rewritten by the next tile.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def make_pipeline(ni, mi, si, expert):
      """The K loop of one 128-row output tile (rows ni, tokens mi, K split
      si) on two compute warpgroups fed by a TMA warpgroup."""

      def mma_body(_, *refs):
        w_smem, xe_smem, xo_smem, s_smem, rest = body_refs(refs)
        *up_refs, accs = rest
        wg = lax.axis_index("wg")
        rows = pl.ds(wg * WG_ROWS, WG_ROWS)
        weights = [(w_smem.at[rows], (s_smem, wg, True))]
        if row_tiles > 1:  # rows wg * 64 of each 128-row tile
          weights = [
            (
              w_smem.at[pl.ds(t * TILE_ROWS + wg * WG_ROWS, WG_ROWS)],
              (s_smem.at[t], wg, True),
            )
            for t in range(row_tiles)
          ]
        if swiglu:
          w_up, s_up = up_refs
          # Mid-tile, warpgroup wg's up rows are half 1 - wg of the wg-th
          # of the two scale tiles.
          up_scales = (
            (s_up.at[wg], 1 - wg, False) if up_mid_tile else (s_up, wg, True)
          )
          weights.append((w_up.at[rows], up_scales))
        step(weights, xe_smem, xo_smem, accs, slot=wg)
        return accs

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, accs=[acc_type] * n_accs)
        def _(accs):
          eval_pipeline(accs)
          wg = lax.axis_index("wg")
          for t, group in enumerate(acc_groups(accs)):
            finish(group, 2 * (row_tiles * ni + t) + wg, expert, mi, si, wg)

      return plgpu.emit_pipeline_warp_specialized(
        mma_body,
        grid=(steps,),
        memory_registers=40,
        in_specs=in_specs(out_tile_rows, ni, mi, si * steps, expert),
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.num_stages,
        compute_context=compute_context,
      )

    def one_warpgroup_pipeline(ni, mi, si, expert):
      """The K loop of 64-row block `ni` (with two row tiles, 128-row tile
      `ni`) on a CTA of one warpgroup, which issues its own TMA loads (plain
      pipeline, no register split); with `Config.warp_mma` the accumulators
      are values the pipeline carries."""

      def block_weights(w_smem, s_smem, up_refs):
        if row_tiles > 1:  # both halves of one 128-row tile
          return [
            (w_smem.at[pl.ds(h * WG_ROWS, WG_ROWS)], (s_smem, h, False))
            for h in range(row_tiles)
          ]
        weights = [(w_smem, (s_smem, ni % 2, False))]
        if swiglu:  # 64-row block ni + up_blocks
          w_up, s_up = up_refs
          weights.append((w_up, (s_up, (ni + up_blocks) % 2, False)))
        return weights

      pipeline = functools.partial(
        plgpu.emit_pipeline,
        grid=(steps,),
        in_specs=in_specs(WG_ROWS * row_tiles, ni, mi, si * steps, expert),
        max_concurrent_steps=cfg.num_stages,
      )
      if cfg.warp_mma:

        def warp_body(_, *refs):
          w_smem, xe_smem, xo_smem, s_smem, rest = body_refs(refs)
          *up_refs, accs = rest
          weights = block_weights(w_smem, s_smem, up_refs)
          return warp_mma_step(weights, xe_smem, xo_smem, accs)

        zeros = plgpu.layout_cast(
          jnp.zeros((WG_ROWS, cfg.block_m), jnp.float32),
          plgpu.Layout.WGMMA,  # = the mma.sync accumulator layout
        )
        accs = pipeline(warp_body, init_carry=(zeros,) * n_accs)(*operands)
        finish(accs, ni, expert, mi, si, 0)
        return

      @functools.partial(pl.run_scoped, accs=[acc_type] * n_accs)
      def _(accs):
        def body(_, *refs):
          w_smem, xe_smem, xo_smem, s_smem, up_refs = body_refs(refs)
          weights = block_weights(w_smem, s_smem, up_refs)
          step(weights, xe_smem, xo_smem, accs, slot=0)

        pipeline(body)(*operands)
        for t, group in enumerate(acc_groups(accs)):
          finish(group, row_tiles * ni + t, expert, mi, si, 0)

    operands = (
      (w_gmem, xe_gmem, s_gmem)
      if one_copy
      else (w_gmem, xe_gmem, xo_gmem, s_gmem)
    )
    if swiglu:
      operands += (w_gmem, s_gmem)
    if not cfg.persistent:
      ni, mi, si = (lax.axis_index(a) for a in ("n", "m", "split"))
      expert = e_gmem[mi]

      @pl.when(expert >= 0)
      def _():
        if single:
          one_warpgroup_pipeline(ni, mi, si, expert)
        else:
          make_pipeline(ni, mi, si, expert)(*operands)

      return

    # Persistent: each CTA walks output tiles (tokens outer, rows, K split)
    # with one set of pipeline buffers, so the TMA warpgroup runs into the
    # next tile while the compute warpgroups finish this one. Token tiles
    # past `v_gmem[0]` (the used ones; they come first) are not visited.
    zero = jnp.int32(0)
    allocations = make_pipeline(zero, zero, zero, zero).get_allocations(
      *operands
    )

    @functools.partial(
      pl.run_scoped, allocations=allocations, collective_axes="wg"
    )
    def _(allocations):
      @plgpu.nd_loop((v_gmem[0], n_tiles, splits), collective_axes="sm")
      def _(info):
        mi, ni, si = info.index
        expert = e_gmem[mi]
        make_pipeline(ni, mi, si, expert)(*operands, allocations=allocations)

  # Outputs have whole row tiles: with a store lying wholly past the end of
  # the output, N=64 came out wrong on the H200, so none is issued.
  n_rows = n_tiles * out_tile_rows
  if bf16_out:
    shape = (2, plan.m, n_rows // 2) if planes_out else (plan.m, n_rows)
    out_type = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    o_smem = plgpu.SMEM(
      (compute_wgs, cfg.block_m, WG_ROWS),
      jnp.bfloat16,
      transforms=_swizzled(16, 2 * WG_ROWS),
    )
  else:
    out_type = jax.ShapeDtypeStruct((splits, n_rows, plan.m), jnp.float32)
    o_smem = (
      None
      if direct_partials
      else plgpu.SMEM((compute_wgs, WG_ROWS, cfg.block_m), jnp.float32)
    )
  scratch = [] if o_smem is None else [o_smem]
  if a_in_smem:
    a_tiles = n_accs * plan.parts
    # Two plane tiles of part_k columns, or one natural tile of twice that.
    tiles, width = (1, 2 * plan.part_k) if row_pairs else (2, plan.part_k)
    scratch.append(
      plgpu.SMEM(
        (compute_wgs, a_tiles, tiles, WG_ROWS, width),
        jnp.bfloat16,
        transforms=_swizzled(16, 2 * width),
      )
    )
  if cfg.persistent:
    work = m_tiles * n_tiles * splits
    grid, grid_names = (min(num_sms, work),), ("sm",)
  else:
    row_blocks = n_tiles * out_tile_rows // (cfg.cta_rows * row_tiles)
    if swiglu:  # 64-row CTAs stop at I: past it a block's up scales would
      # lie past the scale array (a blocked TMA copy promised in bounds).
      row_blocks = -(-inter // cfg.cta_rows)
    grid, grid_names = (row_blocks, m_tiles, splits), ("n", "m", "split")
  call = plgpu.kernel(
    kernel,
    out_type=out_type,
    grid=grid,
    grid_names=grid_names,
    # One warpgroup needs no thread axis (and the interpreter then wants
    # no collective axes on the pipeline's scoped buffers).
    num_threads=None if single else 3,
    thread_name=None if single else "wg",
    scratch_types=scratch,
  )
  if used_tiles is None:
    used_tiles = jnp.full((1,), m_tiles, jnp.int32)
  args = (
    packed,
    *planes,
    scale_chunks,
    tile_expert,
    used_tiles.reshape(1),
    *factors,
  )
  if interpret:
    # Mosaic GPU's CPU interpreter (plgpu.kernel(interpret=True) cannot
    # discharge the pipeline's TMA copies).
    with plgpu.force_gpu_interpret_mode():
      return call(*args)
  return call(*args)

"""Tile configuration of the Mosaic GPU NVFP4 matmul, and its heuristic."""

import dataclasses
import math

WGMMA_ROWS = 64  # rows of the A operand one warpgroup issues
TILE_ROWS = 2 * WGMMA_ROWS  # weight rows per CTA (two compute warpgroups)
H200_SMS = 132
# Tokens of a tile whose warpgroups keep two float32 accumulators (SwiGLU's
# gate and up, `Config.row_tiles`): one register per token each and thread
# (160 tokens ran correctly on the H200; 256 would not fit).
MAX_TWO_TILE_TOKENS = 160


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Tiles of the sm90 kernel.

  A CTA covers `cta_rows` weight rows: 128 (two compute warpgroups of 64
  fed by a TMA warpgroup, one 128-row tile of swizzled block scales) or 64
  (one warpgroup that issues its own TMA loads; several such CTAs share an
  SM, so more warps hide the decode's latency at small token counts).

  Attributes:
    block_k: K per pipeline step: 64, 128, 256 or 512.
    block_m: tokens per CTA (the MMA's N side); a multiple of 8, <= 256.
    num_stages: pipeline depth (concurrent TMA loads).
    splits: CTAs that share one output tile's K range (split-K), so that
      small token counts still give every SM weights to stream.
    persistent: one CTA per SM walks the output tiles with one set of
      pipeline buffers (no CTA launch and pipeline fill per tile).
    cta_rows: weight rows per CTA, 128 or 64 (see above; 64 is not
      persistent).
    twiddled: decode weights in `fp4jax.format.sm90_layout` bit order (9
      instead of 15 integer operations per 8 codes). Set for layers
      prepared with `weight_layout="sm90"`; given a natural-order layer,
      `nvfp4_matmul` rearranges its weight per call (a copy, for tuning).
    async_mma: run each K step in `mma_parts` K parts whose wgmmas overlap
      the next part's decode (input slots are released a step later),
      instead of waiting for each step's wgmmas before decoding again.
    mma_parts: K parts of a step with `async_mma`: 2, 4 or 8, each at
      least 16 plane columns (`block_k // 2 // mma_parts`). More than 2
      was slower on every decode layer measured (NOTES.md).
    warp_mma: 64-row CTAs multiply with warp-level `mma.sync` (the
      accumulators carried in registers) instead of wgmma: no warpgroup
      fence or wait between a step's decode and its MMAs. Not with
      `async_mma`.
    row_pairs: weights in `sm90_layout.to_row_pairs` grouping, activations
      read in natural K order: no activation split, twice the block-scale
      conversions per weight (NOTES.md, eighteenth session). A layer
      prepared with `weight_layout="sm90_row_pairs"` always takes it; set
      on another layer, `nvfp4_matmul` regroups the weight per call (a
      copy, for measurements). Only the dense matmul takes it (no SwiGLU,
      planes output or `warp_mma`).
    row_tiles: 64-row blocks each compute warpgroup multiplies by the
      same activation tile (as SwiGLU's gate and up), so that a CTA's
      weight rows double with the epilogues, pipeline steps and activation
      loads of one: for GEMMs of few K steps (the MoE's down projection).
      2 in 128-row CTAs: rows 64 wg and 128 + 64 wg of a 256-row output
      tile (persistent, one K split, bf16 output, N a multiple of 256); 2
      in 64-row CTAs: both halves of one 128-row tile (a CTA streams twice
      the weights per step; no `warp_mma`). Two float32 accumulators per
      warpgroup: at most MAX_TWO_TILE_TOKENS tokens; no SwiGLU, planes
      output or row pairs.
  """

  block_k: int = 128
  block_m: int = 16
  num_stages: int = 4
  splits: int = 1
  persistent: bool = False
  cta_rows: int = TILE_ROWS
  twiddled: bool = False
  async_mma: bool = False
  mma_parts: int = 2
  warp_mma: bool = False
  row_pairs: bool = False
  row_tiles: int = 1

  def __post_init__(self):
    if self.block_k not in (64, 128, 256, 512):
      raise ValueError(f"{self.block_k=} must be 64, 128, 256 or 512")
    if self.block_m % 8 or not 8 <= self.block_m <= 256:
      raise ValueError(f"{self.block_m=} must be a multiple of 8 in [8, 256]")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")
    if self.splits < 1:
      raise ValueError(f"{self.splits=} must be >= 1")
    if self.cta_rows not in (WGMMA_ROWS, TILE_ROWS):
      raise ValueError(f"{self.cta_rows=} must be 64 or 128")
    if self.cta_rows == WGMMA_ROWS and self.persistent:
      raise ValueError("64-row CTAs have no persistent grid")
    if self.mma_parts not in (2, 4, 8) or self.block_k // 2 % (
      16 * self.mma_parts
    ):
      raise ValueError(
        f"{self.mma_parts=} must be 2, 4 or 8 parts of >= 16 plane columns"
      )
    if self.warp_mma and (self.cta_rows != WGMMA_ROWS or self.async_mma):
      raise ValueError("warp_mma needs 64-row CTAs and no async_mma")
    if self.row_pairs and self.warp_mma:
      raise ValueError("row_pairs has no warp_mma")
    if self.async_mma and self.num_stages < 2:
      raise ValueError("async_mma needs num_stages >= 2")
    if self.row_tiles not in (1, 2):
      raise ValueError(f"{self.row_tiles=} must be 1 or 2")
    if self.row_tiles == 2 and (
      (self.wide and (not self.persistent or self.splits != 1))
      or self.warp_mma
      or self.row_pairs
      or self.block_m > MAX_TWO_TILE_TOKENS
    ):
      raise ValueError(
        "row_tiles=2 needs 64-row CTAs or persistent 128-row ones of one"
        f" split, no warp_mma or row pairs and at most {MAX_TWO_TILE_TOKENS}"
        f" tokens ({self})"
      )
    if self.async_mma and self.persistent:
      # Slots released a step late leave the pipeline's barriers a phase
      # behind when the next tile reuses them (the interpreter caught it).
      raise ValueError("async_mma has no persistent grid")

  @property
  def wide(self) -> bool:
    """128-row CTAs (two compute warpgroups), not 64-row ones."""
    return self.cta_rows == TILE_ROWS

  @property
  def direct_partials(self) -> bool:
    """Whether float32 outputs (split-K partial sums, `float32_out`) go to
    GMEM straight from the accumulator registers, with no SMEM epilogue
    tile: in non-persistent 128-row CTAs, whose 32 KB float32 tile at 64
    tokens cost the split layers their fourth stage. Persistent CTAs keep
    the tile (its TMA store overlaps the next tile's first steps), and so
    do 64-row CTAs (their tile is small)."""
    return self.wide and not self.persistent

  def smem_bytes(
    self,
    float32_out: bool = True,
    weights: int = 1,
    scale_tiles: int | None = None,
  ) -> int:
    """Shared memory of a CTA; the epilogue tile is float32 with split-K
    or `float32_out` (none where `direct_partials`), else bf16 (by default
    the larger is assumed).
    `weights`: weight tiles per step (2: SwiGLU's gate and up), each of
    `row_tiles` blocks of `cta_rows`; `scale_tiles`: 128-row scale tiles
    per step (default those the weight rows lie in; SwiGLU's up rows
    starting mid-tile take two)."""
    if scale_tiles is None:  # a 64-row CTA reads its whole 128-row tile
      scale_tiles = weights * (self.row_tiles if self.wide else 1)
    weights *= self.row_tiles
    per_stage = (
      2 * self.block_m * self.block_k  # activations
      + weights * self.cta_rows * self.block_k // 2  # packed weights
      # block scales (whole 128-row tiles)
      + scale_tiles * TILE_ROWS * self.block_k // 16
    )
    if float32_out or self.splits > 1:
      epilogue = 0 if self.direct_partials else 4 * self.cta_rows * self.block_m
    else:
      epilogue = 2 * self.cta_rows * self.block_m
    return self.num_stages * per_stage + epilogue


SMEM_LIMIT = 227 * 1024
# A CTA's start and pipeline fill, in K steps. This cost model reproduces
# every split the tuner measured best on the H200 (tune_matmul_h200.json:
# 7 splits at 7168x2048 M=1, none at 8192x28672 M=1 and 64) and stops the
# old "fill every SM" rule from giving 4096x14336 at M=1 seven waves of two
# K steps each (30 us, 1.1 TB/s).
SPLIT_OVERHEAD_STEPS = 3
# Token counts from which dense layers take prefill tiles: 256 tokens per
# CTA, K steps of 64, four stages, a persistent grid. Tuned on the H200
# (NOTES.md, tune_prefill_h200.json): 12-29% faster than 128-token tiles on
# all five benchmark layers at 2048 and 8192 tokens. The wide token tile
# halves the decode work per MMA, which the kernel does not overlap.
PREFILL_TOKENS = 2048
PREFILL = Config(block_k=64, block_m=256, num_stages=4, persistent=True)


# Decode CTAs (64 rows) multiply with warp-level mma.sync instead of
# wgmma (`Config.warp_mma`). Off: on the H200 (kernel time, fourteenth
# session, NOTES.md) it ties wgmma at one token (8192x28672 43.0 vs 42.8
# us) and loses at 16 (49.8 -> 53.3; 28672x8192 45.3 -> 50.5), likely as
# each of the four warps loads the whole token tile into registers and, at
# 16 tokens, issues two m16n8k16 per 16 K columns.
WARP_MMA_DECODE = False


def overlaps_mma(cta_rows: int) -> bool:
  """Whether CTAs of `cta_rows` rows take `async_mma`: on the 64-row
  decode CTAs it saved 1-3% (NOTES.md, tune_async_h200.json); on 128-row
  tiles it was slower for prefill and mixed at 64-256 tokens. Not with
  warp-level MMA."""
  return cta_rows == WGMMA_ROWS and not WARP_MMA_DECODE


# Non-persistent 128-row tiles of at most WIDE_ASYNC_MAX_TOKENS tokens in
# four stages take `async_mma`; in three, slots released a step late leave
# two to prefetch, and it lost 1-2% (thirtieth and thirty-first sessions).
# H200, tuner, whole call, off -> on: thirty-first/second sessions, unsplit
# (tune_async4_m64_h200.json, tune_async64_*_h200.json), M = 64 8192x28672
# 70.3 -> 67.9 us (row pairs 68.5 -> 66.3), 4096x14336 21.6 -> 20.8 (19.6
# -> 18.4); M = 40 up to 5% faster or equal, M = 24 within 1.3%. Thirty-
# second session, split K, whose float32 partials from registers
# (`Config.direct_partials`) gave them the fourth stage
# (tune_split_partials_*_h200.json), three stages -> four with async:
# 28672x8192 M = 64 72.3 -> 64.7 (row pairs 71.1 -> 60.4), M = 24 52.0 ->
# 49.6 (52.8 -> 49.8); 7168x2048 and 2048x5120 within 0.1 us or faster.
# 128-token tiles stay off: unsplit ones have three stages.
WIDE_ASYNC_MAX_TOKENS = 64
WIDE_ASYNC_MIN_STAGES = 4


def wide_overlaps_mma(config: Config) -> bool:
  """Whether a 128-row dense tile takes `async_mma` (WIDE_ASYNC_*)."""
  return (
    config.wide
    and not config.persistent
    and config.block_m <= WIDE_ASYNC_MAX_TOKENS
    and config.num_stages >= WIDE_ASYNC_MIN_STAGES
  )


def warp_mma(cta_rows: int) -> bool:
  """Whether CTAs of `cta_rows` rows take `Config.warp_mma`."""
  return cta_rows == WGMMA_ROWS and WARP_MMA_DECODE


# K steps that need not divide K (the kernel reads zeros past it with a
# narrower swizzle): gpt-oss-120b's K = 2880 takes steps of 256 at decode
# (11.25 of them), 128 in 128-token tiles, not 64. Its MoE layer on the H200
# (CUPTI, one call, same error against the reference), steps of 64 -> 128:
# T = 1 63.1 -> 47.6 us, 16 411 -> 350, 64 855 -> 759, 4096 2436 -> 2362;
# 128 -> 256 (fourteenth session): T = 1 42.4 -> 41.1, 16 313.8 -> 279.5.
RAGGED_K_STEPS = True
# A partial last K step may add up to 1/RAGGED_K_WASTE of K in zeros (MMA
# and decode work, no memory traffic: TMA fills them).
RAGGED_K_WASTE = 8
# The epilogue reads the per-tensor scales (alpha, input_scale_inv) as
# kernel operands and multiplies them itself, instead of an XLA pass
# building a per-block factor table before each call (one small kernel per
# GEMM, ~1-1.7 us at decode on the H200). Off: the table.
SCALES_AS_OPERANDS = True


# Dense decode CTAs (64 rows, one token tile, one weight tile a step) that
# each cover at least LONG_STEP_MIN_K of K take K steps of LONG_STEP_K in
# three stages: half the steps, so half the pipeline's per-step work (the
# wait, four TMA issues, descriptor updates); Nsight Compute counted 18%
# fewer instructions on 8192x28672. Its registers (216 a thread) and shared
# memory leave two CTAs per SM instead of three, so with 8-token tiles it
# pays only where the grid fits one wave of LONG_STEP_CTAS_PER_SM CTAs per
# SM; 16-token tiles, with twice the MMA work a step, gain either way.
# H200, whole call, K steps of 256 -> 512 (tune_k512_h200.json and
# tune_k512b_h200.json, sixteenth session): 28672x8192 M = 1 45.9 -> 42.5
# and 46.0 -> 42.6 us, M = 16 47.8 -> 46.2 and 46.3 -> 45.4; 4096x14336
# 14.7 -> 14.3, 15.6 -> 15.3; 8192x28672 (896 CTAs) M = 16 52.9 -> 50.7
# and 53.2 -> 50.5, but M = 1 45.7 -> 47.3 and 44.7 -> 46.9; 7168x2048 and
# 2048x5120 (two K steps a CTA) 3-9% slower.
LONG_STEP_K = 512
LONG_STEP_MIN_K = 4096
LONG_STEP_CTAS_PER_SM = 2


def _block_k(k: int, block_m: int, whole_steps: bool) -> int:
  """The largest K step that divides K, or (not `whole_steps`) whose last,
  partial step adds at most 1/RAGGED_K_WASTE of K."""
  waste = k + 1 if whole_steps else RAGGED_K_WASTE
  block_k = next(bk for bk in (256, 128, 64) if waste * (-k % bk) <= k)
  if block_m > 64 and block_k == 256:
    block_k = 128
  if block_m > 160:
    # 256-token tiles: best with K steps of 64 (PREFILL). The MoE's tiles
    # of 136-160 tokens were 3-6% faster in steps of 128 (H200, twenty-first
    # session: Qwen3-30B-A3B at 4096 tokens, 144-token tiles, 716 -> 686 us).
    block_k = 64
  return block_k


def _splits(tiles: int, k_steps: int, num_sms: int) -> int:
  """Split K only while the output tiles alone leave SMs idle: partial sums
  cost float32 traffic that grows with M. With one CTA per SM, a split
  count costs waves x (K steps per CTA + a CTA's start and pipeline fill,
  about SPLIT_OVERHEAD_STEPS); the fewest splits of least cost win."""
  max_splits = 1 if tiles >= num_sms else 16
  best, best_cost = 1, math.inf
  for splits in range(1, max_splits + 1):
    if k_steps % splits or k_steps // splits < 2:
      continue
    waves = math.ceil(tiles * splits / num_sms)
    cost = waves * (k_steps // splits + SPLIT_OVERHEAD_STEPS)
    if cost < best_cost:
      best, best_cost = splits, cost
  return best


def heuristic(
  m: int,
  n: int,
  k: int,
  num_sms: int = H200_SMS,
  *,
  block_m: int | None = None,
  token_tiles: int | None = None,
  bf16_out: bool = True,
  weights: int = 1,
  scale_tiles: int | None = None,
) -> Config:
  """A config per shape: tokens per CTA, K step, and split-K for decode.

  A grouped GEMM (MoE) fixes `block_m` and says how many token tiles will
  do work (`token_tiles`); by default both follow from `m`. The pipeline
  gets as many stages (up to 4) as shared memory holds, for
  `weights` weight tiles and `scale_tiles` scale tiles per step and the
  epilogue tile the call stores (`Config.smem_bytes`): bf16 when
  `bf16_out` and K is not split (the dense matmul), else float32.
  """
  if block_m is None and m >= PREFILL_TOKENS:
    return PREFILL  # bf16 output: fits in shared memory (smem_bytes)
  if block_m is None:
    block_m = 128 if m >= 128 else max(8, -(-m // 8) * 8)
  if token_tiles is None:
    token_tiles = -(-m // block_m)
  tiles = -(-n // TILE_ROWS) * token_tiles
  k = -(-k // 64) * 64  # the caller pads K to a multiple of 64
  block_k = _block_k(k, block_m, whole_steps=True)
  best = _splits(tiles, -(-k // block_k), num_sms)
  ragged_k = _block_k(k, block_m, whole_steps=not RAGGED_K_STEPS)
  ragged_best = _splits(tiles, -(-k // ragged_k), num_sms)
  # Longer steps, unless their count (23 for 2880 in the 128-token tiles'
  # steps of 128) cannot split K where the whole steps would.
  if ragged_best > 1 or best == 1:
    block_k, best = ragged_k, ragged_best
  k_steps = -(-k // block_k)
  # Decode tiles: CTAs of one warpgroup and 64 rows (several per SM); for
  # one token tile, at least two K ranges per output tile where each keeps
  # 16 K steps. Tuned on the H200 (NOTES.md, sm90_layout weights, kernel
  # time): 64-row CTAs were 1-9% faster at 1-16 tokens on all five
  # benchmark layers and 10% in the MoE; with two splits 8192x28672 at M=1
  # went 54 -> 47 us. At 64 tokens they were 30-45% slower.
  cta_rows = TILE_ROWS
  if block_m <= 16:
    cta_rows = WGMMA_ROWS
    if best == 1 and k_steps >= 32 and k_steps % 2 == 0 and token_tiles == 1:
      best = 2
  stages = 4
  if (
    cta_rows == WGMMA_ROWS
    and weights == 1
    and token_tiles == 1
    and (block_m > 8 or tiles * best <= LONG_STEP_CTAS_PER_SM * num_sms)
    and k % (best * LONG_STEP_K) == 0
    and k // best >= LONG_STEP_MIN_K
  ):
    block_k, stages = LONG_STEP_K, 3
  config = Config(
    block_k=block_k,
    block_m=block_m,
    num_stages=stages,
    splits=best,
    cta_rows=cta_rows,
    async_mma=overlaps_mma(cta_rows),
    warp_mma=warp_mma(cta_rows),
  )
  # Counting a float32 epilogue where the call stores bf16 cost unsplit
  # 64- and 128-token tiles their fourth stage. H200, 3 -> 4 stages
  # (thirtieth session): 8192x28672 M = 64 73.5 -> 71.7 us, 4096x14336
  # 22.6 -> 22.0, 28672x8192 M = 256 180.8 -> 173.5; the other layers at
  # 256 and 1024 tokens within 1%.
  config = fit_stages(config, bf16_out, weights, scale_tiles)
  if wide_overlaps_mma(config):
    config = dataclasses.replace(config, async_mma=True)
  return config


def fit_stages(
  config: Config,
  bf16_out: bool = False,
  weights: int = 1,
  scale_tiles: int | None = None,
) -> Config:
  """`config` with its stages cut (down to 2) until its shared memory
  (`Config.smem_bytes`, as `heuristic` takes the arguments) fits."""
  while (
    config.smem_bytes(not bf16_out, weights, scale_tiles) > SMEM_LIMIT
    and config.num_stages > 2
  ):
    config = dataclasses.replace(config, num_stages=config.num_stages - 1)
  return config

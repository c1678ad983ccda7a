"""Tiles of the Pallas Mosaic GPU MoE: each call's static plan (token tiles
per expert group) and the two grouped GEMMs' kernel configs, with the
switches that choose them (measured on the H200; each comment says when).
"""

import dataclasses
import math

from pallas_kernels.nvfp4_matmul import config as config_lib

# One CTA per SM walking the used token tiles (config.persistent): 24-32%
# faster GEMMs for Qwen3-30B-A3B at 4096 tokens on the H200, 6-12% at 1-16.
PERSISTENT = True
# SwiGLU in GEMM 1's epilogue (W4A16): Qwen3-30B-A3B on the H200 149 -> 139
# us at 16 tokens, 997 -> 923 us at 4096 (CUPTI).
FUSED_SWIGLU = True
# Also fuse it where I % 128 == 64 (gpt-oss: 2880; up rows start mid-tile,
# the sm90 kernel's `swiglu` doc), in GEMM 1 CTAs of at least
# MID_TILE_MIN_CTA_ROWS rows. gpt-oss-120b on the H200 (CUPTI, one call
# each, eleventh session): 2336 -> 2110 us at 4096 tokens (128-row CTAs),
# but 337 -> 343 us at 16 tokens (64-row decode CTAs), so decode tiles keep
# SwiGLU in XLA between the GEMMs.
FUSED_SWIGLU_MID_TILE = True
# Token tiles up to this wide fuse SwiGLU (its gate and up float32
# accumulators take one register per token each and thread).
FUSED_SWIGLU_MAX_TOKENS = config_lib.MAX_TWO_TILE_TOKENS
# Groups of at least this many rows on average (prefill) get token tiles
# sized to the groups (`block_m_for`), up to FUSED_SWIGLU_MAX_TOKENS rows;
# smaller ones keep tiles of about the mean (decode CTAs below 16).
GROUP_TILE_MIN_MEAN = 32
MID_TILE_MIN_CTA_ROWS = config_lib.TILE_ROWS
# Each expert's last rows, when at most REMAINDER_ROWS past its last whole
# 128-row tile, go to a tile of REMAINDER_ROWS rows that a second pair of
# GEMM launches runs (sorted placement only). Off: on the H200 a 64-row
# tile costs ~0.88 of a 128-row one (the weight decode, per tile, bounds
# these GEMMs more than the MMA), so the MMA it saves barely pays for the
# second launches and gathers (CUPTI, one call each, eleventh session):
# DeepSeek-V3 4096 tokens GEMMs 5842 -> 5684 us, layer 6425 -> 6369; 16384
# 20116 -> 20047; gpt-oss-120b 4096 2129 -> 2179, 16384 6306 -> 6417;
# Qwen3-30B-A3B 4096 815 -> 835, 16384 2660 -> 2732. Smaller remainder
# tiles barely pay either (twentieth session, 4096 tokens, layer us):
# 16 rows (64-row decode CTAs) gpt-oss-120b 1853 -> 1844, Qwen3 754 -> 766;
# 32 rows 1802 and 757. The 16-row GEMM 1 streams its experts at ~2 TB/s,
# not the ~2.8 of a decode step. A native FP4 MMA (sm_100), which has no
# decode, may pay for it.
REMAINDER_TILES = False
REMAINDER_ROWS = 64
# GEMM 2 (the down projection: K = I, few K steps a tile) in output tiles
# of two 128-row weight tiles (`Config.row_tiles`): half the epilogues,
# pipeline steps and activation loads per weight row. GEMM 2 kernel us,
# one tile -> two (H200, twenty-fifth session, profile_moe.py autofused vs
# g2one-autofused, bit-identical outputs): Qwen3-30B-A3B 4096 tokens
# 209 -> 184 (layer 654 -> 628), 16384 762 -> 672; Mixtral-8x7B 4096
# 1369 -> 1276; DeepSeek-V3 4096 1631 -> 1512. Decode keeps 64-row CTAs:
# 128-row two-tile CTAs there ("g2wide-g2two") took Qwen3's 16-token GEMM 2
# from 27.4 to 32.7 us.
TWO_TILE_GEMM2 = True
# Decode's GEMM 2 in 64-row CTAs that each multiply both halves of a
# 128-row weight tile (`Config.row_tiles` = 2 in one warpgroup): half the
# CTAs, each streaming twice the weights per K step with one activation
# load and one pipeline turn, where each CTA has at least
# TWO_BLOCK_MIN_K_STEPS K steps and there are at least
# TWO_BLOCK_MIN_CTAS_PER_SM such CTAs per SM. GEMM 2 kernel us, one block
# -> two (H200, twenty-sixth session, one call each, two calls a variant,
# bit-identical outputs): Mixtral-8x7B T = 16 (56 steps, 256 CTAs) 80.0 ->
# 71.8 (3.68 TB/s); but T = 1 (28 steps, 128 CTAs) 23.1 -> 25.2,
# DeepSeek-V3 T = 1 (8 steps) 23.7 -> 26.4, T = 16 233.4 -> 226.3,
# gpt-oss-120b T = 16 (11 steps) 79.4 -> 82.7, Qwen3-30B-A3B T = 1 (3
# steps) 4.2 -> 4.8.
TWO_BLOCK_DECODE_GEMM2 = True
TWO_BLOCK_MIN_K_STEPS = 16
TWO_BLOCK_MIN_CTAS_PER_SM = 1
# Where decode's GEMM 2 splits K already (too few CTAs for the SMs) and the
# two-block rule above does not take it, two-block CTAs in twice the splits:
# as many CTAs, each streaming twice the rows over half the K steps, at
# least TWO_BLOCK_SPLIT_MIN_K_STEPS of them. Mixtral-8x7B at one token
# (H200, twenty-seventh session, 2 splits of 28 steps -> 4 of 14, the
# same error against the reference): GEMM 2 23.7 -> 21.5 and 22.5 -> 21.8
# us in one-call profiles, benchmark row 69.0 -> 67.7 us in one run;
# one-block CTAs in twice the splits were slower (23.5-24.0 us), and so
# was DeepSeek-V3's unsplit 8-step GEMM 2 in two (24.7 -> 24.9, two-block
# 25.4).
TWO_BLOCK_MORE_SPLITS = True
TWO_BLOCK_SPLIT_MIN_K_STEPS = 12
# Where neither two-block rule takes decode's GEMM 2 and its one-block
# 64-row CTAs are fewer than SPLIT_FOR_BALANCE_CTAS_PER_SM a SM and leave
# at least SPLIT_FOR_BALANCE_MIN_IDLE of the SMs' CTA slots idle in their
# last wave, twice its K splits (float32 partials summed by the combine),
# each split keeping at least SPLIT_FOR_BALANCE_MIN_K_STEPS steps: some
# SMs stream two CTAs' rows while others stream one, and the layer waits
# for the slowest (Mixtral-8x7B at two tokens, 256 CTAs, stays).
# gpt-oss-120b at one token (H200, twenty-ninth session, profile_moe.py,
# same error against the reference): 180 CTAs of 12 steps -> 360 of 6,
# layer 35.0 -> 32.1 us ("g2x2") and 34.9/34.0 -> 32.0/32.3 (the rule, in
# another call); at 16 tokens (2880 CTAs) twice the splits were slower,
# 254.6 -> 263.7, as were DeepSeek-V3's 896 CTAs of 8 steps at one token
# (twenty-seventh session, GEMM 2 24.7 -> 24.9 us).
SPLIT_FOR_BALANCE = True
SPLIT_FOR_BALANCE_CTAS_PER_SM = 2
SPLIT_FOR_BALANCE_MIN_IDLE = 0.25
SPLIT_FOR_BALANCE_MIN_K_STEPS = 6


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static tiling of one MoE call."""

  tokens: int
  top_k: int
  experts: int
  block_m: int
  # Rows of each expert's remainder tile (0: none; see REMAINDER_TILES).
  remainder_m: int = 0

  @property
  def pairs(self) -> int:
    return self.tokens * self.top_k

  @property
  def remainder_tiles(self) -> int:
    """Remainder tiles (one per expert at most), after the `max_tiles`."""
    return min(self.experts, self.pairs) if self.remainder_m else 0

  @property
  def bulk_rows(self) -> int:
    """Rows of the `block_m`-row tiles; the remainder tiles' follow."""
    return self.max_tiles * self.block_m

  @property
  def rows(self) -> int:
    return self.bulk_rows + self.remainder_tiles * self.remainder_m

  @property
  def max_tiles(self) -> int:
    """Token tiles that can hold the pairs with each expert's group padded
    (plus one group of dropped pairs: experts another device holds)."""
    groups = min(self.experts + 1, self.pairs)
    return -(-(self.pairs + groups * (self.block_m - 1)) // self.block_m)

  @property
  def busy_tiles(self) -> int:
    """Token tiles that usually do work (for the split-K heuristic): each
    busy expert has one at least (one token's top-k experts make top_k;
    counting one split DeepSeek-V3's GEMM 2 at T = 1, 0.5 us slower)."""
    by_rows = -(-self.pairs // self.block_m)
    by_experts = min(self.pairs, self.experts)
    return min(self.max_tiles, max(by_rows, by_experts))


def block_m_for(tokens: int, top_k: int, experts: int) -> int:
  """Rows per token tile.

  Small groups (decode): about the mean group size, 8 to 128. Larger ones
  (a mean of GROUP_TILE_MIN_MEAN rows or more): about mean / 128 tiles
  (one at least), together holding a group two standard deviations above
  the mean under balanced routing (group sizes then vary by about the
  square root of the mean), each at most FUSED_SWIGLU_MAX_TOKENS rows. Tiles
  of 128 rows left about half the experts a last, nearly empty tile whose
  weights are decoded all the same. H200, one call each (CUPTI,
  twenty-first session), 128-row tiles (64 at 256 tokens) against these:
  Qwen3-30B-A3B 4096 tokens 751 -> 686 us (144 rows), 16384 2586 -> 2474
  (136); gpt-oss-120b 4096 1801 -> 1508 (152), 1024 979 -> 848 (48);
  DeepSeek-V3 4096 6012 -> 5020 (152); Mixtral-8x7B 4096 4300 -> 4223
  (136), 256 521 -> 424 (80).
  """
  mean = tokens * top_k / min(experts, tokens * top_k)
  if mean < GROUP_TILE_MIN_MEAN:
    return int(min(128, max(8, -(-mean // 8) * 8)))
  usual = mean + 2 * math.sqrt(mean)
  tiles = max(
    1,
    round(mean / config_lib.TILE_ROWS),
    math.ceil(usual / FUSED_SWIGLU_MAX_TOKENS),
  )
  return int(-(-usual / tiles // 8) * 8)


def configs_for(
  plan: Plan,
  hidden: int,
  inter: int,
  num_sms: int,
  persistent: bool = PERSISTENT,
  cta_rows: int | None = None,
) -> tuple[config_lib.Config, config_lib.Config]:
  """Tiles of GEMM 1 (N = 2I, K = H) and GEMM 2 (N = H, K = I).

  `cta_rows` None takes the heuristic's (64 for decode tiles); 64-row
  CTAs have no persistent grid.
  """
  configs = []
  for gemm, (n, k) in enumerate(((2 * inter, hidden), (hidden, inter))):
    # GEMM 2 returns bf16 unless split; GEMM 1 first as the fused SwiGLU
    # (two weight tiles, bf16 out), then (below) unfused.
    fused = dict(
      bf16_out=True,
      weights=2 if k == hidden else 1,
      # Up rows that start mid-tile read two scale tiles (sm90 `swiglu`).
      scale_tiles=3 if k == hidden and inter % config_lib.TILE_ROWS else None,
    )
    config = config_lib.heuristic(
      plan.max_tiles * plan.block_m,
      n,
      k,
      num_sms,
      block_m=plan.block_m,
      token_tiles=plan.busy_tiles,
      **fused,
    )
    rows = cta_rows or config.cta_rows
    config = dataclasses.replace(
      config,
      persistent=persistent and rows == config_lib.TILE_ROWS,
      cta_rows=rows,
      async_mma=config_lib.overlaps_mma(rows),
      warp_mma=config_lib.warp_mma(rows),
    )
    # Stages fitted to the final CTA shape and grid: a persistent grid
    # keeps the float32 epilogue tile that the heuristic's non-persistent
    # CTAs do without (`Config.direct_partials`).
    config = config_lib.fit_stages(config, **fused)
    if k == hidden:  # unfused (W4A4 too): one weight tile, float32 out
      config = config_lib.fit_stages(config, bf16_out=False)
    if (
      gemm == 1
      and TWO_TILE_GEMM2
      and config.persistent
      and config.splits == 1
      and plan.block_m <= config_lib.MAX_TWO_TILE_TOKENS
      and -(-n // config_lib.TILE_ROWS) % 2 == 0
    ):
      config = config_lib.fit_stages(
        dataclasses.replace(config, row_tiles=2), bf16_out=True
      )
    ctas = _decode_gemm2_ctas(config, plan, n, k, num_sms) if gemm else None
    if ctas:
      row_tiles, splits = ctas
      config = config_lib.fit_stages(
        dataclasses.replace(config, row_tiles=row_tiles, splits=splits),
        bf16_out=splits == 1,
      )
    configs.append(config)
  return tuple(configs)


def _decode_gemm2_ctas(config, plan: Plan, n: int, k: int, num_sms: int):
  """(row tiles, K splits) of decode's GEMM 2 (`config`, N = `n`, K = `k`)
  where a rule changes its one-block 64-row CTAs, else None: two blocks in
  its own splits for long K loops on every SM (TWO_BLOCK_DECODE_GEMM2), two
  blocks in twice them where it splits already and halving its K loops
  leaves them long enough (TWO_BLOCK_MORE_SPLITS), one block in twice them
  where its CTAs leave SMs idle (SPLIT_FOR_BALANCE)."""
  if (
    config.cta_rows != config_lib.WGMMA_ROWS
    or config.warp_mma
    or config.row_tiles != 1
  ):
    return None
  steps = -(-k // config.block_k)
  more = 2 * config.splits
  halved = steps % more == 0  # twice the splits divide the K steps
  # 128-row tiles (two-block CTAs) and 64-row blocks (one-block CTAs).
  tiles = -(-n // config_lib.TILE_ROWS) * plan.busy_tiles * config.splits
  blocks = -(-n // config_lib.WGMMA_ROWS) * plan.busy_tiles * config.splits
  slots = -(-blocks // num_sms) * num_sms  # the CTA slots of whole waves
  if (
    TWO_BLOCK_DECODE_GEMM2
    and steps // config.splits >= TWO_BLOCK_MIN_K_STEPS
    and tiles >= TWO_BLOCK_MIN_CTAS_PER_SM * num_sms
  ):
    return 2, config.splits
  if (
    TWO_BLOCK_MORE_SPLITS
    and config.splits > 1
    and halved
    and steps // more >= TWO_BLOCK_SPLIT_MIN_K_STEPS
  ):
    return 2, more
  if (
    SPLIT_FOR_BALANCE
    and blocks < SPLIT_FOR_BALANCE_CTAS_PER_SM * num_sms
    and slots - blocks >= SPLIT_FOR_BALANCE_MIN_IDLE * slots
    and halved
    and steps // more >= SPLIT_FOR_BALANCE_MIN_K_STEPS
  ):
    return 1, more
  return None


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The caller's tile overrides (None: the heuristic's)."""

  block_m: int | None
  persistent: bool
  cta_rows: int | None
  fused_swiglu: bool

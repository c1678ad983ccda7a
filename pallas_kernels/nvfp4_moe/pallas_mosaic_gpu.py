"""The Pallas Mosaic GPU backend of `nvfp4_moe`: grouped NVFP4 GEMMs.

Data flow (one jitted function):
1. route (softmax top-k, `base.route`), then sort the (token, expert) pairs
   by expert into a buffer where each expert's rows start on a tile of
   `block_m` rows (padding rows are zero), with one expert id per tile (one
   token needs no sort: tile i holds pair i, `direct_tiles`; a few pairs
   may be placed by comparison counts, `count_by_expert`); the sorted rows
   of a prefill are copied by `gather_rows_sm90`, those of the used tiles
   only;
2. GEMM 1 over `w13` with the matmul kernel's sm90 body in grouped mode:
   each token tile reads only its own expert's weights, tiles past the used
   rows exit at once, so a decode step streams only the active experts;
3. `silu(gate) * up` in GEMM 1's epilogue (W4A16, tiles of <= 128
   tokens, I % 128 == 0, or 128-row CTAs (FUSED_SWIGLU_MID_TILE); else in
   XLA), GEMM 2 over `w2` the same way. GEMM 2 reads its activations as
   two K planes (`sm90.split_activations`); with w13 in the "sm90_planes"
   layout GEMM 1's epilogue writes them so, else an XLA pass reorders the
   intermediate;
4. the router-weighted combine gathers each token's top-k rows.
(REMAINDER_TILES, off: steps 2-3 once more over 64-row remainder tiles.)

Routing (softmax or sigmoid scores, grouped top-k) is `base.route`, shared
with the reference; with DECODE_ROUTING_KERNEL (on) decode steps of
softmax-routed models route and place their pairs in one kernel instead
(`route_decode_sm90`), and with PREFILL_ROUTING_KERNEL (on) larger calls
take their routing from it, and with PREFILL_PLACEMENT_KERNEL (on) their
placement from it and `place_prefill_sm90`.

W4A4 (activation="nvfp4") takes GEMM 1's output in float32 and SwiGLU in
XLA, so that the intermediate's FP4 codes are those of the reference (the
fused epilogue rounds silu(gate) * up to bf16 before GEMM 2 quantizes it).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.format import sm90_layout
from pallas_kernels import activation_quant
from pallas_kernels import common
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90
from pallas_kernels.nvfp4_moe import base
from pallas_kernels.nvfp4_moe import gather_rows_sm90
from pallas_kernels.nvfp4_moe import place_prefill_sm90
from pallas_kernels.nvfp4_moe import route_decode_sm90

FACTOR_ROWS = sm90.WG_ROWS  # the kernel applies one scale per 64 rows
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
# Token tiles up to this wide fuse SwiGLU: its gate and up float32
# accumulators take one register per token each and thread (160 tokens ran
# correctly on the H200; 256 would not fit).
FUSED_SWIGLU_MAX_TOKENS = 160
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
# One token (decode): tile i holds pair i, no sort (its top-k experts are
# distinct, so no expert's weights are read twice).
DIRECT_DECODE = True
# XLA's row gather moves bf16 rows as 32-bit words (see `_gather_rows`).
GATHER_WORDS = True
# From this many sorted rows, the row gather is a kernel that copies only
# the used tiles' rows (`gather_rows_sm90`), not XLA's gather of all rows.
# H200, one call each (CUPTI, twenty-second session): the gather of
# Qwen3-30B-A3B at 4096 tokens 61.6 -> 49.7 us, DeepSeek-V3's 326 -> 238
# (first version); alone at 16384 Qwen3 tokens (HBM-bound) 261 -> 255.
GATHER_KERNEL = True
GATHER_KERNEL_MIN_ROWS = 4096
# Up to this many (token, expert) pairs, `count_by_expert` places them with
# a few comparison counts instead of `sort_by_expert`'s argsort, cumsum and
# scatters (~11 small XLA kernels). H200, one call each (CUPTI): Qwen3-30B-A3B
# 110.2 -> 105.3 us at 16 tokens, 155.0 -> 149.5 at 64, 273.7 -> 261.1 at
# 256 (2048 pairs); DeepSeek-V3 802 -> 793 at 16, 1744 -> 1731 at 64. Larger
# counts are unmeasured (the work grows as pairs x rows).
COUNTING_MAX_PAIRS = 2048
# Above that, `sort_by_expert` ranks pairs within their expert by chunked
# comparison counts (`rank_in_group`), not XLA's stable argsort.
RANK_BY_COUNTING = True
# Routing's top-k by comparison counts (`counting_top_k`) up to this many
# tokens x experts^2 comparisons, instead of XLA's sort (3.3-3.9 us a call
# on the H200 at one token; DeepSeek-V3's grouped routing runs three).
# H200, one call each (CUPTI, tenth session): Qwen3-30B-A3B 22.5 -> 21.0 us
# at 1 token, 102.4 -> 102.0 at 16; DeepSeek-V3 79.2 -> 78.3 at 1, 800.6 ->
# 800.4 at 16 (1M comparisons). Larger counts are unmeasured.
COUNTING_TOP_K_MAX = 1 << 20
# Decode steps route and place their pairs in one kernel
# (`route_decode_sm90`: softmax routing renormalized over the chosen
# experts, no bias or groups, <= 16 tokens) instead of ~12 XLA kernels.
# H200, one call each (`profile_moe.py ... xlarouting-autofused,autofused`,
# eighteenth session): Qwen3-30B-A3B 96.1 -> 85.3 us at 16 tokens (the
# kernel 3.9 us), 18.9 -> 18.5 at 1; gpt-oss-120b 272.4 -> 262.3 and 37.3
# -> 36.8; Mixtral-8x7B 246.2 -> 239.6 at 16 (first version).
DECODE_ROUTING_KERNEL = True
# Larger calls of such routing take their weights and experts from the same
# kernel's routing alone (a CTA per 16 tokens; XLA places the pairs)
# instead of XLA's top-k. H200, one call each (CUPTI, twenty-second
# session): Qwen3-30B-A3B 690.6 -> 674.3 us at 4096 tokens (XLA's top-k
# sort 15.3 us, the kernel 5.9), 2486.9 -> 2435.5 at 16384, 245.1 -> 243.4
# at 256; gpt-oss-120b 1533.7 -> 1523.7 at 4096.
PREFILL_ROUTING_KERNEL = True
# Such calls also rank their pairs in that kernel and take their placement
# from `place_prefill_sm90` (a scan kernel and one kernel of writes)
# instead of `sort_by_expert`'s ~14 XLA kernels. H200, one call each
# (CUPTI, twenty-third session): Qwen3-30B-A3B 679.0 -> 653.7 us at 4096
# tokens, 2454.0 -> 2407.9 at 16384; gpt-oss-120b 1521.0 -> 1513.6 at
# 4096; Mixtral-8x7B 4182.7 -> 4175.2.
PREFILL_PLACEMENT_KERNEL = True


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
  for n, k in ((2 * inter, hidden), (hidden, inter)):
    config = config_lib.heuristic(
      plan.max_tiles * plan.block_m,
      n,
      k,
      num_sms,
      block_m=plan.block_m,
      token_tiles=plan.busy_tiles,
      # GEMM 2 returns bf16 unless split; GEMM 1 first as the fused SwiGLU
      # (two weight tiles, bf16 out), then (below) unfused.
      bf16_out=True,
      weights=2 if k == hidden else 1,
      # Up rows that start mid-tile read two scale tiles (sm90 `swiglu`).
      scale_tiles=3 if k == hidden and inter % config_lib.TILE_ROWS else None,
    )
    if k == hidden:  # unfused (W4A4 too): one weight tile, float32 out
      config = config_lib.fit_stages(config, bf16_out=False)
    rows = cta_rows or config.cta_rows
    config = dataclasses.replace(
      config,
      persistent=persistent and rows == config_lib.TILE_ROWS,
      cta_rows=rows,
      async_mma=config_lib.overlaps_mma(rows),
      warp_mma=config_lib.warp_mma(rows),
    )
    configs.append(config)
  return tuple(configs)


def nvfp4_moe(
  x: jax.Array,
  router_logits: jax.Array,
  experts,
  *,
  top_k: int,
  correction_bias: jax.Array | None = None,
  activation: str = "bf16",
  block_m: int | None = None,
  persistent: bool = PERSISTENT,
  cta_rows: int | None = None,
  fused_swiglu: bool = FUSED_SWIGLU,
  interpret: bool = False,
  **routing,
) -> jax.Array:
  """See `api.nvfp4_moe`; `block_m`, `persistent`, `cta_rows` and
  `fused_swiglu` override the tiles (`config.Config`; `fused_swiglu`
  applies where I % 128 == 0);
  `routing` takes `base.route`'s other options.

  Raises:
    NotImplementedError: no suitable GPU (and not `interpret`), or expert
      shapes this version does not tile (H or I not a multiple of 64).
  """
  base.check_inputs(x, router_logits, experts, top_k, activation)
  tiles = Tiles(block_m, persistent, cta_rows, fused_swiglu)
  forward = _forward_fn(x, top_k, experts, activation, tiles, interpret)
  routing = dict(top_k=top_k, **routing)
  return _routed(
    x,
    router_logits,
    correction_bias,
    dict(experts),
    forward=forward,
    routing=tuple(sorted(routing.items())),  # static: one order
  )


def experts_forward(
  x: jax.Array,
  weights: jax.Array,
  ids: jax.Array,
  experts,
  *,
  activation: str = "bf16",
  routed_experts: int | None = None,
  block_m: int | None = None,
  persistent: bool = PERSISTENT,
  cta_rows: int | None = None,
  fused_swiglu: bool = FUSED_SWIGLU,
  interpret: bool = False,
) -> jax.Array:
  """The experts of a routed MoE on the kernels; see `api.nvfp4_moe_experts`.

  Pairs whose id is outside `[0, E)` are dropped: sorted into a last group
  whose tiles no kernel visits.
  """
  base.check_routing(x, weights, ids, experts, activation, routed_experts)
  tiles = Tiles(block_m, persistent, cta_rows, fused_swiglu)
  forward = _forward_fn(
    x, ids.shape[1], experts, activation, tiles, interpret, routed_experts
  )
  return forward(x, weights, ids.astype(jnp.int32), dict(experts))


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The caller's tile overrides (None: the heuristic's)."""

  block_m: int | None
  persistent: bool
  cta_rows: int | None
  fused_swiglu: bool


def _forward_fn(
  x, top_k, experts, activation, tiles: Tiles, interpret, routed_experts=None
):
  """Checks the GPU and shapes; -> jitted `(x, weights, ids, experts)`.
  `routed_experts`: the router's expert count, for the tile heuristic (None:
  the node's)."""
  common.check_sm90("the Mosaic GPU NVFP4 MoE", interpret)
  n_experts, two_i, hidden = base.StackedLinear.from_mapping(
    experts, "w13_"
  ).shape
  if hidden % 64 or (two_i // 2) % 64:
    raise NotImplementedError(
      f"hidden={hidden} and intermediate={two_i // 2} must be multiples of"
      " 64 (expert stacks are not padded per call)"
    )
  plan = Plan(
    tokens=x.shape[0],
    top_k=top_k,
    experts=n_experts,
    block_m=tiles.block_m
    or block_m_for(x.shape[0], top_k, routed_experts or n_experts),
  )
  direct = DIRECT_DECODE and plan.tokens == 1
  counted = plan.pairs <= COUNTING_MAX_PAIRS
  if (
    REMAINDER_TILES
    and not (direct or counted)
    and plan.block_m == config_lib.TILE_ROWS
  ):
    plan = dataclasses.replace(plan, remainder_m=REMAINDER_ROWS)
  tiling = functools.partial(
    configs_for,
    hidden=hidden,
    inter=two_i // 2,
    num_sms=common.num_sms(interpret),
    persistent=tiles.persistent,
    cta_rows=tiles.cta_rows,
  )
  configs = tiling(plan)
  remainder_configs = None
  if plan.remainder_m:
    remainder_configs = tiling(
      dataclasses.replace(plan, block_m=plan.remainder_m, remainder_m=0)
    )
  swiglu = (
    tiles.fused_swiglu
    and activation == "bf16"
    # I is a multiple of 64 (checked above); mid-tile up rows when not 128.
    and (
      (two_i // 2) % config_lib.TILE_ROWS == 0
      or (
        FUSED_SWIGLU_MID_TILE and configs[0].cta_rows >= MID_TILE_MIN_CTA_ROWS
      )
    )
    # Gate and up float32 accumulators take block_m registers per thread:
    # wider tiles run SwiGLU unfused.
    and plan.block_m <= FUSED_SWIGLU_MAX_TOKENS
  )
  if swiglu:  # the epilogue is not linear: no split-K partial sums
    configs = _one_split_gemm1(configs)
    if remainder_configs:
      remainder_configs = _one_split_gemm1(remainder_configs)
  # Persistent CTAs walk the first `used_tiles` tiles and need the unused
  # ones last; the direct tiles leave a dropped pair's tile where it is.
  direct = direct and not any(c.persistent for c in configs)
  return functools.partial(
    _forward,
    plan=plan,
    configs=configs,
    remainder_configs=remainder_configs,
    activation=activation,
    swiglu=swiglu,
    direct=direct,
    counted=not direct and counted,
    interpret=interpret,
  )


def _one_split_gemm1(configs):
  return (dataclasses.replace(configs[0], splits=1), configs[1])


def direct_tiles(ids: jax.Array, plan: Plan):
  """`sort_by_expert` for one token without the sort: tile i holds pair i
  in its first row; a dropped pair's tile is marked unused (-1). Positions
  and tokens are constants."""
  if plan.tokens != 1 or plan.max_tiles < plan.top_k:
    raise ValueError(f"direct tiles need one token ({plan})")
  position = np.arange(plan.top_k, dtype=np.int32)[None] * plan.block_m
  token = np.ones(plan.max_tiles * plan.block_m, np.int32)  # 1: padding
  token[position[0]] = 0
  expert = jnp.where((ids[0] >= 0) & (ids[0] < plan.experts), ids[0], -1)
  unused = jnp.full(plan.max_tiles - plan.top_k, -1, jnp.int32)
  return position, token, jnp.concatenate([expert.astype(jnp.int32), unused])


def sort_by_expert(ids: jax.Array, plan: Plan):
  """Places (token, k) pairs in expert groups padded to whole token tiles.

  With `plan.remainder_m`, an expert's rows past its last whole `block_m`
  tile, if at most `remainder_m`, go to a remainder tile of its own (after
  the `max_tiles` tiles, in expert order) instead of a padded `block_m` one.

  Args:
    ids: int32 `[T, top_k]` expert of each pair; ids outside `[0, E)` go to
      a last group of dropped pairs, whose tiles are marked unused.

  Returns:
    (position `[T, top_k]` of each pair's row, token `[plan.rows]` of each
    row (T for padding rows), expert `[max_tiles + remainder_tiles]` of
    each tile (-1: unused)).
  """
  flat = _group_of_pairs(ids, plan)
  if RANK_BY_COUNTING:
    rank, counts = rank_in_group(flat, plan.experts + 1)
  else:
    counts = jnp.bincount(flat, length=plan.experts + 1)
    rank = _rank_by_argsort(flat, counts)
  bulk, remainder = _bulk_rows(counts, plan)
  ends = jnp.cumsum(bulk)
  starts = ends - bulk
  row = starts[flat] + rank
  tile_expert = _tile_experts(ends, plan)
  if plan.remainder_m:
    # Remainder tile r (r-th expert that has one) starts at bulk_rows + r m.
    opened = remainder.astype(jnp.int32)
    ahead = jnp.cumsum(opened) - opened
    past = rank - bulk[flat]
    row = jnp.where(
      remainder[flat] & (past >= 0),
      plan.bulk_rows + ahead[flat] * plan.remainder_m + past,
      row,
    )
    tile_expert = jnp.concatenate(
      [tile_expert, _remainder_experts(remainder, plan)]
    )
  # Materialized: XLA otherwise fuses the ranking's reductions into the
  # combine's gather and recomputes them per output element (the H200 spent
  # 1.6 ms instead of ~30 us in Qwen3-30B-A3B's combine at 4096 tokens).
  position = jax.lax.optimization_barrier(row.astype(jnp.int32))
  token = (
    jnp.full(plan.rows, plan.tokens, jnp.int32)
    .at[position]
    .set(jnp.arange(plan.pairs, dtype=jnp.int32) // plan.top_k)
  )
  return position.reshape(ids.shape), token, tile_expert


def rank_in_group(
  group: jax.Array, n_groups: int, chunk: int = 128
) -> tuple[jax.Array, jax.Array]:
  """(each element's rank among the earlier elements of its group, the
  count of each group) for int32 `group` `[P]` in `[0, n_groups)`.

  A counting sort's bookkeeping without a sort: elements in chunks of
  `chunk`; a rank is the earlier equal elements of its chunk (comparisons)
  plus its group's count in the earlier chunks (an exclusive prefix sum
  over per-chunk counts). O(P x (chunk + n_groups)) work in a few fused
  reductions, where XLA's stable argsort of 16384 keys took ~44 us on the
  H200 in three sort kernels.
  """
  (pairs,) = group.shape
  n_chunks = -(-pairs // chunk)
  # Padding elements get group n_groups, counted nowhere.
  padded = jnp.pad(
    group, (0, n_chunks * chunk - pairs), constant_values=n_groups
  ).reshape(n_chunks, chunk)
  at = jnp.arange(chunk)
  earlier = (padded[:, None, :] == padded[:, :, None]) & (
    at[None, :] < at[:, None]
  )[None]
  within = jnp.sum(earlier, axis=2, dtype=jnp.int32)  # [chunks, chunk]
  per_chunk = jnp.sum(
    padded[:, :, None] == jnp.arange(n_groups)[None, None, :],
    axis=1,
    dtype=jnp.int32,
  )  # [chunks, n_groups]
  if n_chunks == 1:
    return within[0, :pairs], per_chunk[0]
  before = jnp.cumsum(per_chunk, axis=0) - per_chunk
  from_earlier_chunks = jnp.take_along_axis(
    before, jnp.minimum(padded, n_groups - 1), axis=1
  )
  rank = (within + from_earlier_chunks).reshape(-1)[:pairs]
  return rank, jnp.sum(per_chunk, axis=0)


def _rank_by_argsort(flat: jax.Array, counts: jax.Array) -> jax.Array:
  """`rank_in_group`'s ranks through XLA's stable argsort."""
  order = jnp.argsort(flat, stable=True)
  first_of_group = jnp.cumsum(counts) - counts
  sorted_rank = jnp.arange(flat.shape[0]) - first_of_group[flat[order]]
  return jnp.zeros_like(flat).at[order].set(sorted_rank.astype(flat.dtype))


def _bulk_rows(counts: jax.Array, plan: Plan):
  """(rows of each group in `block_m` tiles, whether it has a remainder
  tile): `counts` rounded up to whole tiles, or down where the rest fits a
  remainder tile (never for the dropped group, last)."""
  whole = counts // plan.block_m * plan.block_m
  rest = counts - whole
  remainder = (rest > 0) & (rest <= plan.remainder_m)
  remainder = remainder.at[plan.experts].set(False)
  padded = jnp.where(rest > 0, whole + plan.block_m, whole)
  return jnp.where(remainder, whole, padded), remainder


def _remainder_experts(remainder: jax.Array, plan: Plan) -> jax.Array:
  """int32 `[remainder_tiles]`: the expert of each remainder tile (the
  experts that have one, in order), -1 past them."""
  through = jnp.cumsum(remainder[: plan.experts].astype(jnp.int32))
  tile = jnp.arange(plan.remainder_tiles)
  expert = jnp.sum(through[None, :] <= tile[:, None], axis=1)
  return jnp.where(tile < through[-1], expert, -1).astype(jnp.int32)


def count_by_expert(ids: jax.Array, plan: Plan):
  """`sort_by_expert`'s result, by comparison counts (O(pairs x rows)
  work, a few fused reductions; for small pair counts, without remainder
  tiles)."""
  if plan.remainder_m:
    raise ValueError(f"count_by_expert places no remainder tiles ({plan})")
  flat = _group_of_pairs(ids, plan)
  group = jnp.arange(plan.experts + 1)
  # A pair's place in its group: the earlier pairs of the same expert, all
  # pairs in one chunk.
  rank, counts = rank_in_group(flat, plan.experts + 1, chunk=plan.pairs)
  pair = jnp.arange(plan.pairs)
  padded = -(-counts // plan.block_m) * plan.block_m
  # Inclusive prefix sum as one masked reduction (XLA's cumsum is a
  # reduce-window kernel of its own).
  ends = jnp.sum(
    jnp.where(group[None, :] <= group[:, None], padded[None, :], 0), axis=1
  )
  starts = ends - padded
  position = (starts[flat] + rank).astype(jnp.int32)
  rows = jnp.arange(plan.max_tiles * plan.block_m)
  holds = position[None, :] == rows[:, None]  # [rows, pairs]
  token = jnp.sum(
    jnp.where(holds, pair[None, :] // plan.top_k, 0), axis=1, dtype=jnp.int32
  )
  token = jnp.where(jnp.any(holds, axis=1), token, plan.tokens)
  return position.reshape(ids.shape), token, _tile_experts(ends, plan)


def counting_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)` by comparison counts: element i's rank is how
  many elements beat it (larger, or equal at a lower index, as top_k
  orders ties). O(E^2) work per row in two fused reductions, no sort."""
  n = x.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"top-k of {k} out of {n}")
  # Float total order (as top_k: +0 above -0) on int32 keys.
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  keys = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
  pairs = (*x.shape, n)  # [..., i, j]
  xi, xj = keys[..., :, None], keys[..., None, :]
  i = jax.lax.broadcasted_iota(jnp.int32, pairs, x.ndim - 1)
  j = jax.lax.broadcasted_iota(jnp.int32, pairs, x.ndim)
  beaten_by = (xj > xi) | ((xj == xi) & (j < i))
  rank = jnp.sum(beaten_by, axis=-1, dtype=jnp.int32)  # [..., E]
  slots = (*x.shape[:-1], k, n)  # [..., r, i]
  place = jax.lax.broadcasted_iota(jnp.int32, slots, x.ndim - 1)
  element = jax.lax.broadcasted_iota(jnp.int32, slots, x.ndim)
  ids = jnp.sum(
    jnp.where(rank[..., None, :] == place, element, 0),
    axis=-1,
    dtype=jnp.int32,
  )
  return jnp.take_along_axis(x, ids, axis=-1), ids


def _group_of_pairs(ids: jax.Array, plan: Plan) -> jax.Array:
  """int32 `[pairs]`: each pair's expert, or E for a dropped pair (an id
  outside `[0, E)`: another device's expert)."""
  flat = ids.reshape(-1)
  return jnp.where((flat >= 0) & (flat < plan.experts), flat, plan.experts)


def _tile_experts(ends: jax.Array, plan: Plan) -> jax.Array:
  """int32 `[max_tiles]`: the expert whose padded rows (ending at `ends`,
  inclusive prefix sums per group) hold each tile's first row; -1 for the
  dropped group's tiles and those past it."""
  tile_start = jnp.arange(plan.max_tiles) * plan.block_m
  # One fused compare-and-count (jnp.searchsorted unrolls into ~16 tiny
  # kernels).
  tile_expert = jnp.sum(ends[None, :] <= tile_start[:, None], axis=1)
  used = tile_start < ends[plan.experts - 1]  # the dropped group is last
  return jnp.where(used, tile_expert, -1).astype(jnp.int32)


def _gather_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
  """`rows[index]` for bf16 `[R, K/2]` planes, moved as 32-bit words (XLA's
  gather for DeepSeek-V3 at 4096 tokens on the H200: 364 -> 315 us)."""
  if not GATHER_WORDS or rows.shape[-1] % 2:
    return rows[index]
  r, k = rows.shape
  words = jax.lax.bitcast_convert_type(rows.reshape(r, k // 2, 2), jnp.uint32)
  picked = words.at[index].get(mode="promise_in_bounds")
  return jax.lax.bitcast_convert_type(picked, rows.dtype).reshape(-1, k)


def _gather_planes(planes, index, used_tiles, block_m, interpret):
  """`plane[index]` of each bf16 `[R, K/2]` plane for the used token tiles,
  as two arrays (XLA gathers into two faster than into one stacked array), by
  `gather_rows_sm90` from `GATHER_KERNEL_MIN_ROWS` rows (rows past the used
  tiles undefined), else by XLA."""
  rows = index.shape[0]
  if (
    GATHER_KERNEL
    and rows >= GATHER_KERNEL_MIN_ROWS
    and gather_rows_sm90.supports(planes, rows, block_m)
  ):
    return gather_rows_sm90.gather_planes(
      planes,
      index,
      used_tiles * block_m,
      block_m=block_m,
      num_sms=common.num_sms(interpret),
      interpret=interpret,
    )
  return tuple(_gather_rows(plane, index) for plane in planes)


def _factors(
  proj: base.StackedLinear, activation: str
) -> jax.Array | tuple[jax.Array, ...]:
  """The kernel's epilogue scales: the per-expert leaves whose product
  scales each expert's rows (no XLA pass), or, where w13's up rows have
  their own scale, f32 `[E, ceil128(N) / 64]` per 64-row block."""
  if config_lib.SCALES_AS_OPERANDS and proj.alpha_up is None:
    return common.epilogue_scale_operands(
      proj.alpha, proj.input_scale_inv, activation
    )
  _, n, _ = proj.shape
  first, second = proj.epilogue_scales(activation)
  blocks = -(-n // config_lib.TILE_ROWS) * config_lib.TILE_ROWS // FACTOR_ROWS
  in_second_half = jnp.arange(blocks) * FACTOR_ROWS >= n // 2
  return jnp.where(in_second_half[None], second[:, None], first[:, None])


def _grouped_gemm(
  row_expert,
  tile_expert,
  used_tiles,
  proj,
  *,
  rows,
  activation,
  config,
  interpret,
  float32_out=False,
  swiglu=False,
  planes_out=False,
  gather=None,
):
  """`[R, N]` (or with `planes_out` the planes `[2, R, N/2]`): each token
  tile of `rows` times its expert's weights.

  `rows`: `[R, K]`, or bf16 planes `[2, R, K/2]` as `split_activations`
  makes them (W4A16 only). `gather`: row indices into `rows` (the token of
  each sorted row); the K reorder of `split_activations` then runs on the
  fewer unsorted rows.
  """
  n_experts, n, k = proj.shape
  if rows.ndim == 3:
    x_planes = rows
  else:
    if activation == "nvfp4":
      if gather is not None:  # quantized with each row's expert's scale
        rows, gather = rows[gather], None
      rows = activation_quant.fake_quantize_rows(
        rows, proj.input_scale_inv[row_expert]
      )
    # Two arrays, which XLA slices out of the split in one pass.
    x_planes = tuple(sm90.split_activations(rows.astype(jnp.bfloat16)))
  if gather is not None:
    x_planes = _gather_planes(
      x_planes, gather, used_tiles, config.block_m, interpret
    )
  scale_rows, padded_blocks = proj.block_scale.shape[1:]
  weight, config = sm90.kernel_weight(proj.weight, proj.weight_layout, config)
  out = sm90.matmul(
    weight,
    x_planes,
    proj.block_scale.reshape(
      n_experts, scale_rows // 128, padded_blocks // 4, 2, 256
    ),
    _factors(proj, activation),
    tile_expert,
    used_tiles,
    config=config,
    num_sms=common.num_sms(interpret),
    float32_out=float32_out,
    swiglu=swiglu,
    planes_out=planes_out,
    interpret=interpret,
  )
  if swiglu or planes_out:
    return out
  if config.splits > 1 or float32_out:
    out = out.sum(axis=0).T
    if not float32_out:
      out = out.astype(jnp.bfloat16)
  return out[:, :n]


def _expert_gemms(
  rows_in,
  gather,
  tile_expert,
  block_m,
  configs,
  *,
  w13,
  w2,
  activation,
  swiglu,
  interpret,
  used_tiles=None,
):
  """bf16 `[tiles * block_m, H]`: GEMM 1 (+ SwiGLU) and GEMM 2 over token
  tiles of `block_m` rows, row r being `rows_in[gather[r]]` (or `rows_in`
  itself when `gather` is None). `used_tiles`: the tiles with an expert,
  if the placement counted them already."""
  inter = w13.shape[1] // 2
  row_expert = jnp.maximum(jnp.repeat(tile_expert, block_m), 0)
  if used_tiles is None:
    used_tiles = jnp.sum(tile_expert >= 0, dtype=jnp.int32)
  gemm = functools.partial(
    _grouped_gemm,
    row_expert,
    tile_expert,
    used_tiles,
    activation=activation,
    interpret=interpret,
  )
  if swiglu:
    # silu(gate) * up from the float32 accumulators, rounded to bf16 once;
    # with plane-ordered w13 rows, as GEMM 2's activation planes.
    act = gemm(
      w13,
      rows=rows_in,
      config=configs[0],
      swiglu=True,
      planes_out=w13.plane_rows,
      gather=gather,
    )
    if not w13.plane_rows:  # [R, ceil128(I)]: the columns past I are zeros
      act = act[:, :inter]
  else:
    # W4A4 quantizes the intermediate; from float32 gate and up (as the
    # reference) a bf16 rounding cannot move its FP4 codes.
    h = gemm(
      w13,
      rows=rows_in,
      config=configs[0],
      float32_out=activation == "nvfp4",
      gather=gather,
    )
    if w13.plane_rows:  # back to natural feature order (fused with SwiGLU)
      h = sm90_layout.from_plane_rows(h, axis=-1)
    gate = h[:, :inter].astype(jnp.float32)
    up = h[:, inter:].astype(jnp.float32)
    act = (base.silu(gate) * up).astype(jnp.bfloat16)
  return gemm(w2, rows=act, config=configs[1])


@functools.partial(jax.jit, static_argnames=("forward", "routing"))
def _routed(x, router_logits, correction_bias, experts, *, forward, routing):
  tokens, n_experts = router_logits.shape
  options = dict(routing)
  mode = _kernel_routing(router_logits, correction_bias, options, forward)
  if mode is not None:
    plan = forward.keywords["plan"]
    weights, ids, *placed = route_decode_sm90.route_and_place(
      router_logits,
      plan.top_k,
      block_m=plan.block_m,
      max_tiles=plan.max_tiles,
      place=mode == "decode",
      rank=mode == "prefill",
      routed_scaling=options.get("routed_scaling", 1.0),
    )
    if mode == "prefill":
      placed = place_prefill_sm90.place_pairs(
        ids, *placed, block_m=plan.block_m, max_tiles=plan.max_tiles
      )
    out = forward(x, weights, ids, experts, placed=tuple(placed) or None)
    return out.astype(x.dtype)
  counted = tokens * n_experts**2 <= COUNTING_TOP_K_MAX
  weights, ids = base.route(
    router_logits,
    correction_bias=correction_bias,
    top_k_fn=counting_top_k if counted else jax.lax.top_k,
    **options,
  )
  return forward(x, weights, ids, experts).astype(x.dtype)


def _kernel_routing(router_logits, correction_bias, routing, forward):
  """How `route_decode_sm90` takes this call: "decode" (it routes and
  places the pairs of a decode step in one CTA), "prefill" (it routes and
  ranks the pairs, `place_prefill_sm90` places them), "route" (it routes,
  XLA places), or None (XLA routes).

  It takes the softmax of the chosen experts' logits (as `base.route`
  does for these options); it places a decode step's counted pairs
  (DECODE_ROUTING_KERNEL; one token's direct tiles need no placing) and
  routes larger calls (PREFILL_ROUTING_KERNEL), placing them too
  (PREFILL_PLACEMENT_KERNEL) unless the plan has remainder tiles or more
  tokens than `place_prefill_sm90` takes. (Its
  experts are all in range: expert-parallel calls, which drop other
  devices' pairs, come through `experts_forward`, not here.)
  """
  options = forward.keywords
  plan = options["plan"]
  sizes = (plan.tokens, plan.experts, plan.top_k)
  if (
    options["interpret"]
    or not base.routes_by_chosen_softmax(
      correction_bias=correction_bias, **routing
    )
    or router_logits.dtype not in (jnp.float32, jnp.bfloat16)
  ):
    return None
  decode = options["direct"] or options["counted"]
  if DECODE_ROUTING_KERNEL and decode and route_decode_sm90.supports(*sizes):
    return "route" if options["direct"] else "decode"
  if PREFILL_ROUTING_KERNEL and route_decode_sm90.supports(*sizes, place=False):
    places = (
      PREFILL_PLACEMENT_KERNEL
      and not decode
      and not plan.remainder_m
      and place_prefill_sm90.supports(plan.tokens, plan.top_k)
    )
    return "prefill" if places else "route"
  return None


@functools.partial(
  jax.jit,
  static_argnames=(
    "plan",
    "configs",
    "remainder_configs",
    "activation",
    "swiglu",
    "direct",
    "counted",
    "interpret",
  ),
)
def _forward(
  x,
  weights,
  ids,
  experts,
  *,
  plan,
  configs,
  activation,
  swiglu,
  direct,
  interpret,
  counted=False,
  remainder_configs=None,
  placed=None,
):
  """float32 `[T, H]`: sort, GEMM 1 (+ SwiGLU), GEMM 2, weighted combine
  (the two GEMMs once more over the remainder tiles, if the plan has
  them). `placed`: the sort's (position, token, tile_expert), and maybe the
  used tiles, made already (`route_decode_sm90`, `place_prefill_sm90`)."""
  w13 = base.StackedLinear.from_mapping(experts, "w13_")
  w2 = base.StackedLinear.from_mapping(experts, "w2_")
  if direct:
    place = direct_tiles
  else:
    place = count_by_expert if counted else sort_by_expert
  position, token, tile_expert, *used_tiles = placed or place(ids, plan)
  gemms = functools.partial(
    _expert_gemms,
    w13=w13,
    w2=w2,
    activation=activation,
    swiglu=swiglu,
    interpret=interpret,
  )
  if direct:  # rows made by a select, not a gather (token is a constant)
    rows_in = jnp.where((token == 0)[:, None], x[0], 0)
    y = gemms(rows_in, None, tile_expert, plan.block_m, configs)
    # Each tile's first row, a strided slice.
    picked = y.reshape(plan.max_tiles, plan.block_m, -1)[None, : plan.top_k, 0]
  else:
    rows_in = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    bulk = plan.bulk_rows
    y = gemms(
      rows_in,
      token[:bulk],
      tile_expert[: plan.max_tiles],
      plan.block_m,
      configs,
      # The placement kernel counts them over all tiles: bulk tiles only
      # when there are no remainder tiles.
      used_tiles=None if plan.remainder_m else next(iter(used_tiles), None),
    )
    if plan.remainder_m:
      y_remainder = gemms(
        rows_in,
        token[bulk:],
        tile_expert[plan.max_tiles :],
        plan.remainder_m,
        remainder_configs,
      )
      # One gather over both (XLA can fuse the concatenation into it).
      y = jnp.concatenate([y, y_remainder])
    picked = y[position]
  picked = picked.astype(jnp.float32)  # [T, top_k, H]
  if placed is None:
    # Dropped pairs' rows were never written (they may hold NaN): select.
    # (The routing kernel, which made `placed`, drops none.)
    valid = (ids >= 0) & (ids < plan.experts)
    picked = jnp.where(valid[..., None], picked, 0.0)
  # A product and a sum, not an einsum: at one token XLA lowers the einsum
  # to a dot, and float32 dots may round their inputs to TF32 on the GPU;
  # the sum stays float32 (as the reference) at the same speed on the H200
  # (DeepSeek-V3 T = 1 combine 2.3 -> 2.0 us, one call each).
  return jnp.sum(picked * weights[..., None], axis=1)

"""A prefill's expert placement from the routing kernel's ranks (sm90).

`placement.sort_by_expert` places a prefill's (token, expert)
pairs in ~14 small XLA kernels (comparison counts per chunk of pairs, a
prefix sum over the chunks, the rows, a scatter of tokens, the tiles'
experts): ~32 us of Qwen3-30B-A3B's 674 us layer at 4096 tokens on the
H200 (twenty-second session, one-call profile). Here the routing kernel
(`route_decode_sm90.route_and_place(..., rank=True)`) already ranks each
pair among the earlier pairs of its expert in its CTA of 16 tokens and
counts each expert there; two kernels finish:
1. `_scan_chunks`, a warp per expert: each expert's exclusive prefix sum
   over the chunks' counts (where each chunk's pairs of it start in its
   group), and its total. (XLA's prefix sum over the chunks, a reduce
   window, took 8.4 us of a 14 us XLA version of this step at 4096
   tokens.)
2. `_place`, a CTA per chunk: warp 0 pads the totals to whole tiles and
   scans them (where each expert's rows start); then disjoint writes: each
   pair its row and that row's token, each expert (in CTA e mod CTAs) its
   padding rows (token T) and its tiles, and the rows and tiles past the
   used ones T and -1; CTA 0 writes how many tiles are used.

The result equals `sort_by_expert`'s for plans without remainder tiles
and experts all in range (no expert parallelism). Inline Mosaic GPU code,
which the CPU interpreter cannot run.
"""

import functools

import jax
import jax.numpy as jnp
from jax._src.lib.mlir.dialects import arith
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.nvfp4_moe import route_decode_sm90
from pallas_kernels.nvfp4_moe import scalar_sm90 as scalar

# The routing kernel's tokens per CTA: its chunks of pairs.
CHUNK_TOKENS = route_decode_sm90.MAX_TOKENS
THREADS = 128  # one warpgroup: a thread per pair of a chunk (16 x top-8)
SCAN_WARPS = 16  # experts per CTA of `_scan_chunks`, a warp each
# `_scan_chunks` unrolls a lane's loads: 64 of them at this many tokens (a
# warp scans 2048 chunks of 16). Larger calls keep XLA's placement.
MAX_TOKENS = 32 * 64 * CHUNK_TOKENS


def supports(tokens: int, top_k: int) -> bool:
  """Whether a chunk's pairs fit the CTA's threads, and the scan's
  unrolled loads per lane stay few (up to MAX_TOKENS tokens)."""
  return (
    1 <= tokens <= MAX_TOKENS and 1 <= top_k and CHUNK_TOKENS * top_k <= THREADS
  )


def place_pairs(
  ids: jax.Array,
  within: jax.Array,
  chunk_counts: jax.Array,
  *,
  block_m: int,
  max_tiles: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(position int32 `[T, k]`, token int32 `[max_tiles * block_m]`,
  tile_expert int32 `[max_tiles]`), as `sort_by_expert` places them, and
  int32 `[]` the tiles with an expert (the grouped GEMMs' `used_tiles`,
  without an XLA reduction over `tile_expert`).

  Args:
    ids: int32 `[T, k]` expert of each pair, each in `[0, E)`.
    within: int32 `[T, k]` each pair's rank among the earlier pairs of its
      expert in its chunk of `CHUNK_TOKENS` tokens.
    chunk_counts: int32 `[E, ceil(T / CHUNK_TOKENS)]` pairs of each expert
      in each chunk.
    block_m: rows per token tile; each expert's rows start on a tile.
    max_tiles: token tiles of the plan (`config.Plan.max_tiles`).
  """
  tokens, top_k = ids.shape
  experts, chunks = chunk_counts.shape
  if (
    within.shape != ids.shape
    or chunks != -(-tokens // CHUNK_TOKENS)
    or not supports(tokens, top_k)
  ):
    raise ValueError(
      f"place_pairs: ids {ids.shape}, within {within.shape} and chunk counts"
      f" {chunk_counts.shape} do not match (chunks of {CHUNK_TOKENS} tokens,"
      f" top_k <= {THREADS // CHUNK_TOKENS}, <= {MAX_TOKENS} tokens)"
    )
  if min(block_m, max_tiles) < 1:
    raise ValueError(f"placement needs tiles ({block_m=}, {max_tiles=})")
  chunk_before, totals = plgpu.kernel(
    _scan_chunks,
    out_type=(
      jax.ShapeDtypeStruct((experts, chunks), jnp.int32),
      jax.ShapeDtypeStruct((experts,), jnp.int32),
    ),
    grid=(-(-experts // SCAN_WARPS),),
    grid_names=("cta",),
    num_threads=SCAN_WARPS // 4,
    thread_name="wg",
  )(chunk_counts.astype(jnp.int32))
  position, token, tile_expert, used_tiles = plgpu.kernel(
    functools.partial(_place, top_k=top_k, block_m=block_m),
    out_type=(
      jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
      jax.ShapeDtypeStruct((max_tiles * block_m,), jnp.int32),
      jax.ShapeDtypeStruct((max_tiles,), jnp.int32),
      jax.ShapeDtypeStruct((1,), jnp.int32),
    ),
    grid=(chunks,),
    grid_names=("cta",),
    scratch_types=[
      plgpu.SMEM((experts,), jnp.int32),  # where each expert's rows end
      plgpu.SMEM((experts,), jnp.int32),  # each expert's pairs
    ],
  )(ids.astype(jnp.int32), within.astype(jnp.int32), chunk_before, totals)
  return position, token, tile_expert, used_tiles.reshape(())


def _scan_chunks(counts_ref, before_ref, totals_ref):
  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 3)
  def scan(_, chunk_counts, chunk_before, totals):
    c = scalar.const
    experts, chunks = scalar.shape(chunk_counts)
    tid = mgpu_utils.thread_idx()
    warp, lane = arith.divui(tid, c(32)), arith.remui(tid, c(32))
    expert = arith.addi(arith.muli(mgpu_utils.block_idx(), c(SCAN_WARPS)), warp)
    valid = scalar.lt(expert, c(experts))
    expert = arith.select(valid, expert, c(0))
    # Lane l takes the expert's chunks l * per_lane onwards, contiguous
    # (their sectors load once; a lane per chunk across the expert-minor
    # layout made each count a sector of its own: 7.1 us at Qwen3-30B-A3B's
    # 4096 tokens, 24.5 at 16384). Loads first, then the sums.
    per_lane = -(-chunks // 32)
    first = arith.addi(
      arith.muli(expert, c(chunks)), arith.muli(lane, c(per_lane))
    )
    first_chunk = arith.muli(lane, c(per_lane))
    index, values = [], []
    for i in range(per_lane):
      inside = arith.andi(
        valid, scalar.lt(arith.addi(first_chunk, c(i)), c(chunks))
      )
      at = arith.select(inside, arith.addi(first, c(i)), c(0))
      index.append((inside, at))
      values.append(arith.select(inside, scalar.load(chunk_counts, at), c(0)))
    lane_total = c(0)
    lane_before = []
    for value in values:
      lane_before.append(lane_total)
      lane_total = arith.addi(lane_total, value)
    through = scalar.inclusive_warp_scan(lane_total, lane)
    below = arith.subi(through, lane_total)
    for (inside, at), before in zip(index, lane_before, strict=True):
      with mgpu_utils.when(inside):
        scalar.store(arith.addi(below, before), chunk_before, at)
    total = scalar.from_last_lane(through)
    with mgpu_utils.when(arith.andi(valid, scalar.eq(lane, c(0)))):
      scalar.store(total, totals, expert)

  scan(counts_ref, before_ref, totals_ref)


def _place(*refs, top_k, block_m):
  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs))
  def place(
    _,
    ids,
    within,
    chunk_before,
    totals,
    position,
    token,
    tile,
    used_tiles,
    ends,
    counts,
  ):
    c = scalar.const
    tokens, _ = scalar.shape(ids)
    experts, chunks = scalar.shape(chunk_before)
    (n_rows,) = scalar.shape(token)
    (n_tiles,) = scalar.shape(tile)
    tid = mgpu_utils.thread_idx()
    warp, lane = arith.divui(tid, c(32)), arith.remui(tid, c(32))
    cta = mgpu_utils.block_idx()
    first_token = arith.muli(cta, c(CHUNK_TOKENS))

    # Warp 0: where each expert's rows end, its group padded to whole tiles
    # (a scan over the lanes), and its count.
    with mgpu_utils.when(scalar.eq(warp, c(0))):
      groups, _ = scalar.padded_groups(
        functools.partial(scalar.load, totals), experts, block_m, lane
      )
      for valid, expert, count, start, rows in groups:
        with mgpu_utils.when(valid):
          scalar.store(arith.addi(start, rows), ends, expert)
          scalar.store(count, counts, expert)
    scalar.barrier()

    # Each pair: its row, and that row's token.
    here = arith.minsi(c(CHUNK_TOKENS), arith.subi(c(tokens), first_token))
    in_pairs = scalar.lt(tid, arith.muli(here, c(top_k)))
    pair = arith.select(
      in_pairs, arith.addi(arith.muli(first_token, c(top_k)), tid), c(0)
    )
    expert = scalar.load(ids, pair)
    start = arith.subi(
      scalar.load(ends, expert),
      scalar.round_up(scalar.load(counts, expert), block_m),
    )
    row = arith.addi(
      arith.addi(start, scalar.load(within, pair)),
      scalar.load(chunk_before, arith.addi(arith.muli(expert, c(chunks)), cta)),
    )
    with mgpu_utils.when(in_pairs):
      scalar.store(row, position, pair)
      scalar.store(arith.divui(pair, c(top_k)), token, row)

    # Experts cta, cta + chunks, ...: padding rows and tiles.
    group = functools.partial(
      scalar.write_group, tokens=tokens, block_m=block_m, thread=tid
    )
    for first in range(0, experts, chunks):
      expert = arith.addi(cta, c(first))
      valid = scalar.lt(expert, c(experts))
      expert = arith.select(valid, expert, c(0))
      end = scalar.load(ends, expert)
      count = scalar.load(counts, expert)
      start = arith.subi(end, scalar.round_up(count, block_m))
      group(expert, valid, start, count, end, token, tile, step=THREADS)

    # Rows and tiles past the used ones, spread over the CTAs.
    used = scalar.load(ends, c(experts - 1))
    with mgpu_utils.when(
      arith.andi(scalar.eq(cta, c(0)), scalar.eq(tid, c(0)))
    ):
      scalar.store(arith.divui(used, c(block_m)), used_tiles, c(0))
    scalar.write_past_used(
      used,
      token,
      tile,
      tokens=tokens,
      block_m=block_m,
      thread=arith.addi(arith.muli(cta, c(THREADS)), tid),
      step=chunks * THREADS,
    )

  place(*refs)

"""Decode-size MoE routing and placement in one kernel (sm90).

At 16 tokens XLA runs the routing's top-k and weights and the counted
placement as about a dozen small kernels, each a reduction of another
shape (15.3 us of Qwen3-30B-A3B's 95 us layer on the H200, one-call
profile; NOTES.md, fifteenth and seventeenth sessions). Here one CTA of
four warpgroups does them:
1. warp t takes token t: its lanes hold the token's logits, and top_k
   rounds of a butterfly arg-max in float total order (ties to the lower
   expert, as `jax.lax.top_k` and `placement.counting_top_k`) pick
   its experts; lane 0 turns their logits into weights as `base.route`
   does for renormalized softmax routing (the softmax of the chosen
   logits);
2. pair p = (token, k) finds its rank among the earlier pairs of its
   expert: within its warp by a warp match (`match.any`) and a popcount,
   below it from each warp's count of the expert, which the first lane of
   each match writes to shared memory;
3. warp 0 sums the experts' counts, pads them to whole token tiles and
   scans them over its lanes: where each expert's rows start;
4. each pair writes its row and that row's token, each expert its padding
   rows (token T) and its tiles, and the rows and tiles past the used
   ones T and -1, all disjoint: `placement.count_by_expert`'s
   results, equal to them.
Three barriers in all. The first version (seventeenth session) counted by
loops over every pair and expert in each thread: 8.5 us at Qwen3-30B-A3B's
16 tokens on the H200, against the 15 us of XLA kernels it replaced.

Routing alone (`place=False`) runs step 1 in a CTA per `MAX_TOKENS`
tokens at any number of tokens: a prefill's weights and experts, which
XLA then places (`pallas_mosaic_gpu.PREFILL_ROUTING_KERNEL`), instead of
XLA's top-k. With `rank` each CTA also runs step 2 over its own pairs and
writes their ranks in it and its count of each expert: the first half of
a prefill's placement, which `place_prefill_sm90` finishes.

With `x` (one token, routing alone) the CTA's other warps, while warp 0
routes, split the token's row into the GEMM's two activation planes
(`sm90.split_activations`), so that no XLA kernel runs between routing
and GEMM 1: plane word 8g + 4h + t of each 32-column group g takes the
low (plane 0) or high (plane 1) halves of the row's words 16g + 4t + h
and 16g + 4t + 2 + h.

Covers softmax routing renormalized over the chosen experts with no
correction bias or expert groups (Qwen3-MoE, Mixtral, gpt-oss), at most
`MAX_TOKENS` tokens when placing, `MAX_EXPERTS` experts and top-k 8.
The weights use the GPU's `exp` and division, so they may differ from
XLA's in the last bits; the experts, rows and tiles are exact.

Inline Mosaic GPU code (one thread's scalar program), so the CPU
interpreter cannot run it; `pallas_mosaic_gpu.DECODE_ROUTING_KERNEL` turns
it on.
"""

import functools

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax._src.lib.mlir.dialects import math as mlir_math
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.nvfp4_moe import scalar_sm90 as scalar

WARPGROUPS = 4
THREADS = 128 * WARPGROUPS
MAX_TOKENS = THREADS // 32  # one warp per token
MAX_EXPERTS = 256  # up to 8 logits a lane
MAX_TOP_K = 8
# An expert already taken (or a lane past E) ranks below every logit.
_TAKEN = 1 << 30
# Each top-k round takes the warp's best by two warp reductions
# (`redux.sync` max of the keys, min of the indices holding it) after a
# tournament over each lane's values, instead of a linear pass and five
# butterfly rounds. On (twenty-seventh session, H200 one-call profiles):
# DeepSeek-V3's one-token routing (256 experts, 8 a lane, 8 rounds) 2.7 ->
# 2.1 us, Qwen3-30B-A3B's 2.2 -> 1.85; same experts in the GPU tests.
REDUX_TOP_K = True


def supports(tokens: int, experts: int, top_k: int, place: bool = True) -> bool:
  """Whether one CTA routes and places this decode step (`place`), or CTAs
  of `MAX_TOKENS` tokens route these tokens."""
  routes = (
    tokens >= 1 and top_k <= min(MAX_TOP_K, experts) and experts <= MAX_EXPERTS
  )
  if not place:
    return routes
  return routes and tokens <= MAX_TOKENS and tokens * top_k <= THREADS


def route_and_place(
  logits: jax.Array,
  top_k: int,
  *,
  block_m: int = 0,
  max_tiles: int = 0,
  place: bool = True,
  rank: bool = False,
  routed_scaling: float = 1.0,
  x: jax.Array | None = None,
  plane_rows: int = 8,
) -> tuple[jax.Array, ...]:
  """(weights f32 `[T, k]`, ids int32 `[T, k]`) and, with `place`,
  (position int32 `[T, k]`, token int32 `[max_tiles * block_m]`,
  tile_expert int32 `[max_tiles]`) as `count_by_expert` gives them, or
  with `rank` (routing alone) each CTA's share of a prefill's placement:
  (within int32 `[T, k]`, each pair's rank among the earlier pairs of its
  expert in its CTA's `MAX_TOKENS` tokens; chunk_counts int32
  `[E, ceil(T / MAX_TOKENS)]`, each CTA's pairs of each expert), which
  `place_prefill_sm90.place_pairs` takes.

  Args:
    logits: `[T, E]` router logits, float32 or bfloat16.
    top_k: experts per token.
    block_m: rows per token tile; each expert's rows start on a tile.
    max_tiles: token tiles of the plan (`config.Plan.max_tiles`).
    place: also place the pairs (False: one token's direct tiles, or a
      prefill's routing, whose pairs are placed after; any number of
      tokens).
    rank: with `place` False, also rank the pairs in each CTA.
    routed_scaling: multiplies every weight.
    x: bf16 `[1, H]` (one token, routing alone, H % 32 == 0): also returns
      its activation planes, bf16 `[2, plane_rows, H / 2]` with row 0 that
      of `sm90.split_activations(x)` and the other rows undefined (a token
      tile whose other rows' outputs nobody reads).
  """
  tokens, experts = logits.shape
  if not supports(tokens, experts, top_k, place):
    limits = f"<= {MAX_EXPERTS} experts and top_k <= {MAX_TOP_K}"
    if place:
      limits = f"with placement <= {MAX_TOKENS} tokens, {limits}"
    raise ValueError(
      f"route_and_place takes {limits}; got {logits.shape}, {top_k=}"
    )
  if logits.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"logits must be float32 or bfloat16, got {logits.dtype}")
  if place and rank:
    raise ValueError("rank goes with routing alone (place=False)")
  if x is not None and (
    place
    or rank
    or tokens != 1
    or x.dtype != jnp.bfloat16
    or x.shape[0] != 1
    or x.shape[1] % 32
  ):
    raise ValueError(
      "x's planes take one token's bf16 row [1, H], H % 32 == 0, and"
      f" routing alone; got {x.shape} {x.dtype}, {tokens=}, {place=}, {rank=}"
    )
  if place and min(block_m, max_tiles) < 1:
    raise ValueError(
      f"placement needs block_m and max_tiles ({block_m=}, {max_tiles=})"
    )
  pairs = tokens * top_k
  outs = [
    jax.ShapeDtypeStruct((tokens, top_k), jnp.float32),
    jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
  ]
  if place:
    outs += [
      jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
      jax.ShapeDtypeStruct((max_tiles * block_m,), jnp.int32),
      jax.ShapeDtypeStruct((max_tiles,), jnp.int32),
    ]
  ctas = 1 if place else -(-tokens // MAX_TOKENS)
  if rank:
    outs += [
      jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
      # Expert-major: each expert's counts are contiguous for the scan.
      jax.ShapeDtypeStruct((experts, ctas), jnp.int32),
    ]
  inputs = (logits,)
  if x is not None:
    inputs += (x,)
    outs.append(
      jax.ShapeDtypeStruct((2, plane_rows, x.shape[1] // 2), jnp.bfloat16)
    )
  body = functools.partial(
    _route,
    top_k=top_k,
    block_m=block_m,
    place=place,
    rank=rank,
    routed_scaling=float(routed_scaling),
    split=x is not None,
  )

  def kernel(*refs):
    body(*refs)

  scratch = []
  if place or rank:
    cta_pairs = pairs if place else MAX_TOKENS * top_k
    scratch = [
      plgpu.SMEM((cta_pairs,), jnp.int32),  # each pair's expert
      # Pairs of each expert in each warp of pairs.
      plgpu.SMEM((_pair_warps(cta_pairs) * experts,), jnp.int32),
    ]
  if place:
    scratch += [
      plgpu.SMEM((experts,), jnp.int32),  # where each expert's rows start
      plgpu.SMEM((1,), jnp.int32),  # rows of all experts, padded
    ]
  call = plgpu.kernel(
    kernel,
    out_type=tuple(outs),
    # Routing alone: a CTA per MAX_TOKENS tokens.
    grid=(ctas,),
    grid_names=("cta",),
    num_threads=WARPGROUPS,
    thread_name="wg",
    scratch_types=scratch,
  )
  return call(*inputs)


def _route(
  logits_ref, *refs, top_k, block_m, place, rank, routed_scaling, split
):
  # The kernel's refs: inputs (logits and with `split` x), outputs (the
  # routing's, then x's planes), scratch.
  n_out = 5 if place else (4 if rank else 2)
  row_refs = ()
  if split:
    x_ref, *refs = refs
    row_refs = (x_ref, refs.pop(n_out))  # x and its planes
  outs, scratch = refs[:n_out], refs[n_out:]

  @plgpu.inline_mgpu(
    arg_types=(plgpu.RefType(),) * (1 + len(row_refs) + len(refs))
  )
  def route(_, logits, *all_refs):
    if split:  # by warps 1-15, while warp 0 routes the token
      x, planes, *all_refs = all_refs
      tid = mgpu_utils.thread_idx()
      warp_size = scalar.const(32)
      with mgpu_utils.when(scalar.ge(tid, warp_size)):
        _split_row(x, planes, arith.subi(tid, warp_size), THREADS - 32)
    out_refs = all_refs[:n_out]
    if place or rank:
      pair_expert, warp_counts = all_refs[n_out : n_out + 2]
    if place:
      starts, used_rows = all_refs[n_out + 2 :]
    c = scalar.const
    f32 = ir.F32Type.get()
    tokens, experts = scalar.shape(logits)
    # Pairs of this CTA: all of them when placing (one CTA), else those of
    # its MAX_TOKENS tokens.
    cta_pairs = tokens * top_k if place else MAX_TOKENS * top_k
    pair_warps = _pair_warps(cta_pairs)

    def expert_count(expert, below_warp=None):
      """This CTA's pairs of `expert` (in the warps of pairs below one)."""
      total = c(0)
      for w in range(pair_warps):
        count = scalar.load(warp_counts, arith.addi(c(w * experts), expert))
        if below_warp is not None:
          count = arith.select(scalar.lt(c(w), below_warp), count, c(0))
        total = arith.addi(total, count)
      return total

    tid = mgpu_utils.thread_idx()
    warp, lane = arith.divui(tid, c(32)), arith.remui(tid, c(32))
    cta = mgpu_utils.block_idx()  # 0 when placing
    first_token = arith.muli(cta, c(MAX_TOKENS))
    token = arith.addi(first_token, warp)
    if place or rank:  # zero counts, ordered before their use by a barrier
      for first in range(0, pair_warps * experts, THREADS):
        index = arith.addi(tid, c(first))
        with mgpu_utils.when(scalar.lt(index, c(pair_warps * experts))):
          scalar.store(c(0), warp_counts, index)

    # 1. Top-k per token, one warp each; keys in float total order.
    with mgpu_utils.when(scalar.lt(token, c(tokens))):
      keys, indices = [], []
      logit_type = scalar.element_type(logits)
      for j in range(-(-experts // 32)):
        expert = arith.addi(lane, c(32 * j))
        valid = scalar.lt(expert, c(experts))
        index = arith.addi(
          arith.muli(token, c(experts)),
          arith.select(valid, expert, c(0)),
        )
        value = scalar.load(logits, index, logit_type)
        if logit_type != f32:
          value = arith.extf(f32, value)
        keys.append(arith.select(valid, _total_order_key(value), c(-(2**31))))
        indices.append(arith.select(valid, expert, c(_TAKEN)))
      chosen_keys, chosen_ids = [], []
      for _ in range(top_k):
        if REDUX_TOP_K:
          best_key, best_id = _warp_best(*_lane_best(keys, indices))
        else:
          best_key, best_id = keys[0], indices[0]
          for key, index in zip(keys[1:], indices[1:], strict=True):
            best_key, best_id = _better(key, index, best_key, best_id)
          for distance in (1, 2, 4, 8, 16):
            other_key = mgpu_utils.shfl_bfly(best_key, distance)
            other_id = mgpu_utils.shfl_bfly(best_id, distance)
            best_key, best_id = _better(other_key, other_id, best_key, best_id)
        chosen_keys.append(best_key)
        chosen_ids.append(best_id)
        taken = [scalar.eq(i, best_id) for i in indices]
        keys = [
          arith.select(t, c(-(2**31)), k)
          for t, k in zip(taken, keys, strict=True)
        ]
        indices = [
          arith.select(t, c(_TAKEN), i)
          for t, i in zip(taken, indices, strict=True)
        ]
      with mgpu_utils.when(scalar.eq(lane, c(0))):
        chosen = [_key_value(k) for k in chosen_keys]
        # base.route: exp(chosen - chosen[0]), over their sum, times the
        # routed scaling.
        weights = [mlir_math.exp(arith.subf(v, chosen[0])) for v in chosen]
        total = weights[0]
        for w in weights[1:]:
          total = arith.addf(total, w)
        for r, (w, expert) in enumerate(zip(weights, chosen_ids, strict=True)):
          w = arith.divf(w, total)
          if routed_scaling != 1.0:
            w = arith.mulf(w, arith.constant(f32, routed_scaling))
          pair = arith.addi(arith.muli(token, c(top_k)), c(r))
          scalar.store(w, out_refs[0], pair)
          scalar.store(expert, out_refs[1], pair)
          if place or rank:  # the CTA's pair index
            local = arith.addi(arith.muli(warp, c(top_k)), c(r))
            scalar.store(expert, pair_expert, local)
    if not (place or rank):
      return
    scalar.barrier()

    # 2. Each pair's rank among the pairs of its warp with its expert (a
    # warp match), and each warp's count of each expert.
    if place:
      in_pairs = scalar.lt(tid, c(cta_pairs))
    else:  # the last CTA's tokens may be fewer
      here = arith.minsi(c(MAX_TOKENS), arith.subi(c(tokens), first_token))
      in_pairs = scalar.lt(tid, arith.muli(here, c(top_k)))
    own = arith.select(
      in_pairs,
      scalar.load(pair_expert, arith.select(in_pairs, tid, c(0))),
      c(-1),
    )
    same = scalar.warp_op("match.any.sync.b32 $0, $1, -1;", own)
    lanes_below = arith.subi(arith.shli(c(1), lane), c(1))
    rank_in_warp = scalar.popc(arith.andi(same, lanes_below))
    first_of_match = arith.andi(in_pairs, scalar.eq(rank_in_warp, c(0)))
    with mgpu_utils.when(first_of_match):
      scalar.store(
        scalar.popc(same),
        warp_counts,
        arith.addi(arith.muli(warp, c(experts)), own),
      )
    scalar.barrier()
    own_safe = arith.select(in_pairs, own, c(0))
    rank_in_cta = arith.addi(expert_count(own_safe, warp), rank_in_warp)
    if rank:
      # The CTA's share of a prefill's placement (`place_prefill_sm90`):
      # each pair's rank among the CTA's earlier pairs of its expert, and
      # the CTA's count of each expert.
      within_ref, counts_ref = out_refs[2:]
      _, n_ctas = scalar.shape(counts_ref)
      pair = arith.addi(arith.muli(first_token, c(top_k)), tid)
      with mgpu_utils.when(in_pairs):
        scalar.store(rank_in_cta, within_ref, pair)
      in_experts = scalar.lt(tid, c(experts))
      expert = arith.select(in_experts, tid, c(0))
      with mgpu_utils.when(in_experts):
        scalar.store(
          expert_count(expert),
          counts_ref,
          arith.addi(arith.muli(expert, c(n_ctas)), cta),
        )
      return

    # 3. Warp 0: where each expert's rows start, its group padded to whole
    # tiles (a scan over the lanes).
    with mgpu_utils.when(scalar.eq(warp, c(0))):
      groups, through = scalar.padded_groups(
        expert_count, experts, block_m, lane
      )
      for valid, expert, _, start, _ in groups:
        with mgpu_utils.when(valid):
          scalar.store(start, starts, expert)
      with mgpu_utils.when(scalar.eq(lane, c(31))):
        scalar.store(through, used_rows, c(0))
    scalar.barrier()

    # 4. Disjoint writes, no more barriers: each pair its row and the row
    # its token; each expert its padding rows (token T) and its tiles; the
    # rows and tiles past the used ones T and -1.
    position_ref, token_ref, tile_ref = out_refs[2:]
    position = arith.addi(scalar.load(starts, own_safe), rank_in_cta)
    with mgpu_utils.when(in_pairs):
      scalar.store(position, position_ref, tid)
      scalar.store(arith.divui(tid, c(top_k)), token_ref, position)
    in_experts = scalar.lt(tid, c(experts))
    expert = arith.select(in_experts, tid, c(0))
    count = expert_count(expert)
    start = scalar.load(starts, expert)
    end = arith.addi(start, scalar.round_up(count, block_m))
    scalar.write_group(
      expert,
      in_experts,
      start,
      count,
      end,
      token_ref,
      tile_ref,
      tokens=tokens,
      block_m=block_m,
    )
    scalar.write_past_used(
      scalar.load(used_rows, c(0)),
      token_ref,
      tile_ref,
      tokens=tokens,
      block_m=block_m,
      thread=tid,
      step=THREADS,
    )

  route(logits_ref, *row_refs, *outs, *scratch)


def _split_row(x, planes, thread, threads: int):
  """Row 0 of both activation planes of the token row `x` (module doc):
  thread `thread` of `threads` writes plane words thread, thread +
  threads, ... of each plane, all its loads issued before its stores (one
  memory latency, not one a word)."""
  c = scalar.const
  (_, hidden) = scalar.shape(x)
  _, rows, _ = scalar.shape(planes)
  plane_words = hidden // 4  # bf16 pairs in one plane's row
  loaded = []
  for first in range(0, plane_words, threads):
    word = arith.addi(thread, c(first))
    valid = scalar.lt(word, c(plane_words))
    word = arith.select(valid, word, c(0))  # loads stay in bounds
    group, within = arith.divui(word, c(8)), arith.remui(word, c(8))
    h, t = arith.divui(within, c(4)), arith.remui(within, c(4))
    a = arith.addi(arith.addi(arith.muli(group, c(16)), arith.muli(t, c(4))), h)
    pair = (scalar.load(x, a), scalar.load(x, arith.addi(a, c(2))))
    loaded.append((valid, word, pair))
  for valid, word, (lo_word, hi_word) in loaded:
    even = arith.ori(arith.andi(lo_word, c(0xFFFF)), arith.shli(hi_word, c(16)))
    odd = arith.ori(
      arith.shrui(lo_word, c(16)), arith.andi(hi_word, c(~0xFFFF))
    )
    with mgpu_utils.when(valid):
      scalar.store(even, planes, word)
      scalar.store(odd, planes, arith.addi(word, c(rows * plane_words)))


def _pair_warps(pairs: int) -> int:
  """Warps that hold a pair each lane."""
  return -(-pairs // 32)


def _total_order_key(value):
  """int32 key of an f32 whose signed order is the float total order (as
  `counting_top_k`: +0 above -0, NaN by its bits)."""
  return _flip_negative(arith.bitcast(ir.IntegerType.get_signless(32), value))


def _key_value(key):
  """`_total_order_key`'s inverse."""
  return arith.bitcast(ir.F32Type.get(), _flip_negative(key))


def _flip_negative(bits):
  """Negative int32s with all but the sign bit flipped (its own inverse)."""
  i32 = ir.IntegerType.get_signless(32)
  negative = arith.cmpi(arith.CmpIPredicate.slt, bits, arith.constant(i32, 0))
  return arith.select(
    negative, arith.xori(bits, arith.constant(i32, 0x7FFFFFFF)), bits
  )


def _lane_best(keys, indices):
  """This lane's best (key, index) by a tournament of `_better` (depth
  log2 of its values, not their count)."""
  pairs = list(zip(keys, indices, strict=True))
  while len(pairs) > 1:
    paired = [
      _better(*pairs[i + 1], *pairs[i]) for i in range(0, len(pairs) - 1, 2)
    ]
    pairs = paired + pairs[len(pairs) - len(pairs) % 2 :]
  return pairs[0]


def _warp_best(key, index):
  """The warp's best (key, index), the larger key then the lower index, in
  every lane: two warp reductions (`redux.sync`, sm_80 on) in place of
  five butterfly rounds of two shuffles each."""
  top = scalar.warp_op("redux.sync.max.s32 $0, $1, -1;", key)
  candidate = arith.select(scalar.eq(key, top), index, scalar.const(_TAKEN))
  return top, scalar.warp_op("redux.sync.min.u32 $0, $1, -1;", candidate)


def _better(key, index, best_key, best_index):
  """The better of (key, index) and the best so far: the larger key, then
  the lower index."""
  wins = arith.ori(
    arith.cmpi(arith.CmpIPredicate.sgt, key, best_key),
    arith.andi(
      arith.cmpi(arith.CmpIPredicate.eq, key, best_key),
      arith.cmpi(arith.CmpIPredicate.slt, index, best_index),
    ),
  )
  return (
    arith.select(wins, key, best_key),
    arith.select(wins, index, best_index),
  )

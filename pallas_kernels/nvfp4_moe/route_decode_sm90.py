"""Decode-size MoE routing and placement in one kernel (sm90).

At 16 tokens XLA runs the routing's top-k and weights and the counted
placement as about a dozen small kernels, each a reduction of another
shape (15.3 us of Qwen3-30B-A3B's 95 us layer on the H200, one-call
profile; NOTES.md, fifteenth and seventeenth sessions). Here one CTA of
four warpgroups does them:
1. warp t takes token t: its lanes hold the token's logits, and top_k
   rounds of a butterfly arg-max in float total order (ties to the lower
   expert, as `jax.lax.top_k` and `pallas_mosaic_gpu.counting_top_k`) pick
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
   ones T and -1, all disjoint: `pallas_mosaic_gpu.count_by_expert`'s
   results, equal to them.
Three barriers in all. The first version (seventeenth session) counted by
loops over every pair and expert in each thread: 8.5 us at Qwen3-30B-A3B's
16 tokens on the H200, against the 15 us of XLA kernels it replaced.

Routing alone (`place=False`) runs step 1 in a CTA per `MAX_TOKENS`
tokens at any number of tokens: a prefill's weights and experts, which
XLA then places (`pallas_mosaic_gpu.PREFILL_ROUTING_KERNEL`), instead of
XLA's top-k.

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
from jax._src.lib.mlir.dialects import gpu
from jax._src.lib.mlir.dialects import llvm
from jax._src.lib.mlir.dialects import math as mlir_math
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

WARPGROUPS = 4
THREADS = 128 * WARPGROUPS
MAX_TOKENS = THREADS // 32  # one warp per token
MAX_EXPERTS = 256  # up to 8 logits a lane
MAX_TOP_K = 8
# An expert already taken (or a lane past E) ranks below every logit.
_TAKEN = 1 << 30


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
  routed_scaling: float = 1.0,
) -> tuple[jax.Array, ...]:
  """(weights f32 `[T, k]`, ids int32 `[T, k]`) and, with `place`,
  (position int32 `[T, k]`, token int32 `[max_tiles * block_m]`,
  tile_expert int32 `[max_tiles]`) as `count_by_expert` gives them.

  Args:
    logits: `[T, E]` router logits, float32 or bfloat16.
    top_k: experts per token.
    block_m: rows per token tile; each expert's rows start on a tile.
    max_tiles: token tiles of the plan (`Plan.max_tiles`).
    place: also place the pairs (False: one token's direct tiles, or a
      prefill's routing, whose pairs XLA places; any number of tokens).
    routed_scaling: multiplies every weight.
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
  body = functools.partial(
    _route,
    top_k=top_k,
    block_m=block_m,
    place=place,
    routed_scaling=float(routed_scaling),
  )

  def kernel(logits_gmem, *refs):
    body(logits_gmem, *refs)

  scratch = []
  if place:
    scratch = [
      plgpu.SMEM((pairs,), jnp.int32),  # each pair's expert
      # Pairs of each expert in each warp of pairs.
      plgpu.SMEM((_pair_warps(pairs) * experts,), jnp.int32),
      plgpu.SMEM((experts,), jnp.int32),  # where each expert's rows start
      plgpu.SMEM((1,), jnp.int32),  # rows of all experts, padded
    ]
  call = plgpu.kernel(
    kernel,
    out_type=tuple(outs),
    # Routing alone: a CTA per MAX_TOKENS tokens.
    grid=(1 if place else -(-tokens // MAX_TOKENS),),
    grid_names=("cta",),
    num_threads=WARPGROUPS,
    thread_name="wg",
    scratch_types=scratch,
  )
  return call(logits)


def _route(logits_ref, *refs, top_k, block_m, place, routed_scaling):
  n_out = 5 if place else 2
  outs, scratch = refs[:n_out], refs[n_out:]

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * (1 + len(refs)))
  def route(_, logits, *all_refs):
    out_refs = all_refs[:n_out]
    if place:
      pair_expert, warp_counts, starts, used_rows = all_refs[n_out:]
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    tokens, experts = ir.MemRefType(logits.type).shape
    pairs = tokens * top_k
    pair_warps = _pair_warps(pairs)

    def c(v):
      return arith.constant(i32, v)

    def ptr(ref, index, element=i32):
      return mgpu_utils.getelementptr(
        mgpu_utils.memref_ptr(ref), [index], element
      )

    def load(ref, index, element=i32):
      return llvm.load(element, ptr(ref, index, element))

    def store(value, ref, index):
      llvm.store(value, ptr(ref, index, value.type))

    def lt(a, b):
      return arith.cmpi(arith.CmpIPredicate.slt, a, b)

    def eq(a, b):
      return arith.cmpi(arith.CmpIPredicate.eq, a, b)

    def barrier():
      # gpu.barrier lowers to the barrier intrinsic, which LLVM treats as
      # convergent and as ordering memory. A bare "bar.sync 0" in inline
      # PTX is neither: with Mixtral's 8 experts the first version of this
      # kernel wrote tokens out of bounds on the H200 (eighteenth session).
      gpu.barrier()

    def warp_op(ptx, value):
      return mgpu_utils.inline_ptx(
        ptx, value, result_types=i32, convergent=True
      )

    def popc(value):
      return mgpu_utils.inline_ptx("popc.b32 $0, $1;", value, result_types=i32)

    def padded(count):
      return arith.muli(
        arith.divui(arith.addi(count, c(block_m - 1)), c(block_m)), c(block_m)
      )

    def expert_count(expert, below_warp=None):
      """Pairs of `expert` in every warp of pairs (or in those below one)."""
      total = c(0)
      for w in range(pair_warps):
        count = load(warp_counts, arith.addi(c(w * experts), expert))
        if below_warp is not None:
          count = arith.select(lt(c(w), below_warp), count, c(0))
        total = arith.addi(total, count)
      return total

    tid = mgpu_utils.thread_idx()
    warp, lane = arith.divui(tid, c(32)), arith.remui(tid, c(32))
    # Token of this warp (one CTA when placing: the block index is 0).
    token = arith.addi(arith.muli(mgpu_utils.block_idx(), c(MAX_TOKENS)), warp)
    if place:  # zero counts, ordered before their use by the first barrier
      for first in range(0, pair_warps * experts, THREADS):
        index = arith.addi(tid, c(first))
        with mgpu_utils.when(lt(index, c(pair_warps * experts))):
          store(c(0), warp_counts, index)

    # 1. Top-k per token, one warp each; keys in float total order.
    with mgpu_utils.when(lt(token, c(tokens))):
      keys, indices = [], []
      logit_type = ir.MemRefType(logits.type).element_type
      for j in range(-(-experts // 32)):
        expert = arith.addi(lane, c(32 * j))
        valid = lt(expert, c(experts))
        index = arith.addi(
          arith.muli(token, c(experts)),
          arith.select(valid, expert, c(0)),
        )
        value = load(logits, index, logit_type)
        if logit_type != f32:
          value = arith.extf(f32, value)
        keys.append(arith.select(valid, _total_order_key(value), c(-(2**31))))
        indices.append(arith.select(valid, expert, c(_TAKEN)))
      chosen_keys, chosen_ids = [], []
      for _ in range(top_k):
        best_key, best_id = keys[0], indices[0]
        for key, index in zip(keys[1:], indices[1:], strict=True):
          best_key, best_id = _better(key, index, best_key, best_id)
        for distance in (1, 2, 4, 8, 16):
          other_key = mgpu_utils.shfl_bfly(best_key, distance)
          other_id = mgpu_utils.shfl_bfly(best_id, distance)
          best_key, best_id = _better(other_key, other_id, best_key, best_id)
        chosen_keys.append(best_key)
        chosen_ids.append(best_id)
        taken = [
          arith.cmpi(arith.CmpIPredicate.eq, i, best_id) for i in indices
        ]
        keys = [
          arith.select(t, c(-(2**31)), k)
          for t, k in zip(taken, keys, strict=True)
        ]
        indices = [
          arith.select(t, c(_TAKEN), i)
          for t, i in zip(taken, indices, strict=True)
        ]
      with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.eq, lane, c(0))):
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
          store(w, out_refs[0], pair)
          store(expert, out_refs[1], pair)
          if place:
            store(expert, pair_expert, pair)
    if not place:
      return
    barrier()

    # 2. Each pair's rank among the pairs of its warp with its expert (a
    # warp match), and each warp's count of each expert.
    in_pairs = lt(tid, c(pairs))
    own = arith.select(
      in_pairs, load(pair_expert, arith.select(in_pairs, tid, c(0))), c(-1)
    )
    same = warp_op("match.any.sync.b32 $0, $1, -1;", own)
    lanes_below = arith.subi(arith.shli(c(1), lane), c(1))
    rank_in_warp = popc(arith.andi(same, lanes_below))
    with mgpu_utils.when(arith.andi(in_pairs, eq(rank_in_warp, c(0)))):
      store(
        popc(same), warp_counts, arith.addi(arith.muli(warp, c(experts)), own)
      )
    barrier()

    # 3. Warp 0: each expert's padded rows and where they start, lane l
    # taking experts l * per_lane onwards (a scan over the lanes).
    per_lane = -(-experts // 32)
    with mgpu_utils.when(eq(warp, c(0))):
      ids, rows = [], []
      for j in range(per_lane):
        expert = arith.addi(arith.muli(lane, c(per_lane)), c(j))
        valid = lt(expert, c(experts))
        expert = arith.select(valid, expert, c(0))
        ids.append((valid, expert))
        rows.append(arith.select(valid, padded(expert_count(expert)), c(0)))
      lane_rows = rows[0]
      for r in rows[1:]:
        lane_rows = arith.addi(lane_rows, r)
      through = lane_rows  # inclusive scan over the lanes
      for distance in (1, 2, 4, 8, 16):
        earlier = warp_op(
          f"shfl.sync.up.b32 $0, $1, {distance}, 0, -1;", through
        )
        through = arith.select(
          lt(lane, c(distance)), through, arith.addi(through, earlier)
        )
      start = arith.subi(through, lane_rows)
      for (valid, expert), r in zip(ids, rows, strict=True):
        with mgpu_utils.when(valid):
          store(start, starts, expert)
        start = arith.addi(start, r)
      with mgpu_utils.when(eq(lane, c(31))):
        store(through, used_rows, c(0))
    barrier()

    # 4. Disjoint writes, no more barriers: each pair its row and the row
    # its token; each expert its padding rows (token T) and its tiles; the
    # rows and tiles past the used ones T and -1.
    position_ref, token_ref, tile_ref = out_refs[2:]
    own_safe = arith.select(in_pairs, own, c(0))
    position = arith.addi(
      arith.addi(load(starts, own_safe), expert_count(own_safe, warp)),
      rank_in_warp,
    )
    with mgpu_utils.when(in_pairs):
      store(position, position_ref, tid)
      store(arith.divui(tid, c(top_k)), token_ref, position)
    in_experts = lt(tid, c(experts))
    expert = arith.select(in_experts, tid, c(0))
    count = expert_count(expert)
    start = load(starts, expert)
    end = arith.addi(start, padded(count))
    for j in range(block_m - 1):  # padding rows: count to the tile's end
      row = arith.addi(arith.addi(start, count), c(j))
      with mgpu_utils.when(arith.andi(in_experts, lt(row, end))):
        store(c(tokens), token_ref, row)
    # An expert has at most one pair a token: <= T rows.
    first_tile = arith.divui(start, c(block_m))
    for j in range(-(-tokens // block_m)):
      tile = arith.addi(first_tile, c(j))
      inside = lt(arith.muli(tile, c(block_m)), end)
      with mgpu_utils.when(arith.andi(in_experts, inside)):
        store(expert, tile_ref, tile)
    used = load(used_rows, c(0))
    n_rows = ir.MemRefType(token_ref.type).shape[0]
    n_tiles = ir.MemRefType(tile_ref.type).shape[0]
    for first in range(0, n_rows, THREADS):
      row = arith.addi(tid, c(first))
      past = arith.andi(
        lt(row, c(n_rows)), arith.cmpi(arith.CmpIPredicate.sge, row, used)
      )
      with mgpu_utils.when(past):
        store(c(tokens), token_ref, row)
    for first in range(0, n_tiles, THREADS):
      tile = arith.addi(tid, c(first))
      tile_row = arith.muli(tile, c(block_m))
      past = arith.andi(
        lt(tile, c(n_tiles)),
        arith.cmpi(arith.CmpIPredicate.sge, tile_row, used),
      )
      with mgpu_utils.when(past):
        store(c(-1), tile_ref, tile)

  route(logits_ref, *outs, *scratch)


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

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
2. thread p takes pair p = (token, k): its rank among the earlier pairs of
   its expert; thread e takes expert e: its pairs, padded to whole token
   tiles, and where its rows start;
3. each pair's row, each row's token (T for padding rows) and each tile's
   expert (-1 past the used tiles): `pallas_mosaic_gpu.count_by_expert`'s
   results, equal to them.
Covers softmax routing renormalized over the chosen experts with no
correction bias or expert groups (Qwen3-MoE, Mixtral, gpt-oss), at most
`MAX_TOKENS` tokens, `MAX_EXPERTS` experts and top-k 8. The weights use
the GPU's `exp` and division, so they may differ from XLA's in the last
bits; the experts, rows and tiles are exact.

Inline Mosaic GPU code (one thread's scalar program), so the CPU
interpreter cannot run it; `pallas_mosaic_gpu.DECODE_ROUTING_KERNEL` turns
it on. Written in the seventeenth session after the device time ran out:
lowered for sm_90 on the CPU, not yet run on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
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


def supports(tokens: int, experts: int, top_k: int) -> bool:
  """Whether one CTA routes and places this decode step."""
  return (
    1 <= tokens <= MAX_TOKENS
    and top_k <= min(MAX_TOP_K, experts)
    and experts <= MAX_EXPERTS
    and tokens * top_k <= THREADS
  )


def route_and_place(
  logits: jax.Array,
  top_k: int,
  *,
  block_m: int,
  max_tiles: int,
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
    place: also place the pairs (False: one token's direct tiles).
    routed_scaling: multiplies every weight.
  """
  tokens, experts = logits.shape
  if not supports(tokens, experts, top_k):
    raise ValueError(
      f"route_and_place takes <= {MAX_TOKENS} tokens, <= {MAX_EXPERTS}"
      f" experts and top_k <= {MAX_TOP_K}; got {logits.shape}, {top_k=}"
    )
  if logits.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"logits must be float32 or bfloat16, got {logits.dtype}")
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

  call = plgpu.kernel(
    kernel,
    out_type=tuple(outs),
    grid=(1,),
    grid_names=("one",),
    num_threads=WARPGROUPS,
    thread_name="wg",
    scratch_types=[
      plgpu.SMEM((pairs,), jnp.int32),  # each pair's expert
      plgpu.SMEM((experts,), jnp.int32),  # rows of each expert, padded
      plgpu.SMEM((experts,), jnp.int32),  # where each expert's rows end
    ],
  )
  return call(logits)


def _route(logits_ref, *refs, top_k, block_m, place, routed_scaling):
  n_out = 5 if place else 2
  outs, (ids_smem, padded_smem, ends_smem) = refs[:n_out], refs[n_out:]

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * (1 + len(refs)))
  def route(_, logits, *all_refs):
    out_refs, (pair_expert, padded, ends) = all_refs[:n_out], all_refs[n_out:]
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    tokens, experts = ir.MemRefType(logits.type).shape
    pairs = tokens * top_k

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

    def barrier():
      mgpu_utils.inline_ptx("bar.sync 0;", has_side_effects=True)

    tid = mgpu_utils.thread_idx()
    warp, lane = arith.divui(tid, c(32)), arith.remui(tid, c(32))

    # 1. Top-k per token, one warp each; keys in float total order.
    with mgpu_utils.when(lt(warp, c(tokens))):
      keys, indices = [], []
      logit_type = ir.MemRefType(logits.type).element_type
      for j in range(-(-experts // 32)):
        expert = arith.addi(lane, c(32 * j))
        valid = lt(expert, c(experts))
        index = arith.addi(
          arith.muli(warp, c(experts)),
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
          pair = arith.addi(arith.muli(warp, c(top_k)), c(r))
          store(w, out_refs[0], pair)
          store(expert, out_refs[1], pair)
          store(expert, pair_expert, pair)
    if not place:
      return
    barrier()

    # 2. Each pair's rank in its expert; each expert's padded rows.
    in_pairs = lt(tid, c(pairs))
    own = load(pair_expert, arith.select(in_pairs, tid, c(0)))

    @mgpu_utils.fori(c(pairs), c(0))
    def rank(q, acc):
      same = arith.cmpi(arith.CmpIPredicate.eq, load(pair_expert, q), own)
      return arith.addi(acc, arith.extui(i32, arith.andi(same, lt(q, tid))))

    (rank,) = rank.results
    in_experts = lt(tid, c(experts))

    @mgpu_utils.fori(c(pairs), c(0))
    def count(q, acc):
      same = arith.cmpi(arith.CmpIPredicate.eq, load(pair_expert, q), tid)
      return arith.addi(acc, arith.extui(i32, same))

    rows = arith.muli(
      arith.divui(arith.addi(count.results[0], c(block_m - 1)), c(block_m)),
      c(block_m),
    )
    with mgpu_utils.when(in_experts):
      store(rows, padded, tid)
    barrier()

    @mgpu_utils.fori(c(experts), c(0))
    def through(e, acc):  # inclusive prefix sum of the padded rows
      add = arith.select(
        arith.cmpi(arith.CmpIPredicate.sle, e, tid), load(padded, e), c(0)
      )
      return arith.addi(acc, add)

    with mgpu_utils.when(in_experts):
      store(through.results[0], ends, tid)
    barrier()

    # 3. Rows of the pairs, tokens of the rows, experts of the tiles.
    position_ref, token_ref, tile_ref = out_refs[2:]
    start = arith.subi(
      load(ends, arith.select(in_pairs, own, c(0))),
      load(padded, arith.select(in_pairs, own, c(0))),
    )
    position = arith.addi(start, rank)
    with mgpu_utils.when(in_pairs):
      store(position, position_ref, tid)
    n_rows = ir.MemRefType(token_ref.type).shape[0]
    n_tiles = ir.MemRefType(tile_ref.type).shape[0]
    used_end = load(ends, c(experts - 1))
    for first in range(0, max(n_rows, n_tiles), THREADS):
      index = arith.addi(tid, c(first))
      if first < n_rows:
        with mgpu_utils.when(lt(index, c(n_rows))):
          store(c(tokens), token_ref, index)
      if first < n_tiles:
        tile_start = arith.muli(index, c(block_m))

        @mgpu_utils.fori(c(experts), c(0))
        def ended(e, acc, tile_start=tile_start):
          done = arith.cmpi(arith.CmpIPredicate.sle, load(ends, e), tile_start)
          return arith.addi(acc, arith.extui(i32, done))

        expert = arith.select(lt(tile_start, used_end), ended.results[0], c(-1))
        with mgpu_utils.when(lt(index, c(n_tiles))):
          store(expert, tile_ref, index)
    barrier()  # the padding tokens are written before the pairs' own
    with mgpu_utils.when(in_pairs):
      store(arith.divui(tid, c(top_k)), token_ref, position)

  route(logits_ref, *outs, ids_smem, padded_smem, ends_smem)


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

"""The MoE's pair placement in XLA: each (token, expert) pair's row in
expert groups padded to whole token tiles, each row's token and each tile's
expert (the routing and placement kernels do it for softmax-routed calls;
this serves the rest and defines their results), and a top-k by comparison
counts.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.nvfp4_moe import config as moe_config

# `sort_by_expert` ranks pairs within their expert by chunked comparison
# counts (`rank_in_group`), not XLA's stable argsort.
RANK_BY_COUNTING = True


def direct_tiles(ids: jax.Array, plan: moe_config.Plan, in_range=False):
  """`sort_by_expert` for one token without the sort: tile i holds pair i
  in its first row; a dropped pair's tile is marked unused (-1), unless
  `in_range` says there is none (no select then). Positions and tokens are
  constants."""
  if plan.tokens != 1 or plan.max_tiles < plan.top_k:
    raise ValueError(f"direct tiles need one token ({plan})")
  position = np.arange(plan.top_k, dtype=np.int32)[None] * plan.block_m
  token = np.ones(plan.max_tiles * plan.block_m, np.int32)  # 1: padding
  token[position[0]] = 0
  expert = ids[0]
  if not in_range:
    expert = jnp.where((expert >= 0) & (expert < plan.experts), expert, -1)
  unused = jnp.full(plan.max_tiles - plan.top_k, -1, jnp.int32)
  return position, token, jnp.concatenate([expert.astype(jnp.int32), unused])


def sort_by_expert(ids: jax.Array, plan: moe_config.Plan):
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


def _bulk_rows(counts: jax.Array, plan: moe_config.Plan):
  """(rows of each group in `block_m` tiles, whether it has a remainder
  tile): `counts` rounded up to whole tiles, or down where the rest fits a
  remainder tile (never for the dropped group, last)."""
  whole = counts // plan.block_m * plan.block_m
  rest = counts - whole
  remainder = (rest > 0) & (rest <= plan.remainder_m)
  remainder = remainder.at[plan.experts].set(False)
  padded = jnp.where(rest > 0, whole + plan.block_m, whole)
  return jnp.where(remainder, whole, padded), remainder


def _remainder_experts(
  remainder: jax.Array, plan: moe_config.Plan
) -> jax.Array:
  """int32 `[remainder_tiles]`: the expert of each remainder tile (the
  experts that have one, in order), -1 past them."""
  through = jnp.cumsum(remainder[: plan.experts].astype(jnp.int32))
  tile = jnp.arange(plan.remainder_tiles)
  expert = jnp.sum(through[None, :] <= tile[:, None], axis=1)
  return jnp.where(tile < through[-1], expert, -1).astype(jnp.int32)


def count_by_expert(ids: jax.Array, plan: moe_config.Plan):
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


def _group_of_pairs(ids: jax.Array, plan: moe_config.Plan) -> jax.Array:
  """int32 `[pairs]`: each pair's expert, or E for a dropped pair (an id
  outside `[0, E)`: another device's expert)."""
  flat = ids.reshape(-1)
  return jnp.where((flat >= 0) & (flat < plan.experts), flat, plan.experts)


def _tile_experts(ends: jax.Array, plan: moe_config.Plan) -> jax.Array:
  """int32 `[max_tiles]`: the expert whose padded rows (ending at `ends`,
  inclusive prefix sums per group) hold each tile's first row; -1 for the
  dropped group's tiles and those past it."""
  tile_start = jnp.arange(plan.max_tiles) * plan.block_m
  # One fused compare-and-count (jnp.searchsorted unrolls into ~16 tiny
  # kernels).
  tile_expert = jnp.sum(ends[None, :] <= tile_start[:, None], axis=1)
  used = tile_start < ends[plan.experts - 1]  # the dropped group is last
  return jnp.where(used, tile_expert, -1).astype(jnp.int32)

"""The MoE's pair placement in XLA: rows in padded expert groups, remainder
tiles, ranks by counting and by argsort, one token's direct tiles, and the
top-k by comparison counts against `jax.lax.top_k`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nvfp4_moe import config as moe_config
from pallas_kernels.nvfp4_moe import placement


@pytest.mark.parametrize(
  "tokens, experts, top_k, block_m",
  [(1, 8, 2, 8), (16, 128, 8, 8), (37, 4, 3, 16), (64, 8, 8, 128)],
)
def test_sort_by_expert_places_every_pair_in_its_experts_tiles(
  rng, tokens, experts, top_k, block_m
):
  plan = moe_config.Plan(
    tokens=tokens, top_k=top_k, experts=experts, block_m=block_m
  )
  ids = np.stack(
    [rng.choice(experts, top_k, replace=False) for _ in range(tokens)]
  ).astype(np.int32)
  if tokens > 8:
    ids[: tokens // 2, 0] = 0  # a crowded expert
  position, token, tile_expert = map(
    np.asarray, placement.sort_by_expert(jnp.asarray(ids), plan)
  )
  assert len(set(position.ravel())) == tokens * top_k  # one row per pair
  rows_tile = position // block_m
  np.testing.assert_array_equal(tile_expert[rows_tile], ids)
  want_token = np.broadcast_to(np.arange(tokens)[:, None], ids.shape)
  np.testing.assert_array_equal(token[position], want_token)
  padding = np.setdiff1d(np.arange(token.size), position.ravel())
  assert (token[padding] == tokens).all()
  used = tile_expert >= 0
  # Used tiles come first, grouped by expert in increasing order.
  assert not used[np.argmin(used) :].any() or used.all()
  assert (np.diff(tile_expert[used]) >= 0).all()
  assert used.sum() == sum(
    -(-np.count_nonzero(ids == e) // block_m) for e in range(experts)
  )


@pytest.mark.parametrize(
  "counts", [(21, 12, 31, 16, 1), (5, 0, 40, 9, 24, 8, 17)]
)
def test_sort_by_expert_puts_short_remainders_in_remainder_tiles(rng, counts):
  # Tiles of 16 rows, remainders of up to 8: a rest of 1-8 rows gets a
  # remainder tile, one of 9-15 a padded tile, none neither.
  experts, top_k = len(counts), 2
  flat = rng.permutation(np.repeat(np.arange(experts), counts))
  flat = np.concatenate([flat, [-1] * (len(flat) % 2 + 2)])  # dropped pairs
  ids = flat.reshape(-1, top_k).astype(np.int32)
  tokens = len(ids)
  plan = moe_config.Plan(
    tokens=tokens, top_k=top_k, experts=experts, block_m=16, remainder_m=8
  )
  position, token, tile_expert = map(
    np.asarray, placement.sort_by_expert(jnp.asarray(ids), plan)
  )
  assert token.shape == (plan.rows,)
  assert tile_expert.shape == (plan.max_tiles + plan.remainder_tiles,)
  kept = ids >= 0
  assert len(set(position[kept])) == kept.sum()  # one row per pair
  bulk = position < plan.bulk_rows
  tile = np.where(
    bulk,
    position // 16,
    plan.max_tiles + (position - plan.bulk_rows) // 8,
  )
  np.testing.assert_array_equal(tile_expert[tile][kept], ids[kept])
  want_token = np.broadcast_to(np.arange(tokens)[:, None], ids.shape)
  np.testing.assert_array_equal(token[position], want_token)
  padding = np.setdiff1d(np.arange(plan.rows), position.ravel())
  assert (token[padding] == tokens).all()
  assert (position[~kept] < plan.bulk_rows).all()  # dropped pairs
  remainders = tile_expert[plan.max_tiles :]
  used = remainders >= 0
  assert not used[np.argmin(used) :].any() or used.all()  # used first
  for e, count in enumerate(counts):
    rest = count % 16
    want_remainder = 0 < rest <= 8
    # Whole tiles in the bulk, the rest in a remainder tile if it fits.
    assert (remainders == e).sum() == want_remainder
    want_bulk = count // 16 + (rest > 0 and not want_remainder)
    assert (tile_expert[: plan.max_tiles] == e).sum() == want_bulk
    assert (~bulk[ids == e]).sum() == (rest if want_remainder else 0)
  assert used.any() and not used.all()  # both kinds of expert were seen


@pytest.mark.parametrize(
  "tokens, experts, top_k, block_m",
  [(1, 8, 2, 8), (16, 128, 8, 8), (37, 4, 3, 16), (64, 8, 8, 128)],
)
def test_count_by_expert_equals_the_sort(rng, tokens, experts, top_k, block_m):
  plan = moe_config.Plan(
    tokens=tokens, top_k=top_k, experts=experts, block_m=block_m
  )
  ids = np.stack(
    [rng.choice(experts, top_k, replace=False) for _ in range(tokens)]
  ).astype(np.int32)
  ids[: tokens // 2, 0] = 0  # a crowded expert
  ids[-1, -1] = -1  # dropped pairs (another device's experts)
  ids[0, -1] = experts + 3
  want = placement.sort_by_expert(jnp.asarray(ids), plan)
  got = placement.count_by_expert(jnp.asarray(ids), plan)
  for g, w in zip(got, want, strict=True):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize(
  "pairs, groups, chunk",
  [(1, 3, 128), (127, 5, 128), (129, 2, 128), (1000, 9, 64), (16384, 129, 128)],
)
def test_rank_in_group_counts_earlier_members(rng, pairs, groups, chunk):
  group = rng.integers(0, groups, pairs).astype(np.int32)
  if pairs > 8:
    group[: pairs // 3] = groups - 1  # a crowded group across chunks
  rank, counts = jax.jit(placement.rank_in_group, static_argnums=(1, 2))(
    jnp.asarray(group), groups, chunk
  )
  want_rank = np.empty(pairs, np.int64)
  seen = np.zeros(groups, np.int64)
  for i, g in enumerate(group):
    want_rank[i], seen[g] = seen[g], seen[g] + 1
  np.testing.assert_array_equal(np.asarray(rank), want_rank)
  np.testing.assert_array_equal(np.asarray(counts), seen)


@pytest.mark.parametrize("remainder_m", [0, 64])
def test_sort_by_expert_ranks_by_counting_as_by_argsort(
  rng, monkeypatch, remainder_m
):
  plan = moe_config.Plan(
    tokens=700, top_k=4, experts=16, block_m=128, remainder_m=remainder_m
  )
  ids = np.stack([rng.choice(16, 4, replace=False) for _ in range(700)]).astype(
    np.int32
  )
  ids[:300, 0] = 3  # a crowded expert
  ids[-5:, -1] = -1  # dropped pairs
  placed = {}
  for by_counting in (True, False):
    monkeypatch.setattr(placement, "RANK_BY_COUNTING", by_counting)
    placed[by_counting] = placement.sort_by_expert(jnp.asarray(ids), plan)
  for got, want in zip(placed[True], placed[False], strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_direct_tiles_give_each_pair_of_one_token_its_own_tile():
  plan = moe_config.Plan(tokens=1, top_k=4, experts=6, block_m=8)
  ids = jnp.asarray([[5, -1, 0, 9]], jnp.int32)  # two foreign ids
  position, token, tile_expert = map(
    np.asarray, placement.direct_tiles(ids, plan)
  )
  np.testing.assert_array_equal(position, [[0, 8, 16, 24]])
  np.testing.assert_array_equal(tile_expert[:4], [5, -1, 0, -1])
  assert (tile_expert[4:] == -1).all()
  assert (token[position] == 0).all()
  assert (np.delete(token, position.ravel()) == 1).all()  # padding rows
  with pytest.raises(ValueError, match="one token"):
    placement.direct_tiles(ids, dataclasses.replace(plan, tokens=2))


@pytest.mark.parametrize(
  "backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize(
  "shape, k",
  [((1, 128), 8), ((16, 256), 8), ((5, 8), 2), ((3, 8, 32), 2), ((4, 6), 6)],
)
def test_counting_top_k_equals_lax_top_k(rng, backend, shape, k):
  # Few distinct values (many ties), masked entries, both zeros.
  x = rng.integers(-3, 4, shape).astype(np.float32) / 4
  x[rng.random(shape) < 0.2] = -np.inf
  x[rng.random(shape) < 0.1] = -0.0
  x = jax.device_put(jnp.asarray(x), jax.devices(backend)[0])
  got = jax.jit(placement.counting_top_k, static_argnums=1)(x, k)
  want = jax.jit(jax.lax.top_k, static_argnums=1)(x, k)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  np.testing.assert_array_equal(
    np.asarray(got[0]).view(np.uint32), np.asarray(want[0]).view(np.uint32)
  )

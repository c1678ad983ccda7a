"""The MoE's tiles: token tiles sized to the expert groups, and the two
GEMMs' configs (overlapped MMA, busy tiles for the split-K heuristic)."""

import pytest

from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_moe import config as moe_config


def plan_for(tokens, top_k, experts):
  """The plan of a call with the heuristic's token tiles."""
  return moe_config.Plan(
    tokens=tokens,
    top_k=top_k,
    experts=experts,
    block_m=moe_config.block_m_for(tokens, top_k, experts),
  )


@pytest.mark.parametrize(
  "tokens, top_k, n_experts, want",
  [
    (1, 8, 128, 8),
    (16, 8, 128, 8),
    (256, 8, 128, 16),  # below GROUP_TILE_MIN_MEAN: about the mean
    (64, 2, 8, 16),
    (1024, 4, 128, 48),  # groups of 32 +- 6 in one tile
    (4096, 8, 128, 144),  # 256 +- 16 in two
    (4096, 4, 128, 152),  # 128 +- 11 in one
    (16384, 8, 128, 136),  # 1024 +- 32 in eight
    (600, 4, 16, 88),  # 150 +- 12: over 160 in one, so two
  ],
)
def test_tiles_are_sized_to_the_groups(tokens, top_k, n_experts, want):
  got = moe_config.block_m_for(tokens, top_k, n_experts)
  assert got == want
  assert got % 8 == 0 and got <= moe_config.FUSED_SWIGLU_MAX_TOKENS


@pytest.mark.parametrize(
  "tokens, top_k, n_experts",
  [
    (t, k, e)
    for t in (256, 1024, 2048, 4096, 8192, 16384, 65536)
    for k, e in ((8, 128), (4, 128), (2, 8))
    if t * k / e >= moe_config.GROUP_TILE_MIN_MEAN
  ],
)
def test_group_sized_tiles_hold_a_group_two_deviations_up(
  tokens, top_k, n_experts
):
  mean = tokens * top_k / n_experts
  block_m = moe_config.block_m_for(tokens, top_k, n_experts)
  assert block_m <= moe_config.FUSED_SWIGLU_MAX_TOKENS
  usual = mean + 2 * mean**0.5
  tiles = -(-usual // block_m)
  assert tiles * block_m >= usual
  # No wider than about mean / 128 tiles need (near 128 rows each, where
  # they were measured), unless so few would exceed the largest tile.
  fewest = max(1, round(mean / 128))
  largest = moe_config.FUSED_SWIGLU_MAX_TOKENS
  assert block_m <= -(-usual / fewest // 8) * 8 or usual / fewest > largest


@pytest.mark.parametrize("tokens", [1, 16, 4096])
@pytest.mark.parametrize("cta_rows", [None, 64, 128])
@pytest.mark.parametrize("persistent", [False, True])
def test_configs_overlap_mma_only_on_64_row_ctas(tokens, cta_rows, persistent):
  # async_mma releases pipeline slots a step late, which the persistent
  # grid's reused barriers cannot take (config.Config).
  plan = plan_for(tokens, 8, 128)
  for config in moe_config.configs_for(
    plan, 2048, 768, 132, persistent, cta_rows
  ):
    assert config.async_mma == (config.cta_rows == 64)
    assert not (config.async_mma and config.persistent)


def test_one_token_counts_a_busy_tile_per_expert():
  # One token's eight experts make eight token tiles: with 112 row blocks
  # each, DeepSeek-V3's GEMM 2 (K = 2048) has work for every SM unsplit.
  plan = moe_config.Plan(tokens=1, top_k=8, experts=256, block_m=8)
  assert plan.busy_tiles == 8
  _, gemm2 = moe_config.configs_for(plan, 7168, 2048, 132)
  assert gemm2.splits == 1
  many = moe_config.Plan(tokens=4096, top_k=8, experts=256, block_m=128)
  assert many.busy_tiles == -(-4096 * 8 // 128)


@pytest.mark.parametrize("tokens", [16, 1024, 4096, 16384])
@pytest.mark.parametrize("on", [False, True])
def test_two_tile_gemm2_only_where_switched_on_and_it_fits(
  monkeypatch, tokens, on
):
  monkeypatch.setattr(moe_config, "TWO_TILE_GEMM2", on)
  plan = plan_for(tokens, 8, 128)
  gemm1, gemm2 = moe_config.configs_for(plan, 2048, 768, 132)
  assert gemm1.row_tiles == 1
  # Persistent 128-row CTAs only (16 tokens: 64-row decode CTAs).
  assert gemm2.row_tiles == (2 if on and gemm2.persistent else 1)
  assert gemm2.persistent == (tokens > 16)
  assert gemm2.smem_bytes(float32_out=False) <= config_lib.SMEM_LIMIT


@pytest.mark.parametrize(
  "model, tokens, paired",
  [
    # (experts, top_k, hidden, intermediate): K steps of 256 per CTA, CTAs
    ((8, 2, 4096, 14336), 16, True),  # Mixtral-8x7B: 56 steps, 256 CTAs
    ((8, 2, 4096, 14336), 1, True),  # 28 steps (split): 14 in 4 splits
    ((256, 8, 7168, 2048), 1, False),  # DeepSeek-V3: 8 steps
    ((256, 8, 7168, 2048), 16, False),
    ((128, 4, 2880, 2880), 16, False),  # gpt-oss-120b: 11.25 steps
    ((128, 8, 2048, 768), 16, False),  # Qwen3-30B-A3B: 3 steps
  ],
)
def test_two_block_decode_gemm2_for_long_k_loops_on_every_sm(
  model, tokens, paired
):
  n_experts, top_k, hidden, inter = model
  plan = plan_for(tokens, top_k, n_experts)
  gemm1, gemm2 = moe_config.configs_for(plan, hidden, inter, 132)
  assert gemm1.row_tiles == 1
  assert gemm2.cta_rows == config_lib.WGMMA_ROWS
  assert gemm2.row_tiles == (2 if paired else 1)
  assert gemm2.smem_bytes(gemm2.splits > 1) <= config_lib.SMEM_LIMIT


@pytest.mark.parametrize("on", [False, True])
def test_split_decode_gemm2_takes_two_blocks_in_twice_the_splits(
  monkeypatch, on
):
  monkeypatch.setattr(moe_config, "TWO_BLOCK_MORE_SPLITS", on)
  # Mixtral-8x7B at one token: 56 K steps of 256 in 2 splits of one block,
  # or 4 of two blocks (as many CTAs, 14 steps each).
  _, gemm2 = moe_config.configs_for(plan_for(1, 2, 8), 4096, 14336, 132)
  assert (gemm2.row_tiles, gemm2.splits) == ((2, 4) if on else (1, 2))
  assert gemm2.smem_bytes(float32_out=True) <= config_lib.SMEM_LIMIT
  # Fewer than TWO_BLOCK_SPLIT_MIN_K_STEPS steps a CTA: the split stays.
  _, short = moe_config.configs_for(plan_for(1, 2, 8), 4096, 5120, 132)
  assert short.splits > 1 and short.row_tiles == 1


@pytest.mark.parametrize("on", [False, True])
def test_decode_gemm2_splits_to_spread_few_ctas_over_the_sms(monkeypatch, on):
  monkeypatch.setattr(moe_config, "SPLIT_FOR_BALANCE", on)
  # gpt-oss-120b at one token (I padded to 2944: 12 K steps of 256): 45
  # output blocks x 4 experts = 180 one-block CTAs, 48 SMs with two and 84
  # with one; in two splits 360 CTAs of 6 steps.
  plan = plan_for(1, 4, 128)
  gemm1, gemm2 = moe_config.configs_for(plan, 2880, 2944, 132)
  assert (gemm2.row_tiles, gemm2.splits) == ((1, 2) if on else (1, 1))
  assert gemm2.smem_bytes(float32_out=gemm2.splits > 1) <= (
    config_lib.SMEM_LIMIT
  )
  assert gemm1 == moe_config.configs_for(plan, 2880, 2944, 132)[0]
  # Many CTAs already (16 tokens: 2880), or nearly two a SM on every SM
  # (Mixtral-8x7B at two tokens: 256), or too few steps to halve
  # (Qwen3-30B-A3B at one token: 3): the splits stay.
  for args in (
    (plan_for(16, 4, 128), 2880, 2944),
    (plan_for(2, 2, 8), 4096, 14336),
    (plan_for(1, 8, 128), 2048, 768),
  ):
    monkeypatch.setattr(moe_config, "SPLIT_FOR_BALANCE", False)
    before = moe_config.configs_for(*args, 132)
    monkeypatch.setattr(moe_config, "SPLIT_FOR_BALANCE", True)
    assert moe_config.configs_for(*args, 132) == before

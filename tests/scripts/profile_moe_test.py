"""The MoE profiler's variant prefixes set switches the library has."""

import dataclasses
import importlib
import pathlib
import re

import pytest

from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90
from pallas_kernels.nvfp4_moe import base as moe_base
from pallas_kernels.nvfp4_moe import config as moe_config
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu
from pallas_kernels.nvfp4_moe import placement
from pallas_kernels.nvfp4_moe import route_decode_sm90

MODULES = (
  pallas_mosaic_gpu,
  config_lib,
  moe_config,
  placement,
  sm90,
  moe_base,
  route_decode_sm90,
)


def _switches():
  return {
    (m.__name__, name): value
    for m in MODULES
    for name, value in vars(m).items()
    if name.isupper()
  }


@pytest.fixture
def profile_moe():
  before = _switches()
  yield importlib.import_module("scripts.profile_moe")
  for (module, name), value in before.items():
    setattr(importlib.import_module(module), name, value)


def test_no_prefix_keeps_the_library_defaults(profile_moe):
  before = _switches()
  profile_moe.apply_prefixes(set())
  assert _switches() == before


def test_prefixes_set_their_switches(profile_moe):
  profile_moe.apply_prefixes(
    {"xlaplace", "sortrank", "rem32", "bm256", "g2one", "g2pair"}
  )
  assert moe_config.TWO_BLOCK_MIN_K_STEPS == 0
  assert moe_config.TWO_BLOCK_MIN_CTAS_PER_SM == 0
  assert not pallas_mosaic_gpu.PREFILL_PLACEMENT_KERNEL
  assert not placement.RANK_BY_COUNTING
  assert moe_config.REMAINDER_TILES and moe_config.REMAINDER_ROWS == 32
  assert moe_config.FUSED_SWIGLU_MAX_TOKENS == 256
  assert not moe_config.TWO_TILE_GEMM2
  assert route_decode_sm90.REDUX_TOP_K
  assert moe_config.SPLIT_FOR_BALANCE
  profile_moe.apply_prefixes({"g2block", "shuffletopk", "unbalanced"})
  assert not moe_config.SPLIT_FOR_BALANCE
  assert not moe_config.TWO_BLOCK_DECODE_GEMM2
  assert not moe_config.TWO_BLOCK_MORE_SPLITS
  assert not route_decode_sm90.REDUX_TOP_K


def test_a_missing_switch_is_refused(profile_moe):
  with pytest.raises(AttributeError, match="no switch SORT_BY_EXPERT"):
    profile_moe._switch(pallas_mosaic_gpu, SORT_BY_EXPERT=True)


def test_gpu_session_variants_parse(profile_moe):
  # Each profile_moe.py call in gpu_session.sh names known prefixes and
  # variants (an unknown one would spend a device call on an error).
  lines = pathlib.Path("scripts/gpu_session.sh").read_text().splitlines()
  commands = "\n".join(x for x in lines if not x.lstrip().startswith("#"))
  calls = re.findall(
    r"profile_moe\.py\s+(\S+)\s+(\S+)\s+(\S+)",
    commands.replace("\\\n", " "),
  )
  literal = [c for c in calls if "$" not in c[2]]
  assert len(literal) >= 10
  for model, tokens, variants in literal:
    # Shell variables stand for a model or token list given elsewhere.
    model = "qwen3-30b-a3b" if "$" in model else model
    tokens = "16" if "$" in tokens else tokens
    name, _, parsed = profile_moe.parse_args([model, tokens, variants])
    assert name == model and parsed == variants.split(",")
  with pytest.raises(ValueError, match="unknown variant"):
    profile_moe.parse_args(["qwen3-30b-a3b", "16", "g2too-autofused"])
  with pytest.raises(SystemExit, match="unknown model"):
    profile_moe.parse_args(["autofused", "16", "autofused"])


def test_g2x2_doubles_decode_gemm2_splits_where_they_divide(profile_moe):
  decode = config_lib.Config(block_k=256, block_m=8, splits=2, cta_rows=64)
  # Mixtral-8x7B's GEMM 2 at one token: K = 14336, 56 steps.
  more = profile_moe._more_splits(decode, 14336)
  assert more.splits == 4 and more.block_k == 256
  # 23 steps of 128 (gpt-oss-120b's padded I) take no second split.
  odd = dataclasses.replace(decode, block_k=128, splits=1)
  assert profile_moe._more_splits(odd, 2944) == odd
  persistent = dataclasses.replace(decode, persistent=True, cta_rows=128)
  assert profile_moe._more_splits(persistent, 14336) == persistent


def test_use_prefixes_sets_the_tiles_for_next_traces(profile_moe, monkeypatch):
  monkeypatch.setattr(moe_config, "configs_for", moe_config.configs_for)
  plan = moe_config.Plan(tokens=1, top_k=2, experts=8, block_m=8)
  default = moe_config.configs_for(plan, hidden=4096, inter=14336, num_sms=132)
  profile_moe.use_prefixes({"g2x2"})
  doubled = moe_config.configs_for(plan, hidden=4096, inter=14336, num_sms=132)
  assert doubled[0] == default[0]
  assert doubled[1].splits == 2 * default[1].splits

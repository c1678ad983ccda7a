"""GPU diagnostic: where an NVFP4 MoE layer's time goes, kernel by kernel.

  PYTHONPATH=. python scripts/profile_moe.py [model] [tokens,...]
      [variants: plain,persistent,fused,rows64,rows64fused,auto,autofused,
       wide,wideplain; each optionally after prefixes, see PREFIXES]

Prints CUPTI time per kernel launch (name, µs; past 64 tokens those of 3
µs or more, unless PROFILE_ALL_KERNELS=1) of one Pallas MoE call, for
the benchmark's weights (`benchmarks.moe`), so that XLA glue (sorting,
gathers, SwiGLU, combine) can be told apart from the two grouped GEMMs, and
the error against the reference.
"""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from benchmarks import arg_specs
from benchmarks import moe
from fp4jax import transform
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90
from pallas_kernels.nvfp4_moe import base as moe_base
from pallas_kernels.nvfp4_moe import config as moe_config
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu
from pallas_kernels.nvfp4_moe import placement
from pallas_kernels.nvfp4_moe import route_decode_sm90

CONFIGS_FOR = moe_config.configs_for
FUSED_SWIGLU_MAX_TOKENS = moe_config.FUSED_SWIGLU_MAX_TOKENS
TWO_BLOCK_MIN_K_STEPS = moe_config.TWO_BLOCK_MIN_K_STEPS
TWO_BLOCK_MIN_CTAS_PER_SM = moe_config.TWO_BLOCK_MIN_CTAS_PER_SM
# Variant prefixes (several may precede a variant, e.g. "old-s3-autofused"):
# "old": w13 rows not plane-ordered (GEMM 2's input planes made by an XLA
# pass); "s3": GEMM 2 with at most 3 pipeline stages (before the heuristic
# counted its bf16 epilogue); "nosplit": neither GEMM splits K (the split
# heuristic counts one busy token tile at T = 1, where top-k experts make
# top_k tiles); "sorted": one token goes through the expert sort too (not
# the direct tiles); "bf16gather": XLA gathers rows as bf16, not 32-bit
# words; "whole": K steps divide K (not config.RAGGED_K_STEPS, which gives
# gpt-oss-120b's 2880 steps of 128); "counting": up to 4096 pairs are
# placed by comparison counts (COUNTING_MAX_PAIRS, default 2048);
# "argsort": every count of pairs goes through the argsort; "table": the
# epilogue scales come as an XLA-built per-block table, not the scale
# leaves (config.SCALES_AS_OPERANDS); "sorttopk": routing's top-k by XLA's
# sort, not by comparison counts (COUNTING_TOP_K_MAX = 0); "k64": GEMM 2
# in K steps of 64 with up to 4 stages (as the dense prefill tiles), "k64all"
# both GEMMs; "narrow": 64-token tiles (the heuristic sizes prefill tiles
# to the expert groups, `block_m_for`); "bm128" gives its tiles before the
# twenty-first session; "midtile": SwiGLU fused where I % 128 == 64 in
# 64-row CTAs too
# (gpt-oss-120b; by default only 128-row CTAs, MID_TILE_MIN_CTA_ROWS);
# "nomidtile": never where I % 128 == 64 (FUSED_SWIGLU_MID_TILE off);
# "g2one": GEMM 2 in one-tile outputs (config.TWO_TILE_GEMM2 off);
# "g2two": with "g2wide", decode's GEMM 2 in two-tile outputs too;
# "g2pair": decode's GEMM 2 in 64-row CTAs of both halves of a 128-row
# tile wherever they apply (by default only for long K loops and enough
# CTAs: config.TWO_BLOCK_DECODE_GEMM2, or for a split GEMM 2 in twice the
# splits: TWO_BLOCK_MORE_SPLITS); "g2block": never; "xlasplit": one
# token's activation split by XLA, not by the routing kernel
# (SPLIT_IN_DECODE_ROUTING off); "shuffletopk": the routing kernel's top-k
# rounds by shuffles, not warp reductions (route_decode_sm90.REDUX_TOP_K
# off);
# "remainder": 64-row remainder tiles (REMAINDER_TILES, off by default);
# "rem16", "rem32": remainder tiles of 16 or 32 rows (16: 64-row decode
# CTAs, which stream an expert's weights for a few rows);
# "unpadded": I not padded to a multiple of 128 (by default `fp4jax.prepare`
# pads it, transform.PAD_INTERMEDIATE_TO_TILES: gpt-oss-120b 2880 -> 2944,
# w13 in plane order); "sortrank": pairs ranked within their expert by XLA's
# stable argsort (RANK_BY_COUNTING off); "counttopk": routing's top-k by
# comparison counts at every size (COUNTING_TOP_K_MAX unbounded);
# "warpmma": 64-row decode CTAs multiply with warp-level mma.sync
# (config.WARP_MMA_DECODE) instead of wgmma; "split2": GEMM 1 splits K in
# two (unfused SwiGLU only: "split2-auto"; at T = 1 Qwen3-30B-A3B's GEMM 1
# has 96 or 192 CTAs, one or none on most SMs); "k256": both GEMMs in K
# steps of 256, the last one partial where K is not a multiple (gpt-oss-120b:
# H = 2880 took steps of 128 by default before config.RAGGED_K_WASTE = 8);
# "g1s2", "g1s3":
# GEMM 1 with 2 or 3 pipeline stages (more CTAs per SM: the fused decode
# CTAs' ~24 KB stages leave room for two at 4 stages); "fullsoftmax":
# renormalized routing through the softmax over all experts
# (base.RENORMALIZED_SOFTMAX_OF_CHOSEN off); "g2wide": GEMM 2 in 128-row
# CTAs (two compute warpgroups fed by a TMA warpgroup, persistent) while
# GEMM 1 keeps the heuristic's (at decode, 64-row CTAs): a short-K GEMM 2
# (Qwen3-30B-A3B: 3 K steps) fills its pipeline once per 128 rows;
# "g2k512": GEMM 2's 64-row decode CTAs in K steps of 512 with 3 stages
# where I is a multiple of 512 (as config.LONG_STEP_K gives dense decode
# layers; Mixtral-8x7B's K = 14336, DeepSeek-V3's 2048); "copiedscales":
# the decode multiplies by copies of each block scale made by byte permutes
# (the sm90 kernel's SCALE_HALF_OPERANDS off), not by halves of one
# register per word of four scales; "twocopies": GEMM 2's stacked
# activation planes load in two TMA copies a step, one per plane (the sm90
# kernel's ONE_ACTIVATION_COPY off); "xlarouting": decode steps route and
# place in XLA (~12 kernels), not in one kernel, and larger calls route in
# XLA (route_decode_sm90; DECODE_ROUTING_KERNEL, PREFILL_ROUTING_KERNEL
# off); "bmNNN" (e.g. "bm144"): token tiles of NNN
# rows, SwiGLU fused up to that width (FUSED_SWIGLU_MAX_TOKENS);
# "xlagather": the prefill's row gather by XLA over all rows, not the bulk
# copies of the used rows (gather_rows_sm90, GATHER_KERNEL); "xlaplace":
# a prefill's pairs placed by XLA (sort_by_expert), not by the routing
# kernel's ranks and place_prefill_sm90 (PREFILL_PLACEMENT_KERNEL off);
# "g2x2": decode's GEMM 2 in twice the heuristic's K splits, where they
# divide its K steps (Mixtral-8x7B at one token: 512 CTAs of 14 steps, or
# with "g2pair" 256 two-block CTAs of 14); "unbalanced": decode's GEMM 2
# keeps its splits where they leave SMs idle (config.SPLIT_FOR_BALANCE
# off; gpt-oss-120b at one token: 180 CTAs of 12 steps, not 360 of 6).
PREFIXES = (
  "old",
  "s3",
  "nosplit",
  "sorted",
  "bf16gather",
  "whole",
  "counting",
  "argsort",
  "table",
  "sorttopk",
  "k64",
  "k64all",
  "narrow",
  "midtile",
  "nomidtile",
  "remainder",
  "rem16",
  "rem32",
  "unpadded",
  "sortrank",
  "counttopk",
  "warpmma",
  "split2",
  "k256",
  "g1s2",
  "g1s3",
  "fullsoftmax",
  "g2wide",
  "g2k512",
  "copiedscales",
  "twocopies",
  "xlarouting",
  "xlagather",
  "xlaplace",
  "g2two",
  "g2one",
  "g2pair",
  "g2block",
  "xlasplit",
  "shuffletopk",
  "g2x2",
  "unbalanced",
)
# What follows the prefixes: the tiles (`main`'s nvfp4_moe arguments).
VARIANTS = (
  "plain",
  "persistent",
  "fused",
  "rows64",
  "rows64fused",
  "auto",
  "autofused",
  "wide",
  "wideplain",
)


def _is_prefix(head: str) -> bool:
  return head in PREFIXES or (head[:2] == "bm" and head[2:].isdigit())


def _prefixes(name: str) -> tuple[set[str], str]:
  """(prefixes, variant) of a command-line variant name; an unknown prefix
  or variant is refused before any GPU work."""
  found = set()
  while _is_prefix(head := name.split("-", 1)[0]) and "-" in name:
    found.add(head)
    name = name.split("-", 1)[1]
  if name not in VARIANTS:
    raise ValueError(
      f"unknown variant or prefix in {name!r}: prefixes {PREFIXES} (and"
      f" bmN), then one of {VARIANTS}"
    )
  return found, name


def _fitted(config, weights, bf16_out):
  """`config` with as many of its stages as fit in shared memory, or None
  where even two do not."""
  fitted = config_lib.fit_stages(config, bf16_out, weights)
  fits = fitted.smem_bytes(not bf16_out, weights) <= config_lib.SMEM_LIMIT
  return fitted if fits else None


def _fitting_stages(config, weights, bf16_out):
  """`config` with as many of its stages as fit (itself if none do)."""
  return _fitted(config, weights, bf16_out) or config


def _short_steps(config, weights, bf16_out):
  """`config` in K steps of 64, with as many stages (up to 4) as fit."""
  short = dataclasses.replace(config, block_k=64, num_stages=4)
  return _fitted(short, weights, bf16_out) or config


def _configs_for(
  *args,
  at_most_three_stages,
  no_split,
  short_steps=(),
  gemm1_splits=None,
  long_steps=False,
  gemm1_stages=None,
  gemm2_wide=False,
  gemm2_two_tile_decode=False,
  gemm2_long=False,
  gemm2_more_splits=False,
  **kwargs,
):
  configs = CONFIGS_FOR(*args, **kwargs)
  # GEMM 1's K and GEMM 2's (`_forward_fn` passes them by name).
  hidden, inter = kwargs["hidden"], kwargs["inter"]
  step = config_lib.LONG_STEP_K
  if (
    gemm2_long
    and configs[1].cta_rows == config_lib.WGMMA_ROWS
    and inter % step == 0
  ):
    splits = configs[1].splits if inter // step % configs[1].splits == 0 else 1
    long = dataclasses.replace(
      configs[1], block_k=step, num_stages=3, splits=splits
    )
    configs = [configs[0], _fitting_stages(long, weights=1, bf16_out=True)]
  if long_steps:  # K steps of 256, the last one partial where K is ragged
    ks = (hidden, inter)
    configs = [
      _fitting_stages(
        dataclasses.replace(
          c,
          block_k=256,
          splits=c.splits if -(-k // 256) % c.splits == 0 else 1,
        ),
        weights=2 - i,
        bf16_out=i == 1,
      )
      for i, (c, k) in enumerate(zip(configs, ks, strict=True))
    ]
  if gemm1_splits and -(-hidden // configs[0].block_k) % gemm1_splits == 0:
    configs = [dataclasses.replace(configs[0], splits=gemm1_splits), configs[1]]
  configs = [
    _short_steps(c, weights=2 - i, bf16_out=i == 1) if i in short_steps else c
    for i, c in enumerate(configs)
  ]
  if gemm1_stages:
    configs = [
      dataclasses.replace(configs[0], num_stages=gemm1_stages),
      configs[1],
    ]
  if gemm2_wide and configs[1].cta_rows == config_lib.WGMMA_ROWS:
    wide = dataclasses.replace(
      configs[1],
      cta_rows=config_lib.TILE_ROWS,
      persistent=True,
      async_mma=False,
      warp_mma=False,
    )
    if gemm2_two_tile_decode and hidden % (2 * config_lib.TILE_ROWS) == 0:
      # Decode tiles in two-tile outputs too (one K split).
      wide = dataclasses.replace(wide, row_tiles=2, splits=1)
    configs = [configs[0], _fitting_stages(wide, weights=1, bf16_out=True)]
  if gemm2_more_splits:
    configs = [configs[0], _more_splits(configs[1], inter)]
  if no_split:
    configs = [dataclasses.replace(c, splits=1) for c in configs]
  if at_most_three_stages:
    stages = min(3, configs[1].num_stages)
    configs = [configs[0], dataclasses.replace(configs[1], num_stages=stages)]
  return tuple(configs)


def _more_splits(config, k):
  """Decode's (not persistent) `config` in twice its K splits, float32 out,
  where they divide its K steps; else `config`."""
  splits = 2 * config.splits
  if config.persistent or -(-k // config.block_k) % splits:
    return config
  more = dataclasses.replace(config, splits=splits)
  return _fitting_stages(more, weights=1, bf16_out=False)


def _tile_rows(prefixes) -> list[int]:
  """The token tiles the "bmN" prefixes ask for."""
  return [int(p[2:]) for p in prefixes if p[:2] == "bm"]


def _switch(module, **values):
  """Sets module switches, refusing names the module lacks (a plain
  assignment to a moved or renamed switch would silently do nothing)."""
  for name, value in values.items():
    if not hasattr(module, name):
      raise AttributeError(f"{module.__name__} has no switch {name}")
    setattr(module, name, value)


def apply_prefixes(prefixes) -> None:
  """Sets the library's switches for a variant's prefixes (none: the
  library's defaults)."""
  remainder_rows = (
    16 if "rem16" in prefixes else 32 if "rem32" in prefixes else 64
  )
  tile_rows = _tile_rows(prefixes)
  _switch(
    pallas_mosaic_gpu,
    DIRECT_DECODE="sorted" not in prefixes,
    GATHER_WORDS="bf16gather" not in prefixes,
    GATHER_KERNEL="xlagather" not in prefixes,
    COUNTING_MAX_PAIRS=(
      0 if "argsort" in prefixes else 4096 if "counting" in prefixes else 2048
    ),
    COUNTING_TOP_K_MAX=(
      0
      if "sorttopk" in prefixes
      else 1 << 62
      if "counttopk" in prefixes
      else 1 << 20
    ),
    DECODE_ROUTING_KERNEL="xlarouting" not in prefixes,
    PREFILL_ROUTING_KERNEL="xlarouting" not in prefixes,
    PREFILL_PLACEMENT_KERNEL="xlaplace" not in prefixes,
    SPLIT_IN_DECODE_ROUTING="xlasplit" not in prefixes,
  )
  _switch(
    config_lib,
    RAGGED_K_STEPS="whole" not in prefixes,
    SCALES_AS_OPERANDS="table" not in prefixes,
    WARP_MMA_DECODE="warpmma" in prefixes,
  )
  _switch(
    moe_config,
    FUSED_SWIGLU_MID_TILE="nomidtile" not in prefixes,
    REMAINDER_TILES="remainder" in prefixes or remainder_rows != 64,
    REMAINDER_ROWS=remainder_rows,
    MID_TILE_MIN_CTA_ROWS=(
      64 if "midtile" in prefixes else config_lib.TILE_ROWS
    ),
    FUSED_SWIGLU_MAX_TOKENS=max([*tile_rows, FUSED_SWIGLU_MAX_TOKENS]),
    TWO_TILE_GEMM2="g2one" not in prefixes,
    TWO_BLOCK_DECODE_GEMM2="g2block" not in prefixes,
    TWO_BLOCK_MORE_SPLITS="g2block" not in prefixes,
    SPLIT_FOR_BALANCE="unbalanced" not in prefixes,
    TWO_BLOCK_MIN_K_STEPS=0 if "g2pair" in prefixes else TWO_BLOCK_MIN_K_STEPS,
    TWO_BLOCK_MIN_CTAS_PER_SM=(
      0 if "g2pair" in prefixes else TWO_BLOCK_MIN_CTAS_PER_SM
    ),
  )
  _switch(placement, RANK_BY_COUNTING="sortrank" not in prefixes)
  _switch(route_decode_sm90, REDUX_TOP_K="shuffletopk" not in prefixes)
  _switch(
    sm90,
    SCALE_HALF_OPERANDS="copiedscales" not in prefixes,
    ONE_ACTIVATION_COPY="twocopies" not in prefixes,
  )
  _switch(
    moe_base,
    RENORMALIZED_SOFTMAX_OF_CHOSEN="fullsoftmax" not in prefixes,
  )


def use_prefixes(prefixes) -> None:
  """Makes the library tile and switch as the prefixes say (none: its
  defaults), for this process's next traces."""
  moe_config.configs_for = functools.partial(
    _configs_for,
    at_most_three_stages="s3" in prefixes,
    no_split="nosplit" in prefixes,
    gemm1_splits=2 if "split2" in prefixes else None,
    long_steps="k256" in prefixes,
    gemm2_wide="g2wide" in prefixes,
    gemm2_two_tile_decode="g2two" in prefixes,
    gemm2_long="g2k512" in prefixes,
    gemm2_more_splits="g2x2" in prefixes,
    gemm1_stages=2 if "g1s2" in prefixes else 3 if "g1s3" in prefixes else None,
    short_steps=(0, 1)
    if "k64all" in prefixes
    else (1,)
    if "k64" in prefixes
    else (),
  )
  jax.clear_caches()  # the module switches are not jit keys
  apply_prefixes(prefixes)


def parse_args(argv):
  """(model, token counts, variants) from the command line, checked."""
  name = argv[0] if argv else "qwen3-30b-a3b"
  tokens = [int(t) for t in argv[1].split(",")] if len(argv) > 1 else [1, 16]
  variants = argv[2].split(",") if len(argv) > 2 else ["persistent"]
  if name not in arg_specs.MOE_MODELS:
    raise SystemExit(f"unknown model {name!r}: {sorted(arg_specs.MOE_MODELS)}")
  for variant in variants:  # a typo fails here, before any GPU work
    _prefixes(variant)
  return name, tokens, variants


def main(argv):
  name, tokens, variants = parse_args(argv)
  n_experts, top_k, hidden, inter = arg_specs.MOE_MODELS[name]
  experts = moe.random_experts(jax.random.key(0), n_experts, hidden, inter)
  for t in tokens:
    x = jax.random.normal(jax.random.key(t), (t, hidden), jnp.bfloat16)
    logits = jax.random.normal(jax.random.key(t + 1), (t, n_experts))
    first = None
    for name_with_prefixes in variants:
      prefixes, variant = _prefixes(name_with_prefixes)
      use_prefixes(prefixes)
      tile_rows = _tile_rows(prefixes)
      node = dict(experts)
      if "unpadded" in prefixes:
        pad, transform.PAD_INTERMEDIATE_TO_TILES = (
          transform.PAD_INTERMEDIATE_TO_TILES,
          False,
        )
        node = moe.random_experts(jax.random.key(0), n_experts, hidden, inter)
        transform.PAD_INTERMEDIATE_TO_TILES = pad
      if "old" in prefixes and "w13_weight_sm90_planes" in node:
        node["w13_weight_sm90"] = node.pop("w13_weight_sm90_planes")

      def layer(
        x, logits, experts, variant=variant, prefixes=prefixes, rows=tile_rows
      ):
        return pallas_mosaic_gpu.nvfp4_moe(
          x,
          logits,
          experts,
          top_k=top_k,
          persistent=not variant.endswith("plain"),
          # "auto*": the heuristic's CTAs; "rows64*": 64-row CTAs; "wide*":
          # 256-token tiles (SwiGLU unfused).
          cta_rows={"auto": None, "rows": 64}.get(variant[:4], 128),
          block_m=256
          if variant.startswith("wide")
          else 64
          if "narrow" in prefixes
          else max(rows, default=None),
          fused_swiglu=variant.endswith("fused"),
        )

      got, timings = profiler.measure(jax.jit(layer), aggregate=False)(
        x, logits, node
      )
      # The reference dequantizes the experts it is given to float32: only
      # the routed ones, and only at decode sizes (DeepSeek-V3 at 4096
      # tokens routes to all 256: 45 GB).
      # Larger: against the first variant's output (another tiling).
      err, want = "n/a (first variant)", None
      if t <= 64:
        want = moe.active_reference(x, logits, node, top_k)
      elif "unpadded" in prefixes:  # other random weights
        err = "n/a (unpadded weights)"
      elif first is None:
        first = got
      else:
        want = first
      if want is not None:
        want = want.astype(jnp.float32)
        diff = jnp.max(jnp.abs(got.astype(jnp.float32) - want))
        err = f"{float(diff / jnp.max(jnp.abs(want))):.2e}"
      total = sum(ms for _, ms in timings)
      print(
        f"== {name} T={t} {name_with_prefixes}: {len(timings)} kernels,"
        f" {total * 1e3:.1f} us, rel err {err}"
      )
      every = os.environ.get("PROFILE_ALL_KERNELS") == "1"
      for kernel, ms in timings:
        if every or t <= 64 or ms * 1e3 >= 3 or "mosaic" in kernel:
          print(f"  {ms * 1e3:9.1f} us  {kernel[:90]}")


if __name__ == "__main__":
  main(sys.argv[1:])

"""The Mosaic GPU NVFP4 matmul: CPU interpreter, sm_90 lowering, GPU tier.

Mosaic GPU's interpreter cannot run inline PTX or wgmma with A in registers,
so in interpret mode the kernel decodes with jnp ops into SMEM; everything
else (tiles, pipeline, split-K, the swizzled scale words, the epilogues) is
the code the GPU runs, checked here at small shapes. The inline-PTX decoder
is checked by lowering for sm_90 on CPU (Python-side errors) and by the GPU
tier (`pytest -m gpu`), which runs the shared op suite at real shapes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from fp4jax.format import sm90_layout
from pallas_kernels.nvfp4_matmul import base
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90
from tests import conftest
from tests import pairwise
from tests import tolerance
from tests.pallas_kernels import jaxpr_checks
from tests.pallas_kernels.nvfp4_matmul import test_base

# bf16 activations, f32 accumulation: as the reference, plus summation order.
RTOL = 2.0**-7
# (M, N, K) at the benchmark's layer sizes, decode to prefill.
REAL_SHAPES = [
  (1, 28672, 8192),
  (16, 8192, 28672),
  (64, 14336, 4096),
  (64, 2048, 7168),
  (3, 2048, 2880),
  (8192, 28672, 8192),
  (2048, 5120, 2048),
  (7, 2880, 2880),  # gpt-oss: N is no multiple of 128, K of 64
]
# Configs with wgmmas in flight across K steps at real shapes.
ASYNC_REAL_CONFIGS = [
  (8192, 28672, 8192, dict(block_k=128, block_m=128)),
  (2048, 5120, 2048, dict(block_k=64, block_m=256, num_stages=3)),
  (256, 8192, 28672, dict(block_k=128, block_m=128)),
  (1, 28672, 8192, dict(block_k=256, block_m=8, splits=2, cta_rows=64)),
  (64, 14336, 4096, dict(block_k=128, block_m=64)),
]
# Row-pair weights (Config.row_pairs): decode CTAs, 64 and 256 tokens,
# prefill tiles, a K of 2880 (steps that do not divide it).
ROW_PAIR_SHAPES = [
  (1, 28672, 8192),
  (16, 8192, 28672),
  (64, 2048, 7168),
  (256, 14336, 4096),
  (2048, 5120, 2048),
  (7, 2880, 2880),
]


def _row_pairs(config):
  return dataclasses.replace(config, row_pairs=True)


# Shapes that do not fill whole tiles (N % 128, N % 8, K % 64, M < 8).
PARTIAL_SHAPES = [(3, 200, 64), (2, 128, 48), (5, 60, 96), (9, 192, 320)]


def run(x, layer, activation, config=None, interpret=True):
  return pallas_mosaic_gpu.nvfp4_matmul(
    x,
    base.PreparedLinear.from_mapping(layer),
    activation=activation,
    config=config,
    interpret=interpret,
  )


# (M, N, K, config) at small shapes: each kernel feature, alone and with
# the others it meets.
_SMALL_CONFIGS = [
  (1, 128, 128, None),
  (5, 128, 512, None),
  (16, 256, 512, config_lib.Config(block_k=64, block_m=8, splits=2)),
  (9, 256, 1024, config_lib.Config(block_k=128, block_m=16, splits=4)),
  (20, 128, 512, config_lib.Config(block_k=256, block_m=8, num_stages=1)),
  (4, 320, 192, config_lib.Config(block_k=64, block_m=8, splits=3)),
  (5, 384, 512, config_lib.Config(block_k=128, block_m=8, persistent=True)),
  (
    20,
    200,
    512,
    config_lib.Config(block_k=64, block_m=8, splits=2, persistent=True),
  ),
  # One-warpgroup CTAs of 64 rows: both halves of a scale tile, a
  # partial last tile, split-K.
  (3, 256, 512, config_lib.Config(block_k=128, block_m=8, cta_rows=64)),
  (
    9,
    200,
    512,
    config_lib.Config(block_k=64, block_m=16, splits=2, cta_rows=64),
  ),
  (5, 256, 256, config_lib.Config(block_k=128, block_m=8, twiddled=True)),
  # wgmmas left in flight across K steps, on each CTA shape.
  *[
    (m, n, k, config_lib.Config(async_mma=True, **fields))
    for m, n, k, fields in [
      (20, 256, 1024, dict(block_k=64, block_m=8)),
      (9, 200, 512, dict(block_k=64, block_m=16, splits=2, cta_rows=64)),
      (4, 256, 256, dict(block_k=64, block_m=8, num_stages=2)),
      # Four and eight K parts a step (16 plane columns each at 256).
      (3, 128, 512, dict(block_k=128, block_m=8, mma_parts=4)),
      (
        5,
        256,
        512,
        dict(block_k=256, block_m=8, cta_rows=64, mma_parts=8),
      ),
    ]
  ],
  # K steps of 512 (config.LONG_STEP_K), split, sm90 bit order.
  (
    5,
    256,
    2048,
    config_lib.Config(
      block_k=512,
      block_m=8,
      num_stages=3,
      splits=2,
      cta_rows=64,
      async_mma=True,
      twiddled=True,
    ),
  ),
  # Warp-level mma.sync (accumulators carried by the pipeline): plain,
  # split-K with a partial last tile, sm90 bit order.
  *[
    (m, n, k, config_lib.Config(cta_rows=64, warp_mma=True, **fields))
    for m, n, k, fields in [
      (3, 256, 512, dict(block_k=128, block_m=8)),
      (9, 200, 512, dict(block_k=64, block_m=16, splits=2)),
      (5, 128, 512, dict(block_k=256, block_m=8, twiddled=True)),
    ]
  ],
  # Row-pair weights, natural activations (Config.row_pairs): each CTA
  # shape, split-K, wgmmas in flight, a persistent grid, prefill tiles.
  *[
    (m, n, k, config_lib.Config(row_pairs=True, **fields))
    for m, n, k, fields in [
      (5, 256, 512, dict(block_k=128, block_m=8)),
      (9, 208, 512, dict(block_k=64, block_m=16, splits=2, cta_rows=64)),
      (3, 256, 1024, dict(block_k=256, block_m=8, async_mma=True)),
      (
        20,
        128,
        512,
        dict(block_k=64, block_m=8, splits=2, persistent=True),
      ),
    ]
  ],
  # Two 128-row weight tiles an output tile (Config.row_tiles): whole
  # tiles, a last tile partly past N, several token tiles, sm90 order.
  *[
    (m, n, k, config_lib.Config(persistent=True, row_tiles=2, **fields))
    for m, n, k, fields in [
      (20, 256, 512, dict(block_k=64, block_m=8)),
      (5, 400, 256, dict(block_k=128, block_m=8, num_stages=2)),
      (40, 512, 384, dict(block_k=128, block_m=16, twiddled=True)),
    ]
  ],
  # Both halves of a 128-row tile in a 64-row CTA (row_tiles=2): bf16 and
  # split-K float32 outputs, a last tile partly past N, async wgmmas.
  *[
    (m, n, k, config_lib.Config(cta_rows=64, row_tiles=2, **fields))
    for m, n, k, fields in [
      (5, 256, 512, dict(block_k=128, block_m=8)),
      (9, 400, 512, dict(block_k=64, block_m=16, splits=2)),
      (
        3,
        256,
        1024,
        dict(block_k=256, block_m=8, async_mma=True, twiddled=True),
      ),
    ]
  ],
]
_ACTIVATIONS = ("bf16", "nvfp4")


@pytest.mark.parametrize(
  "backend, m, n, k, config, activation",
  # In the interpreter the kernel runs alike for both activations (W4A4
  # differs in the quantization before the call and in the epilogue's
  # factor values), so the CPU takes each config once, the activations in
  # turn (~3.4 s a case); the GPU takes every config with both.
  pairwise.by_backend(
    [(*case, _ACTIVATIONS[i % 2]) for i, case in enumerate(_SMALL_CONFIGS)],
    [
      (*case, activation)
      for case in _SMALL_CONFIGS
      for activation in _ACTIVATIONS
    ],
  ),
)
def test_each_config_matches_numpy_oracle(
  rng, backend, m, n, k, config, activation
):
  layer, src = test_base.make_layer(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  out = run(x, layer, activation, config, interpret=backend == "cpu")
  assert out.shape == (m, n) and out.dtype == jnp.bfloat16
  want = test_base.numpy_matmul(x.astype(jnp.float32), src, activation)
  tolerance.assert_close(out, want, RTOL)


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_interpret_row_pair_layer(rng, activation):
  # A layer stored in row pairs runs the row-pair kernel with no per-call
  # regrouping, and the reference ungroups it.
  layer, src = test_base.make_layer(rng, 208, 512)
  grouped = pallas_mosaic_gpu.row_pair_layer(
    base.PreparedLinear.from_mapping(layer)
  )
  assert grouped.weight_layout == "sm90_row_pairs"
  leaves = grouped.to_mapping()
  assert sm90_layout.ROW_PAIRS_LEAF in leaves
  x = jnp.asarray(rng.standard_normal((5, 512)), jnp.bfloat16)
  want = test_base.numpy_matmul(x.astype(jnp.float32), src, activation)
  config = config_lib.Config(block_k=128, block_m=8)
  tolerance.assert_close(run(x, leaves, activation, config), want, RTOL)
  reference = pallas_kernels.nvfp4_matmul(
    x, leaves, activation=activation, implementation="xla"
  )
  tolerance.assert_close(reference, want, RTOL)


@pytest.mark.parametrize(
  "activation, weight_only",
  [("bf16", False), ("bf16", True), ("nvfp4", False)],
)
def test_interpret_scales_as_operands_equal_the_factor_table(
  rng, activation, weight_only, monkeypatch
):
  # The epilogue multiplying the scale leaves itself gives the same bits as
  # the per-block table XLA used to build.
  layer, _ = test_base.make_layer(rng, 200, 256, weight_only=weight_only)
  x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
  config = config_lib.Config(block_k=64, block_m=8, splits=2)
  outs = []
  for operands in (True, False):
    monkeypatch.setattr(config_lib, "SCALES_AS_OPERANDS", operands)
    jax.clear_caches()  # the flag is read when tracing
    outs.append(np.asarray(run(x, layer, activation, config), np.float32))
  assert not np.isnan(outs[0]).any()
  np.testing.assert_array_equal(outs[0], outs[1])


def test_interpret_batch_dims_and_weight_only(rng):
  layer, src = test_base.make_layer(rng, 128, 128, weight_only=True)
  x = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.bfloat16)
  out = run(x, layer, "bf16")
  want = test_base.numpy_matmul(
    x.reshape(6, 128).astype(jnp.float32), src, "bf16"
  )
  tolerance.assert_close(out.reshape(6, 128), want, RTOL)


@pytest.mark.parametrize(
  "m, n, k, config",
  [(*shape, None) for shape in REAL_SHAPES + PARTIAL_SHAPES]
  + [
    (256, 2048, 7168, config_lib.Config(block_k=64, block_m=256)),
    (
      8192,
      28672,
      8192,
      config_lib.Config(block_k=128, block_m=128, persistent=True),
    ),
    (
      1,
      28672,
      8192,
      config_lib.Config(block_k=256, block_m=8, splits=2, persistent=True),
    ),
    (1, 28672, 8192, config_lib.Config(block_k=256, block_m=8, cta_rows=64)),
    # K steps of 512 as the heuristic gives 8192x28672 (N x K) at 1 and 16.
    *[(m, 8192, 28672, config_lib.heuristic(m, 8192, 28672)) for m in (1, 16)],
    # K = 2880 (gpt-oss) in steps that do not divide it: narrower swizzles.
    (16, 2880, 2880, config_lib.Config(block_k=128, block_m=16)),
    (
      1,
      2880,
      2880,
      config_lib.Config(block_k=256, block_m=8, cta_rows=64, async_mma=True),
    ),
    (4096, 5760, 2880, config_lib.Config(block_k=128, persistent=True)),
    *[
      (m, n, k, config_lib.Config(cta_rows=64, warp_mma=True, **fields))
      for m, n, k, fields in [
        (1, 28672, 8192, dict(block_k=256, block_m=8, splits=2)),
        (16, 8192, 28672, dict(block_k=256, block_m=16, twiddled=True)),
        (1, 2880, 2880, dict(block_k=128, block_m=8)),
      ]
    ],
    (
      16,
      8192,
      28672,
      config_lib.Config(block_k=256, block_m=16, twiddled=True),
    ),
    (
      64,
      2048,
      7168,
      config_lib.Config(block_k=256, block_m=64, splits=7, cta_rows=64),
    ),
    *[
      (m, n, k, config_lib.Config(async_mma=True, **fields))
      for m, n, k, fields in ASYNC_REAL_CONFIGS
    ],
    # Row-pair weights and natural activations on the heuristic's tiles.
    *[
      (m, n, k, _row_pairs(config_lib.heuristic(m, n, k)))
      for m, n, k in ROW_PAIR_SHAPES
    ],
    # Two weight tiles an output tile at the MoE's down projections'
    # K (Qwen3-30B-A3B, DeepSeek-V3) and largest token tiles.
    *[
      (
        m,
        n,
        k,
        config_lib.Config(
          block_k=128,
          block_m=block_m,
          num_stages=3,
          persistent=True,
          row_tiles=2,
          twiddled=True,
        ),
      )
      for m, n, k, block_m in [(2304, 2048, 768, 144), (2560, 7168, 2048, 160)]
    ],
    # Both halves of a 128-row tile in 64-row decode CTAs: K steps of 512
    # (8192x28672 at one token, two splits) and 256.
    *[
      (m, n, k, dataclasses.replace(config_lib.heuristic(m, n, k), row_tiles=2))
      for m, n, k in [(1, 28672, 8192), (16, 7168, 2048), (1, 2880, 2880)]
    ],
  ],
)
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_lowers_for_sm90(m, n, k, config, activation):
  # Lowering also checks that the tiles fit in shared memory (227 KiB).
  config = config or config_lib.heuristic(m, n, k)
  trace_run(m, n, k, config, activation).lower(lowering_platforms=("cuda",))


def trace_run(m, n, k, config, activation, weight_leaf="weight"):
  """`pallas_mosaic_gpu._run` on these tiles, traced for an abstract
  layer (its packed weight stored as `weight_leaf`)."""
  layer = {
    weight_leaf: jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
    "block_scale": jax.ShapeDtypeStruct(
      (-(-n // 128) * 128, -(-(k // 16) // 4) * 4), jnp.float8_e4m3fn
    ),
    "alpha": jax.ShapeDtypeStruct((), jnp.float32),
    "input_scale_inv": jax.ShapeDtypeStruct((), jnp.float32),
  }

  def f(x, leaves):
    return pallas_mosaic_gpu._run(
      x, leaves, activation=activation, config=config, interpret=False
    )

  return jax.jit(f).trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), layer)


@pytest.mark.parametrize("row_pairs", [False, True])
@pytest.mark.parametrize("m, n, k", ROW_PAIR_SHAPES)
def test_async_waits_cover_all_but_the_last_part(m, n, k, row_pairs):
  # With async_mma a K part's decode reuses the A registers of the part
  # before: each wait must leave in flight only the wgmmas just issued
  # (row pairs issue one a part, planes two; waiting for two with row pairs
  # gave a rare garbage output on the H200).
  config = config_lib.heuristic(m, n, k)
  if row_pairs:
    config = _row_pairs(config)
  leaf = "weight_sm90_row_pairs" if row_pairs else "weight_sm90"
  traced = trace_run(m, n, k, config, "bf16", weight_leaf=leaf)
  jaxpr_checks.assert_waits_leave_only_the_last_part(traced.jaxpr.jaxpr)


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize("m, n, k", PARTIAL_SHAPES)
def test_interpret_partial_tiles(rng, m, n, k, activation):
  # The last row tile reads past the weight (TMA fills zeros); K % 64 or
  # N % 8 pads the weight per call.
  layer, src = test_base.make_layer(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  out = run(x, layer, activation)
  assert out.shape == (m, n)
  want = test_base.numpy_matmul(x.astype(jnp.float32), src, activation)
  tolerance.assert_close(out, want, RTOL)


@pytest.mark.parametrize(
  "k, config",
  [
    (192, config_lib.Config(block_k=128, block_m=16)),
    (320, config_lib.Config(block_k=256, block_m=16, cta_rows=64)),
    (2880, config_lib.Config(block_k=128, block_m=16, splits=23)),
  ],
)
def test_interpret_last_k_step_partial(rng, k, config):
  # K not a whole number of steps (gpt-oss: 2880 in steps of 128): the last
  # step's weights, scales and activations past K read as zeros.
  layer, src = test_base.make_layer(rng, 128, k)
  x = jnp.asarray(rng.standard_normal((16, k)), jnp.bfloat16)
  out = run(x, layer, "bf16", config)
  want = test_base.numpy_matmul(x.astype(jnp.float32), src, "bf16")
  tolerance.assert_close(out, want, RTOL)


@pytest.mark.parametrize("ragged, want", [(False, 64), (True, 256)])
def test_heuristic_k_steps_for_k_2880(monkeypatch, ragged, want):
  monkeypatch.setattr(config_lib, "RAGGED_K_STEPS", ragged)
  # gpt-oss's MoE GEMM 1 at 1 token (4 experts' tiles fill the SMs): 11.25
  # steps of 256 with RAGGED_K_STEPS, 45 of 64 without.
  moe = config_lib.heuristic(32, 5760, 2880, block_m=8, token_tiles=4)
  assert moe.block_k == want and moe.splits == 1
  # One token tile of a dense layer splits K either way (12 steps of 256 by
  # three, or 45 of 64).
  dense = config_lib.heuristic(16, 5120, 2880)
  assert dense.block_k == want and dense.splits == 3
  # 128-token tiles take steps of at most 128: 23 of them cannot split, so
  # a split layer keeps 45 of 64.
  assert config_lib.heuristic(256, 5120, 2880).block_k == 64
  assert config_lib.heuristic(16, 2048, 7168).block_k == 256  # divides K


def test_heuristic_long_k_steps():
  # Dense decode CTAs with >= 4096 of K each take K steps of 512 in three
  # stages (config.LONG_STEP_K) where their grid is one wave of two CTAs
  # per SM, or their tiles hold 16 tokens.
  for m in (1, 16):
    for n, k, splits in ((8192, 28672, 2), (14336, 4096, 1)):
      cfg = config_lib.heuristic(m, n, k)
      assert (cfg.block_k, cfg.num_stages, cfg.splits) == (512, 3, splits)
      assert cfg.smem_bytes() <= config_lib.SMEM_LIMIT // 2  # two a SM
    # Two K steps a CTA: steps of 256.
    assert config_lib.heuristic(m, 2048, 7168).block_k == 256
  # 896 CTAs (several waves): steps of 512 only for 16-token tiles.
  assert config_lib.heuristic(1, 28672, 8192).block_k == 256
  assert config_lib.heuristic(16, 28672, 8192).block_k == 512
  # Not for MoE token tiles, nor SwiGLU's two weight tiles a step.
  assert (
    config_lib.heuristic(8, 8192, 28672, block_m=8, token_tiles=2).block_k
    == 256
  )
  assert config_lib.heuristic(1, 8192, 28672, weights=2).block_k == 256


def test_config_that_does_not_split_k_evenly_is_rejected(rng):
  layer, _ = test_base.make_layer(rng, 128, 192)
  with pytest.raises(ValueError, match="does not tile"):
    run(
      jnp.ones((2, 192), jnp.bfloat16),
      layer,
      "bf16",
      config_lib.Config(block_k=64, splits=2),
    )


def test_config_validation():
  with pytest.raises(ValueError, match="block_k"):
    config_lib.Config(block_k=96)
  with pytest.raises(ValueError, match="block_m"):
    config_lib.Config(block_m=12)
  with pytest.raises(ValueError, match="splits"):
    config_lib.Config(splits=0)
  with pytest.raises(ValueError, match="cta_rows"):
    config_lib.Config(cta_rows=32)
  with pytest.raises(ValueError, match="persistent"):
    config_lib.Config(cta_rows=64, persistent=True)
  with pytest.raises(ValueError, match="async_mma"):
    config_lib.Config(async_mma=True, num_stages=1)
  with pytest.raises(ValueError, match="async_mma"):
    config_lib.Config(async_mma=True, persistent=True)
  with pytest.raises(ValueError, match="mma_parts"):
    config_lib.Config(mma_parts=3)
  with pytest.raises(ValueError, match="mma_parts"):
    config_lib.Config(block_k=128, mma_parts=8)  # 8 plane columns a part
  with pytest.raises(ValueError, match="warp_mma"):
    config_lib.Config(warp_mma=True)  # 128-row CTAs
  with pytest.raises(ValueError, match="warp_mma"):
    config_lib.Config(cta_rows=64, warp_mma=True, async_mma=True)


@pytest.mark.parametrize("m, n, k", REAL_SHAPES + PARTIAL_SHAPES)
def test_heuristic_tiles_and_fits(m, n, k):
  cfg = config_lib.heuristic(m, n, k)
  padded_k = -(-k // 64) * 64
  steps = -(-padded_k // cfg.block_k)
  # A partial last step adds at most 1/RAGGED_K_WASTE of K.
  assert (
    config_lib.RAGGED_K_WASTE * (steps * cfg.block_k - padded_k) <= padded_k
  )
  assert steps % cfg.splits == 0
  assert cfg.smem_bytes(float32_out=False) <= config_lib.SMEM_LIMIT
  assert cfg.block_m >= min(m, 128)
  if m >= config_lib.PREFILL_TOKENS:
    assert cfg == config_lib.PREFILL and cfg.splits == 1  # bf16 epilogue
  # Decode tiles run on 64-row one-warpgroup CTAs (config.heuristic), with
  # their wgmmas overlapping the next decode, as do unsplit four-stage
  # 128-row tiles of few tokens.
  assert cfg.cta_rows == (64 if cfg.block_m <= 16 else 128)
  assert cfg.async_mma == (
    cfg.cta_rows == 64 or config_lib.wide_overlaps_mma(cfg)
  )
  tiles = -(-n // config_lib.TILE_ROWS) * -(-m // cfg.block_m)
  if tiles >= config_lib.H200_SMS and cfg.block_m > 16:
    assert cfg.splits == 1  # large M: no float32 partial sums
  elif padded_k // 64 >= 16:  # enough K steps to split
    assert tiles * cfg.splits >= min(config_lib.H200_SMS, tiles * 8) // 2


@pytest.mark.parametrize(
  "m, n, k, stages",
  [
    (64, 28672, 8192, 4),  # unsplit: a bf16 epilogue tile, 4 stages fit
    (256, 8192, 28672, 4),
    # Split K: float32 partial sums from registers, no epilogue tile.
    (64, 8192, 28672, 4),
  ],
)
def test_heuristic_counts_the_epilogue_the_call_stores(m, n, k, stages):
  # An unsplit dense call stores bf16, so its stages are fitted for a bf16
  # epilogue tile (a float32 one cost 64- and 128-token tiles a stage);
  # a split one's 128-row CTAs store float32 from registers.
  cfg = config_lib.heuristic(m, n, k)
  assert cfg.num_stages == stages
  float32_out = cfg.splits > 1
  assert cfg.direct_partials or not float32_out
  assert cfg.smem_bytes(float32_out) <= config_lib.SMEM_LIMIT
  deeper = dataclasses.replace(cfg, num_stages=cfg.num_stages + 1)
  assert deeper.smem_bytes(float32_out) > config_lib.SMEM_LIMIT
  # A persistent grid keeps the float32 tile: a stage less at 64 tokens.
  if float32_out and cfg.block_m == 64:
    persistent = dataclasses.replace(cfg, persistent=True, async_mma=False)
    assert persistent.smem_bytes(float32_out) > config_lib.SMEM_LIMIT


@pytest.mark.parametrize(
  "m, n, k, overlaps",
  [
    (64, 28672, 8192, True),  # unsplit, four stages
    (40, 14336, 4096, True),
    (64, 8192, 28672, True),  # split K: four stages (partials from registers)
    (64, 2048, 7168, True),
    (256, 8192, 28672, False),  # 128-token tiles
    (16, 28672, 8192, True),  # the 64-row decode CTAs' own rule
  ],
)
def test_heuristic_overlaps_mma_in_four_stage_64_token_tiles(m, n, k, overlaps):
  cfg = config_lib.heuristic(m, n, k)
  assert cfg.async_mma == overlaps
  if cfg.wide and overlaps:
    assert cfg.num_stages == 4 and cfg.block_m <= 64 and not cfg.persistent


def test_named_pallas_without_a_gpu_says_why(rng):
  layer, _ = test_base.make_layer(rng, 128, 128)
  x = jnp.ones((2, 128), jnp.bfloat16)
  if conftest.has_gpu():
    out = pallas_kernels.nvfp4_matmul(x, layer, implementation="pallas")
    assert out.shape == (2, 128)
  else:
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
      pallas_kernels.nvfp4_matmul(x, layer, implementation="pallas")


def test_plane_row_order_is_the_kernels_activation_split():
  x = jnp.arange(3 * 256, dtype=jnp.float32).reshape(3, 256)
  planes = sm90.split_activations(x)  # [2, 3, 128]
  # Per 128 features: the 64 even ones, then the 64 odd ones.
  want = jnp.stack(
    [planes[0].reshape(3, 2, 64), planes[1].reshape(3, 2, 64)], axis=2
  ).reshape(3, 256)
  np.testing.assert_array_equal(sm90_layout.to_plane_rows(x, axis=-1), want)
  np.testing.assert_array_equal(sm90_layout.from_plane_rows(want, axis=-1), x)


@pytest.mark.gpu
class TestOnGPU(test_base.NVFP4MatmulTestBase):
  """The shared suite on the H200, whole and partial tiles."""

  IMPLEMENTATION = "pallas"

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize(
    "m, n, k",
    [
      (1, 4096, 4096),
      (16, 8192, 2048),
      (64, 2048, 7168),
      (300, 1024, 1024),
      (3, 2048, 2880),
      (2048, 5120, 2048),
      (7, 2880, 2880),
      (130, 200, 80),
      (1, 64, 2048),
      (32, 64, 128),  # one K step, no split: a whole idle warpgroup tile
      (5, 60, 96),
    ],
  )
  def test_matches_numpy_oracle(self, rng, m, n, k, activation):
    super().test_matches_numpy_oracle(rng, m, n, k, activation)

  @pytest.mark.parametrize("async_mma", [False, True])
  @pytest.mark.parametrize(
    "m, n, k, fields",
    [
      (2048, 5120, 2048, dict(block_k=64, block_m=256, num_stages=3)),
      (256, 4096, 4096, dict(block_k=128, block_m=128)),
      (300, 1024, 1024, dict(block_k=64, block_m=128)),
      (64, 2048, 7168, dict(block_k=128, block_m=64)),
      # 128-row CTAs of split K: float32 partial sums from registers.
      (64, 8192, 28672, dict(block_k=256, block_m=64, splits=2)),
      (40, 2048, 7168, dict(block_k=256, block_m=40, splits=7)),
      (1, 4096, 8192, dict(block_k=256, block_m=8, splits=2, cta_rows=64)),
      (
        16,
        4096,
        8192,
        dict(block_k=256, block_m=16, splits=2, cta_rows=64, mma_parts=4),
      ),
      # K steps that do not divide K = 2880 (narrower swizzles).
      (16, 2880, 2880, dict(block_k=128, block_m=16)),
      (1, 2880, 2880, dict(block_k=256, block_m=8, cta_rows=64)),
      # K steps of 512 (config.LONG_STEP_K), split, and a partial last one.
      (1, 8192, 28672, dict(block_k=512, block_m=8, splits=2, cta_rows=64)),
      (
        16,
        28672,
        8192,
        dict(block_k=512, block_m=16, num_stages=3, splits=2, cta_rows=64),
      ),
      (
        16,
        14336,
        4096,
        dict(block_k=512, block_m=16, num_stages=3, cta_rows=64),
      ),
      (5, 2880, 2880, dict(block_k=512, block_m=8, cta_rows=64)),
    ],
  )
  def test_configs(self, rng, m, n, k, fields, async_mma):
    # Each CTA shape with and without wgmmas in flight across K steps (a
    # released input slot read by a running wgmma gave NaNs before).
    layer, src = test_base.make_layer(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    config = config_lib.Config(async_mma=async_mma, **fields)
    out = pallas_kernels.nvfp4_matmul(
      x, layer, implementation="pallas", config=config
    )
    self.check(out, test_base.numpy_matmul(x.astype(jnp.float32), src, "bf16"))

  @pytest.mark.parametrize(
    "m, n, k",
    [(1, 28672, 8192), (16, 7168, 2048), (1, 2880, 2880), (9, 8192, 28672)],
  )
  def test_two_row_tiles_in_64_row_ctas(self, rng, m, n, k):
    # Both halves of a 128-row tile in one warpgroup: each 64-row block's
    # K steps and MMAs are those of a one-block CTA, so the outputs are
    # equal bit for bit (split-K float32 partial sums included).
    layer, src = test_base.make_layer(rng, n, k, weight_layout="sm90")
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    config = config_lib.heuristic(m, n, k)
    assert config.cta_rows == 64
    outs = [
      np.asarray(
        pallas_kernels.nvfp4_matmul(
          x,
          layer,
          implementation="pallas",
          config=dataclasses.replace(config, row_tiles=row_tiles),
        )
      )
      for row_tiles in (1, 2)
    ]
    self.check(
      outs[1], test_base.numpy_matmul(x.astype(jnp.float32), src, "bf16")
    )
    np.testing.assert_array_equal(
      outs[1].view(np.uint16), outs[0].view(np.uint16)
    )

  @pytest.mark.parametrize(
    "m, n, k, fields",
    [
      (1, 4096, 8192, dict(block_k=256, block_m=8, splits=2)),
      (16, 8192, 2048, dict(block_k=256, block_m=16, twiddled=True)),
      (7, 2880, 2880, dict(block_k=128, block_m=8)),
      (3, 200, 512, dict(block_k=64, block_m=8, splits=2)),
    ],
  )
  def test_warp_mma(self, rng, m, n, k, fields):
    # Decode CTAs with warp-level mma.sync (Config.warp_mma): the decoded
    # registers reshaped into the mma.sync A layout, activations loaded
    # into its B layout, accumulators carried through the pipeline.
    layer, src = test_base.make_layer(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    config = config_lib.Config(cta_rows=64, warp_mma=True, **fields)
    out = pallas_kernels.nvfp4_matmul(
      x, layer, implementation="pallas", config=config
    )
    self.check(out, test_base.numpy_matmul(x.astype(jnp.float32), src, "bf16"))

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize("m, n, k", ROW_PAIR_SHAPES)
  def test_row_pairs(self, rng, m, n, k, activation):
    # A layer prepared in row pairs, read with natural activations: the
    # decode's outputs placed as A registers of two rows, each row's scale
    # a half of one register.
    layer, src = test_base.make_layer(rng, n, k, weight_layout="sm90_row_pairs")
    assert "weight_sm90_row_pairs" in layer
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = pallas_kernels.nvfp4_matmul(
      x, layer, activation=activation, implementation="pallas"
    )
    want = test_base.numpy_matmul(x.astype(jnp.float32), src, activation)
    self.check(out, want)

  @pytest.mark.parametrize("weight_layout", ["sm90", "sm90_row_pairs"])
  @pytest.mark.parametrize("m, n, k", [(1, 28672, 8192), (7, 2880, 2880)])
  def test_repeated_calls_are_bitwise_equal(self, rng, m, n, k, weight_layout):
    # A race shows as calls that differ: row-pair decode steps that left a
    # wgmma in flight while the next decode rewrote its A registers gave a
    # garbage element in 15 of 40 calls at 28672x8192, M = 1.
    layer, src = test_base.make_layer(rng, n, k, weight_layout=weight_layout)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    call = jax.jit(
      lambda x, layer: pallas_kernels.nvfp4_matmul(
        x, layer, implementation="pallas"
      )
    )
    first = np.asarray(call(x, layer))
    self.check(
      first, test_base.numpy_matmul(x.astype(jnp.float32), src, "bf16")
    )
    for _ in range(40):
      again = np.asarray(call(x, layer))
      np.testing.assert_array_equal(
        again.view(np.uint16), first.view(np.uint16)
      )

  def test_row_pairs_regrouped_per_call(self, rng):
    # Config.row_pairs on an sm90 layer: the weight is regrouped per call.
    layer, src = test_base.make_layer(rng, 2048, 7168, weight_layout="sm90")
    x = jnp.asarray(rng.standard_normal((64, 7168)), jnp.bfloat16)
    config = _row_pairs(config_lib.heuristic(64, 2048, 7168))
    out = pallas_kernels.nvfp4_matmul(
      x, layer, implementation="pallas", config=config
    )
    self.check(out, test_base.numpy_matmul(x.astype(jnp.float32), src, "bf16"))

  def test_batch_dims(self, rng):
    layer, src = test_base.make_layer(rng, 128, 256)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
    want = test_base.numpy_matmul(
      x.reshape(6, 256).astype(jnp.float32), src, "bf16"
    )
    self.check(self.matmul(x, layer, "bf16").reshape(6, 128), want)

  def test_weight_only_layer(self, rng):
    layer, src = test_base.make_layer(rng, 256, 512, weight_only=True)
    x = jnp.asarray(rng.standard_normal((4, 512)), jnp.bfloat16)
    want = test_base.numpy_matmul(x.astype(jnp.float32), src, "bf16")
    self.check(self.matmul(x, layer, "bf16"), want)
    with pytest.raises(ValueError, match="input_scale_inv"):
      self.matmul(x, layer, "nvfp4")

  def test_under_jit(self, rng):
    layer, src = test_base.make_layer(rng, 128, 256)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    out = jax.jit(lambda x, lay: self.matmul(x, lay, "nvfp4"))(x, layer)
    self.check(out, test_base.numpy_matmul(x.astype(jnp.float32), src, "nvfp4"))

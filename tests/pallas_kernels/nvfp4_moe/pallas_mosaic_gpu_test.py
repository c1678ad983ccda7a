"""The Mosaic GPU NVFP4 MoE: CPU interpreter, sm_90 lowering, GPU tier (the
XLA placement of pairs: placement_test; the tiles: config_test).

As for the matmul, the interpreter decodes weights with jnp ops into SMEM
(it cannot run inline PTX or register-A wgmma); the grouping (one expert per
token tile, skipped tiles), routing and combine are the code the GPU runs.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from fp4jax import transform
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_moe import base
from pallas_kernels.nvfp4_moe import config as moe_config
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu
from tests import conftest
from tests import pairwise
from tests import tolerance
from tests.pallas_kernels import jaxpr_checks
from tests.pallas_kernels.nvfp4_moe import config_test
from tests.pallas_kernels.nvfp4_moe import test_base

# Real models: (experts, top_k, hidden, intermediate).
QWEN3_30B = (128, 8, 2048, 768)
DEEPSEEK_V3 = (256, 8, 7168, 2048)
MIXTRAL = (8, 2, 4096, 14336)
GPT_OSS = (128, 4, 2880, 2880)


def test_interpret_pairs_placed_by_counting(rng, monkeypatch):
  monkeypatch.setattr(pallas_mosaic_gpu, "COUNTING_MAX_PAIRS", 4096)
  forward = pallas_mosaic_gpu._forward_fn(
    jnp.zeros((9, 128), jnp.bfloat16),
    2,
    test_base.make_experts(rng, 4, 128, 128)[0],
    "bf16",
    moe_config.Tiles(None, True, None, True),
    interpret=True,
  )
  assert forward.keywords["counted"]
  check_interpret_against_numpy(rng, (9, 4, 128, 128))


@pytest.mark.parametrize(
  "tokens, remainder_rows, activation, fused_swiglu",
  [
    (150, 64, "bf16", True),
    (150, 64, "bf16", False),
    (150, 64, "nvfp4", False),
    (140, 16, "bf16", True),
  ],
)
def test_interpret_remainder_tiles(
  rng, monkeypatch, activation, fused_swiglu, tokens, remainder_rows
):
  # Two experts, top-2: each gets all the tokens, one 128-row tile and a
  # remainder tile of the other 22 (or 12), which a second pair of GEMMs
  # runs (16-row ones in 64-row decode CTAs).
  monkeypatch.setattr(moe_config, "REMAINDER_TILES", True)
  monkeypatch.setattr(moe_config, "REMAINDER_ROWS", remainder_rows)
  monkeypatch.setattr(pallas_mosaic_gpu, "COUNTING_MAX_PAIRS", 0)
  calls = spy_on_matmul(monkeypatch, "block_m")
  check_interpret_against_numpy(
    rng,
    (tokens, 2, 128, 128),
    activation,
    block_m=128,
    fused_swiglu=fused_swiglu,
  )
  assert calls == [128, 128, remainder_rows, remainder_rows]


@pytest.mark.parametrize("direct", [False, True])
def test_interpret_one_token_with_and_without_the_sort(
  rng, monkeypatch, direct
):
  # Decode of one token: the direct tiles (default) and the sorted ones
  # give the same output, foreign and repeated ids included.
  monkeypatch.setattr(pallas_mosaic_gpu, "DIRECT_DECODE", direct)
  experts, _ = test_base.make_experts(rng, 4, 128, 128)
  x = jnp.asarray(rng.standard_normal((1, 128)), jnp.bfloat16)
  ids = jnp.asarray([[2, -1, 2, 0]], jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (1, 4)), jnp.float32)
  forward = pallas_mosaic_gpu._forward_fn(
    x,
    4,
    experts,
    "bf16",
    moe_config.Tiles(None, True, None, True),
    interpret=True,
  )
  assert forward.keywords["direct"] == direct
  got = forward(x, weights, ids, dict(experts))
  want = base.reference_experts(x, weights, ids, experts)
  tolerance.assert_close(
    got,
    np.asarray(want, np.float64),
    test_base.NVFP4MoETestBase.RTOL,
    KERNEL_FLOOR,
  )


# Like vLLM's and SGLang's MoE kernels, this one rounds gate and up and each
# expert's output to bf16 before the next step; a sum that cancels between
# experts keeps those roundings at the scale of the experts' outputs (up to
# ~0.9% of max|out| seen on CPU), so near-zero outputs get a floor of 100%.
KERNEL_FLOOR = 1.0


class TestInterpret(test_base.NVFP4MoETestBase):
  """The shared suite in Mosaic GPU's interpreter (CPU)."""

  FLOOR = KERNEL_FLOOR
  SHAPE = (128, 64)
  SMALL_SHAPE = (64, 64)

  def moe(self, x, logits, experts, **kwargs):
    return pallas_mosaic_gpu.nvfp4_moe(
      x, logits, experts, interpret=True, **kwargs
    )


def spy_on_matmul(monkeypatch, field: str) -> list:
  """The `field` ("swiglu", or a field of its config) of each sm90 matmul
  the MoE traces from now on (jit caches cleared, so that it traces)."""
  jax.clear_caches()
  calls = []
  matmul = pallas_mosaic_gpu.sm90.matmul

  def spy(*args, **kwargs):
    if field == "swiglu":
      calls.append(kwargs.get("swiglu", False))
    else:
      calls.append(getattr(kwargs["config"], field))
    return matmul(*args, **kwargs)

  monkeypatch.setattr(pallas_mosaic_gpu.sm90, "matmul", spy)
  return calls


def check_interpret_against_numpy(
  rng, shape, activation="bf16", weight_layout="natural", **options
):
  """The interpreted MoE of fresh `(tokens, experts, hidden, inter)` inputs,
  top-2 with tile `options`, against the dense numpy loop."""
  experts, src, x, logits = test_base.make_inputs(
    rng, *shape, weight_layout=weight_layout
  )
  out = pallas_mosaic_gpu.nvfp4_moe(
    x,
    logits,
    experts,
    top_k=2,
    activation=activation,
    interpret=True,
    **options,
  )
  want = test_base.numpy_moe(x, logits, src, 2, True, activation)
  tolerance.assert_close(
    out, want, test_base.NVFP4MoETestBase.RTOL, KERNEL_FLOOR
  )


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_interpret_counting_top_k_routes_as_the_sort(rng, scoring, monkeypatch):
  experts, _, x, logits = test_base.make_inputs(rng, 7, 16, 64, 64)
  routing = dict(top_k=3, scoring=scoring)
  if scoring == "sigmoid":  # DeepSeek-V3's grouped routing, three top-ks
    bias = rng.uniform(-0.2, 0.2, 16).astype(np.float32)
    routing.update(
      correction_bias=jnp.asarray(bias), num_groups=4, top_groups=2
    )
  outs = []
  for limit in (1 << 20, 0):
    monkeypatch.setattr(pallas_mosaic_gpu, "COUNTING_TOP_K_MAX", limit)
    jax.clear_caches()  # the switch is read when tracing
    out = pallas_mosaic_gpu.nvfp4_moe(
      x, logits, experts, interpret=True, **routing
    )
    outs.append(np.asarray(out, np.float32))
  assert not np.isnan(outs[0]).any()
  np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_interpret_scales_as_operands_equal_the_factor_table(
  rng, activation, monkeypatch
):
  # Per-expert alpha (and input_scale_inv) read by the epilogue give the
  # same bits as the per-block table XLA used to build.
  experts, _, x, logits = test_base.make_inputs(rng, 6, 4, 128, 128)
  assert "w13_alpha_up" not in experts
  outs = []
  for operands in (True, False):
    monkeypatch.setattr(config_lib, "SCALES_AS_OPERANDS", operands)
    jax.clear_caches()  # the flag is read when tracing
    out = pallas_mosaic_gpu.nvfp4_moe(
      x, logits, experts, top_k=2, activation=activation, interpret=True
    )
    outs.append(np.asarray(out, np.float32))
  assert not np.isnan(outs[0]).any()
  np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_interpret_two_tile_gemm2(rng, monkeypatch, activation):
  # GEMM 2 (N = H = 256) in one output tile of two 128-row weight tiles:
  # each warpgroup's two accumulators, scale tiles and epilogues.
  monkeypatch.setattr(moe_config, "TWO_TILE_GEMM2", True)
  row_tiles = spy_on_matmul(monkeypatch, "row_tiles")
  check_interpret_against_numpy(
    rng,
    (40, 4, 256, 128),
    activation=activation,
    weight_layout="sm90",
    block_m=16,
    persistent=True,
    cta_rows=128,
  )
  assert row_tiles == [1, 2]


# Each token count and activation once (~22 s a case interpreted; the GPU
# test takes both activations at each shape).
@pytest.mark.parametrize("tokens, activation", [(1, "bf16"), (5, "nvfp4")])
def test_interpret_two_block_decode_gemm2(rng, monkeypatch, activation, tokens):
  # Decode's GEMM 2 (N = H = 384: three 128-row tiles) in 64-row CTAs that
  # each take both halves of one tile.
  pair_decode_gemm2(monkeypatch, True)
  row_tiles = spy_on_matmul(monkeypatch, "row_tiles")
  check_interpret_against_numpy(
    rng, (tokens, 4, 384, 128), activation=activation, weight_layout="sm90"
  )
  assert row_tiles == [1, 2]


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_interpret_decode_gemm2_split_for_balance(rng, monkeypatch, activation):
  # One token, top-2: GEMM 2 (N = H = 192) has 3 x 2 one-block CTAs on the
  # interpreter's 4 SMs, a quarter of the second wave idle, so its 2 K
  # steps split in two (SPLIT_FOR_BALANCE, one step a split allowed here;
  # config_test checks that it splits nothing without the rule).
  monkeypatch.setattr(moe_config, "SPLIT_FOR_BALANCE", True)
  monkeypatch.setattr(moe_config, "SPLIT_FOR_BALANCE_MIN_K_STEPS", 1)
  splits = spy_on_matmul(monkeypatch, "splits")
  check_interpret_against_numpy(
    rng, (1, 4, 192, 512), activation=activation, weight_layout="sm90"
  )
  assert splits == [1, 2]


def pair_decode_gemm2(monkeypatch, on: bool) -> None:
  """Decode's GEMM 2 in 64-row CTAs of two blocks wherever they apply (on),
  or nowhere."""
  monkeypatch.setattr(moe_config, "TWO_BLOCK_DECODE_GEMM2", on)
  monkeypatch.setattr(moe_config, "TWO_BLOCK_MORE_SPLITS", on)
  monkeypatch.setattr(moe_config, "TWO_BLOCK_MIN_K_STEPS", 0)
  monkeypatch.setattr(moe_config, "TWO_BLOCK_MIN_CTAS_PER_SM", 0)


def test_interpret_one_token_multiplies_one_shared_tile(rng, monkeypatch):
  # One token's direct tiles: GEMM 1 reads one tile of activation planes
  # (x and zero rows) in every tile, GEMM 2 its own rows.
  jax.clear_caches()
  calls = []
  matmul = pallas_mosaic_gpu.sm90.matmul

  def spy(weight, planes, *args, **kwargs):
    calls.append((kwargs.get("shared_rows", False), planes[0].shape[-2]))
    return matmul(weight, planes, *args, **kwargs)

  monkeypatch.setattr(pallas_mosaic_gpu.sm90, "matmul", spy)
  check_interpret_against_numpy(rng, (1, 4, 128, 128), weight_layout="sm90")
  block_m = moe_config.block_m_for(1, 2, 4)
  assert calls == [(True, block_m), (False, 2 * block_m)]


@pytest.mark.parametrize(
  "persistent, cta_rows, weight_layout",
  [(False, 128, "natural"), (True, 128, "sm90"), (False, 64, "sm90")],
)
def test_interpret_larger_token_tiles(rng, persistent, cta_rows, weight_layout):
  # 16-row tiles, split-K over the 4 interpreter SMs, several tiles per
  # expert; persistent: 4 CTAs walk only the used token tiles; 64-row CTAs
  # of one warpgroup (SwiGLU fused: I = 128). sm90: GEMM 1 writes GEMM 2's
  # activation planes (plane-ordered w13 rows).
  check_interpret_against_numpy(
    rng,
    (40, 4, 256, 128),
    weight_layout=weight_layout,
    block_m=16,
    persistent=persistent,
    cta_rows=cta_rows,
  )


def test_interpret_warp_mma_decode(rng, monkeypatch):
  # 64-row decode CTAs with warp-level mma.sync (config.WARP_MMA_DECODE):
  # SwiGLU fused (two carried accumulators), sm90 layout (GEMM 1 writes
  # GEMM 2's planes). The GPU tier runs one token (direct tiles) as well.
  monkeypatch.setattr(config_lib, "WARP_MMA_DECODE", True)
  calls = spy_on_matmul(monkeypatch, "warp_mma")
  check_interpret_against_numpy(
    rng, (40, 4, 256, 128), weight_layout="sm90", block_m=16, cta_rows=64
  )
  assert calls and all(calls), calls  # both GEMMs took mma.sync


@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("model", [QWEN3_30B, GPT_OSS])  # GPT_OSS: K = 2880
def test_warp_mma_decode_lowers_for_sm90(monkeypatch, model, tokens):
  monkeypatch.setattr(config_lib, "WARP_MMA_DECODE", True)
  lower_moe(model, tokens, False, 64, True)


@pytest.mark.parametrize(
  "activation, weight_layout", [("bf16", "natural"), ("nvfp4", "sm90")]
)
def test_interpret_256_token_tiles(rng, activation, weight_layout):
  # Tiles as wide as the dense prefill's; SwiGLU then runs unfused (its two
  # accumulators would not fit in registers), plane-ordered w13 rows are
  # put back in natural order for it.
  check_interpret_against_numpy(
    rng,
    (300, 2, 128, 128),
    activation=activation,
    weight_layout=weight_layout,
    block_m=256,
  )


def test_interpret_fused_swiglu_in_tiles_wider_than_128(rng, monkeypatch):
  # Group-sized prefill tiles (`block_m_for`): 144 tokens, both accumulators
  # of SwiGLU in one warpgroup, K steps of 128 (the heuristic's).
  calls = spy_on_matmul(monkeypatch, "swiglu")
  check_interpret_against_numpy(rng, (150, 2, 128, 128), block_m=144)
  assert calls == [True, False]


def test_interpret_partial_k_steps(rng, monkeypatch):
  # Steps of 128 over H = 192 and I = 320 (gpt-oss's 2880 likewise): each
  # GEMM's last K step reads zeros past K.
  configs_for = moe_config.configs_for

  def steps_of_128(*args, **kwargs):
    return tuple(
      dataclasses.replace(c, block_k=128) for c in configs_for(*args, **kwargs)
    )

  monkeypatch.setattr(moe_config, "configs_for", steps_of_128)
  check_interpret_against_numpy(rng, (12, 4, 192, 320), block_m=16)


class TestInterpretFusedSwiGLU(test_base.NVFP4MoETestBase):
  """The shared suite with SwiGLU in GEMM 1's epilogue (I % 128 == 0)."""

  FLOOR = KERNEL_FLOOR
  SHAPE = (128, 128)
  SMALL_SHAPE = (64, 128)

  def moe(self, x, logits, experts, **kwargs):
    return pallas_mosaic_gpu.nvfp4_moe(
      x, logits, experts, fused_swiglu=True, interpret=True, **kwargs
    )


_MID_TILE_FACTORS = (
  [(1, False, 64), (9, False, 128), (40, True, 128)],  # grid
  ["natural", "sm90"],  # weight layout
  [False, True],  # unequal gate/up scales
)
# The GPU takes every combination; the CPU interpreter (~16 s a case) a
# pairwise cover.
_MID_TILE_ALL = [
  (*grid, *rest) for grid, *rest in itertools.product(*_MID_TILE_FACTORS)
]
_MID_TILE_PAIRWISE = [
  (*grid, *rest) for grid, *rest in pairwise.cover(*_MID_TILE_FACTORS)
]


@pytest.mark.parametrize(
  "backend, tokens, persistent, cta_rows, weight_layout, unequal_gate_up",
  pairwise.by_backend(_MID_TILE_PAIRWISE, _MID_TILE_ALL),
)
def test_fused_swiglu_with_up_rows_mid_tile(
  rng,
  monkeypatch,
  backend,
  tokens,
  persistent,
  cta_rows,
  weight_layout,
  unequal_gate_up,
):
  # I = 192 (gpt-oss's 2880 likewise): a 128-row tile's up rows start 64
  # rows into a scale tile. The kernel must run SwiGLU fused (spied), and
  # with w13_alpha_up its per-block scales come from the shifted blocks.
  # The sm90 layout unpadded (padded I is test_padded_intermediate's).
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", False)
  monkeypatch.setattr(moe_config, "FUSED_SWIGLU_MID_TILE", True)
  monkeypatch.setattr(moe_config, "MID_TILE_MIN_CTA_ROWS", 64)
  calls = spy_on_matmul(monkeypatch, "swiglu")
  experts, src, x, logits = test_base.make_inputs(
    rng,
    tokens,
    4,
    128,
    192,
    weight_layout=weight_layout,
    unequal_gate_up=unequal_gate_up,
  )
  assert ("w13_alpha_up" in experts) == unequal_gate_up
  assert experts["w13_block_scale"].shape[1] == 384  # I stays 192
  out = pallas_mosaic_gpu.nvfp4_moe(
    x,
    logits,
    experts,
    top_k=2,
    fused_swiglu=True,
    persistent=persistent,
    cta_rows=cta_rows,
    block_m=16 if tokens > 1 else None,
    interpret=backend == "cpu",
  )
  assert calls == [True, False]
  want = test_base.numpy_moe(x, logits, src, 2, True, "bf16")
  tolerance.assert_close(
    out, want, test_base.NVFP4MoETestBase.RTOL, KERNEL_FLOOR
  )


@pytest.mark.parametrize(
  "activation, tokens", [("bf16", 1), ("bf16", 40), ("nvfp4", 40)]
)
@pytest.mark.parametrize(
  "backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]
)
def test_padded_intermediate(rng, monkeypatch, backend, activation, tokens):
  # transform.PAD_INTERMEDIATE_TO_TILES: I = 192 prepared as 256 with zero
  # rows and columns, so w13 takes the plane order and GEMM 1 (fused, W4A16)
  # writes GEMM 2's planes; the outputs are the unpadded experts'.
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", True)
  experts, src, x, logits = test_base.make_inputs(
    rng, tokens, 4, 128, 192, weight_layout="sm90"
  )
  assert experts["w13_weight_sm90_planes"].shape == (4, 512, 64)
  out = pallas_mosaic_gpu.nvfp4_moe(
    x,
    logits,
    experts,
    top_k=2,
    activation=activation,
    interpret=backend == "cpu",
  )
  want = test_base.numpy_moe(x, logits, src, 2, True, activation)
  tolerance.assert_close(
    out, want, test_base.NVFP4MoETestBase.RTOL, KERNEL_FLOOR
  )


@pytest.mark.parametrize("cta_rows, fused", [(64, False), (128, True)])
def test_mid_tile_swiglu_fuses_only_in_128_row_ctas(
  rng, monkeypatch, cta_rows, fused
):
  # The default policy (FUSED_SWIGLU_MID_TILE, MID_TILE_MIN_CTA_ROWS): with
  # I % 128 == 64, 64-row decode CTAs were slower fused on the H200.
  calls = spy_on_matmul(monkeypatch, "swiglu")
  experts, src, x, logits = test_base.make_inputs(rng, 3, 4, 128, 192)
  out = pallas_mosaic_gpu.nvfp4_moe(
    x, logits, experts, top_k=2, cta_rows=cta_rows, interpret=True
  )
  assert calls == [fused, False]
  want = test_base.numpy_moe(x, logits, src, 2, True, "bf16")
  tolerance.assert_close(
    out, want, test_base.NVFP4MoETestBase.RTOL, KERNEL_FLOOR
  )


def test_experts_forward_sizes_tiles_for_the_routed_experts(rng, monkeypatch):
  # Expert parallelism: a node of 4 of the router's 64 experts sees all 40 x
  # 8 pairs, of which ~1/16 stay: groups of ~5 rows, not the 80 that 4
  # experts holding every pair would have.
  experts, _ = test_base.make_experts(rng, 4, 128, 128)
  x = jnp.zeros((40, 128), jnp.bfloat16)
  weights = jnp.zeros((40, 8), jnp.float32)
  ids = jnp.zeros((40, 8), jnp.int32)
  for routed, want in ((None, 104), (64, 8)):
    calls = spy_on_matmul(monkeypatch, "block_m")
    jax.eval_shape(  # traces the kernels, runs nothing
      functools.partial(
        pallas_mosaic_gpu.experts_forward,
        routed_experts=routed,
        interpret=True,
      ),
      x,
      weights,
      ids,
      experts,
    )
    assert calls == [want, want]
  with pytest.raises(ValueError, match="routed_experts=3 must be"):
    pallas_mosaic_gpu.experts_forward(
      x, weights, ids, experts, routed_experts=3, interpret=True
    )
  with pytest.raises(ValueError, match="routed_experts=3 must be"):
    base.reference_experts(x, weights, ids, experts, routed_experts=3)


@pytest.mark.parametrize("fused_swiglu", [False, True])
def test_interpret_experts_forward_drops_foreign_ids(rng, fused_swiglu):
  # Expert parallelism hands each device ids of experts it does not hold
  # (here -1 and 9 for a node of 4 experts): they contribute nothing.
  experts, _ = test_base.make_experts(rng, 4, 128, 128)
  x = jnp.asarray(rng.standard_normal((10, 128)), jnp.bfloat16)
  ids = rng.integers(-1, 6, (10, 3)).astype(np.int32)
  ids[0] = [9, -1, 7]  # a token with no local expert
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (10, 3)), jnp.float32)
  got = pallas_mosaic_gpu.experts_forward(
    x,
    weights,
    jnp.asarray(ids),
    experts,
    fused_swiglu=fused_swiglu,
    interpret=True,
  )
  want = base.reference_experts(x, weights, jnp.asarray(ids), experts)
  assert got.dtype == jnp.float32 and not np.asarray(got[0]).any()
  tolerance.assert_close(
    got,
    np.asarray(want, np.float64),
    test_base.NVFP4MoETestBase.RTOL,
    KERNEL_FLOOR,
  )


def test_shapes_it_does_not_tile_fall_through(rng):
  experts, _ = test_base.make_experts(rng, 4, 64, 32)
  x = jnp.ones((2, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="multiples of 64"):
    pallas_mosaic_gpu.nvfp4_moe(
      x, jnp.ones((2, 4)), experts, top_k=2, interpret=True
    )
  # The dispatcher then runs the reference.
  out = pallas_kernels.nvfp4_moe(x, jnp.ones((2, 4)), experts, top_k=2)
  assert out.shape == (2, 64)


def test_named_pallas_without_a_gpu_says_why(rng):
  experts, _ = test_base.make_experts(rng, 4, 128, 64)
  x = jnp.ones((2, 128), jnp.bfloat16)
  if conftest.has_gpu():
    out = pallas_kernels.nvfp4_moe(
      x, jnp.ones((2, 4)), experts, top_k=2, implementation="pallas"
    )
    assert out.shape == (2, 128)
  else:
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
      pallas_kernels.nvfp4_moe(
        x, jnp.ones((2, 4)), experts, top_k=2, implementation="pallas"
      )


def abstract_experts(n_experts, hidden, inter):
  def stack(n, k):
    return {
      "weight": jax.ShapeDtypeStruct((n_experts, n, k // 2), jnp.uint8),
      "block_scale": jax.ShapeDtypeStruct(
        (n_experts, -(-n // 128) * 128, -(-(k // 16) // 4) * 4),
        jnp.float8_e4m3fn,
      ),
      "alpha": jax.ShapeDtypeStruct((n_experts,), jnp.float32),
      "input_scale_inv": jax.ShapeDtypeStruct((n_experts,), jnp.float32),
    }

  node = {}
  for prefix, (n, k) in (
    ("w13_", (2 * inter, hidden)),
    ("w2_", (hidden, inter)),
  ):
    node.update({prefix + key: v for key, v in stack(n, k).items()})
  return node


@pytest.mark.parametrize("model", [QWEN3_30B, GPT_OSS])
def test_group_sized_tiles_lower_for_sm90(model):
  # 1024 tokens: 80-row tiles (Qwen3-30B-A3B), 48 (gpt-oss-120b); 4096
  # (144, 152) are in test_lowers_for_sm90.
  for config in lower_moe_configs(model, 1024):
    assert config.cta_rows == 128 and config.persistent
  lower_moe(model, 1024, True, None, True)


def lower_moe_configs(model, tokens):
  n_experts, top_k, hidden, inter = model
  plan = config_test.plan_for(tokens, top_k, n_experts)
  return moe_config.configs_for(plan, hidden, inter, 132)


_MODELS = {
  "qwen3_30b": QWEN3_30B,
  "deepseek_v3": DEEPSEEK_V3,
  "mixtral": MIXTRAL,
  "gpt_oss": GPT_OSS,
}
_LOWERING_FACTORS = (
  list(_MODELS),
  [1, 16, 4096],
  [(False, 128), (True, 128), (False, 64)],  # (persistent, cta_rows)
  [False, True],  # fused SwiGLU
)


def _flat_ctas(rows):
  return [
    (model, tokens, *ctas, swiglu) for model, tokens, ctas, swiglu in rows
  ]


@pytest.mark.parametrize(
  "backend, model, tokens, persistent, cta_rows, swiglu",
  # Lowering takes ~1.5 s a case on CPU: a pairwise cover there (12 of 72);
  # the GPU runners lower them all.
  pairwise.by_backend(
    _flat_ctas(pairwise.cover(*_LOWERING_FACTORS)),
    _flat_ctas(itertools.product(*_LOWERING_FACTORS)),
  ),
)
def test_lowers_for_sm90(backend, model, tokens, persistent, cta_rows, swiglu):
  del backend  # lowering for sm_90 is the same on either host
  lower_moe(_MODELS[model], tokens, persistent, cta_rows, swiglu)


@pytest.mark.parametrize("tokens", [1, 16, 4096])
def test_gpt_oss_in_partial_k_steps_lowers_for_sm90(monkeypatch, tokens):
  monkeypatch.setattr(config_lib, "RAGGED_K_STEPS", True)
  plan = config_test.plan_for(tokens, 4, 128)
  for config in moe_config.configs_for(plan, 2880, 2880, 132):
    # 11.25 steps in decode tiles, 22.5 in 128-token tiles
    assert config.block_k == (256 if plan.block_m <= 64 else 128)
  lower_moe(GPT_OSS, tokens, True, None, False)


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("model", [QWEN3_30B, DEEPSEEK_V3, MIXTRAL])
def test_256_token_tiles_lower_for_sm90(model, persistent, activation):
  # Lowering checks that GEMM 2's four stages fit in shared memory.
  lower_moe(model, 16384, persistent, 128, False, 256, activation)


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("tokens", [1, 16, 4096])
def test_gpt_oss_with_padded_intermediate_lowers_for_sm90(tokens, swiglu):
  # transform.PAD_INTERMEDIATE_TO_TILES: I = 2880 stored as 2944.
  n_experts, top_k, hidden, _ = GPT_OSS
  lower_moe((n_experts, top_k, hidden, 2944), tokens, True, None, swiglu)


@pytest.mark.parametrize(
  "model, swiglu, remainder_rows",
  [
    *[
      (m, s, 64)
      for m in (QWEN3_30B, DEEPSEEK_V3, GPT_OSS)
      for s in (False, True)
    ],
    (QWEN3_30B, True, 16),
    (GPT_OSS, True, 16),
  ],
)
def test_remainder_tiles_lower_for_sm90(
  monkeypatch, model, swiglu, remainder_rows
):
  monkeypatch.setattr(moe_config, "REMAINDER_ROWS", remainder_rows)
  lower_moe(model, 4096, True, None, swiglu, remainder=True)


@pytest.mark.parametrize("model", [QWEN3_30B, DEEPSEEK_V3, MIXTRAL, GPT_OSS])
def test_two_tile_gemm2_lowers_for_sm90(monkeypatch, model):
  monkeypatch.setattr(moe_config, "TWO_TILE_GEMM2", True)
  gemm1, gemm2 = lower_moe_configs(model, 4096)
  assert gemm1.row_tiles == 1
  # gpt-oss-120b's H = 2880 is 23 weight tiles: no pairs of them.
  assert gemm2.row_tiles == (1 if model == GPT_OSS else 2)
  lower_moe(model, 4096, True, None, True)


@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("model", [QWEN3_30B, DEEPSEEK_V3, MIXTRAL, GPT_OSS])
def test_two_block_decode_gemm2_lowers_for_sm90(monkeypatch, model, tokens):
  pair_decode_gemm2(monkeypatch, True)
  gemm1, gemm2 = lower_moe_configs(model, tokens)
  assert (gemm1.row_tiles, gemm2.row_tiles) == (1, 2)
  lower_moe(model, tokens, False, None, model != GPT_OSS)


@pytest.mark.parametrize("tokens", [1, 16])
def test_decode_counts_no_used_tiles(tokens):
  # Decode CTAs are not persistent and never read the count of used tiles:
  # no XLA reduction of the tiles' experts (one dimension) makes it. (At
  # one token the combine's sum over top-k is the only reduction outside
  # the kernels.)
  traced = trace_moe(DEEPSEEK_V3, tokens, False, None, True, routed=True)
  sums = [
    eqn.invars[0].aval.ndim
    for eqn in jaxpr_eqns(traced.jaxpr.jaxpr)
    if eqn.primitive.name == "reduce_sum"
  ]
  assert 1 not in sums
  if tokens == 1:
    assert sums == [3]


def jaxpr_eqns(jaxpr):
  """The equations of `jaxpr` and the jaxprs nested in it, kernels' bodies
  excluded."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name == "pallas_call":
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from jaxpr_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from jaxpr_eqns(sub)


def lower_moe(*args, **kwargs):
  trace_moe(*args, **kwargs).lower(lowering_platforms=("cuda",))


def trace_moe(
  model,
  tokens,
  persistent,
  cta_rows,
  swiglu,
  block_m=None,
  activation="bf16",
  remainder=False,
  routed=False,
):
  """The MoE layer's `_forward` on these tiles, traced for abstract
  experts (what `_forward_fn` would plan, but with the given tiles);
  `routed`: of given routing weights and ids, not from logits."""
  n_experts, top_k, hidden, inter = model
  experts = abstract_experts(n_experts, hidden, inter)
  x = jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16)
  logits = jax.ShapeDtypeStruct((tokens, n_experts), jnp.float32)
  plan = moe_config.Plan(
    tokens=tokens,
    top_k=top_k,
    experts=n_experts,
    block_m=block_m or moe_config.block_m_for(tokens, top_k, n_experts),
  )
  configs = moe_config.configs_for(
    plan,
    hidden,
    inter,
    num_sms=132,
    persistent=persistent,
    cta_rows=cta_rows,
  )
  remainder_configs = None
  if remainder:  # as _forward_fn plans them
    rows = moe_config.REMAINDER_ROWS
    plan = dataclasses.replace(plan, remainder_m=rows)
    remainder_configs = moe_config.configs_for(
      dataclasses.replace(plan, block_m=rows, remainder_m=0),
      hidden,
      inter,
      num_sms=132,
      persistent=persistent,
    )
  if swiglu:  # gpt-oss (I = 2880): up rows start mid-tile
    configs = (dataclasses.replace(configs[0], splits=1), configs[1])
    if remainder:
      remainder_configs = (
        dataclasses.replace(remainder_configs[0], splits=1),
        remainder_configs[1],
      )

  def f(x, logits, experts):
    if routed:
      weights, ids = logits
    else:
      weights, ids = base.route(logits, top_k=top_k)
    return pallas_mosaic_gpu._forward(
      x,
      weights,
      ids,
      experts,
      plan=plan,
      configs=configs,
      activation=activation,
      swiglu=swiglu,
      direct=tokens == 1 and not any(c.persistent for c in configs),
      interpret=False,
      remainder_configs=remainder_configs,
    )

  if routed:
    logits = (
      jax.ShapeDtypeStruct((tokens, top_k), jnp.float32),
      jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
    )
  return jax.jit(f).trace(x, logits, experts)


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("model", [QWEN3_30B, GPT_OSS])
def test_async_waits_cover_all_but_the_last_part(model, tokens, swiglu):
  # The decode CTAs' async wgmmas, with SwiGLU's two accumulators too
  # (the row-pair race, in the matmul's tests).
  traced = trace_moe(model, tokens, False, None, swiglu)
  jaxpr_checks.assert_waits_leave_only_the_last_part(traced.jaxpr.jaxpr)


@pytest.mark.gpu
class TestOnGPU(test_base.NVFP4MoETestBase):
  """The shared suite on the H200, then real expert shapes."""

  IMPLEMENTATION = "pallas"
  FLOOR = KERNEL_FLOOR
  SHAPE = (256, 128)
  SMALL_SHAPE = (128, 64)

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize("tokens", [1, 16, 300])
  def test_qwen3_sized_experts(self, rng, tokens, activation):
    # Qwen3-30B-A3B's hidden and intermediate sizes with 16 experts.
    experts, _, x, logits = test_base.make_inputs(rng, tokens, 16, 2048, 768)
    out = self.moe(x, logits, experts, top_k=8, activation=activation)
    # The reference, itself checked against the numpy loop at small shapes
    # (a float64 loop over 2400 expert GEMMs would take minutes).
    want = pallas_kernels.nvfp4_moe(
      x, logits, experts, top_k=8, activation=activation, implementation="xla"
    )
    self.check(out, want.astype(jnp.float32))

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize("tokens", [1, 16])
  def test_warp_mma_decode(self, rng, monkeypatch, tokens, activation):
    # Qwen3-30B-A3B's shapes through 64-row decode CTAs with warp-level
    # mma.sync (config.WARP_MMA_DECODE), SwiGLU fused.
    monkeypatch.setattr(config_lib, "WARP_MMA_DECODE", True)
    calls = spy_on_matmul(monkeypatch, "warp_mma")  # clears jit caches
    experts, _, x, logits = test_base.make_inputs(rng, tokens, 16, 2048, 768)
    out = self.moe(x, logits, experts, top_k=8, activation=activation)
    assert calls and all(calls), calls
    want = pallas_kernels.nvfp4_moe(
      x, logits, experts, top_k=8, activation=activation, implementation="xla"
    )
    self.check(out, want.astype(jnp.float32))

  @pytest.mark.parametrize("tokens", [1, 64, 700])
  @pytest.mark.parametrize("mid_tile", [False, True])
  def test_gpt_oss_sized_experts(self, rng, monkeypatch, tokens, mid_tile):
    # H = I = 2880: K steps of 128 that do not divide K; SwiGLU fused with
    # the up rows mid-tile (FUSED_SWIGLU_MID_TILE), or unfused.
    monkeypatch.setattr(moe_config, "FUSED_SWIGLU_MID_TILE", mid_tile)
    monkeypatch.setattr(moe_config, "MID_TILE_MIN_CTA_ROWS", 64)
    experts, _, x, logits = test_base.make_inputs(rng, tokens, 8, 2880, 2880)
    out = self.moe(x, logits, experts, top_k=4)
    want = pallas_kernels.nvfp4_moe(
      x, logits, experts, top_k=4, implementation="xla"
    )
    self.check(out, want.astype(jnp.float32))

  @pytest.mark.parametrize("remainder_rows", [64, 16])
  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize("inter", [1024, 2880])
  def test_remainder_tiles(
    self, rng, monkeypatch, inter, activation, remainder_rows
  ):
    # 16 experts, top-4 of 600 tokens: groups of ~150 rows, a 128-row tile
    # each (the remainder plan's; the heuristic would size tiles to the
    # groups) and the rest, where it fits, in remainder tiles (spied, so
    # traced anew; 16-row ones run in 64-row decode CTAs).
    monkeypatch.setattr(moe_config, "REMAINDER_TILES", True)
    monkeypatch.setattr(moe_config, "REMAINDER_ROWS", remainder_rows)
    monkeypatch.setattr(moe_config, "GROUP_TILE_MIN_MEAN", 1 << 30)
    calls = spy_on_matmul(monkeypatch, "block_m")
    experts, _, x, logits = test_base.make_inputs(rng, 600, 16, 1024, inter)
    out = self.moe(x, logits, experts, top_k=4, activation=activation)
    assert calls == [128, 128, remainder_rows, remainder_rows]
    want = pallas_kernels.nvfp4_moe(
      x, logits, experts, top_k=4, activation=activation, implementation="xla"
    )
    self.check(out, want.astype(jnp.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_256_token_tiles_on_gpu(rng, activation, persistent):
  # Qwen3-30B-A3B's expert sizes, 16 experts: groups of ~512 rows.
  experts, _, x, logits = test_base.make_inputs(rng, 1024, 16, 2048, 768)
  out = pallas_mosaic_gpu.nvfp4_moe(
    x,
    logits,
    experts,
    top_k=8,
    activation=activation,
    block_m=256,
    persistent=persistent,
  )
  want = pallas_kernels.nvfp4_moe(
    x, logits, experts, top_k=8, activation=activation, implementation="xla"
  )
  tolerance.assert_close(
    out, want.astype(jnp.float32), TestOnGPU.RTOL, KERNEL_FLOOR
  )


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize(
  "tokens, n_experts, top_k, hidden, inter, block_m",
  [
    (512, 16, 8, 2048, 768, 144),  # Qwen3-30B-A3B's experts, groups ~256
    (256, 8, 4, 2880, 2880, 152),  # gpt-oss-120b's (up rows mid-tile)
  ],
)
def test_group_sized_tiles_on_gpu(
  rng, monkeypatch, activation, tokens, n_experts, top_k, hidden, inter, block_m
):
  calls = spy_on_matmul(monkeypatch, "block_m")
  experts, _, x, logits = test_base.make_inputs(
    rng, tokens, n_experts, hidden, inter
  )
  out = pallas_mosaic_gpu.nvfp4_moe(
    x, logits, experts, top_k=top_k, activation=activation
  )
  assert calls == [block_m, block_m]  # the heuristic's, fused or not
  want = pallas_kernels.nvfp4_moe(
    x, logits, experts, top_k=top_k, activation=activation, implementation="xla"
  )
  tolerance.assert_close(
    out, want.astype(jnp.float32), TestOnGPU.RTOL, KERNEL_FLOOR
  )


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize(
  "tokens, n_experts, top_k, hidden, inter",
  [
    (512, 16, 8, 2048, 768),  # Qwen3-30B-A3B's experts
    (300, 16, 8, 7168, 2048),  # DeepSeek-V3's, groups of ~150 rows
  ],
)
def test_two_tile_gemm2_on_gpu(
  rng, monkeypatch, activation, tokens, n_experts, top_k, hidden, inter
):
  # Each 64-row block's K steps and MMAs are those of one-tile outputs:
  # the same numbers, bit for bit, and the reference's.
  check_gemm2_two_ways(
    rng,
    monkeypatch,
    lambda on: monkeypatch.setattr(moe_config, "TWO_TILE_GEMM2", on),
    activation,
    (tokens, n_experts, hidden, inter),
    top_k,
  )


def check_gemm2_two_ways(rng, monkeypatch, two_tiles, activation, shape, top_k):
  """The MoE of fresh `(tokens, experts, hidden, inter)` inputs with GEMM 2
  in one and in two row tiles a warpgroup (`two_tiles(on)` switches):
  equal bit for bit, and to the reference."""
  experts, _, x, logits = test_base.make_inputs(rng, *shape)
  outs = {}
  for on in (False, True):
    two_tiles(on)
    row_tiles = spy_on_matmul(monkeypatch, "row_tiles")
    outs[on] = np.asarray(
      pallas_mosaic_gpu.nvfp4_moe(
        x, logits, experts, top_k=top_k, activation=activation
      ),
      np.float32,
    )
    assert row_tiles == [1, 2 if on else 1]
  want = pallas_kernels.nvfp4_moe(
    x, logits, experts, top_k=top_k, activation=activation, implementation="xla"
  )
  tolerance.assert_close(
    outs[True], want.astype(jnp.float32), TestOnGPU.RTOL, KERNEL_FLOOR
  )
  np.testing.assert_array_equal(outs[True], outs[False])


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize(
  "tokens, n_experts, top_k, hidden, inter",
  [
    (1, 16, 8, 7168, 2048),  # DeepSeek-V3's experts
    (16, 16, 8, 7168, 2048),
    (16, 32, 8, 2048, 768),  # Qwen3-30B-A3B's
    (1, 2, 2, 4096, 14336),  # Mixtral-8x7B's (two): GEMM 2 splits K
  ],
)
def test_two_block_decode_gemm2_on_gpu(
  rng, monkeypatch, activation, tokens, n_experts, top_k, hidden, inter
):
  # Each 64-row block's K steps and MMAs are those of a one-block CTA: the
  # same numbers, bit for bit, and the reference's.
  check_gemm2_two_ways(
    rng,
    monkeypatch,
    functools.partial(pair_decode_gemm2, monkeypatch),
    activation,
    (tokens, n_experts, hidden, inter),
    top_k,
  )


def check_decode_gemm2_rule_on_gpu(
  rng, monkeypatch, switch, shape, top_k, activation, gemm2
):
  """Fresh inputs at one token (`shape`: experts, hidden, inter) with
  `moe_config`'s `switch` on and off: decode's GEMM 2 in `gemm2[on]` (row
  tiles, K splits), and the reference's numbers both ways (split sums add
  in another order, so not each other's bits)."""
  experts, _, x, logits = test_base.make_inputs(rng, 1, *shape)
  want = pallas_kernels.nvfp4_moe(
    x, logits, experts, top_k=top_k, activation=activation, implementation="xla"
  )
  for on in (True, False):
    monkeypatch.setattr(moe_config, switch, on)
    row_tiles = spy_on_matmul(monkeypatch, "row_tiles")
    splits = spy_on_matmul(monkeypatch, "splits")
    got = pallas_mosaic_gpu.nvfp4_moe(
      x, logits, experts, top_k=top_k, activation=activation
    )
    assert (row_tiles[-1], splits[-1]) == gemm2[on]
    tolerance.assert_close(
      np.asarray(got, np.float32),
      want.astype(jnp.float32),
      TestOnGPU.RTOL,
      KERNEL_FLOOR,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize("n_experts", [2, 8])
def test_two_blocks_in_more_splits_on_gpu(
  rng, monkeypatch, activation, n_experts
):
  # Mixtral-8x7B's experts at one token: GEMM 2 in two-block CTAs of 4 K
  # splits (TWO_BLOCK_MORE_SPLITS) where one-block CTAs take 2.
  check_decode_gemm2_rule_on_gpu(
    rng,
    monkeypatch,
    "TWO_BLOCK_MORE_SPLITS",
    (n_experts, 4096, 14336),
    2,
    activation,
    {True: (2, 4), False: (1, 2)},
  )


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_decode_gemm2_split_for_balance_on_gpu(rng, monkeypatch, activation):
  # gpt-oss-120b's experts at one token (12 K steps): GEMM 2's 45 x 4
  # one-block CTAs in two K splits (SPLIT_FOR_BALANCE) or one.
  check_decode_gemm2_rule_on_gpu(
    rng,
    monkeypatch,
    "SPLIT_FOR_BALANCE",
    (8, 2880, 2880),
    4,
    activation,
    {True: (1, 2), False: (1, 1)},
  )


@pytest.mark.gpu
class TestOnGPUUnfusedSwiGLU(TestOnGPU):
  """The GPU suite again with SwiGLU as its own XLA kernel (the default
  fuses it into GEMM 1 where I % 128 == 0 and activations are bf16)."""

  SHAPE = (256, 128)
  SMALL_SHAPE = (128, 128)

  def moe(self, x, logits, experts, **kwargs):
    return pallas_mosaic_gpu.nvfp4_moe(
      x, logits, experts, fused_swiglu=False, **kwargs
    )

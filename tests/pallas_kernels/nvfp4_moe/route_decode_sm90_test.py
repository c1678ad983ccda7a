"""Decode routing and placement in one kernel equal XLA's, and so does
the same kernel's routing alone at any number of tokens.

The kernel is inline Mosaic GPU code: the CPU tier checks its bounds and
that it lowers for sm_90, alone and in the MoE; the GPU tier checks its
experts, rows and tiles exactly and its weights to float32 rounding
against `base.route` and `count_by_expert`, then the MoE through it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.nvfp4_moe import base
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu
from pallas_kernels.nvfp4_moe import placement
from pallas_kernels.nvfp4_moe import route_decode_sm90
from tests.pallas_kernels.nvfp4_moe import config_test
from tests.pallas_kernels.nvfp4_moe import pallas_mosaic_gpu_test
from tests.pallas_kernels.nvfp4_moe import test_base

# (tokens, experts, top_k): Qwen3-30B-A3B, Mixtral-8x7B, gpt-oss-120b at 16
# tokens, odd sizes, and one token (direct tiles: no placement).
CASES = [(16, 128, 8), (16, 8, 2), (16, 128, 4), (5, 40, 3), (1, 128, 8)]


def use_redux(monkeypatch, on: bool) -> None:
  """Top-k rounds by warp reductions (`REDUX_TOP_K`) or by shuffles."""
  monkeypatch.setattr(route_decode_sm90, "REDUX_TOP_K", on)
  jax.clear_caches()  # the switch is no jit key


def _route_and_place(logits, top_k):
  tokens, experts = logits.shape
  plan = config_test.plan_for(tokens, top_k, experts)
  return route_decode_sm90.route_and_place(
    logits,
    top_k,
    block_m=plan.block_m,
    max_tiles=plan.max_tiles,
    place=tokens > 1,
  )


def test_routes_alone_at_any_size():
  assert route_decode_sm90.supports(16384, 128, 8, place=False)
  assert route_decode_sm90.supports(17, 8, 2, place=False)
  assert not route_decode_sm90.supports(4096, 512, 8, place=False)
  assert not route_decode_sm90.supports(4096, 8, 9, place=False)
  with pytest.raises(ValueError, match="with placement"):
    route_decode_sm90.route_and_place(
      jnp.zeros((17, 8)), 2, block_m=8, max_tiles=8
    )
  with pytest.raises(ValueError, match="block_m and max_tiles"):
    route_decode_sm90.route_and_place(jnp.zeros((16, 8)), 2)


@pytest.mark.parametrize(
  "tokens, hidden, dtype, place",
  [
    (2, 64, jnp.bfloat16, False),  # two tokens
    (1, 48, jnp.bfloat16, False),  # H not a multiple of 32
    (1, 64, jnp.float32, False),
    (1, 64, jnp.bfloat16, True),  # with the placement
  ],
)
def test_row_planes_take_one_bf16_token(tokens, hidden, dtype, place):
  with pytest.raises(ValueError, match="one token's bf16 row"):
    route_decode_sm90.route_and_place(
      jnp.zeros((tokens, 8)),
      2,
      block_m=8,
      max_tiles=2,
      place=place,
      x=jnp.zeros((tokens, hidden), dtype),
    )


@pytest.mark.parametrize(
  "experts, top_k, hidden", [(256, 8, 7168), (8, 2, 4096)]
)
def test_routing_with_row_planes_lowers_for_sm90(experts, top_k, hidden):
  logits = jax.ShapeDtypeStruct((1, experts), jnp.float32)
  x = jax.ShapeDtypeStruct((1, hidden), jnp.bfloat16)

  def route(logits, x):
    return route_decode_sm90.route_and_place(logits, top_k, place=False, x=x)

  traced = jax.jit(route).trace(logits, x)
  assert traced.out_info[2].shape == (2, 8, hidden // 2)
  lowered = traced.lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("stablehlo.custom_call") == 1


# (tokens, experts, top_k): Qwen3-30B-A3B and Mixtral-8x7B prefills, and a
# last CTA of one token.
ROUTING_CASES = [(4096, 128, 8), (4096, 8, 2), (33, 40, 3)]


@pytest.mark.parametrize("tokens, experts, top_k", ROUTING_CASES)
@pytest.mark.parametrize("redux", [False, True])
def test_routing_alone_lowers_for_sm90(
  tokens, experts, top_k, monkeypatch, redux
):
  use_redux(monkeypatch, redux)
  logits = jax.ShapeDtypeStruct((tokens, experts), jnp.float32)
  lowered = (
    jax.jit(lambda x: route_decode_sm90.route_and_place(x, top_k, place=False))
    .trace(logits)
    .lower(lowering_platforms=("cuda",))
  )
  assert lowered.as_text().count("stablehlo.custom_call") == 1


def qwen3_prefill_texts(monkeypatch, switch: str) -> dict:
  """{on: StableHLO text} of Qwen3-30B-A3B's MoE at 4096 tokens lowered for
  sm_90 with `pallas_mosaic_gpu.<switch>` off and on."""
  monkeypatch.setattr(pallas_mosaic_gpu.common, "check_sm90", lambda *_: None)
  experts = pallas_mosaic_gpu_test.abstract_experts(128, 2048, 768)
  x = jax.ShapeDtypeStruct((4096, 2048), jnp.bfloat16)
  logits = jax.ShapeDtypeStruct((4096, 128), jnp.float32)

  def moe(x, logits, experts, on):
    monkeypatch.setattr(pallas_mosaic_gpu, switch, on)
    jax.clear_caches()
    return pallas_mosaic_gpu.nvfp4_moe(x, logits, experts, top_k=8)

  return {
    on: jax.jit(functools.partial(moe, on=on))
    .trace(x, logits, experts)
    .lower(lowering_platforms=("cuda",))
    .as_text()
    for on in (False, True)
  }


def test_prefill_moe_lowers_through_the_routing(monkeypatch):
  # XLA places the pairs (place_prefill_sm90_test: the placement kernel).
  monkeypatch.setattr(pallas_mosaic_gpu, "PREFILL_PLACEMENT_KERNEL", False)
  texts = qwen3_prefill_texts(monkeypatch, "PREFILL_ROUTING_KERNEL")
  # The routing kernel, the row gather and the two expert GEMMs; XLA's
  # top-k only without the kernel.
  assert texts[True].count("stablehlo.custom_call") == 4
  assert texts[False].count("stablehlo.custom_call") == 3
  assert "chlo.top_k" in texts[False]
  assert "chlo.top_k" not in texts[True]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, experts, top_k", ROUTING_CASES)
@pytest.mark.parametrize("redux", [False, True])
def test_routing_alone_equals_xla(
  rng, tokens, experts, top_k, dtype, monkeypatch, redux
):
  use_redux(monkeypatch, redux)
  logits = _logits(rng, tokens, experts, dtype)
  weights, ids = jax.jit(
    lambda x: route_decode_sm90.route_and_place(x, top_k, place=False)
  )(logits)
  want_weights, want_ids = jax.jit(lambda x: base.route(x, top_k=top_k))(logits)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(
    np.asarray(weights), np.asarray(want_weights), rtol=2e-6, atol=1e-7
  )


def test_supports_decode_sizes_only():
  assert route_decode_sm90.supports(16, 128, 8)
  assert route_decode_sm90.supports(1, 8, 2)
  assert not route_decode_sm90.supports(17, 128, 8)  # one warp a token
  assert not route_decode_sm90.supports(16, 512, 8)  # 8 logits a lane
  assert not route_decode_sm90.supports(4, 4, 5)  # top_k > experts
  with pytest.raises(ValueError, match="route_and_place"):
    route_decode_sm90.route_and_place(
      jnp.zeros((32, 8)), 2, block_m=8, max_tiles=16
    )
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    route_decode_sm90.route_and_place(
      jnp.zeros((2, 8), jnp.float16), 2, block_m=8, max_tiles=4
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, experts, top_k", CASES)
@pytest.mark.parametrize("redux", [False, True])
def test_lowers_for_sm90(tokens, experts, top_k, dtype, monkeypatch, redux):
  use_redux(monkeypatch, redux)
  logits = jax.ShapeDtypeStruct((tokens, experts), dtype)
  lowered = (
    jax.jit(lambda x: _route_and_place(x, top_k))
    .trace(logits)
    .lower(lowering_platforms=("cuda",))
  )
  assert lowered.as_text().count("stablehlo.custom_call") == 1


@pytest.mark.parametrize("tokens", [1, 16])
def test_moe_lowers_through_it(monkeypatch, tokens):
  monkeypatch.setattr(pallas_mosaic_gpu, "DECODE_ROUTING_KERNEL", True)
  # Lowering for sm_90 needs no GPU; the backend's device check would stop it.
  monkeypatch.setattr(pallas_mosaic_gpu.common, "check_sm90", lambda *_: None)
  n_experts, top_k, hidden, inter = 128, 8, 2048, 768  # Qwen3-30B-A3B
  experts = {}
  for prefix, (n, k) in (
    ("w13_", (2 * inter, hidden)),
    ("w2_", (hidden, inter)),
  ):
    experts[prefix + "weight_sm90"] = jax.ShapeDtypeStruct(
      (n_experts, n, k // 2), jnp.uint8
    )
    experts[prefix + "block_scale"] = jax.ShapeDtypeStruct(
      (n_experts, n, k // 16), jnp.float8_e4m3fn
    )
    for key in ("alpha", "input_scale_inv"):
      experts[prefix + key] = jax.ShapeDtypeStruct((n_experts,), jnp.float32)
  x = jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16)
  logits = jax.ShapeDtypeStruct((tokens, n_experts), jnp.float32)

  def moe(x, logits, experts):
    return pallas_mosaic_gpu.nvfp4_moe(x, logits, experts, top_k=top_k)

  texts = {}
  for split in (False, True):
    monkeypatch.setattr(pallas_mosaic_gpu, "SPLIT_IN_DECODE_ROUTING", split)
    jax.clear_caches()  # the switch is no jit key
    lowered = jax.jit(moe).trace(x, logits, experts)
    texts[split] = lowered.lower(lowering_platforms=("cuda",)).as_text()
  # The routing kernel and the two expert GEMMs; at one token the routing
  # kernel also splits the row: one XLA transpose fewer before GEMM 1.
  assert texts[True].count("stablehlo.custom_call") == 3
  transposes = {
    k: text.count("stablehlo.transpose") for k, text in texts.items()
  }
  assert transposes[True] == transposes[False] - (tokens == 1)


def _logits(rng, tokens, experts, dtype):
  logits = rng.standard_normal((tokens, experts)).astype(np.float32)
  logits[0] = np.round(logits[0])  # ties, broken by the lower expert
  if tokens > 2:
    logits[2] = 0.5  # all tied
    logits[1, ::3] = -0.0  # signed zeros: +0 ranks above -0
    logits[1, 1::3] = 0.0
  return jnp.asarray(logits, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, experts, top_k", CASES)
@pytest.mark.parametrize("redux", [False, True])
def test_equals_xla_routing_and_placement(
  rng, tokens, experts, top_k, dtype, monkeypatch, redux
):
  use_redux(monkeypatch, redux)
  logits = _logits(rng, tokens, experts, dtype)
  got = jax.jit(_route_and_place, static_argnums=1)(logits, top_k)
  want_weights, want_ids = jax.jit(
    lambda x: base.route(x, top_k=top_k, top_k_fn=placement.counting_top_k)
  )(logits)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want_ids))
  np.testing.assert_allclose(
    np.asarray(got[0]), np.asarray(want_weights), rtol=2e-6, atol=1e-7
  )
  if tokens > 1:
    plan = config_test.plan_for(tokens, top_k, experts)
    placed = jax.jit(lambda ids: placement.count_by_expert(ids, plan))(want_ids)
    for a, b in zip(got[2:], placed, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [7168, 2880, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_planes_equal_the_split(rng, hidden, dtype):
  # Row 0 of the planes, bit for bit, and the same routing as without them.
  logits = _logits(rng, 1, 128, dtype)
  x = jnp.asarray(rng.standard_normal((1, hidden)), jnp.bfloat16)
  route = jax.jit(
    functools.partial(route_decode_sm90.route_and_place, top_k=8, place=False)
  )
  weights, ids, planes = route(logits, x=x)
  assert planes.shape == (2, 8, hidden // 2)
  want = pallas_mosaic_gpu.sm90.split_activations(x)
  np.testing.assert_array_equal(
    np.asarray(planes[:, 0]).view(np.uint16),
    np.asarray(want[:, 0]).view(np.uint16),
  )
  alone = route(logits)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(alone[1]))
  np.testing.assert_array_equal(np.asarray(weights), np.asarray(alone[0]))


@pytest.mark.gpu
@pytest.mark.parametrize(
  "experts, top_k, hidden, inter",
  [(16, 8, 7168, 2048), (8, 2, 2880, 2880), (16, 4, 256, 128)],
)
def test_one_token_moe_with_row_planes_is_unchanged(
  rng, monkeypatch, experts, top_k, hidden, inter
):
  # The routing kernel's planes (rows past the first undefined) in place of
  # XLA's split of x and zero rows: the same output, bit for bit.
  nodes, _, x, logits = test_base.make_inputs(
    rng, 1, experts, hidden, inter, weight_layout="sm90"
  )
  outs = []
  for on in (False, True):
    monkeypatch.setattr(pallas_mosaic_gpu, "SPLIT_IN_DECODE_ROUTING", on)
    jax.clear_caches()  # the switch is no jit key
    outs.append(
      np.asarray(
        pallas_kernels.nvfp4_moe(
          x, logits, nodes, top_k=top_k, implementation="pallas"
        ),
        np.float32,
      )
    )
  assert np.isfinite(outs[0]).all()
  np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_moe_through_it_equals_the_xla_routing(rng, monkeypatch, tokens):
  experts, _ = test_base.make_experts(rng, 16, 256, 128, weight_layout="sm90")
  x = jnp.asarray(rng.standard_normal((tokens, 256)), jnp.bfloat16)
  logits = _logits(rng, tokens, 16, jnp.float32)

  def moe(x, logits):
    return pallas_kernels.nvfp4_moe(
      x, logits, experts, top_k=4, implementation="pallas"
    )

  monkeypatch.setattr(pallas_mosaic_gpu, "DECODE_ROUTING_KERNEL", False)
  monkeypatch.setattr(pallas_mosaic_gpu, "PREFILL_ROUTING_KERNEL", False)
  want = np.asarray(jax.jit(moe)(x, logits), np.float32)
  monkeypatch.setattr(pallas_mosaic_gpu, "DECODE_ROUTING_KERNEL", True)
  monkeypatch.setattr(pallas_mosaic_gpu, "PREFILL_ROUTING_KERNEL", True)
  jax.clear_caches()  # the switches are no jit keys
  got = np.asarray(jax.jit(moe)(x, logits), np.float32)
  assert np.isfinite(want).all()
  # Same experts and rows; weights within float32 rounding, so outputs
  # within a bf16 rounding of each other.
  np.testing.assert_allclose(
    got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max()
  )

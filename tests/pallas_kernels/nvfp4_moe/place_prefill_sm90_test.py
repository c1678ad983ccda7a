"""A prefill's placement from the routing kernel's ranks equals
`sort_by_expert`'s.

Both kernels are inline Mosaic GPU code: the CPU tier checks what
`place_pairs` refuses and that it lowers for sm_90, alone and in the MoE;
the GPU tier compares its rows, tokens and tiles exactly with
`sort_by_expert` over the same experts, at the models' sizes, with a last
CTA of fewer tokens, with every token on one expert, and through the MoE.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu
from pallas_kernels.nvfp4_moe import place_prefill_sm90
from pallas_kernels.nvfp4_moe import placement
from pallas_kernels.nvfp4_moe import route_decode_sm90
from tests.pallas_kernels.nvfp4_moe import config_test
from tests.pallas_kernels.nvfp4_moe import pallas_mosaic_gpu_test
from tests.pallas_kernels.nvfp4_moe import route_decode_sm90_test
from tests.pallas_kernels.nvfp4_moe import test_base

# (tokens, experts, top_k): Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-120b
# prefills, more experts than CTAs (each CTA pads several), and a last CTA
# of one token.
CASES = [
  (4096, 128, 8),
  (4096, 8, 2),
  (4096, 128, 4),
  (300, 256, 8),
  (33, 40, 3),
]


def _route_and_place(logits, top_k):
  tokens, experts = logits.shape
  plan = config_test.plan_for(tokens, top_k, experts)
  _, ids, within, chunk_counts = route_decode_sm90.route_and_place(
    logits, top_k, place=False, rank=True
  )
  placed = place_prefill_sm90.place_pairs(
    ids, within, chunk_counts, block_m=plan.block_m, max_tiles=plan.max_tiles
  )
  return ids, placed


def test_refuses_what_it_cannot_place():
  assert place_prefill_sm90.supports(32768, 8)
  assert not place_prefill_sm90.supports(16, 9)  # 16 tokens x 9 > 128 threads
  assert not place_prefill_sm90.supports(32769, 8)  # 65 loads a scan lane
  ids = jnp.zeros((33, 2), jnp.int32)
  with pytest.raises(ValueError, match="do not match"):
    place_prefill_sm90.place_pairs(
      ids, ids, jnp.zeros((8, 2), jnp.int32), block_m=8, max_tiles=16
    )
  with pytest.raises(ValueError, match="do not match"):
    place_prefill_sm90.place_pairs(
      ids, ids[:32], jnp.zeros((8, 3), jnp.int32), block_m=8, max_tiles=16
    )
  with pytest.raises(ValueError, match="needs tiles"):
    place_prefill_sm90.place_pairs(
      ids, ids, jnp.zeros((8, 3), jnp.int32), block_m=8, max_tiles=0
    )
  with pytest.raises(ValueError, match="routing alone"):
    route_decode_sm90.route_and_place(
      jnp.zeros((16, 8)), 2, block_m=8, max_tiles=8, rank=True
    )


@pytest.mark.parametrize("tokens, experts, top_k", CASES)
def test_lowers_for_sm90(tokens, experts, top_k):
  logits = jax.ShapeDtypeStruct((tokens, experts), jnp.float32)
  lowered = (
    jax.jit(functools.partial(_route_and_place, top_k=top_k))
    .trace(logits)
    .lower(lowering_platforms=("cuda",))
  )
  # The routing kernel, the scan over chunks and the placement kernel.
  assert lowered.as_text().count("stablehlo.custom_call") == 3


def test_prefill_moe_lowers_through_the_placement(monkeypatch):
  texts = route_decode_sm90_test.qwen3_prefill_texts(
    monkeypatch, "PREFILL_PLACEMENT_KERNEL"
  )
  # Routing, scan, placement, row gather, two expert GEMMs; XLA's scatter
  # of tokens into rows only without the placement kernels.
  assert texts[True].count("stablehlo.custom_call") == 6
  assert texts[False].count("stablehlo.custom_call") == 4
  assert "stablehlo.scatter" in texts[False]
  assert "stablehlo.scatter" not in texts[True]
  # The placement kernel counts the used tiles too: the combine's sum is
  # the one XLA reduction left (XLA's placement has six more).
  assert texts[False].count("stablehlo.reduce(") > 1
  assert texts[True].count("stablehlo.reduce(") == 1


def test_larger_calls_keep_xla_placement(monkeypatch):
  """Past MAX_TOKENS the scan would unroll too many loads a lane."""
  monkeypatch.setattr(pallas_mosaic_gpu.common, "check_sm90", lambda *_: None)
  experts = pallas_mosaic_gpu_test.abstract_experts(128, 256, 128)

  def scatters(tokens):
    x = jax.ShapeDtypeStruct((tokens, 256), jnp.bfloat16)
    logits = jax.ShapeDtypeStruct((tokens, 128), jnp.float32)
    text = (
      jax.jit(
        functools.partial(pallas_mosaic_gpu.nvfp4_moe, top_k=8),
      )
      .trace(x, logits, experts)
      .lower(lowering_platforms=("cuda",))
      .as_text()
    )
    return "stablehlo.scatter" in text

  limit = place_prefill_sm90.MAX_TOKENS
  assert not scatters(limit)
  assert scatters(limit + 1)


def _logits(rng, tokens, experts, dtype=jnp.float32):
  logits = rng.standard_normal((tokens, experts)).astype(np.float32)
  logits[0] = np.round(logits[0])  # ties, broken by the lower expert
  logits[:, experts // 2] = -30.0  # an expert nobody picks
  return jnp.asarray(logits, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, experts, top_k", [*CASES, (16384, 128, 8)])
def test_equals_sort_by_expert(rng, tokens, experts, top_k):
  logits = _logits(rng, tokens, experts)
  plan = config_test.plan_for(tokens, top_k, experts)
  route = jax.jit(functools.partial(_route_and_place, top_k=top_k))
  ids, placed = route(logits)
  want = jax.jit(lambda i: placement.sort_by_expert(i, plan))(ids)
  _check_placed(placed, want)


def _check_placed(placed, want):
  """`place_pairs`' outputs equal `sort_by_expert`'s, and its used tiles
  count the tiles with an expert."""
  *arrays, used_tiles = placed
  for name, got, expected in zip(
    ("position", "token", "tile_expert"), arrays, want, strict=True
  ):
    np.testing.assert_array_equal(
      np.asarray(got), np.asarray(expected), err_msg=name
    )
  assert int(used_tiles) == int((np.asarray(want[2]) >= 0).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, experts, top_k", [(4096, 128, 8), (77, 8, 2)])
def test_every_token_on_one_expert(rng, tokens, experts, top_k):
  logits = np.array(_logits(rng, tokens, experts))
  logits[:, 3] = 40.0  # every token's first expert
  plan = config_test.plan_for(tokens, top_k, experts)
  ids, placed = jax.jit(functools.partial(_route_and_place, top_k=top_k))(
    jnp.asarray(logits)
  )
  assert (np.asarray(ids)[:, 0] == 3).all()
  want = jax.jit(lambda i: placement.sort_by_expert(i, plan))(ids)
  _check_placed(placed, want)


@pytest.mark.gpu
def test_moe_through_it_equals_xla_placement(rng, monkeypatch):
  experts, _ = test_base.make_experts(rng, 16, 256, 128, weight_layout="sm90")
  tokens = 700  # 2800 pairs: past the counted placement
  x = jnp.asarray(rng.standard_normal((tokens, 256)), jnp.bfloat16)
  logits = _logits(rng, tokens, 16)

  def moe(x, logits):
    return pallas_kernels.nvfp4_moe(
      x, logits, experts, top_k=4, implementation="pallas"
    )

  outs = {}
  for on in (False, True):
    monkeypatch.setattr(pallas_mosaic_gpu, "PREFILL_PLACEMENT_KERNEL", on)
    jax.clear_caches()  # the switch is no jit key
    outs[on] = np.asarray(jax.jit(moe)(x, logits), np.float32)
  assert np.isfinite(outs[False]).all()
  # Same routing kernel, same rows: the same numbers.
  np.testing.assert_array_equal(outs[True], outs[False])

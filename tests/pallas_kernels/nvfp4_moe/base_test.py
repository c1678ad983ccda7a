"""The pure-jnp MoE reference ("xla") on the shared suite."""

import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import transform
from pallas_kernels.nvfp4_moe import base
from tests.pallas_kernels.nvfp4_moe import test_base


class TestReference(test_base.NVFP4MoETestBase):
  IMPLEMENTATION = "xla"


class TestDefaultDispatch(test_base.NVFP4MoETestBase):
  IMPLEMENTATION = None


def test_route_matches_deepseek_numpy(rng):
  logits = rng.standard_normal((32, 64)).astype(np.float32)
  bias = rng.uniform(-0.1, 0.1, 64).astype(np.float32)
  weights, ids = base.route(
    jnp.asarray(logits),
    top_k=8,
    scoring="sigmoid",
    correction_bias=jnp.asarray(bias),
    num_groups=8,
    top_groups=4,
    routed_scaling=2.5,
  )
  want_w, want_ids = test_base.numpy_route_deepseek(logits, bias, 8, 8, 4, 2.5)
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-6)
  # Only experts of the 4 chosen groups of 8 are picked.
  assert (np.unique(np.asarray(ids) // 8, axis=None).size) <= 8
  assert all(len(set(row // 8)) <= 4 for row in np.asarray(ids))


def test_route_rejects_unknown_scoring_and_bad_groups():
  logits = jnp.ones((2, 8))
  with pytest.raises(NotImplementedError, match="scoring"):
    base.route(logits, top_k=2, scoring="tanh")
  with pytest.raises(ValueError, match="num_groups"):
    base.route(logits, top_k=2, num_groups=3)


def test_plane_ordered_leaf_where_it_cannot_be_is_refused(rng, monkeypatch):
  # I = 64 unpadded: no whole 128-row halves; and w2 never has plane-ordered
  # rows.
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", False)
  experts, _ = test_base.make_experts(rng, 2, 64, 64, weight_layout="sm90")
  renamed = dict(experts)
  renamed["w13_weight_sm90_planes"] = renamed.pop("w13_weight_sm90")
  with pytest.raises(ValueError, match="w13_weight_sm90_planes"):
    base.StackedLinear.from_mapping(renamed, "w13_")
  renamed = dict(experts)
  renamed["w2_weight_sm90_planes"] = renamed.pop("w2_weight_sm90")
  with pytest.raises(ValueError, match="w2_weight_sm90_planes"):
    base.StackedLinear.from_mapping(renamed, "w2_")


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_renormalized_softmax_routing_is_the_softmax_of_the_chosen(
  rng, scale, monkeypatch
):
  # Large logits too: the chosen ones' softmax must not overflow, and where
  # the full softmax underflows to zeros (ties it breaks by index) the
  # logits still rank the experts.
  logits = jnp.asarray(rng.standard_normal((16, 64)) * scale, jnp.float32)
  weights, ids = base.route(logits, top_k=6, routed_scaling=1.5)
  monkeypatch.setattr(base, "RENORMALIZED_SOFTMAX_OF_CHOSEN", False)
  want_w, want_ids = base.route(logits, top_k=6, routed_scaling=1.5)
  weights, want_w = np.asarray(weights), np.asarray(want_w)
  ranked = want_w > 0
  np.testing.assert_array_equal(
    np.asarray(ids)[ranked], np.asarray(want_ids)[ranked]
  )
  np.testing.assert_array_equal(
    np.asarray(ids),
    np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :6],
  )
  assert np.isfinite(weights).all()
  np.testing.assert_allclose(weights, want_w, rtol=2e-6, atol=1e-30)
  np.testing.assert_allclose(weights.sum(-1), 1.5, rtol=1e-6)

"""The shared NVFP4 MoE suite; each implementation subclasses it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
import pallas_kernels
from fp4jax import transform
from tests import numpy_reference as ref
from tests import sources
from tests import tolerance


def make_experts(
  rng, e, hidden, inter, *, unequal_gate_up=False, weight_layout="natural"
):
  """A prepared experts node from fresh random weights, and its sources."""
  src = sources.experts_source(
    rng,
    e,
    hidden,
    inter,
    weight_std=0.05,
    up_factor=1.25 if unequal_gate_up else 1.0,
    # Activation amaxes of a few units, like real calibrations.
    w13_input_scale=(2 / 2688, 6 / 2688),
    w2_input_scale=(0.5 / 2688, 2 / 2688),
  )
  prepared, _ = fp4jax.prepare({"experts": src}, weight_layout=weight_layout)
  return prepared["experts"], jax.tree.map(np.asarray, src)


def make_inputs(rng, tokens, e, hidden, inter, **expert_options):
  """(experts, sources, bf16 tokens `[T, H]`, f32 router logits `[T, E]`)."""
  experts, src = make_experts(rng, e, hidden, inter, **expert_options)
  x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.bfloat16)
  logits = jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32)
  return experts, src, x, logits


def numpy_route_deepseek(logits, bias, top_k, num_groups, top_groups, scaling):
  """DeepSeek-V3's sigmoid grouped top-k, token by token (HF's logic)."""
  scores = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  weights, ids = [], []
  for s in scores:
    choice = s + bias
    groups = choice.reshape(num_groups, -1)
    group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
    best = np.argsort(-group_score, kind="stable")[:top_groups]
    masked = np.full_like(groups, -np.inf)
    masked[best] = groups[best]
    top = np.argsort(-masked.ravel(), kind="stable")[:top_k]
    w = s[top] / s[top].sum()
    weights.append(w * scaling)
    ids.append(top)
  return np.array(weights), np.array(ids)


def numpy_moe(x, logits, src, top_k, renormalize, activation, routing=None):
  """Dense per-token loop in numpy (float64 GEMMs), the MoE oracle.

  `routing`: optional (weights, ids) `[T, top_k]` replacing softmax top-k.
  Returns `tolerance.WithSlack`: the bf16 intermediate is rounded here from
  float64 and by implementations from float32 (whose W4A16 scale, alpha *
  input_scale_inv, is also one ulp from weight_scale_2), so an element
  within float32 noise of a bf16 tie may round either way; the slack is what
  such elements could move the output (with nvfp4 activations, through the
  FP4 codes and block scale that each rounding quantizes to).
  """
  x = np.asarray(x, np.float32)
  logits = np.asarray(logits, np.float32)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros(x.shape, np.float64)
  slack = np.zeros(x.shape, np.float64)
  inter = src["w13_weight"].shape[1] // 2

  @functools.cache  # once per expert, not per (token, expert) pair
  def weight(prefix, e):
    return ref.dequantize(
      src[prefix + "weight"][e], src[prefix + "weight_scale"][e], np.float32(1)
    ).astype(np.float64)

  def gemm_input(a, prefix, e):
    """float64 `a` as the GEMM multiplies it (quantized with nvfp4)."""
    if activation == "nvfp4":
      inp = np.float32(src[prefix + "input_scale"][e].max())
      packed, sf = ref.quantize_activation(a[None], np.float32(1) / inp)
      a = ref.dequantize(packed, sf, np.float32(inp))[0]
    return a.astype(np.float64)

  def gemm(a, prefix, e):
    return gemm_input(a, prefix, e) @ weight(prefix, e).T

  def to_bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)

  for t in range(x.shape[0]):
    top = np.argsort(-probs[t], kind="stable")[:top_k]
    weights = probs[t, top] / (probs[t, top].sum() if renormalize else 1)
    if routing is not None:
      weights, top = routing[0][t], routing[1][t]
    for e, wt in zip(top, weights, strict=True):
      h = gemm(x[t], "w13_", e)
      ws2 = src["w13_weight_scale_2"][e].astype(np.float64)
      gate, up = h[:inter] * ws2[0], h[inter:] * ws2[1]
      act = gate / (1 + np.exp(-gate)) * up
      w2_scale = np.float64(src["w2_weight_scale_2"][e])
      y = gemm(np.asarray(to_bf16(act), np.float32), "w2_", e) * w2_scale
      out[t] += wt * y
      # Elements within float32 noise (2^-18 relative) of a bf16 tie; with
      # nvfp4 activations a flipped rounding can flip an FP4 code (or its
      # block's scale), so the two roundings are compared as quantized.
      either_way = np.abs(
        gemm_input(to_bf16(act * (1 + 2.0**-18)).astype(np.float32), "w2_", e)
        - gemm_input(to_bf16(act * (1 - 2.0**-18)).astype(np.float32), "w2_", e)
      )
      slack[t] += abs(wt) * w2_scale * (np.abs(weight("w2_", e)) @ either_way)
  return tolerance.with_slack(out, slack)


class NVFP4MoETestBase:
  IMPLEMENTATION: str | None = None
  RTOL = 2.0**-6
  FLOOR = 0.05  # fraction of max|want| added to |want| (tolerance.py)
  # (hidden, intermediate) of the experts: the main case and a smaller one.
  SHAPE = (64, 32)
  SMALL_SHAPE = (32, 16)

  def moe(self, x, logits, experts, **kwargs):
    return pallas_kernels.nvfp4_moe(
      x, logits, experts, implementation=self.IMPLEMENTATION, **kwargs
    )

  def check(self, out, want):
    tolerance.assert_close(out, want, self.RTOL, self.FLOOR)

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize(
    "tokens, e, top_k, renormalize",
    [(1, 4, 2, True), (9, 8, 3, False), (16, 4, 4, True), (5, 6, 1, True)],
  )
  def test_matches_dense_loop(
    self, rng, tokens, e, top_k, renormalize, activation
  ):
    hidden, inter = self.SHAPE
    experts, src, x, logits = make_inputs(rng, tokens, e, hidden, inter)
    out = self.moe(
      x,
      logits,
      experts,
      top_k=top_k,
      renormalize=renormalize,
      activation=activation,
    )
    assert out.dtype == jnp.bfloat16
    want = numpy_moe(x, logits, src, top_k, renormalize, activation)
    self.check(out, want)

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  def test_sm90_weight_layout(self, rng, activation):
    hidden, inter = self.SHAPE
    experts, src, x, logits = make_inputs(
      rng, 9, 4, hidden, inter, weight_layout="sm90"
    )
    # [gate; up] rows in plane order where I, padded or not, is a multiple
    # of 128 (fp4jax.transform).
    stored = transform.padded_intermediate(inter, "sm90")
    w13 = transform.experts_weight_leaf("w13_", 2 * stored, "sm90")
    assert {w13, "w2_weight_sm90"} <= set(experts)
    assert "w2_weight" not in experts
    out = self.moe(x, logits, experts, top_k=2, activation=activation)
    self.check(out, numpy_moe(x, logits, src, 2, True, activation))

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  def test_sm90_plane_ordered_gate_up_rows(self, rng, activation):
    hidden = self.SMALL_SHAPE[0]
    experts, src, x, logits = make_inputs(
      rng, 5, 4, hidden, 256, weight_layout="sm90"
    )
    assert "w13_weight_sm90_planes" in experts
    out = self.moe(x, logits, experts, top_k=2, activation=activation)
    self.check(out, numpy_moe(x, logits, src, 2, True, activation))

  def test_all_tokens_on_one_expert_and_empty_experts(self, rng):
    hidden, inter = self.SMALL_SHAPE
    experts, src = make_experts(rng, 8, hidden, inter)
    x = jnp.asarray(rng.standard_normal((12, hidden)), jnp.bfloat16)
    logits = np.full((12, 8), -10.0, np.float32)
    logits[:, 5] = 10.0
    logits[:, 2] = 5.0
    out = self.moe(x, jnp.asarray(logits), experts, top_k=2)
    self.check(out, numpy_moe(x, logits, src, 2, True, "bf16"))

  def test_unequal_gate_up_scales(self, rng):
    hidden, inter = self.SMALL_SHAPE
    experts, src = make_experts(rng, 4, hidden, inter, unequal_gate_up=True)
    assert "w13_alpha_up" in experts
    x = jnp.asarray(rng.standard_normal((6, hidden)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    for activation in ("bf16", "nvfp4"):
      out = self.moe(x, logits, experts, top_k=2, activation=activation)
      self.check(out, numpy_moe(x, logits, src, 2, True, activation))

  def test_sigmoid_grouped_routing(self, rng):
    # DeepSeek-V3's routing: sigmoid scores, correction bias, 4 groups of
    # 4 experts, the best 2 groups compete, weights scaled by 2.5.
    hidden, inter = self.SMALL_SHAPE
    experts, src = make_experts(rng, 16, hidden, inter)
    x = jnp.asarray(rng.standard_normal((7, hidden)), jnp.bfloat16)
    logits = rng.standard_normal((7, 16)).astype(np.float32)
    bias = rng.uniform(-0.2, 0.2, 16).astype(np.float32)
    out = self.moe(
      x,
      jnp.asarray(logits),
      experts,
      top_k=3,
      scoring="sigmoid",
      correction_bias=jnp.asarray(bias),
      num_groups=4,
      top_groups=2,
      routed_scaling=2.5,
    )
    routing = numpy_route_deepseek(logits, bias, 3, 4, 2, 2.5)
    self.check(out, numpy_moe(x, logits, src, 3, True, "bf16", routing))

  def test_rejects_bad_inputs(self, rng):
    hidden, inter = self.SMALL_SHAPE
    experts, _ = make_experts(rng, 4, hidden, inter)
    x = jnp.ones((3, hidden), jnp.bfloat16)
    with pytest.raises(ValueError, match="router_logits"):
      self.moe(x, jnp.ones((3, 5)), experts, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
      self.moe(x, jnp.ones((3, 4)), experts, top_k=5)
    with pytest.raises(ValueError, match="x must be"):
      self.moe(
        jnp.ones((3, hidden + 16), jnp.bfloat16),
        jnp.ones((3, 4)),
        experts,
        top_k=2,
      )

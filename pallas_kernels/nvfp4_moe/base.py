"""The NVFP4 MoE interface and its pure-jnp reference (implementation "xla").

Per token t and each of its top-k experts e (router weight applied after the
down projection, as SGLang and vLLM do):
  g, u = split(x_t @ W13_e.T)          # [gate; up] rows, scaled per expert
  h    = silu(g) * u                    # rounded to x.dtype, as kernels do
  y_t += weight[t, e] * (h @ W2_e.T)
With activation="nvfp4" the GEMM inputs (x_t, then h) are quantized to NVFP4
with each expert's `input_scale_inv`, as SGLang's W4A4 MoE does.
"""

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fp4jax.format import nvfp4
from fp4jax.format import sm90_layout
from fp4jax.format import swizzle
from pallas_kernels import common

SCORINGS = ("softmax", "sigmoid")
# Renormalized softmax routing as the softmax of the top-k logits (equal up
# to rounding): on the H200 one routing kernel less per call (the softmax
# over all experts).
RENORMALIZED_SOFTMAX_OF_CHOSEN = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackedLinear:
  """One prepared projection stacked over experts (`w13_*` or `w2_*`)."""

  weight: jax.Array  # uint8 [E, N, K/2]
  block_scale: jax.Array  # e4m3 [E, ceil128(N), ceil4(K/16)], swizzled
  alpha: jax.Array  # f32 [E]
  alpha_up: jax.Array | None  # f32 [E]: w13 up rows, when it differs
  input_scale_inv: jax.Array | None  # f32 [E]; None if weight-only
  # "natural", "sm90" (see PreparedLinear) or "sm90_planes" (w13 only:
  # sm90 bits, each half's rows in `sm90_layout.to_plane_rows` order).
  weight_layout: str = "natural"

  @classmethod
  def from_mapping(cls, node: Mapping, prefix: str) -> "StackedLinear":
    weight_key, layout = common.weight_key(node, prefix)
    keys = [weight_key] + [prefix + k for k in ("block_scale", "alpha")]
    missing = [k for k in keys if k not in node]
    if missing:
      raise ValueError(
        f"experts node is missing {missing}; prepare it with"
        " fp4jax.transform.prepare"
      )
    w, bs = node[weight_key], node[prefix + "block_scale"]
    common.check_packed(prefix, w, bs, batch_dims=1)
    if layout == "sm90_planes" and not (
      prefix == "w13_" and sm90_layout.gate_up_in_plane_order(w.shape[1])
    ):
      raise ValueError(
        f"{weight_key} {w.shape}: plane-ordered rows exist only for a w13"
        f" [gate; up] stack of whole {sm90_layout.PLANE_BLOCK}-row halves"
      )
    return cls(
      weight=w,
      block_scale=bs,
      alpha=node[prefix + "alpha"],
      alpha_up=node.get(prefix + "alpha_up"),
      input_scale_inv=node.get(prefix + "input_scale_inv"),
      weight_layout=layout,
    )

  @property
  def shape(self) -> tuple[int, int, int]:
    """(E, N, K) of the unpacked stack."""
    e, n, half_k = self.weight.shape
    return e, n, 2 * half_k

  def dequantized_blocks(self) -> jax.Array:
    """`e2m1 * f32(block_scale)` for all experts, f32 `[E, N, K]`."""
    _, n, k = self.shape
    scale = swizzle.unswizzle_block_scale(
      self.block_scale, n, k // nvfp4.BLOCK_SIZE
    )
    weight = common.natural_weight(self.weight, self.weight_layout)
    blocks = nvfp4.dequantize_blocks(weight, scale)
    if self.plane_rows:  # whole 128-row blocks per half: one permutation
      blocks = sm90_layout.from_plane_rows(blocks, axis=1)
    return blocks

  @property
  def plane_rows(self) -> bool:
    """Whether each half's rows are in `sm90_layout.to_plane_rows` order."""
    return self.weight_layout == "sm90_planes"

  def epilogue_scales(self, activation: str) -> tuple[jax.Array, jax.Array]:
    """Per-expert factors for the first and second halves of the N rows."""
    first = self.alpha
    second = self.alpha if self.alpha_up is None else self.alpha_up
    if activation == "bf16" and self.input_scale_inv is not None:
      # W4A16 multiplies by weight_scale_2 = alpha * input_scale_inv.
      first, second = (s * self.input_scale_inv for s in (first, second))
    return first, second


def route(
  router_logits: jax.Array,
  *,
  top_k: int,
  renormalize: bool = True,
  scoring: str = "softmax",
  correction_bias: jax.Array | None = None,
  num_groups: int = 1,
  top_groups: int | None = None,
  routed_scaling: float = 1.0,
  top_k_fn: Callable = jax.lax.top_k,
) -> tuple[jax.Array, jax.Array]:
  """Top-k routing: (weights f32 `[T, k]`, expert ids int32 `[T, k]`).

  scoring="softmax" (Mixtral, Qwen3-MoE): top-k of the softmax; renormalized,
  the softmax of the top-k logits (equal up to rounding).
  scoring="sigmoid" (DeepSeek-V3, Kimi-K2): scores are sigmoids; experts
  are chosen by score + `correction_bias` but weighted by the score alone.
  With `num_groups > 1` (either scoring) experts form equal groups, each
  group is ranked by the sum of its two best choice scores, and only the
  best `top_groups` groups compete (DeepSeek-V3's `n_group`, `topk_group`).
  Renormalized weights sum to one; all are then times `routed_scaling`.
  `top_k_fn` stands in for `jax.lax.top_k` (a backend's equal but faster
  one).
  """
  if scoring not in SCORINGS:
    raise NotImplementedError(f"{scoring=} is not supported ({SCORINGS})")
  logits = router_logits.astype(jnp.float32)
  if routes_by_chosen_softmax(
    renormalize=renormalize,
    scoring=scoring,
    correction_bias=correction_bias,
    num_groups=num_groups,
  ):
    # Softmax keeps the order, and renormalized over the chosen experts it
    # is their logits' softmax, whose max is the first (top-k sorts them):
    # no softmax over all E, one gather-and-sum kernel on the GPU.
    chosen, ids = top_k_fn(logits, top_k)
    weights = jnp.exp(chosen - chosen[..., :1])
  else:
    weights, ids = _scored_top_k(
      logits, top_k, scoring, correction_bias, num_groups, top_groups, top_k_fn
    )
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights * jnp.float32(routed_scaling), ids.astype(jnp.int32)


def routes_by_chosen_softmax(
  *,
  renormalize: bool = True,
  scoring: str = "softmax",
  correction_bias: jax.Array | None = None,
  num_groups: int = 1,
  **_other_options,
) -> bool:
  """Whether `route` (with these options; the others do not matter) takes
  its weights as the softmax of the chosen experts' logits."""
  return (
    RENORMALIZED_SOFTMAX_OF_CHOSEN
    and scoring == "softmax"
    and renormalize
    and correction_bias is None
    and num_groups == 1
  )


def _scored_top_k(
  logits, top_k, scoring, correction_bias, num_groups, top_groups, top_k_fn
):
  """`route`'s (scores of the chosen experts, their ids), not renormalized."""
  n_experts = logits.shape[-1]
  if scoring == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
  else:
    probs = 1.0 / (1.0 + jnp.exp(-logits))  # exact on CPU and GPU alike
  choice = probs
  if correction_bias is not None:
    choice = choice + correction_bias.astype(jnp.float32)[None]
  if num_groups > 1:
    top_groups = top_groups or num_groups
    if n_experts % num_groups or not 1 <= top_groups <= num_groups:
      raise ValueError(
        f"{num_groups=} must divide {n_experts} experts and {top_groups=}"
        " be in [1, num_groups]"
      )
    grouped = choice.reshape(*choice.shape[:-1], num_groups, -1)
    pair = min(2, grouped.shape[-1])
    group_score = top_k_fn(grouped, pair)[0].sum(-1)
    _, best = top_k_fn(group_score, top_groups)
    keep = jax.nn.one_hot(best, num_groups).sum(-2) > 0  # [T, groups]
    choice = jnp.where(keep[..., None], grouped, -jnp.inf).reshape(choice.shape)
  _, ids = top_k_fn(choice, top_k)
  return jnp.take_along_axis(probs, ids, axis=-1), ids


def silu(x: jax.Array) -> jax.Array:
  """`x * sigmoid(x)` written out: XLA's GPU logistic is a fast approximation
  (~1e-3 off), which would make the reference differ between CPU and GPU."""
  return x / (1.0 + jnp.exp(-x))


def _grouped_matmul(rows, row_expert, group_sizes, proj, activation):
  """Rows sorted by expert times their expert's weights, f32 `[R, N]`."""
  e, n, _ = proj.shape
  w = proj.dequantized_blocks()
  if activation == "nvfp4":
    if proj.input_scale_inv is None:
      raise ValueError("activation='nvfp4' needs input_scale_inv per expert")
    packed, sf = nvfp4.quantize_activation(
      rows, proj.input_scale_inv[row_expert]
    )
    rows = nvfp4.dequantize_blocks(packed, sf)
  acc = jax.lax.ragged_dot(
    rows.astype(jnp.float32),
    jnp.swapaxes(w, 1, 2),
    group_sizes,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  first, second = proj.epilogue_scales(activation)
  half = n // 2
  col = jnp.arange(n)
  scale = jnp.where(
    col[None, :] < half, first[row_expert][:, None], second[row_expert][:, None]
  )
  return acc * scale


def check_inputs(
  x: jax.Array,
  router_logits: jax.Array,
  experts: Mapping,
  top_k: int,
  activation: str,
) -> tuple[StackedLinear, StackedLinear]:
  """Validates an MoE call; returns the (w13, w2) stacks."""
  if activation not in ("bf16", "nvfp4"):
    raise ValueError(f"{activation=} must be 'bf16' or 'nvfp4'")
  w13 = StackedLinear.from_mapping(experts, "w13_")
  w2 = StackedLinear.from_mapping(experts, "w2_")
  n_experts, two_i, hidden = w13.shape
  if x.ndim != 2 or x.shape[-1] != hidden:
    raise ValueError(f"x must be [T, {hidden}], got {x.shape}")
  if router_logits.shape != (x.shape[0], n_experts):
    raise ValueError(
      f"router_logits must be {(x.shape[0], n_experts)}, got"
      f" {router_logits.shape}"
    )
  if w2.shape != (n_experts, hidden, two_i // 2):
    raise ValueError(f"w2 shape {w2.shape} does not match w13 {w13.shape}")
  if not 1 <= top_k <= n_experts:
    raise ValueError(f"{top_k=} must be in [1, {n_experts}]")
  if activation == "nvfp4" and (
    w13.input_scale_inv is None or w2.input_scale_inv is None
  ):
    raise ValueError("activation='nvfp4' needs input_scale_inv per expert")
  return w13, w2


ROUTING_OPTIONS = (
  "top_k",
  "renormalize",
  "scoring",
  "num_groups",
  "top_groups",
  "routed_scaling",
)


@functools.partial(jax.jit, static_argnames=(*ROUTING_OPTIONS, "activation"))
def reference_moe(
  x: jax.Array,
  router_logits: jax.Array,
  experts: Mapping,
  *,
  top_k: int,
  correction_bias: jax.Array | None = None,
  activation: str = "bf16",
  **routing,
) -> jax.Array:
  """Pure-jnp NVFP4 MoE for `x[T, H]`: the numbers kernels are tested against.

  `routing`: `route`'s other options (renormalize, scoring, num_groups,
  top_groups, routed_scaling).
  """
  check_inputs(x, router_logits, experts, top_k, activation)
  weights, ids = route(
    router_logits, top_k=top_k, correction_bias=correction_bias, **routing
  )
  out = reference_experts(x, weights, ids, experts, activation=activation)
  return out.astype(x.dtype)


def check_routing(x, weights, ids, experts, activation, routed_experts=None):
  """Validates an experts call with given routing; returns (w13, w2)."""
  held = experts[common.weight_key(experts, "w13_")[0]].shape[0]
  if routed_experts is not None and not (
    isinstance(routed_experts, int) and routed_experts >= held
  ):
    raise ValueError(
      f"routed_experts={routed_experts!r} must be an int of at least the"
      f" {held} experts the node holds"
    )
  if weights.shape != ids.shape or weights.ndim != 2:
    raise ValueError(
      f"weights {weights.shape} and ids {ids.shape} must both be [T, top_k]"
    )
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be integers, got {ids.dtype}")
  fake_logits = jax.ShapeDtypeStruct((x.shape[0], held), jnp.float32)
  return check_inputs(x, fake_logits, experts, 1, activation)


@functools.partial(jax.jit, static_argnames=("activation", "routed_experts"))
def reference_experts(
  x: jax.Array,
  weights: jax.Array,
  ids: jax.Array,
  experts: Mapping,
  *,
  activation: str = "bf16",
  routed_experts: int | None = None,
) -> jax.Array:
  """The experts of a routed MoE: float32 `[T, H]` = sum of weighted outputs.

  `ids[t, j]` outside `[0, E)` (e.g. -1, or an expert another device holds
  under expert parallelism) contributes nothing. `routed_experts` only
  sizes the kernels' tiles (`api.nvfp4_moe_experts`); checked here alike.
  """
  w13, w2 = check_routing(x, weights, ids, experts, activation, routed_experts)
  n_experts, two_i, hidden = w13.shape
  top_k = ids.shape[1]
  valid = (ids >= 0) & (ids < n_experts)
  weights = jnp.where(valid, weights, 0.0)
  flat_ids = jnp.where(valid, ids, 0).reshape(-1)
  order = jnp.argsort(flat_ids, stable=True)
  token = order // top_k
  row_expert = flat_ids[order]
  group_sizes = jnp.bincount(flat_ids, length=n_experts).astype(jnp.int32)

  h = _grouped_matmul(x[token], row_expert, group_sizes, w13, activation)
  gate, up = h[:, : two_i // 2], h[:, two_i // 2 :]
  # Kernels feed GEMM 2 a bf16 intermediate; the barrier keeps that rounding
  # (XLA's GPU pipeline drops an f32 -> bf16 -> f32 round trip otherwise).
  act = jax.lax.optimization_barrier((silu(gate) * up).astype(x.dtype))
  y = _grouped_matmul(act, row_expert, group_sizes, w2, activation)
  y = y * weights.reshape(-1)[order][:, None]
  return jnp.zeros((x.shape[0], hidden), jnp.float32).at[token].add(y)

"""`nvfp4_moe`: pick an implementation, fall through on NotImplementedError."""

from collections.abc import Callable
from collections.abc import Mapping

import jax

from pallas_kernels import _dispatch
from pallas_kernels.nvfp4_moe import base
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu

IMPLEMENTATIONS: dict[str, Callable] = {
  "pallas": pallas_mosaic_gpu.nvfp4_moe,
  "xla": base.reference_moe,
}
EXPERTS_IMPLEMENTATIONS: dict[str, Callable] = {
  "pallas": pallas_mosaic_gpu.experts_forward,
  "xla": base.reference_experts,
}
DEFAULT_ORDER = ("pallas", "xla")


def nvfp4_moe(
  x: jax.Array,
  router_logits: jax.Array,
  experts: Mapping,
  *,
  top_k: int,
  renormalize: bool = True,
  scoring: str = "softmax",
  correction_bias: jax.Array | None = None,
  num_groups: int = 1,
  top_groups: int | None = None,
  routed_scaling: float = 1.0,
  activation: str = "bf16",
  implementation: str | None = None,
) -> jax.Array:
  """Routes `x[T, H]` to its top-k experts and combines their outputs.

  Args:
    x: tokens `[T, H]`.
    router_logits: `[T, E]`.
    experts: a prepared experts node (`w13_*`, `w2_*`, in either weight
      layout; see fp4jax.transform).
    top_k: experts per token.
    renormalize: rescale the top-k weights to sum to one.
    scoring: "softmax" (Mixtral, Qwen3-MoE) or "sigmoid" (DeepSeek-V3).
    correction_bias: `[E]` added to the scores to choose experts, not to
      weight them (DeepSeek-V3's `e_score_correction_bias`).
    num_groups, top_groups: grouped top-k (DeepSeek-V3's `n_group`,
      `topk_group`): only the best `top_groups` expert groups compete.
    routed_scaling: multiplies the router weights (`routed_scaling_factor`).
    activation: "bf16" (W4A16) or "nvfp4" (W4A4, quantized GEMM inputs).
    implementation: None (fastest available), "xla" or "pallas".

  Returns:
    `[T, H]` in x.dtype.
  """
  return _dispatch.dispatch(
    "NVFP4 MoE",
    IMPLEMENTATIONS,
    DEFAULT_ORDER,
    implementation,
    x,
    router_logits,
    experts,
    top_k=top_k,
    renormalize=renormalize,
    scoring=scoring,
    correction_bias=correction_bias,
    num_groups=num_groups,
    top_groups=top_groups,
    routed_scaling=routed_scaling,
    activation=activation,
  )


def nvfp4_moe_experts(
  x: jax.Array,
  weights: jax.Array,
  ids: jax.Array,
  experts: Mapping,
  *,
  activation: str = "bf16",
  routed_experts: int | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """The expert half of `nvfp4_moe`, for routing done elsewhere.

  Args:
    x: tokens `[T, H]`.
    weights: router weights `[T, top_k]`.
    ids: expert of each weight `[T, top_k]`; ids outside `[0, E)` (experts
      another device holds under expert parallelism) contribute nothing.
    experts: a prepared experts node.
    routed_experts: how many experts the router chose among (None: the
      node's). Under expert parallelism a device's node holds E/S of them,
      and the kernels size their token tiles for the groups this implies
      (T top_k / E rows each), as one device holding all E would; changes
      no output.
    activation, implementation: as for `nvfp4_moe`.

  Returns:
    float32 `[T, H]`: each token's weighted sum of its experts' outputs
    (float32 so that partial sums across devices add without rounding).
  """
  return _dispatch.dispatch(
    "NVFP4 MoE experts",
    EXPERTS_IMPLEMENTATIONS,
    DEFAULT_ORDER,
    implementation,
    x,
    weights,
    ids,
    experts,
    activation=activation,
    routed_experts=routed_experts,
  )

"""NVFP4MoE: a Flax NNX Mixture-of-Experts block with NVFP4 experts."""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from fp4jax import sharding
from fp4jax.format import nvfp4
from fp4jax.nn import _prepared
from fp4jax.nn import variables

default_kernel_init = nnx.initializers.lecun_normal()


class Router(nnx.Module):
  """The unquantized router: logits = x @ weight.T, weight `[E, H]` (HF)."""

  def __init__(self, hidden: int, num_experts: int, *, param_dtype, rngs):
    self.weight = nnx.Param(
      default_kernel_init(rngs.params(), (num_experts, hidden), param_dtype)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum(
      "th,eh->te",
      x,
      self.weight[...].astype(x.dtype),
      preferred_element_type=jnp.float32,
    )


class NVFP4Experts(_prepared.NVFP4Leaves):
  """Expert weights stacked as `fp4jax.checkpoint` loads them.

  Source state: `w13_weight` u8 `[E, 2I, H/2]` ([gate; up] rows),
  `w13_weight_scale` e4m3 `[E, 2I, H/16]`, `w13_weight_scale_2` f32 `[E, 2]`,
  `w13_input_scale` f32 `[E, 2]`, and `w2_weight` `[E, H, I/2]`,
  `w2_weight_scale`, `w2_weight_scale_2 [E]`, `w2_input_scale [E]`.
  Prepared state: `w*_weight`, `w*_block_scale`, `w*_alpha`,
  `w*_input_scale_inv` (and `w13_alpha_up` when gate and up scales differ).
  """

  def __init__(
    self,
    hidden: int,
    intermediate: int,
    num_experts: int,
    *,
    weight_only: bool = False,
    rngs: nnx.Rngs,
  ):
    for name, dim in (("hidden", hidden), ("intermediate", intermediate)):
      if dim % nvfp4.BLOCK_SIZE:
        raise ValueError(f"{name}={dim} must be a multiple of 16")
    shapes = {
      "w13_": (num_experts, 2 * intermediate, hidden),
      "w2_": (num_experts, hidden, intermediate),
    }
    for prefix, shape in shapes.items():
      t = nvfp4.quantize(default_kernel_init(rngs.params(), shape, jnp.float32))
      scale_2 = t.global_scale
      if prefix == "w13_":
        scale_2 = jnp.stack([scale_2, scale_2], axis=-1)
      leaves = {
        "weight": t.packed,
        "weight_scale": t.block_scale,
        "weight_scale_2": scale_2,
      }
      if not weight_only:
        leaves["input_scale"] = jnp.ones(scale_2.shape, jnp.float32)
      for name, value in leaves.items():
        setattr(self, prefix + name, variables.NVFP4Param(value))


class NVFP4MoE(nnx.Module):
  """Router + top-k NVFP4 experts with SwiGLU, HF leaf names (`gate`, `experts`).

  Softmax top-k routing (optionally renormalized), `silu(gate) * up`, and the
  router weight applied after the down projection.
  """

  def __init__(
    self,
    hidden: int,
    intermediate: int,
    num_experts: int,
    top_k: int,
    *,
    renormalize: bool = True,
    activation: str = "bf16",
    implementation: str | None = None,
    weight_only: bool = False,
    dtype=None,
    router_dtype=jnp.bfloat16,
    rngs: nnx.Rngs,
  ):
    """Creates the block in source state with random weights.

    Args:
      hidden: H, a multiple of 16.
      intermediate: I per expert, a multiple of 16.
      num_experts: E.
      top_k: experts per token.
      renormalize: rescale the top-k router weights to sum to one (Qwen3's
        `norm_topk_prob`, Mixtral).
      activation: "bf16" (W4A16) or "nvfp4" (W4A4).
      implementation: see `pallas_kernels.nvfp4_moe`.
      weight_only: experts have no `input_scale` (NVFP4A16 checkpoints).
      dtype: compute dtype; None keeps x.dtype.
      router_dtype: storage dtype of the router weight.
      rngs: random keys.
    """
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"{top_k=} must be in [1, {num_experts=}]")
    self.top_k = top_k
    self.renormalize = renormalize
    self.activation = activation
    self.implementation = implementation
    self.dtype = dtype
    self.gate = Router(hidden, num_experts, param_dtype=router_dtype, rngs=rngs)
    if activation == "nvfp4" and weight_only:
      raise ValueError("activation='nvfp4' needs input_scale (weight_only)")
    self.experts = NVFP4Experts(
      hidden, intermediate, num_experts, weight_only=weight_only, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    experts = self.experts.require_prepared()
    if self.dtype is not None:
      x = x.astype(self.dtype)
    lead = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1])
    options = dict(
      top_k=self.top_k,
      renormalize=self.renormalize,
      activation=self.activation,
      implementation=self.implementation,
    )
    if self.experts.parallel is None:
      y = pallas_kernels.nvfp4_moe(
        tokens, self.gate(tokens), experts, **options
      )
    else:
      mesh, _, axis = self.experts.parallel
      y = sharding.moe(
        tokens, self.gate(tokens), experts, mesh, axis=axis, **options
      )
    return y.reshape(*lead, y.shape[-1])

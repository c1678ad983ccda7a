"""The NVFP4 matmul interface and its pure-jnp reference (implementation "xla").

`y = x @ W.T` for a prepared layer, float32 accumulation, output in x.dtype:
  activation="bf16"  (W4A16): y = (x @ deq(W).T) * weight_scale_2
  activation="nvfp4" (W4A4):  y = (deq(q(x)) @ deq(W).T) * alpha
where deq(W) = e2m1 * f32(block_scale) is exact in float32 and
weight_scale_2 = alpha * input_scale_inv (within one ulp; see transform).
"""

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax.format import nvfp4
from fp4jax.format import swizzle
from pallas_kernels import common

ACTIVATIONS = ("bf16", "nvfp4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedLinear:
  """The leaves a prepared NVFP4 linear layer holds, checked.

  Attributes:
    weight: uint8 `[N, K/2]` packed E2M1, in `weight_layout` bit order.
    block_scale: float8_e4m3fn `[ceil128(N), ceil4(K/16)]`, 128x4 swizzled.
    alpha: float32 scalar, `input_scale * weight_scale_2`.
    input_scale_inv: float32 scalar or None (weight-only checkpoints).
    weight_layout: "natural" (leaf `weight`) or "sm90" (leaf
      `weight_sm90`, `fp4jax.format.sm90_layout`; see `transform.prepare`).
  """

  weight: jax.Array
  block_scale: jax.Array
  alpha: jax.Array
  input_scale_inv: jax.Array | None
  weight_layout: str = "natural"

  @classmethod
  def from_mapping(cls, layer: Mapping) -> "PreparedLinear":
    """Validates a prepared layer dict (see `fp4jax.transform`)."""
    weight_key, layout = common.weight_key(layer)
    missing = [
      k for k in (weight_key, "block_scale", "alpha") if k not in layer
    ]
    if missing:
      stale = [k for k in ("weight_scale", "weight_scale_2") if k in layer]
      hint = " (run fp4jax.transform.prepare first)" if stale else ""
      raise ValueError(f"layer is missing {missing}{hint}")
    w, bs = layer[weight_key], layer["block_scale"]
    common.check_packed("", w, bs, batch_dims=0)
    return cls(
      weight=w,
      block_scale=bs,
      alpha=layer["alpha"],
      input_scale_inv=layer.get("input_scale_inv"),
      weight_layout=layout,
    )

  def to_mapping(self) -> dict:
    """The leaves under their prepared names (a pytree for `jax.jit`)."""
    out = {
      common.WEIGHT_KEYS[self.weight_layout]: self.weight,
      "block_scale": self.block_scale,
      "alpha": self.alpha,
    }
    if self.input_scale_inv is not None:
      out["input_scale_inv"] = self.input_scale_inv
    return out

  def natural_weight(self) -> jax.Array:
    """The packed weight in natural NVFP4 order."""
    return common.natural_weight(self.weight, self.weight_layout)

  @property
  def n(self) -> int:
    return self.weight.shape[0]

  @property
  def k(self) -> int:
    return 2 * self.weight.shape[1]

  def weight_scale_2(self) -> jax.Array:
    """The per-tensor weight scale a W4A16 epilogue multiplies by."""
    if self.input_scale_inv is None:
      return self.alpha
    return self.alpha * self.input_scale_inv

  def row_major_block_scale(self) -> jax.Array:
    return swizzle.unswizzle_block_scale(
      self.block_scale, self.n, self.k // nvfp4.BLOCK_SIZE
    )


def check_inputs(x: jax.Array, layer: PreparedLinear, activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"{activation=} must be one of {ACTIVATIONS}")
  if x.shape[-1] != layer.k:
    raise ValueError(f"x has K={x.shape[-1]}, the weight has K={layer.k}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got {x.dtype}")
  if activation == "nvfp4" and layer.input_scale_inv is None:
    raise ValueError(
      "activation='nvfp4' needs input_scale_inv, and this layer has none"
      " (a weight-only checkpoint): use activation='bf16'"
    )


def _dot_f32(a: jax.Array, b_t: jax.Array) -> jax.Array:
  return jnp.einsum(
    "...k,nk->...n",
    a.astype(jnp.float32),
    b_t,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )


def reference_matmul(
  x: jax.Array, layer: PreparedLinear, *, activation: str = "bf16"
) -> jax.Array:
  """Pure-jnp NVFP4 matmul: the numbers every kernel is tested against."""
  check_inputs(x, layer, activation)
  return _reference(x, layer.to_mapping(), activation=activation)


@functools.partial(jax.jit, static_argnames="activation")
def _reference(x, leaves, *, activation):
  layer = PreparedLinear.from_mapping(leaves)
  w = nvfp4.dequantize_blocks(
    layer.natural_weight(), layer.row_major_block_scale()
  )
  if activation == "bf16":
    acc = _dot_f32(x, w)
    return (acc * layer.weight_scale_2()).astype(x.dtype)
  packed, scale = nvfp4.quantize_activation(x, layer.input_scale_inv)
  acc = _dot_f32(nvfp4.dequantize_blocks(packed, scale), w)
  return (acc * layer.alpha).astype(x.dtype)


def weight_nbytes(layer: PreparedLinear) -> int:
  """FP4 bytes a matmul must read: packed weight plus block scales."""
  return int(np.prod(layer.weight.shape)) + int(
    np.prod(layer.block_scale.shape)
  )

"""NVFP4Linear: a Flax NNX linear layer with NVFP4 weights."""

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from fp4jax import sharding
from fp4jax.format import nvfp4
from fp4jax.nn import _prepared
from fp4jax.nn import variables

default_kernel_init = nnx.initializers.lecun_normal()


class NVFP4Linear(_prepared.NVFP4Leaves):
  """`y = x @ W.T (+ bias)` with W stored as NVFP4, HF/ModelOpt leaf names.

  Source state (after a checkpoint or Orbax restore): `weight` uint8
  `[N, K/2]`, `weight_scale` e4m3 `[N, K/16]`, `weight_scale_2` f32 `[]`,
  `input_scale` f32 `[]` (absent if `weight_only`). Prepared state (after
  `fp4jax.prepare_model`): `weight`, `block_scale` (128x4 swizzled),
  `alpha`, `input_scale_inv`. Only the prepared state can be called.

  Example:
    >>> layer = NVFP4Linear(64, 32, rngs=nnx.Rngs(0))
    >>> _ = fp4jax.prepare_model(layer)
    >>> layer(jnp.ones((2, 64), jnp.bfloat16)).shape
    (2, 32)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = False,
    weight_only: bool = False,
    activation: str = "bf16",
    implementation: str | None = None,
    dtype=None,
    kernel_init=default_kernel_init,
    rngs: nnx.Rngs,
  ):
    """Creates the layer in source state with randomly drawn weights.

    Args:
      in_features: K, a multiple of 16.
      out_features: N.
      use_bias: add a float32 bias (ModelOpt keeps biases unquantized).
      weight_only: no `input_scale` (NVFP4A16 checkpoints).
      activation: "bf16" (W4A16) or "nvfp4" (W4A4) at call time.
      implementation: matmul backend, see `pallas_kernels.nvfp4_matmul`.
      dtype: compute dtype of inputs and outputs; None keeps x.dtype.
      kernel_init: initializer for the float weights `[N, K]` that are
        quantized; real weights come from a checkpoint.
      rngs: random keys.
    """
    if in_features % nvfp4.BLOCK_SIZE:
      raise ValueError(f"{in_features=} must be a multiple of 16")
    if activation == "nvfp4" and weight_only:
      raise ValueError("activation='nvfp4' needs input_scale (weight_only)")
    self.in_features = in_features
    self.out_features = out_features
    self.activation = activation
    self.implementation = implementation
    self.dtype = dtype
    w = kernel_init(rngs.params(), (out_features, in_features), jnp.float32)
    t = nvfp4.quantize(w)
    self.weight = variables.NVFP4Param(t.packed)
    self.weight_scale = variables.NVFP4Param(t.block_scale)
    self.weight_scale_2 = variables.NVFP4Param(t.global_scale)
    if not weight_only:
      # Calibrated in real checkpoints; 1.0 keeps every E4M3 scale normal for
      # activations between ~0.1 and ~2688.
      self.input_scale = variables.NVFP4Param(jnp.ones((), jnp.float32))
    self.bias = (
      nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    layer = self.require_prepared()
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.parallel is None:
      y = pallas_kernels.nvfp4_matmul(
        x, layer, activation=self.activation, implementation=self.implementation
      )
    else:
      mesh, kind, axis = self.parallel
      y = sharding.matmul(
        x,
        layer,
        mesh,
        kind,
        axis=axis,
        activation=self.activation,
        implementation=self.implementation,
      )
    if self.bias is not None:
      bias = self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))
      y = (y.astype(jnp.float32) + bias).astype(y.dtype)
    return y

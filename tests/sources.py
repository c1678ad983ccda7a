"""Source (checkpoint-state) NVFP4 leaves from fresh random weights."""

import jax.numpy as jnp

import fp4jax


def experts_source(
  rng,
  e,
  hidden,
  inter,
  *,
  weight_std=1.0,
  up_factor=1.0,
  w13_input_scale=(1e-3, 1e-1),
  w2_input_scale=(1e-3, 1e-1),
):
  """A stacked experts node as `load_modelopt` returns it.

  `up_factor` scales the up rows' `weight_scale_2` (1.0: equal to gate's, as
  ModelOpt exports them); input scales are drawn uniformly from the ranges.
  """

  def stack(n, k):
    w = rng.standard_normal((e, n, k)) * weight_std
    return fp4jax.quantize(jnp.asarray(w, jnp.float32))

  w13, w2 = stack(2 * inter, hidden), stack(hidden, inter)
  up_scale = w13.global_scale * jnp.float32(up_factor)
  in13 = jnp.asarray(rng.uniform(*w13_input_scale, e), jnp.float32)
  return {
    "w13_weight": w13.packed,
    "w13_weight_scale": w13.block_scale,
    "w13_weight_scale_2": jnp.stack([w13.global_scale, up_scale], -1),
    "w13_input_scale": jnp.stack([in13, in13], -1),
    "w2_weight": w2.packed,
    "w2_weight_scale": w2.block_scale,
    "w2_weight_scale_2": w2.global_scale,
    "w2_input_scale": jnp.asarray(rng.uniform(*w2_input_scale, e), jnp.float32),
  }

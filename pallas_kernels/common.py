"""Checks and helpers shared by the ops."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from fp4jax.format import nvfp4
from fp4jax.format import sm90_layout
from fp4jax.format import swizzle

# Leaf name of the packed weight per bit layout (`transform.prepare`).
# "sm90_planes": an experts' [gate; up] stack in the sm90 bit order with its
# rows in `sm90_layout.to_plane_rows` order within each half.
# "sm90_row_pairs": a dense weight in the sm90 bit order after
# `sm90_layout.to_row_pairs` (`prepare(weight_layout="sm90_row_pairs")`).
WEIGHT_KEYS = {
  "natural": "weight",
  "sm90": sm90_layout.WEIGHT_LEAF,
  "sm90_planes": sm90_layout.PLANE_ROWS_LEAF,
  "sm90_row_pairs": sm90_layout.ROW_PAIRS_LEAF,
}
# Layouts whose bytes are in the sm90 bit order.
TWIDDLED = ("sm90", "sm90_planes", "sm90_row_pairs")


def weight_key(node: Mapping, prefix: str = "") -> tuple[str, str]:
  """(leaf name, layout) of the packed weight a prepared node holds."""
  for layout in ("sm90_planes", "sm90_row_pairs", "sm90"):
    if prefix + WEIGHT_KEYS[layout] in node:
      return prefix + WEIGHT_KEYS[layout], layout
  return prefix + WEIGHT_KEYS["natural"], "natural"


def natural_weight(weight: jax.Array, layout: str) -> jax.Array:
  """Packed E2M1 bytes in natural bit order, from any layout (rows stay in
  the layout's order; row pairs, which keep their scales' rows, are
  ungrouped)."""
  if layout == "sm90_row_pairs":
    return sm90_layout.from_row_pairs(sm90_layout.untwiddle(weight))
  return sm90_layout.untwiddle(weight) if layout in TWIDDLED else weight


def check_packed(
  name: str, weight: jax.Array, block_scale: jax.Array, batch_dims: int
) -> tuple[int, int]:
  """Validates a prepared `[*batch, N, K/2]` weight and its swizzled scales.

  Returns:
    (N, K) of the unpacked matrices.
  """
  ndim = batch_dims + 2
  if weight.dtype != jnp.uint8 or weight.ndim != ndim:
    dims = "[" + "E, " * batch_dims + "N, K/2]"
    raise ValueError(
      f"{name}weight must be uint8 {dims}, got {weight.dtype}{weight.shape}"
    )
  n, k = weight.shape[-2], 2 * weight.shape[-1]
  if k % nvfp4.BLOCK_SIZE:
    raise ValueError(f"{name}weight: K={k} must be a multiple of 16")
  want = (
    *weight.shape[:batch_dims],
    *swizzle.padded_shape(n, k // nvfp4.BLOCK_SIZE),
  )
  if block_scale.dtype != jnp.float8_e4m3fn or tuple(block_scale.shape) != want:
    raise ValueError(
      f"{name}block_scale must be float8_e4m3fn {want} for weight"
      f" {weight.shape}, got {block_scale.dtype}{block_scale.shape}"
    )
  return n, k


def epilogue_scale_operands(
  alpha: jax.Array, input_scale_inv: jax.Array | None, activation: str
) -> tuple[jax.Array, ...]:
  """The per-tensor scales (scalars, or one per expert) whose product a
  kernel epilogue multiplies by: alpha for W4A4 and weight-only layers,
  alpha * input_scale_inv (= weight_scale_2, transform doc) for W4A16."""
  if activation == "bf16" and input_scale_inv is not None:
    return (alpha, input_scale_inv)
  return (alpha,)


H200_SMS = 132
INTERPRET_SMS = 4  # small, so that split-K runs in interpret-mode tests


def check_sm90(op: str, interpret: bool) -> None:
  """Raises NotImplementedError unless a Hopper GPU (or the interpreter)."""
  if interpret:
    return
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise NotImplementedError(
      f"{op} needs an NVIDIA GPU (found {device.platform}); interpret=True"
      " runs it on CPU"
    )
  major = str(device.compute_capability).split(".")[0]
  if major != "9":
    raise NotImplementedError(
      f"no {op} kernel for compute capability {device.compute_capability}"
      " yet (sm90 only)"
    )


def num_sms(interpret: bool) -> int:
  if interpret:
    return INTERPRET_SMS
  return getattr(jax.devices()[0], "core_count", H200_SMS)

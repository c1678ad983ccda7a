"""Post-training quantization of a bf16 param tree to ModelOpt's NVFP4 layout.

What ModelOpt's export does, for trees shaped like `load_modelopt`'s output:
each calibrated linear's `weight [N, K]` becomes `weight`, `weight_scale`,
`weight_scale_2` and `input_scale`; fused groups (q/k/v, gate/up and each
expert's gate/up) share the group's max amax first (format doc §3), so the
result matches a ModelOpt export bit for bit given the same amaxes.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from fp4jax.format import nvfp4

FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _amax(w) -> np.float32:
  return np.float32(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32))))


def _quantize_linear(w, group_amax, input_amax) -> dict[str, Any]:
  t = nvfp4.quantize(
    w, global_scale=nvfp4.global_scale_from_amax(jnp.float32(group_amax))
  )
  node = {
    "weight": t.packed,
    "weight_scale": t.block_scale,
    "weight_scale_2": t.global_scale,
  }
  if input_amax is not None:
    node["input_scale"] = nvfp4.global_scale_from_amax(jnp.float32(input_amax))
  return node


def _quantize_experts(node, input_amax) -> dict[str, Any]:
  """bf16 `w13_weight [E, 2I, H]`, `w2_weight [E, H, I]` -> NVFP4 leaves."""
  w13, w2 = node["w13_weight"], node["w2_weight"]
  # One global scale per expert for its fused gate/up rows.
  group = jnp.max(jnp.abs(w13.astype(jnp.float32)), axis=(1, 2))
  t13 = nvfp4.quantize(w13, global_scale=nvfp4.global_scale_from_amax(group))
  t2 = nvfp4.quantize(w2)
  in13, in2 = (None, None) if input_amax is None else input_amax
  out = {
    "w13_weight": t13.packed,
    "w13_weight_scale": t13.block_scale,
    "w13_weight_scale_2": jnp.stack([t13.global_scale] * 2, axis=-1),
    "w2_weight": t2.packed,
    "w2_weight_scale": t2.block_scale,
    "w2_weight_scale_2": t2.global_scale,
  }
  if in13 is not None:
    e = w13.shape[0]
    scale13 = nvfp4.global_scale_from_amax(jnp.float32(in13))
    out["w13_input_scale"] = jnp.full((e, 2), scale13, jnp.float32)
    scale2 = nvfp4.global_scale_from_amax(jnp.float32(in2))
    out["w2_input_scale"] = jnp.full((e,), scale2, jnp.float32)
  return out


def quantize_params(
  params: Mapping[str, Any],
  input_amax: Mapping[str, Any],
  *,
  weight_only: bool = False,
) -> dict[str, Any]:
  """Quantizes the listed modules of a bf16 tree to NVFP4 (ModelOpt layout).

  Args:
    params: nested dict of bf16 leaves with HF names; linear modules hold
      `weight [N, K]`, stacked MoE `experts` nodes hold `w13_weight [E, 2I,
      H]` ([gate; up] rows) and `w2_weight [E, H, I]`.
    input_amax: dotted module path -> calibrated activation amax (a float
      for a linear; `(gate_up_amax, down_amax)` for an experts node). Only
      these modules are quantized; everything else stays as it is.
    weight_only: write no `input_scale` (an NVFP4A16 checkpoint).

  Returns:
    A new nested dict in `fp4jax.checkpoint.load_modelopt`'s layout.
  """
  todo = dict(input_amax)

  def walk(node, path):
    out = {}
    for name, child in node.items():
      child_path = f"{path}.{name}" if path else name
      if child_path in todo:
        amax = todo.pop(child_path)
        amax = None if weight_only else amax
        if name == "experts":
          out[name] = _quantize_experts(child, amax)
        else:
          group = next((g for g in FUSED_GROUPS if name in g), (name,))
          peers = [node[g]["weight"] for g in group if g in node]
          out[name] = dict(child)
          del out[name]["weight"]
          out[name].update(
            _quantize_linear(child["weight"], max(map(_amax, peers)), amax)
          )
      elif isinstance(child, Mapping):
        out[name] = walk(child, child_path)
      else:
        out[name] = child
    return out

  result = walk(params, "")
  if todo:
    raise KeyError(f"modules not found in params: {sorted(todo)}")
  return result

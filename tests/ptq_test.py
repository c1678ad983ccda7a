"""ptq.quantize_params against ModelOpt's own exports (fused groups too)."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import checkpoint
from fp4jax import ptq
from fp4jax.checkpoint import safetensors_io

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "modelopt"


def bf16_tree(ref) -> tuple[dict, dict]:
  """The fixture's original weights in load_modelopt's layout, and amaxes."""
  tree: dict = {}
  experts: dict = {}
  for key in ref:
    if not key.endswith(".original_weight"):
      continue
    module = key.removesuffix(".original_weight")
    if ".experts." in module:
      prefix, rest = module.split(".experts.")
      e, proj = rest.split(".")
      experts.setdefault(prefix, {}).setdefault(int(e), {})[proj] = ref[key]
      continue
    node = tree
    for part in module.split("."):
      node = node.setdefault(part, {})
    node["weight"] = jnp.asarray(ref[key])
  for prefix, per_expert in experts.items():
    node = tree
    for part in (prefix + ".experts").split("."):
      node = node.setdefault(part, {})
    order = sorted(per_expert)
    node["w13_weight"] = jnp.asarray(
      np.stack(
        [
          np.concatenate([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]])
          for e in order
        ]
      )
    )
    node["w2_weight"] = jnp.asarray(
      np.stack([per_expert[e]["down_proj"] for e in order])
    )
  targets = {}
  for key in ref:
    if key.endswith(".original_weight") and ".experts." not in key:
      targets[key.removesuffix(".original_weight")] = 1.0
  for prefix in experts:
    targets[prefix + ".experts"] = (1.0, 1.0)
  return tree, targets


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3_moe"])
def test_quantize_params_reproduces_the_modelopt_export(name):
  ref = safetensors_io.open_tensors(FIXTURES / name / "reference.safetensors")
  exported, _ = checkpoint.load_modelopt(FIXTURES / name, progress=False)
  tree, targets = bf16_tree(ref)
  ours = ptq.quantize_params(tree, targets)

  def compare(a, b, path=""):
    for k, v in a.items():
      if isinstance(v, dict):
        compare(v, b[k], f"{path}.{k}")
      elif not k.endswith("input_scale"):  # amaxes here are placeholders
        np.testing.assert_array_equal(
          np.asarray(v).reshape(-1).view(np.uint8),
          np.asarray(b[k]).reshape(-1).view(np.uint8),
          err_msg=f"{path}.{k}",
        )

  compare(ours, exported)


def test_weight_only_and_unknown_modules():
  w = jnp.ones((32, 32), jnp.bfloat16)
  tree = {"a": {"weight": w}, "norm": {"weight": jnp.ones(32)}}
  out = ptq.quantize_params(tree, {"a": 3.0}, weight_only=True)
  assert set(out["a"]) == {"weight", "weight_scale", "weight_scale_2"}
  assert out["norm"]["weight"] is tree["norm"]["weight"]
  with pytest.raises(KeyError, match="b.c"):
    ptq.quantize_params(tree, {"b.c": 1.0})

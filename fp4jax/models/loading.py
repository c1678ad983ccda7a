"""`from_pretrained`: ModelOpt checkpoint -> (Orbax cache) -> prepared model."""

import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from fp4jax import checkpoint
from fp4jax import errors
from fp4jax.models import causal_lm
from fp4jax.models import config as config_lib
from fp4jax.nn import prepare as prepare_lib


def _quantized_modules(params) -> set[str]:
  """Dotted names of the nodes the checkpoint stores in NVFP4."""
  found = set()

  def walk(node, path):
    if any(k.endswith("weight_scale") for k in node):
      found.add(path)
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{path}.{k}" if path else k)

  walk(params, "")
  return found


def from_pretrained(
  path: str | os.PathLike,
  *,
  dtype=jnp.bfloat16,
  activation: str = "bf16",
  implementation: str | None = None,
  orbax_cache: str | os.PathLike | None = None,
  progress: bool = True,
  mesh=None,
  axis: str = "tp",
  weight_layout: str = "natural",
) -> causal_lm.CausalLM:
  """Loads a ModelOpt NVFP4 Hugging Face checkpoint as a prepared model.

  Args:
    path: the checkpoint directory (`config.json`, safetensors).
    dtype: compute dtype (and of the unquantized weights).
    activation: "bf16" (W4A16) or "nvfp4" (W4A4).
    implementation: kernel backend for the NVFP4 ops.
    orbax_cache: optional directory; the first call converts the checkpoint
      to Orbax there, later calls restore from it.
    progress: progress bar while reading safetensors.
    mesh: a `jax.sharding.Mesh` to split the model over: attention and MLP
      projections tensor parallel (q/k/v/gate/up by output features, o/down
      by input features), MoE experts expert parallel, all along `axis`;
      embeddings, norms, routers and lm_head stay replicated.
    axis: the mesh axis to split along.
    weight_layout: "sm90" stores the packed weights in the bit order the
      Hopper kernels decode fastest, "sm90_row_pairs" the dense ones in the
      layout that skips the activation split, faster for prefill
      (`fp4jax.transform.prepare`).

  Returns:
    A `CausalLM` in prepared state (source scale leaves dropped).
  """
  config = checkpoint.read_checkpoint_config(path)
  cfg = config_lib.ModelConfig.from_hf(config.hf_config)
  cache = None if orbax_cache is None else pathlib.Path(orbax_cache)
  if cache is not None and cache.exists():
    params = checkpoint.restore_params(cache)
  else:
    params, _ = checkpoint.load_modelopt(path, progress=progress)
    if cache is not None:
      checkpoint.save_params(cache, params)
  quantized = _quantized_modules(params)
  # Weight-only (NVFP4A16) checkpoints carry no input_scale at all; the
  # loader refuses a mix.
  weight_only = not any(
    path[-1].key.endswith("input_scale")
    for path, _ in jax.tree_util.tree_leaves_with_path(params)
  )
  abstract = nnx.eval_shape(
    lambda: causal_lm.CausalLM(
      cfg,
      lambda name: name in quantized,
      activation=activation,
      implementation=implementation,
      weight_only=weight_only,
      dtype=dtype,
      rngs=nnx.Rngs(0),
    )
  )
  graphdef, state = nnx.split(abstract)
  state_dict = nnx.to_pure_dict(state)
  unquantized_float = lambda x: (  # noqa: E731
    x.astype(dtype) if x.dtype == jnp.bfloat16 else x
  )
  params = jax.tree.map(unquantized_float, params)
  _check_same_leaves(state_dict, params)
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  plan = None if mesh is None else decoder_plan(axis)
  prepare_lib.prepare_model(
    model, donate=True, mesh=mesh, plan=plan, weight_layout=weight_layout
  )
  return model


COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def decoder_plan(axis: str):
  """How a decoder's NVFP4 modules split (`prepare_model`'s `plan`)."""

  def plan(path: str):
    name = path.rsplit("/", 1)[-1]
    if name in COLUMN_PARALLEL:
      return "column", axis
    if name in ROW_PARALLEL:
      return "row", axis
    if name == "experts":
      return "experts", axis
    return None

  return plan


def _check_same_leaves(expected, params) -> None:
  """Names the leaves the model wants but the checkpoint lacks, and back."""

  def paths(tree, prefix=""):
    for k, v in tree.items():
      name = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(v, dict):
        yield from paths(v, name)
      else:
        yield name

  want, have = set(paths(expected)), set(paths(params))
  if want != have:
    missing, extra = sorted(want - have)[:8], sorted(have - want)[:8]
    raise errors.CheckpointError(
      f"checkpoint does not match the model: missing {missing},"
      f" unexpected {extra}"
    )

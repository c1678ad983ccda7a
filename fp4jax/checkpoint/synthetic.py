"""Random ModelOpt-layout NVFP4 param trees for tests and demos.

Packed weights are random bytes and block scales random positive finite e4m3
values, so the trees exercise every code path of loading and saving; they are
not the quantization of any real weight.
"""

from typing import Any

import ml_dtypes
import numpy as np

from fp4jax.checkpoint import modelopt

GROUP = modelopt.GROUP_SIZE


def block_scales(rng: np.random.Generator, shape) -> np.ndarray:
  """Random positive, finite float8_e4m3fn values (bytes 0x01..0x7E)."""
  raw = rng.integers(1, 0x7F, shape, dtype=np.uint8)
  return raw.view(ml_dtypes.float8_e4m3fn)


def per_tensor_scale(rng: np.random.Generator, shape=()) -> np.ndarray:
  """Random positive float32 scales of a plausible size (amax / 2688)."""
  return rng.uniform(1e-5, 1e-2, shape).astype(np.float32)


def bf16(rng: np.random.Generator, shape) -> np.ndarray:
  return (0.02 * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16)


def nvfp4_linear(
  rng: np.random.Generator, n: int, k: int, *, input_scale: bool = True
) -> dict[str, np.ndarray]:
  """Source leaves of one NVFP4 linear with weight [N, K]."""
  if k % GROUP:
    raise ValueError(f"{k=} must be a multiple of {GROUP}")
  leaves = {
    "weight": rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
    "weight_scale": block_scales(rng, (n, k // GROUP)),
    "weight_scale_2": per_tensor_scale(rng),
  }
  if input_scale:
    leaves["input_scale"] = per_tensor_scale(rng)
  return leaves


def nvfp4_experts(
  rng: np.random.Generator,
  num_experts: int,
  hidden: int,
  intermediate: int,
  *,
  input_scale: bool = True,
  equal_gate_up: bool = True,
) -> dict[str, np.ndarray]:
  """A stacked NVFP4 experts node.

  With ``equal_gate_up`` each expert's gate and up share ``weight_scale_2``,
  as ModelOpt exports them; otherwise they differ. ``input_scale`` is always
  shared (ModelOpt equalises it).
  """
  e, h, i = num_experts, hidden, intermediate
  scale_2 = per_tensor_scale(rng, (e, 1 if equal_gate_up else 2))
  leaves = {
    "w13_weight": rng.integers(0, 256, (e, 2 * i, h // 2), dtype=np.uint8),
    "w13_weight_scale": block_scales(rng, (e, 2 * i, h // GROUP)),
    "w13_weight_scale_2": np.broadcast_to(scale_2, (e, 2)).copy(),
    "w2_weight": rng.integers(0, 256, (e, h, i // 2), dtype=np.uint8),
    "w2_weight_scale": block_scales(rng, (e, h, i // GROUP)),
    "w2_weight_scale_2": per_tensor_scale(rng, (e,)),
  }
  if input_scale:
    # ModelOpt exports one input_scale per gate/up pair.
    leaves["w13_input_scale"] = np.repeat(
      per_tensor_scale(rng, (e, 1)), 2, axis=1
    )
    leaves["w2_input_scale"] = per_tensor_scale(rng, (e,))
  return leaves


def share_scales(*linears: dict[str, np.ndarray]) -> None:
  """Gives fused siblings (q/k/v, gate/up) one set of per-tensor scales.

  ModelOpt takes the max amax over such groups at export (format spec §3).
  """
  for name in ("weight_scale_2", "input_scale"):
    if name in linears[0]:
      value = max(lin[name] for lin in linears)
      for lin in linears:
        lin[name] = value.copy()


def bf16_experts(
  rng: np.random.Generator, num_experts: int, hidden: int, intermediate: int
) -> dict[str, np.ndarray]:
  """A stacked unquantized (excluded) experts node."""
  e, h, i = num_experts, hidden, intermediate
  return {
    "w13_weight": bf16(rng, (e, 2 * i, h)),
    "w2_weight": bf16(rng, (e, h, i)),
  }


def tiny_model(
  rng: np.random.Generator,
  *,
  model_type: str = "llama",
  num_layers: int = 2,
  hidden: int = 64,
  intermediate: int = 32,
  num_heads: int = 4,
  num_kv_heads: int = 2,
  head_dim: int = 16,
  vocab: int = 96,
  num_experts: int = 4,
  weight_only: bool = False,
  exclude_experts: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], modelopt.QuantizationConfig]:
  """A small model in the layout `modelopt.load_modelopt` returns.

  Args:
    rng: source of all random values.
    model_type: ``"llama"`` (dense MLP), ``"qwen3_moe"`` (``mlp.experts``)
      or ``"mixtral"`` (``block_sparse_moe.experts``).
    num_layers: decoder layers.
    hidden: hidden size (a multiple of 16).
    intermediate: MLP or per-expert intermediate size (a multiple of 16).
    num_heads: attention heads.
    num_kv_heads: key/value heads.
    head_dim: per-head size; heads * head_dim must be a multiple of 16.
    vocab: vocabulary size.
    num_experts: experts per MoE layer.
    weight_only: no input_scale anywhere (NVFP4A16).
    exclude_experts: leave experts in bf16 and exclude them in the config.

  Returns:
    ``(params, hf_config, quantization)`` ready for `modelopt.save_modelopt`.
  """
  scales = not weight_only

  def linear(n, k):
    return nvfp4_linear(rng, n, k, input_scale=scales)

  moe = model_type in ("qwen3_moe", "mixtral")
  mlp_key = "block_sparse_moe" if model_type == "mixtral" else "mlp"
  layers = {}
  for layer in range(num_layers):
    if not moe:
      mlp = {
        "gate_proj": linear(intermediate, hidden),
        "up_proj": linear(intermediate, hidden),
        "down_proj": linear(hidden, intermediate),
      }
      share_scales(mlp["gate_proj"], mlp["up_proj"])
    elif exclude_experts:
      mlp = {
        "gate": {"weight": bf16(rng, (num_experts, hidden))},
        "experts": bf16_experts(rng, num_experts, hidden, intermediate),
      }
    else:
      mlp = {
        "gate": {"weight": bf16(rng, (num_experts, hidden))},
        "experts": nvfp4_experts(
          rng, num_experts, hidden, intermediate, input_scale=scales
        ),
      }
    attn = {
      "q_proj": linear(num_heads * head_dim, hidden),
      "k_proj": linear(num_kv_heads * head_dim, hidden),
      "v_proj": linear(num_kv_heads * head_dim, hidden),
      "o_proj": linear(hidden, num_heads * head_dim),
    }
    share_scales(attn["q_proj"], attn["k_proj"], attn["v_proj"])
    layers[str(layer)] = {
      "input_layernorm": {"weight": bf16(rng, (hidden,))},
      "self_attn": attn,
      "post_attention_layernorm": {"weight": bf16(rng, (hidden,))},
      mlp_key: mlp,
    }
  params = {
    "model": {
      "embed_tokens": {"weight": bf16(rng, (vocab, hidden))},
      "layers": layers,
      "norm": {"weight": bf16(rng, (hidden,))},
    },
    "lm_head": {"weight": bf16(rng, (vocab, hidden))},
  }
  hf_config = {
    "architectures": [
      {
        "llama": "LlamaForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "mixtral": "MixtralForCausalLM",
      }[model_type]
    ],
    "model_type": model_type,
    "hidden_size": hidden,
    "intermediate_size": intermediate,
    "num_hidden_layers": num_layers,
    "num_attention_heads": num_heads,
    "num_key_value_heads": num_kv_heads,
    "head_dim": head_dim,
    "vocab_size": vocab,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
  }
  if model_type == "qwen3_moe":
    hf_config["num_experts"] = num_experts
    hf_config["moe_intermediate_size"] = intermediate
  elif model_type == "mixtral":
    hf_config["num_local_experts"] = num_experts
  exclude = ["lm_head"]
  if exclude_experts:
    exclude.append(f"*{mlp_key}.experts*")
  quantization = modelopt.QuantizationConfig(
    "NVFP4", GROUP, tuple(exclude), None
  )
  return params, hf_config, quantization

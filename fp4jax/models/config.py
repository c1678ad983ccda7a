"""The decoder configuration read from a Hugging Face `config.json`."""

import dataclasses
from collections.abc import Mapping
from typing import Any

SUPPORTED = ("llama", "qwen3", "qwen3_moe", "mixtral")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """What the decoder needs from `config.json` (HF names, HF defaults)."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  rope_scaling: Mapping[str, Any] | None
  tie_word_embeddings: bool
  attention_bias: bool
  # MoE (zero experts: dense MLP everywhere).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()

  @property
  def qk_norm(self) -> bool:
    """Qwen3 normalizes q and k per head before RoPE."""
    return self.model_type in ("qwen3", "qwen3_moe")

  @property
  def moe_block_name(self) -> str:
    return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

  def is_moe_layer(self, layer: int) -> bool:
    if not self.num_experts or layer in self.mlp_only_layers:
      return False
    return (layer + 1) % self.decoder_sparse_step == 0

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
    """Parses a `config.json` dict; unknown architectures are refused."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
      raise NotImplementedError(
        f"model_type={model_type!r} is not supported (one of {SUPPORTED})"
      )
    heads = hf["num_attention_heads"]
    # transformers >= 5 nests RoPE settings in rope_parameters.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (
      rope if rope.get("rope_type", "default") != "default" else None
    )
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    intermediate = hf["intermediate_size"]
    return cls(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=intermediate,
      num_hidden_layers=hf["num_hidden_layers"],
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
      rope_scaling=scaling,
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      attention_bias=hf.get("attention_bias", False),
      num_experts=num_experts,
      num_experts_per_tok=hf.get("num_experts_per_tok", 0),
      # Mixtral's experts use intermediate_size.
      moe_intermediate_size=hf.get("moe_intermediate_size", intermediate),
      norm_topk_prob=hf.get("norm_topk_prob", model_type == "mixtral"),
      decoder_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
      mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
    )

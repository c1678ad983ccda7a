"""Llama / Qwen3 / Qwen3-MoE / Mixtral decoders with NVFP4 linears."""

import jax.numpy as jnp
from flax import nnx

from fp4jax import nn
from fp4jax.models import config as config_lib
from fp4jax.models import layers

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class DecoderLayer(nnx.Module):
  def __init__(
    self,
    cfg: config_lib.ModelConfig,
    index: int,
    quantized,
    *,
    options: layers.NVFP4Options,
    rngs,
  ):
    prefix = f"model.layers.{index}"
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.post_attention_layernorm = layers.RMSNorm(
      cfg.hidden_size, cfg.rms_norm_eps
    )
    self.self_attn = layers.Attention(
      cfg,
      {p: quantized(f"{prefix}.self_attn.{p}") for p in ATTENTION},
      options=options,
      rngs=rngs,
    )
    if cfg.is_moe_layer(index):
      block = f"{prefix}.{cfg.moe_block_name}.experts"
      if not quantized(block):
        raise NotImplementedError(
          f"{block}: unquantized (excluded) experts are not supported yet"
        )
      moe = nn.NVFP4MoE(
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        renormalize=cfg.norm_topk_prob,
        activation=options.activation,
        implementation=options.implementation,
        weight_only=options.weight_only,
        dtype=options.dtype,
        rngs=rngs,
      )
      setattr(self, cfg.moe_block_name, moe)
      self.ffn_name = cfg.moe_block_name
    else:
      self.mlp = layers.MLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        {p: quantized(f"{prefix}.mlp.{p}") for p in MLP},
        options=options,
        rngs=rngs,
      )
      self.ffn_name = "mlp"

  def __call__(self, x, positions, cache):
    h, cache = self.self_attn(self.input_layernorm(x), positions, cache)
    x = x + h
    ffn = getattr(self, self.ffn_name)
    return x + ffn(self.post_attention_layernorm(x)), cache


class Embedding(nnx.Module):
  def __init__(self, vocab, hidden, *, rngs):
    init = nnx.initializers.normal(0.02)
    self.weight = nnx.Param(init(rngs.params(), (vocab, hidden), jnp.bfloat16))

  def __call__(self, ids, dtype):
    return self.weight[...][ids].astype(dtype)


class Decoder(nnx.Module):
  """`model.*` of a HF checkpoint: embeddings, layers, final norm."""

  def __init__(self, cfg, quantized, *, options: layers.NVFP4Options, rngs):
    self.dtype = options.dtype
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.layers = nnx.List(
      [
        DecoderLayer(cfg, i, quantized, options=options, rngs=rngs)
        for i in range(cfg.num_hidden_layers)
      ]
    )
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def __call__(self, input_ids, positions, cache):
    x = self.embed_tokens(input_ids, self.dtype)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, None if cache is None else cache[i])
      new_cache.append(layer_cache)
    return self.norm(x), (None if cache is None else new_cache)


class CausalLM(nnx.Module):
  """`model(input_ids, positions, cache) -> (logits, cache)`, HF leaf names.

  Holds `model.embed_tokens`, `model.layers.N.*`, `model.norm` and
  `lm_head`, so a `load_modelopt` tree fills it with
  `nnx.replace_by_pure_dict`.
  """

  def __init__(
    self,
    cfg: config_lib.ModelConfig,
    quantized,
    *,
    activation: str = "bf16",
    implementation: str | None = None,
    weight_only: bool = False,
    dtype=jnp.bfloat16,
    rngs: nnx.Rngs,
  ):
    """Builds the decoder (random weights; restore real ones into it).

    Args:
      cfg: the parsed `config.json`.
      quantized: `module_name -> bool`, whether the checkpoint stores that
        module (dotted HF name) in NVFP4.
      activation: "bf16" (W4A16) or "nvfp4" (W4A4) for the NVFP4 layers.
      implementation: kernel backend (see `pallas_kernels`).
      weight_only: NVFP4 layers have no `input_scale` (NVFP4A16).
      dtype: compute dtype of activations.
      rngs: random keys.
    """
    options = layers.NVFP4Options(
      activation=activation,
      implementation=implementation,
      weight_only=weight_only,
      dtype=dtype,
    )
    self.cfg = cfg
    self.dtype = dtype
    self.model = Decoder(cfg, quantized, options=options, rngs=rngs)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.linear(
        quantized("lm_head"),
        cfg.hidden_size,
        cfg.vocab_size,
        options=options,
        rngs=rngs,
      )

  def __call__(self, input_ids, positions=None, cache=None):
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    h, cache = self.model(input_ids, positions, cache)
    if self.lm_head is None:
      emb = self.model.embed_tokens.weight[...].astype(h.dtype)
      logits = jnp.einsum(
        "bth,vh->btv", h, emb, preferred_element_type=jnp.float32
      )
    else:
      logits = self.lm_head(h).astype(jnp.float32)
    return logits, cache

  def init_cache(self, batch: int, max_len: int):
    """Zeroed KV cache: per layer `(k, v)` of `[B, max_len, KVH, D]`."""
    shape = (batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim)
    return [
      (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
      for _ in range(self.cfg.num_hidden_layers)
    ]

"""Decoder models (Llama, Qwen3, Qwen3-MoE, Mixtral) built from config.json."""

from fp4jax.models.causal_lm import CausalLM as CausalLM
from fp4jax.models.config import ModelConfig as ModelConfig
from fp4jax.models.generate import generate as generate
from fp4jax.models.loading import from_pretrained as from_pretrained

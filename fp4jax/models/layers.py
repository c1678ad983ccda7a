"""Decoder building blocks with Hugging Face leaf names."""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp4jax import nn
from fp4jax.models import config as config_lib


class Linear(nnx.Module):
  """An unquantized linear with HF's `weight [N, K]` (excluded modules)."""

  def __init__(
    self,
    in_features,
    out_features,
    *,
    use_bias=False,
    param_dtype=jnp.bfloat16,
    dtype=None,
    rngs,
  ):
    init = nnx.initializers.lecun_normal()
    self.weight = nnx.Param(
      init(rngs.params(), (out_features, in_features), param_dtype)
    )
    self.bias = (
      nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    )
    self.dtype = dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    y = jnp.einsum(
      "...k,nk->...n",
      x.astype(dtype),
      self.weight[...].astype(dtype),
      preferred_element_type=jnp.float32,
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32).reshape(
        (1,) * (y.ndim - 1) + (-1,)
      )
    return y.astype(dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NVFP4Options:
  """How a model's NVFP4 layers run, shared by all of them.

  Attributes:
    activation: "bf16" (W4A16) or "nvfp4" (W4A4).
    implementation: kernel backend (see `pallas_kernels`).
    weight_only: the checkpoint has no `input_scale` (NVFP4A16).
    dtype: compute dtype of activations.
  """

  activation: str = "bf16"
  implementation: str | None = None
  weight_only: bool = False
  dtype: Any = jnp.bfloat16


def linear(
  quantized: bool, in_features, out_features, *, options, use_bias=False, rngs
):
  """An NVFP4 or an unquantized linear, as the checkpoint stores it."""
  if quantized:
    return nn.NVFP4Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      activation=options.activation,
      implementation=options.implementation,
      weight_only=options.weight_only,
      dtype=options.dtype,
      rngs=rngs,
    )
  return Linear(
    in_features, out_features, use_bias=use_bias, dtype=options.dtype, rngs=rngs
  )


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.bfloat16):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + self.eps)
    w = self.weight[...].astype(jnp.float32)
    return (y * w.reshape((1,) * (y.ndim - 1) + (-1,))).astype(x.dtype)


def _yarn(cfg, scaling, inv: np.ndarray) -> tuple[np.ndarray, float]:
  """YaRN (arXiv 2309.00071): blend interpolated and original frequencies
  over a ramp of dimensions, and scale cos/sin by an attention factor."""
  d, base = cfg.head_dim, cfg.rope_theta
  factor = scaling["factor"]
  original = scaling["original_max_position_embeddings"]

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention = scaling.get("attention_factor")
  if attention is None:
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention = (
      mscale(factor, m) / mscale(factor, m_all)
      if m and m_all
      else mscale(factor)
    )

  def dim_of(rotations):  # the dimension that turns `rotations` times
    return (
      d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    )

  low = dim_of(scaling.get("beta_fast") or 32)
  high = dim_of(scaling.get("beta_slow") or 1)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
  keep = 1 - ramp  # 1: keep the original frequency (fast dimensions)
  return inv / factor * (1 - keep) + inv * keep, float(attention)


def rope_parameters(cfg: config_lib.ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies and the cos/sin scale, for the `rope_scaling`
  variants these models use: none, linear, llama3 and yarn."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  scaling = cfg.rope_scaling
  if not scaling:
    return inv.astype(np.float32), 1.0
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "linear":
    return (inv / scaling["factor"]).astype(np.float32), 1.0
  if kind == "yarn":
    inv, attention = _yarn(cfg, scaling, inv)
    return inv.astype(np.float32), attention
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    mid = (wavelen <= old / low) & (wavelen >= old / high)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return np.where(mid, blended, scaled).astype(np.float32), 1.0
  raise NotImplementedError(f"rope_scaling type {kind!r} is not supported")


def apply_rope(x, positions, inv_freq, scale=1.0):
  """HF's rotate-half RoPE on `x [B, T, heads, D]` at `positions [B, T]`."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq[None, None]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :] * scale
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :] * scale
  xf = x.astype(jnp.float32)
  half = xf.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with a KV cache; q/k/v/o HF names."""

  def __init__(
    self,
    cfg: config_lib.ModelConfig,
    quantized: dict,
    *,
    options: NVFP4Options,
    rngs,
  ):
    h, d = cfg.hidden_size, cfg.head_dim
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = d
    qkv = dict(use_bias=cfg.attention_bias, options=options, rngs=rngs)
    self.q_proj = linear(quantized["q_proj"], h, self.num_heads * d, **qkv)
    self.k_proj = linear(quantized["k_proj"], h, self.num_kv_heads * d, **qkv)
    self.v_proj = linear(quantized["v_proj"], h, self.num_kv_heads * d, **qkv)
    self.o_proj = linear(
      quantized["o_proj"], self.num_heads * d, h, options=options, rngs=rngs
    )
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
    else:
      self.q_norm = self.k_norm = None
    # Static (floats), so they are not leaves of the param state.
    inv_freq, self.rope_scale = rope_parameters(cfg)
    self.inv_freq = tuple(float(f) for f in inv_freq)

  def __call__(self, x, positions, cache):
    """x `[B, T, H]`; cache `(k, v)` of `[B, S, KVH, D]` or None."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
    q = apply_rope(q, positions, inv_freq, self.rope_scale)
    k = apply_rope(k, positions, inv_freq, self.rope_scale)
    if cache is None:
      keys, values, key_pos = k, v, positions
    else:
      # Write this step's k/v at its positions; attend over the whole cache
      # with positions beyond the current one masked.
      cache_k, cache_v = cache
      start = positions[0, 0]
      keys = jax.lax.dynamic_update_slice_in_dim(
        cache_k, k.astype(cache_k.dtype), start, axis=1
      )
      values = jax.lax.dynamic_update_slice_in_dim(
        cache_v, v.astype(cache_v.dtype), start, axis=1
      )
      cache = (keys, values)
      key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
    groups = self.num_heads // self.num_kv_heads
    qf = q.astype(jnp.float32).reshape(
      b, t, self.num_kv_heads, groups, self.head_dim
    )
    scores = jnp.einsum("btkgd,bskd->bkgts", qf, keys.astype(jnp.float32))
    scores = scores / np.float32(math.sqrt(self.head_dim))
    allowed = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(jnp.float32))
    out = out.reshape(b, t, self.num_heads * self.head_dim).astype(x.dtype)
    return self.o_proj(out), cache


class MLP(nnx.Module):
  """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

  def __init__(
    self, hidden, intermediate, quantized: dict, *, options: NVFP4Options, rngs
  ):
    kw = dict(options=options, rngs=rngs)
    self.gate_proj = linear(quantized["gate_proj"], hidden, intermediate, **kw)
    self.up_proj = linear(quantized["up_proj"], hidden, intermediate, **kw)
    self.down_proj = linear(quantized["down_proj"], intermediate, hidden, **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

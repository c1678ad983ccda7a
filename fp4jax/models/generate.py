"""Generation: one jitted prefill, then jitted cached decode steps."""

import jax
import jax.numpy as jnp
from flax import nnx

from fp4jax.models import causal_lm


def generate(
  model: causal_lm.CausalLM,
  input_ids: jax.Array,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Extends `input_ids [B, T]` by `max_new_tokens`; returns `[B, T + new]`.

  Greedy at `temperature=0`; otherwise samples from softmax(logits / T) with
  `rng`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"{max_new_tokens=} must be >= 1")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng")
  b, t = input_ids.shape
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, start, cache):
    positions = start + jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, cache = nnx.merge(graphdef, state)(ids, positions, cache)
    return logits[:, -1], cache

  def pick(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(input_ids.dtype)
    return jax.random.categorical(key, logits / temperature).astype(
      input_ids.dtype
    )

  keys = (
    [None] * max_new_tokens
    if rng is None
    else list(jax.random.split(rng, max_new_tokens))
  )
  cache = model.init_cache(b, t + max_new_tokens)
  logits, cache = step(state, input_ids, jnp.int32(0), cache)
  tokens = [pick(logits, keys[0])]
  for i in range(1, max_new_tokens):
    logits, cache = step(
      state, tokens[-1][:, None], jnp.int32(t + i - 1), cache
    )
    tokens.append(pick(logits, keys[i]))
  return jnp.concatenate([input_ids, jnp.stack(tokens, axis=1)], axis=1)

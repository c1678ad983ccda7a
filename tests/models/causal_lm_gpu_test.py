"""On a GPU: the fixture Llama through the Pallas matmul kernel."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import models
from fp4jax.checkpoint import safetensors_io

pytestmark = pytest.mark.gpu

LLAMA = (
  pathlib.Path(__file__).parents[1] / "fixtures" / "modelopt" / "tiny_llama"
)


def test_llama_with_the_pallas_matmul():
  ref = safetensors_io.open_tensors(LLAMA / "reference.safetensors")
  ids = jnp.asarray(ref["input_ids"], jnp.int32)
  logits = {}
  for implementation in ("xla", "pallas"):
    model = models.from_pretrained(
      LLAMA,
      dtype=jnp.bfloat16,
      implementation=implementation,
      progress=False,
    )
    logits[implementation] = np.asarray(model(ids)[0])
  scale = np.abs(ref["logits"]).max()
  # Both run bf16 activations with f32 accumulation; only the order of the
  # sums (and so some bf16 roundings of intermediates) differs.
  assert np.abs(logits["pallas"] - logits["xla"]).max() <= 1e-2 * scale
  # Against transformers in float32: bf16 activations through two layers.
  assert np.abs(logits["pallas"] - ref["logits"]).max() <= 5e-2 * scale

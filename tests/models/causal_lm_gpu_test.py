"""On a GPU: the fixture models through the Pallas kernels."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import models
from fp4jax.checkpoint import safetensors_io

pytestmark = pytest.mark.gpu

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "modelopt"


# Tolerances relative to max |logit|. Both implementations run bf16
# activations with float32 accumulation, so only the order of the sums (and
# some bf16 roundings of intermediates) differs; the MoE kernel also rounds
# gate/up and each expert's output to bf16 before the next step, as vLLM's
# and SGLang's MoE kernels do.
@pytest.mark.parametrize(
  "fixture, vs_xla, vs_transformers",
  [("tiny_llama", 1e-2, 5e-2), ("tiny_qwen3_moe", 2e-2, 5e-2)],
)
def test_fixture_model_with_the_pallas_kernels(
  fixture, vs_xla, vs_transformers
):
  path = FIXTURES / fixture
  ref = safetensors_io.open_tensors(path / "reference.safetensors")
  ids = jnp.asarray(ref["input_ids"], jnp.int32)
  logits = {}
  for implementation in ("xla", "pallas"):
    model = models.from_pretrained(
      path,
      dtype=jnp.bfloat16,
      implementation=implementation,
      progress=False,
    )
    logits[implementation] = np.asarray(model(ids)[0])
  assert np.all(np.isfinite(logits["pallas"]))
  scale = np.abs(ref["logits"]).max()
  assert np.abs(logits["pallas"] - logits["xla"]).max() <= vs_xla * scale
  # Against transformers in float32: bf16 activations through two layers.
  err = np.abs(logits["pallas"] - ref["logits"]).max()
  assert err <= vs_transformers * scale

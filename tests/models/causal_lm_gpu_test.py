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


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3_moe"])
def test_greedy_generation_with_the_pallas_kernels(fixture):
  # Every greedy token of transformers is the Pallas model's best or within
  # bf16 noise of it (teacher-forced over transformers' greedy sequence),
  # and generation reproduces the sequence up to the first step where the
  # float32 model (equal to transformers to 1e-4) sees a near tie.
  path = FIXTURES / fixture
  ref = safetensors_io.open_tensors(path / "reference.safetensors")
  want = np.asarray(ref["greedy_tokens"])
  prompt_len, noise = 8, 2e-2
  model = models.from_pretrained(
    path, dtype=jnp.bfloat16, implementation="pallas", progress=False
  )
  forced = np.asarray(model(jnp.asarray(want, jnp.int32))[0], np.float32)[0]
  steps = forced[prompt_len - 1 : -1]
  chosen = steps[np.arange(len(steps)), want[0, prompt_len:]]
  scale = np.abs(forced).max()
  assert np.all(chosen >= steps.max(axis=-1) - noise * scale)

  exact = models.from_pretrained(path, dtype=jnp.float32, progress=False)
  logits = np.asarray(exact(jnp.asarray(want, jnp.int32))[0])[0]
  top2 = np.sort(logits[prompt_len - 1 : -1], axis=-1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 2 * noise * np.abs(logits).max()
  checked = clear.size if clear.all() else int(np.argmin(clear))
  got = np.asarray(
    models.generate(
      model,
      jnp.asarray(want[:1, :prompt_len], jnp.int32),
      want.shape[1] - prompt_len,
    )
  )
  end = prompt_len + checked
  np.testing.assert_array_equal(got[0, :end], want[0, :end])

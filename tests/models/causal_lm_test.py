"""Decoder models against transformers (fixtures) and on all architectures."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import checkpoint
from fp4jax import models
from fp4jax.checkpoint import safetensors_io
from fp4jax.checkpoint import synthetic
from fp4jax.models import config as config_lib
from fp4jax.models import layers

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "modelopt"


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen3_moe"])
def fixture(request):
  path = FIXTURES / request.param
  model = models.from_pretrained(path, dtype=jnp.float32, progress=False)
  ref = safetensors_io.open_tensors(path / "reference.safetensors")
  return model, ref


def test_logits_match_transformers(fixture):
  # transformers ran the same architecture in float32 with ModelOpt's
  # dequantized weights: only float rounding may differ.
  model, ref = fixture
  logits, _ = model(jnp.asarray(ref["input_ids"], jnp.int32))
  want = np.asarray(ref["logits"])
  assert np.all(np.isfinite(np.asarray(logits)))
  rel = np.abs(np.asarray(logits) - want).max() / np.abs(want).max()
  assert rel < 1e-4, rel


def test_greedy_generation_matches_transformers(fixture):
  model, ref = fixture
  want = np.asarray(ref["greedy_tokens"])
  prompt = jnp.asarray(ref["input_ids"][:1, :8], jnp.int32)
  got = models.generate(model, prompt, want.shape[1] - 8)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_cached_decode_equals_full_forward(fixture):
  model, ref = fixture
  ids = jnp.asarray(ref["input_ids"][:1], jnp.int32)
  full, _ = model(ids)
  cache = model.init_cache(1, ids.shape[1])
  _, cache = model(ids[:, :10], None, cache)
  step, _ = model(ids[:, 10:11], jnp.array([[10]]), cache)
  np.testing.assert_allclose(
    np.asarray(step[0, 0]), np.asarray(full[0, 10]), rtol=1e-5, atol=1e-5
  )


def test_orbax_cache(tmp_path):
  path = FIXTURES / "tiny_llama"
  ids = jnp.arange(12, dtype=jnp.int32)[None]
  first = models.from_pretrained(
    path, dtype=jnp.float32, orbax_cache=tmp_path / "orbax", progress=False
  )
  assert (tmp_path / "orbax").exists()
  second = models.from_pretrained(
    path, dtype=jnp.float32, orbax_cache=tmp_path / "orbax", progress=False
  )
  np.testing.assert_array_equal(
    np.asarray(first(ids)[0]), np.asarray(second(ids)[0])
  )


def synthetic_checkpoint(tmp_path, rng, model_type):
  base = "llama" if model_type == "qwen3" else model_type
  params, hf, quant = synthetic.tiny_model(rng, model_type=base)
  hf["model_type"] = model_type
  hf["num_experts_per_tok"] = 2
  if model_type in ("qwen3", "qwen3_moe"):
    for layer in params["model"]["layers"].values():
      for norm in ("q_norm", "k_norm"):
        layer["self_attn"][norm] = {"weight": synthetic.bf16(rng, (16,)) + 1}
  checkpoint.save_modelopt(tmp_path / model_type, params, hf, quant)
  return tmp_path / model_type


@pytest.mark.parametrize(
  "model_type", ["llama", "qwen3", "qwen3_moe", "mixtral"]
)
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_every_architecture_loads_and_runs(
  tmp_path, rng, model_type, activation
):
  path = synthetic_checkpoint(tmp_path, rng, model_type)
  model = models.from_pretrained(path, activation=activation, progress=False)
  ids = jnp.asarray(rng.integers(0, 96, (2, 5)), jnp.int32)
  logits, _ = model(ids)
  assert logits.shape == (2, 5, 96)
  assert np.all(np.isfinite(np.asarray(logits)))
  out = models.generate(model, ids, 3)
  assert out.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(ids))


def test_checkpoint_that_does_not_match_the_config(tmp_path, rng):
  params, hf, quant = synthetic.tiny_model(rng)
  del params["model"]["norm"]
  checkpoint.save_modelopt(tmp_path / "c", params, hf, quant)
  with pytest.raises(fp4jax.CheckpointError, match="model.norm.weight"):
    models.from_pretrained(tmp_path / "c", progress=False)


def test_config_parsing():
  hf = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
  }
  cfg = config_lib.ModelConfig.from_hf(hf)
  assert cfg.head_dim == 16 and cfg.num_key_value_heads == 4
  assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0
  with pytest.raises(NotImplementedError, match="gpt2"):
    config_lib.ModelConfig.from_hf({**hf, "model_type": "gpt2"})
  longrope = dict(hf, rope_scaling={"rope_type": "longrope", "factor": 4.0})
  with pytest.raises(NotImplementedError, match="longrope"):
    layers.rope_parameters(config_lib.ModelConfig.from_hf(longrope))


@pytest.mark.parametrize("name", ["yarn_qwen3", "yarn_mscale", "llama3"])
def test_rope_scaling_matches_transformers(name):
  golden = json.loads(
    (pathlib.Path(__file__).parent / "rope_golden.json").read_text()
  )[name]
  cfg = config_lib.ModelConfig.from_hf(
    {
      "model_type": "qwen3",
      "vocab_size": 32,
      "hidden_size": 512,
      "intermediate_size": 128,
      "num_hidden_layers": 1,
      "num_attention_heads": 4,
      "head_dim": 128,
      "max_position_embeddings": 131072,
      "rope_parameters": {"rope_theta": 1000000.0, **golden["rope_scaling"]},
    }
  )
  inv, scale = layers.rope_parameters(cfg)
  np.testing.assert_allclose(inv, golden["inv_freq"], rtol=1e-6)
  assert scale == pytest.approx(golden["attention_factor"], rel=1e-12)


def test_tied_embeddings(tmp_path, rng):
  params, hf, quant = synthetic.tiny_model(rng)
  del params["lm_head"]
  hf["tie_word_embeddings"] = True
  checkpoint.save_modelopt(tmp_path / "c", params, hf, quant)
  model = models.from_pretrained(
    tmp_path / "c", dtype=jnp.float32, progress=False
  )
  ids = jnp.asarray([[1, 2, 3]], jnp.int32)
  logits, _ = model(ids)
  assert model.lm_head is None and logits.shape == (1, 3, 96)
  h, _ = model.model(ids, jnp.asarray([[0, 1, 2]]), None)
  emb = np.asarray(params["model"]["embed_tokens"]["weight"], np.float32)
  np.testing.assert_allclose(
    np.asarray(logits), np.asarray(h) @ emb.T, rtol=1e-4, atol=1e-5
  )

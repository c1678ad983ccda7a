"""Checkpoints with tensors beside the NVFP4 set (biases, KV-cache scales)."""

import numpy as np

import fp4jax
from fp4jax import checkpoint
from fp4jax.checkpoint import synthetic


def test_bias_and_kv_scales_survive_load_and_prepare(tmp_path, rng):
  params, hf_config, quantization = synthetic.tiny_model(rng)
  attn = params["model"]["layers"]["0"]["self_attn"]
  attn["q_proj"]["bias"] = synthetic.bf16(
    rng, (attn["q_proj"]["weight"].shape[0],)
  )
  attn["k_proj"]["k_scale"] = np.float32(0.5)
  attn["v_proj"]["v_scale"] = np.float32(0.25)
  checkpoint.save_modelopt(
    tmp_path / "ckpt",
    params,
    hf_config,
    checkpoint.QuantizationConfig(
      "NVFP4", 16, quantization.exclude_modules, "FP8"
    ),
  )
  loaded, config = checkpoint.load_modelopt(tmp_path / "ckpt", progress=False)
  assert config.quantization.kv_cache_quant_algo == "FP8"
  prepared, _ = fp4jax.prepare(loaded)
  got = prepared["model"]["layers"]["0"]["self_attn"]
  assert set(got["q_proj"]) == {
    "weight",
    "block_scale",
    "alpha",
    "input_scale_inv",
    "bias",
  }
  assert float(got["k_proj"]["k_scale"]) == 0.5
  assert float(got["v_proj"]["v_scale"]) == 0.25
  np.testing.assert_array_equal(
    np.asarray(got["q_proj"]["bias"]), attn["q_proj"]["bias"]
  )

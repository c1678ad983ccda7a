"""Checkpoint -> Orbax -> restore -> prepare -> forward, end to end."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import fp4jax
import pallas_kernels
from fp4jax import checkpoint
from fp4jax import demo

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "modelopt"


def test_modelopt_checkpoint_through_orbax_gives_the_same_prepared_tree(
  tmp_path, rng
):
  loaded, _ = checkpoint.load_modelopt(
    FIXTURES / "tiny_qwen3_moe", progress=False
  )
  checkpoint.save_params(tmp_path / "orbax", loaded)
  restored = checkpoint.restore_params(
    tmp_path / "orbax", abstract_params=jax.eval_shape(lambda: loaded)
  )
  direct, _ = fp4jax.prepare(loaded)
  via_orbax, report = fp4jax.prepare(restored, donate=True)
  flat_a = jax.tree_util.tree_leaves_with_path(direct)
  flat_b = jax.tree_util.tree_leaves_with_path(via_orbax)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
    np.testing.assert_array_equal(
      np.asarray(a).reshape(-1).view(np.uint8),
      np.asarray(b).reshape(-1).view(np.uint8),
      err_msg=str(path),
    )
  assert report.freed_bytes > 0

  layer = via_orbax["model"]["layers"]["0"]["self_attn"]["q_proj"]
  x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
  y = pallas_kernels.nvfp4_matmul(x, layer, activation="nvfp4")
  assert y.shape == (4, layer["weight"].shape[0])
  assert bool(jnp.all(jnp.isfinite(y)))
  experts = via_orbax["model"]["layers"]["1"]["mlp"]["experts"]
  logits = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
  out = pallas_kernels.nvfp4_moe(x, logits, experts, top_k=2)
  assert out.shape == (4, 128) and bool(jnp.all(jnp.isfinite(out)))


def test_demo_pipeline(tmp_path):
  result = demo.run(tmp_path, seed=1, tokens=16)
  report = result["report"]
  assert report.freed_bytes == sum(r.nbytes for r in report.removed)
  assert result["after"] == (
    result["before"] - report.freed_bytes + report.created_bytes
  )
  w4a16, w4a16_vs_dequantized = result["errors"]["bf16"]
  # With the dequantized weights only bf16 activation rounding remains.
  assert w4a16_vs_dequantized < 0.01
  # FP4 weights on random Gaussian layers: ~10% per matmul.
  assert w4a16 < 0.3
  assert result["errors"]["nvfp4"][0] < 0.4
  assert (tmp_path / "hf_checkpoint" / "model.safetensors").exists()


def test_demo_model_path(tmp_path):
  result = demo.run_model(tmp_path, seed=2, new_tokens=6)
  assert result["report"].freed_bytes > 0
  # Same weights, dequantized, in float32: only rounding may differ.
  assert result["logits_error_dequantized"] < 1e-4
  np.testing.assert_array_equal(
    np.asarray(result["tokens"]), np.asarray(result["dequantized_tokens"])
  )
  assert (tmp_path / "llama_orbax").is_dir()

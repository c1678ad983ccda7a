"""The benchmark harness runs end to end (host timer on CPU) and renders."""

import json

import jax

from benchmarks import matmul
from benchmarks import report


def test_matmul_harness_and_report(tmp_path):
  out = tmp_path / "r.json"
  # jax's own scaled_dot_general mixes dtypes and ranks internally.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    matmul.main(["--ci", "--out", str(out)])
  result = json.loads(out.read_text())
  statuses = {r["impl"]: r["status"] for r in result["rows"]}
  for anchor in ("xla_bf16", "xla_dequant_dot", "scaled_dot_general"):
    assert statuses[anchor] == "ok", statuses[anchor]
  ok = [r for r in result["rows"] if r["status"] == "ok"]
  assert all(r["us"] > 0 and r["tflop_per_s"] > 0 for r in ok)
  md = tmp_path / "B.md"
  md.write_text("# Benchmarks\n\nkept text\n")
  report.main(
    [str(out), "--markdown", str(md), "--plot", str(tmp_path / "p.png")]
  )
  text = md.read_text()
  assert "kept text" in text and "XLA bf16 dot" in text
  assert (tmp_path / "p.png").stat().st_size > 0
  # Re-rendering replaces the section instead of appending another one.
  report.main(
    [str(out), "--markdown", str(md), "--plot", str(tmp_path / "p.png")]
  )
  assert md.read_text().count("<!-- matmul:begin -->") == 1


def test_dequant_dot_anchor_matches_reference(rng):
  import jax.numpy as jnp
  import numpy as np

  import fp4jax
  import pallas_kernels

  w = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
  t = fp4jax.quantize(w)
  x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
  got = matmul.dequant_dot(x, t.packed, t.block_scale, t.global_scale)
  layer, _ = fp4jax.prepare(
    {
      "l": {
        "weight": t.packed,
        "weight_scale": t.block_scale,
        "weight_scale_2": t.global_scale,
      }
    }
  )
  want = pallas_kernels.nvfp4_matmul(x, layer["l"], implementation="xla")
  np.testing.assert_allclose(
    np.asarray(got, np.float32),
    np.asarray(want, np.float32),
    rtol=2e-2,
    atol=2e-2 * float(jnp.abs(want).max()),
  )

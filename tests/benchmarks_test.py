"""The benchmark harness runs end to end (host timer on CPU) and renders."""

import json

import jax

from benchmarks import matmul
from benchmarks import moe
from benchmarks import report
from benchmarks import sharded_moe
from benchmarks import timing


def test_matmul_harness_and_report(tmp_path):
  out = tmp_path / "r.json"
  # jax's own scaled_dot_general mixes dtypes and ranks internally.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    matmul.main(["--ci", "--tokens", "3", "--out", str(out)])
  result = json.loads(out.read_text())
  assert {r["M"] for r in result["rows"]} == {3}
  assert result["meta"]["weight_layout"] == "sm90"
  statuses = {r["impl"]: r["status"] for r in result["rows"]}
  assert set(statuses) == set(matmul.IMPLEMENTATIONS)
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


def test_moe_harness_and_report(tmp_path):
  out = tmp_path / "moe.json"
  moe.main(["--ci", "--out", str(out)])
  result = json.loads(out.read_text())
  statuses = {r["impl"]: r["status"] for r in result["rows"]}
  for anchor in ("ragged_dot_bf16", "fp4jax_xla"):
    assert statuses[anchor] == "ok", statuses[anchor]
  ok = [r for r in result["rows"] if r["status"] == "ok"]
  assert all(r["us"] > 0 and r["active_experts"] >= 1 for r in ok)
  md = tmp_path / "B.md"
  md.write_text("# Benchmarks\n\nkept text\n")
  args = [str(out), "--kind", "moe", "--markdown", str(md)]
  report.main([*args, "--plot", str(tmp_path / "m.png")])
  text = md.read_text()
  assert "kept text" in text and "jax.lax.ragged_dot bf16" in text
  assert "<!-- moe:begin -->" in text


def test_moe_time_budget_times_each_models_first_tokens(tmp_path):
  # A budget spent before any timing (making a large model's weights) still
  # times every model's first token count; later ones are skipped.
  out = tmp_path / "moe.json"
  moe.main(
    ["--ci", "--out", str(out), "--time-budget", "1e-9"]
    + ["--impls", "ragged_dot_bf16"]
  )
  rows = json.loads(out.read_text())["rows"]
  statuses = {r["T"]: r["status"] for r in rows}
  assert statuses == {1: "ok", 16: "skipped: time budget"}


def test_sharded_moe_harness_on_host_devices(tmp_path, capsys):
  out = tmp_path / "sharded.json"
  sharded_moe.main(
    ["--ci", "--platform", "cpu", "--tokens", "1,5", "--out", str(out)]
  )
  result = json.loads(out.read_text())
  memory = result["memory"]
  # Two ranks, each with half the experts, before and after the prepare.
  assert len(memory["prepared_bytes"]) == 2
  assert len(set(memory["source_bytes"].values())) == 1
  assert len(set(memory["prepared_bytes"].values())) == 1
  assert {"w13_weight_scale", "w2_weight_scale"} <= set(
    memory["freed_source_leaves"]
  )
  layouts = {(r["T"], r["layout"]) for r in result["rows"]}
  assert len(layouts) == 6 and (5, "one device") in layouts
  for row in result["rows"]:
    assert row["us"] > 0 and row["tokens_per_s"] > 0
    # Partial outputs added in float32 and rounded once: within a bf16 ulp.
    assert row["rel_err_vs_one_device"] <= 2.0**-7
  capsys.readouterr()
  sharded_moe.main(["--markdown", str(out)])
  text = capsys.readouterr().out
  assert "| 5 | 2 devices, tokens split |" in text and "MiB" in text


def test_ragged_dot_anchor_matches_reference(rng):
  import jax.numpy as jnp
  import numpy as np

  import pallas_kernels
  from tests.pallas_kernels.nvfp4_moe import test_base

  experts, src = test_base.make_experts(rng, 4, 64, 32)
  x = jnp.asarray(rng.standard_normal((6, 64)), jnp.bfloat16)
  logits = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  # The anchor on the same weights, dequantized to bf16 and scaled.
  w13 = src_dense(src, "w13_")
  w2 = src_dense(src, "w2_")
  got = moe.ragged_dot_moe(
    x, logits, jnp.swapaxes(w13, 1, 2), jnp.swapaxes(w2, 1, 2), top_k=2
  )
  want = pallas_kernels.nvfp4_moe(
    x, logits, experts, top_k=2, implementation="xla"
  )
  scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
  err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
  assert err.max() <= 0.03 * scale  # bf16 weights and silu approximation


def test_active_reference_equals_the_whole_reference():
  # The benchmark's check dequantizes only the routed experts; the numbers
  # must be the full reference's, bit for bit.
  import jax
  import jax.numpy as jnp
  import numpy as np

  import pallas_kernels

  key = jax.random.key(7)
  experts = moe.random_experts(key, 16, 64, 32)
  x = jax.random.normal(key, (5, 64), jnp.bfloat16)
  logits = jax.random.normal(jax.random.fold_in(key, 1), (5, 16))
  want = pallas_kernels.nvfp4_moe(
    x, logits, experts, top_k=2, implementation="xla"
  )
  got = moe.active_reference(x, logits, experts, top_k=2)
  assert np.unique(jnp.argsort(logits, axis=1)[:, -2:]).size < 16
  np.testing.assert_array_equal(
    np.asarray(got, np.float32), np.asarray(want, np.float32)
  )


def src_dense(src, prefix):
  import jax.numpy as jnp

  import fp4jax

  ws2 = jnp.asarray(src[prefix + "weight_scale_2"])
  if ws2.ndim == 2:  # [E, 2]: gate and up rows
    n = src[prefix + "weight"].shape[1]
    gs = jnp.where(
      jnp.arange(n)[None, :, None] < n // 2, ws2[:, :1, None], ws2[:, 1:, None]
    )
  else:
    gs = ws2[:, None, None]
  t = fp4jax.NVFP4Tensor(
    packed=jnp.asarray(src[prefix + "weight"]),
    block_scale=jnp.asarray(src[prefix + "weight_scale"]),
    global_scale=jnp.ones(ws2.shape[:1], jnp.float32),
  )
  return (fp4jax.dequantize(t) * gs).astype(jnp.bfloat16)


def test_report_merges_runs_group_by_group():
  def run(note, rows):
    meta = {
      "date": "d",
      "device": "gpu",
      "jax": "j",
      "command": note,
      "note": note,
      "timer": "cupti",
      "models": {"m": {"E": 1, "top_k": 1, "H": 1, "I": 1}},
      "pallas_vs_reference_rel_err": {"m": 0.1},
    }
    return {"meta": meta, "rows": rows}

  def row(t, impl, status="ok", us=1.0):
    return {"model": "m", "T": t, "impl": impl, "status": status, "us": us}

  first = run(
    "a", [row(16, "ragged_dot_bf16", us=9.0), row(1, "x", "skipped: time")]
  )
  second = run(
    "b",
    [
      row(1, "ragged_dot_bf16", us=5.0),
      row(1, "fp4jax_pallas_w4a16", us=2.0),
      row(16, "fp4jax_pallas_w4a16", us=3.0),
    ],
  )
  merged = report.merge([first, second], "moe")
  got = [(r["T"], r["impl"], r["run"]) for r in merged["rows"]]
  # T=1 only measured in run 2; T=16 measured once in each: run 1 wins.
  assert got == [
    (1, "ragged_dot_bf16", 2),
    (1, "fp4jax_pallas_w4a16", 2),
    (16, "ragged_dot_bf16", 1),
  ]
  assert [m["note"] for m in merged["meta"]["runs"]] == ["a", "b"]
  # With prefer_first (runs newest first), a group the first run measured
  # at all is its, even where a later run measured more of it; likewise
  # the second run before the third.
  third = run(
    "c",
    [row(16, "ragged_dot_bf16", us=7.0), row(16, "fp4jax_xla", us=8.0)],
  )
  for prefer, want_run in ((False, 2), (True, 1)):
    merged = report.merge([first, third], "moe", prefer_first=prefer)
    assert {r["run"] for r in merged["rows"] if r["T"] == 16} == {want_run}
  empty = run("d", [row(64, "fp4jax_pallas_w4a16", us=1.0)])
  for prefer, want_run in ((False, 3), (True, 2)):
    merged = report.merge([empty, first, third], "moe", prefer_first=prefer)
    assert {r["run"] for r in merged["rows"] if r["T"] == 16} == {want_run}
  # A newer run that skipped an fp4jax row of a group (its time budget ran
  # out) gives way to one that measured the whole group; one that skipped
  # only an anchor keeps its group.
  for skipped_impl, want_run in (
    ("fp4jax_pallas_w4a4", 2),
    ("ragged_dot_bf16", 1),
  ):
    cut = run(
      "e",
      [
        row(16, "fp4jax_pallas_w4a16", us=2.5),
        row(16, skipped_impl, "skipped: time budget"),
      ],
    )
    merged = report.merge([cut, third], "moe", prefer_first=True)
    assert {r["run"] for r in merged["rows"] if r["T"] == 16} == {want_run}


def test_interleaved_medians_take_trials_in_turn(monkeypatch):
  order = []

  def trial(fn, args, calls, trials, kernels):
    order.append(args[0])
    return [10.0 * args[0] / calls] * trials

  monkeypatch.setattr(timing, "_samples_us", trial)

  def broken(x):
    raise NotImplementedError("no kernel here")

  got = timing.interleaved_medians(
    {
      "a": (lambda x: x + 1, (1,), 1),
      "broken": (broken, (3,), 1),
      "b": (lambda x: x * 2, (2,), 2),
    },
    trials=3,
  )
  assert order == [1, 2] * 3
  assert got["a"][:2] == (10.0, [10.0] * 3)
  assert got["b"][:2] == (10.0, [10.0] * 3)
  assert isinstance(got["broken"], NotImplementedError)


def test_tuner_checks_then_times_configs_in_turn(monkeypatch):
  import pallas_kernels
  from benchmarks import tune_matmul

  real = pallas_kernels.nvfp4_matmul

  def reference(x, layer, *, config=None, implementation=None, **kw):
    del config, implementation  # the reference stands in for the kernel
    return real(x, layer, implementation="xla", **kw)

  monkeypatch.setattr(tune_matmul.pallas_kernels, "nvfp4_matmul", reference)
  rows = tune_matmul.tune(
    [(256, 256)],
    [8],
    max_configs=2,
    overrides=[{"num_stages": 3}],
    weight_layout="sm90_row_pairs",
  )
  assert [r["status"] for r in rows] == ["ok", "ok"]
  assert rows[0]["config"] != rows[1]["config"]
  assert all(r["us"] > 0 and r["rel_err"] == 0 for r in rows)

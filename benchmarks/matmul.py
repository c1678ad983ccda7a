"""NVFP4 matmul benchmark: fp4jax against JAX's own paths, one timer.

  python -m benchmarks.matmul [--ci] [--out results.json] [--time-budget S]

Times, in the same run: fp4jax Pallas W4A16 and W4A4 (when implemented),
each with the layer prepared in the run's layout ("sm90") and in
"sm90_row_pairs" (no activation split), XLA's bf16 dot on bf16 weights,
XLA dequantize-then-dot from packed FP4 and `jax.nn.scaled_dot_general`
with the nvfp4 config; plus the two ceilings (a
device-to-device copy and a bf16 8192^3 dot). Each timed call runs the op
over several weight sets that together exceed L2, each with its own
activations (so that nothing done to x is shared between calls); the
median of 7 trials is reported, the implementations of a case timed trial
by trial in turn (`timing.interleaved_medians`). Render the JSON with
`python -m benchmarks.report`.
"""

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp

import fp4jax
import pallas_kernels
from benchmarks import arg_specs
from benchmarks import timing
from fp4jax.format import e2m1
from fp4jax.format import nvfp4
from fp4jax.format import swizzle

# The roofline's bandwidth: the H200's datasheet HBM rate. XLA's own bf16 dot
# streams 4.2 TB/s at M=1, above the copy rate we measure, so a measured
# copy would not bound what a kernel can reach.
HBM_BYTES_PER_S = 4.8e12

IMPLEMENTATIONS = (
  "xla_bf16",
  "xla_dequant_dot",
  "scaled_dot_general",
  "fp4jax_pallas_w4a16",
  "fp4jax_pallas_w4a4",
  "fp4jax_pallas_w4a16_row_pairs",
  "fp4jax_pallas_w4a4_row_pairs",
)


def measure_ceilings() -> dict:
  """HBM copy bandwidth and bf16 matmul rate, measured now."""
  n = (1 << 30) if timing.on_gpu() else (1 << 20)
  src = jnp.ones((n,), jnp.bfloat16)
  us, _, _ = timing.median_us(lambda a: a + 1, src)
  copy_bw = 2 * src.nbytes / (us * 1e-6)
  size = 8192 if timing.on_gpu() else 256
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
  # bf16 in and out: cuBLAS accumulates in f32 and writes bf16 directly.
  us, _, _ = timing.median_us(jnp.dot, a, b)
  return {
    "copy_bytes_per_s": copy_bw,
    "bf16_flops_per_s": 2 * size**3 / (us * 1e-6),
    "bf16_ceiling_size": size,
  }


def fp4_bytes(k: int, n: int) -> int:
  """Packed weight plus block scales as a kernel reads them (swizzled)."""
  return n * k // 2 + math.prod(swizzle.padded_shape(n, k // 16))


def make_weights(
  k: int, n: int, sets: int, weight_layout: str = "sm90", row_pairs=False
) -> dict[str, list]:
  """`sets` copies (distinct buffers) of one random layer in each form:
  "bf16", "prepared" (in `weight_layout`, see `fp4jax.prepare`),
  "row_major" (the checkpoint's packed bytes and scales) and, with
  `row_pairs`, "row_pairs" (prepared in "sm90_row_pairs")."""
  w = (jax.random.normal(jax.random.key(k * 7 + n), (n, k)) * 0.02).astype(
    jnp.bfloat16
  )
  t = fp4jax.quantize(w)
  src = {
    "weight": t.packed,
    "weight_scale": t.block_scale,
    "weight_scale_2": t.global_scale,
    "input_scale": jnp.float32(4.0 / 2688),
  }
  forms = {
    "bf16": w,
    "prepared": fp4jax.prepare({"l": src}, weight_layout=weight_layout)[0]["l"],
    "row_major": {
      "packed": t.packed,
      "scale": t.block_scale,
      "gs": t.global_scale,
    },
  }
  if row_pairs:
    forms["row_pairs"] = fp4jax.prepare(
      {"l": src}, weight_layout="sm90_row_pairs"
    )[0]["l"]
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
  return {name: [copy(f) for _ in range(sets)] for name, f in forms.items()}


def dequant_dot(x, packed, scale, gs):
  """What a JAX user writes today: decode to bf16 in XLA, then a bf16 dot."""
  values = jnp.asarray(e2m1.E2M1_VALUES)[e2m1.unpack(packed).astype(jnp.int32)]
  blocks = values.reshape(*scale.shape, nvfp4.BLOCK_SIZE)
  w = blocks * (scale.astype(jnp.float32) * gs)[..., None]
  w = w.astype(jnp.bfloat16).reshape(packed.shape[0], -1)
  return jnp.einsum("mk,nk->mn", x, w)


def scaled_dot(x, w):
  config = jax.nn.get_scaled_dot_general_config("nvfp4")
  return jax.nn.scaled_dot_general(
    x,
    w,
    (((1,), (1,)), ((), ())),
    preferred_element_type=jnp.bfloat16,
    configs=[config, config, config],
  )


def runner(impl: str, weights: dict[str, list]):
  """`(fn, weight sets)`: `fn(xs, ws)` calls the op once per (activation,
  weight) set, or raises why it can't run (`weights` from `make_weights`)."""
  if impl == "xla_bf16":
    op, sets = lambda x, w: jnp.einsum("mk,nk->mn", x, w), weights["bf16"]
  elif impl == "xla_dequant_dot":
    op = lambda x, w: dequant_dot(x, w["packed"], w["scale"], w["gs"])  # noqa: E731
    sets = weights["row_major"]
  elif impl == "scaled_dot_general":
    op, sets = scaled_dot, weights["bf16"]
  else:
    activation = "bf16" if "_w4a16" in impl else "nvfp4"
    op = lambda x, w: pallas_kernels.nvfp4_matmul(  # noqa: E731
      x, w, activation=activation, implementation="pallas"
    )
    sets = weights["row_pairs" if impl.endswith("row_pairs") else "prepared"]
  return (
    lambda xs, ws: [op(x, w) for x, w in zip(xs, ws, strict=True)],
    sets,
  )


def rotating_sets(layer_bytes: int) -> int:
  """Copies of a layer that a timed loop rotates through so that each call
  reads its weights from HBM (twice L2 together, at least 3)."""
  return max(3, math.ceil(2 * arg_specs.L2_BYTES / layer_bytes))


def rotating_layers(
  k: int, n: int, weight_layout: str = "sm90"
) -> tuple[list, int]:
  """(prepared copies of one random layer, enough to rotate through, the
  layer's FP4 bytes), for the tuner and diagnostics."""
  layer_bytes = fp4_bytes(k, n)
  # The host fallback only exercises the harness (as `run`).
  sets = rotating_sets(layer_bytes) if timing.on_gpu() else 3
  prepared = make_weights(k, n, sets, weight_layout)["prepared"]
  return prepared, layer_bytes


def run(shapes, tokens, time_budget: float, weight_layout="sm90") -> dict:
  start = time.monotonic()
  ceilings = measure_ceilings()
  layers = {}
  for k, n in shapes:
    layer_bytes = fp4_bytes(k, n)
    sets = rotating_sets(layer_bytes)
    if not timing.on_gpu():
      sets = 3  # the host fallback only exercises the harness
    layers[k, n] = (
      layer_bytes,
      sets,
      make_weights(k, n, sets, weight_layout, row_pairs=True),
    )
  rows = []
  # Tokens outer: with a time budget, every shape gets the decode sizes.
  for m in tokens:
    for (k, n), (layer_bytes, sets, weights) in layers.items():
      xs = timing.rotating_inputs(jax.random.key(m), sets, (m, k), jnp.bfloat16)
      flops = 2 * m * n * k
      roofline_s = max(
        (layer_bytes + 2 * m * (k + n)) / HBM_BYTES_PER_S,
        flops / ceilings["bf16_flops_per_s"],
      )
      rows_of = {
        impl: {"K": k, "N": n, "M": m, "impl": impl, "sets": sets}
        for impl in IMPLEMENTATIONS
      }
      if time.monotonic() - start > time_budget:
        rows += [
          {**r, "status": "skipped: time budget"} for r in rows_of.values()
        ]
        continue
      cases = {}
      for impl in IMPLEMENTATIONS:
        fn, ws = runner(impl, weights)
        cases[impl] = (fn, (xs, ws), sets)
      timed = timing.interleaved_medians(cases)
      bf16_us = None
      for impl in IMPLEMENTATIONS:
        row, got = rows_of[impl], timed[impl]
        if isinstance(got, Exception):  # an anchor that fails is recorded
          rows.append({**row, "status": timing.failure_status(got)})
          continue
        us, samples, timer = got
        if impl == "xla_bf16":
          bf16_us = us
        rows.append(
          {
            **row,
            "status": "ok",
            "timer": timer,
            "us": us,
            "samples_us": samples,
            "fp4_tb_per_s": layer_bytes / (us * 1e-6) / 1e12,
            "tflop_per_s": flops / (us * 1e-6) / 1e12,
            "speedup_vs_xla_bf16": None if bf16_us is None else bf16_us / us,
            "fraction_of_roofline": roofline_s / (us * 1e-6),
          }
        )
        print(
          f"K={k:6d} N={n:6d} M={m:5d} {impl:22s} {us:10.1f} us"
          f" {rows[-1]['fp4_tb_per_s']:6.2f} TB/s(fp4)"
          f" {rows[-1]['tflop_per_s']:7.1f} TFLOP/s",
          flush=True,
        )
  return {
    "meta": {
      **timing.run_meta("benchmarks.matmul"),
      "timer": "cupti" if timing.on_gpu() else "host",
      "inputs_per_set": True,
      "interleaved_trials": True,
      "weight_layout": weight_layout,
      **ceilings,
    },
    "rows": rows,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ci", action="store_true", help="tiny shapes")
  parser.add_argument("--out", default="matmul_results.json")
  parser.add_argument("--time-budget", type=float, default=float("inf"))
  parser.add_argument(
    "--weight-layout",
    default="sm90",
    choices=("natural", "sm90"),
    help="how the fp4jax layers are prepared (fp4jax.prepare)",
  )
  parser.add_argument(
    "--tokens", default=None, help="token counts M, e.g. 2048,8192"
  )
  args = parser.parse_args(argv)
  shapes = arg_specs.CI_MATMUL_SHAPES if args.ci else arg_specs.MATMUL_SHAPES
  tokens = arg_specs.CI_MATMUL_TOKENS if args.ci else arg_specs.MATMUL_TOKENS
  if args.tokens:
    tokens = tuple(int(t) for t in args.tokens.split(","))
  result = run(shapes, tokens, args.time_budget, args.weight_layout)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

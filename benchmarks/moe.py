"""NVFP4 MoE benchmark: fp4jax against JAX's own paths, one timer.

  python -m benchmarks.moe [--ci] [--out results.json] [--time-budget S]
      [--models qwen3-30b-a3b,...] [--tokens 1,16,...]

Times one MoE layer (routing, both expert GEMMs, SwiGLU, combine) in the
same run for: fp4jax Pallas (W4A16), the fp4jax XLA reference, and
`jax.lax.ragged_dot` on bf16 expert weights (tokens sorted by expert in
XLA). Weights are random in the prepared layout (values do not change the
time); the Pallas output is checked against the reference once per model.
Each timed call runs the layer over rotating weight sets whose active
experts together exceed L2, each with its own activations and logits;
median of 7 trials, the implementations taking their trials in turn
(`timing.interleaved_medians`; CUPTI kernel time on GPU).
Render with `python -m benchmarks.report --kind moe results.json`.
"""

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp

import pallas_kernels
from benchmarks import arg_specs
from benchmarks import timing
from fp4jax import transform
from fp4jax.format import swizzle
from pallas_kernels.nvfp4_moe import base

IMPLEMENTATIONS = ("ragged_dot_bf16", "fp4jax_xla", "fp4jax_pallas_w4a16")


def expert_fp4_bytes(hidden: int, inter: int) -> int:
  """One expert's packed weights and swizzled scales (w13 and w2)."""
  total = 0
  for n, k in ((2 * inter, hidden), (hidden, inter)):
    total += n * k // 2 + math.prod(swizzle.padded_shape(n, k // 16))
  return total


def random_experts(
  key, n_experts: int, hidden: int, inter: int, weight_layout="sm90"
) -> dict:
  """A prepared experts node with random codes and sane E4M3 scales.

  Random bytes are random codes in any bit layout or row order, so
  `weight_layout` only names the leaves (as `fp4jax.prepare` would). I is
  stored padded as `prepare` would pad it
  (`transform.PAD_INTERMEDIATE_TO_TILES`; random codes in the padding too,
  which changes no timing).
  """
  inter = transform.padded_intermediate(inter, weight_layout)
  node = {}
  for prefix, (n, k) in (
    ("w13_", (2 * inter, hidden)),
    ("w2_", (hidden, inter)),
  ):
    key, k_w, k_s = jax.random.split(key, 3)
    node[transform.experts_weight_leaf(prefix, n, weight_layout)] = (
      jax.random.bits(k_w, (n_experts, n, k // 2), jnp.uint8)
    )
    # E4M3 bytes 0x30..0x3f: scales in [0.5, 1), never NaN.
    scale_bytes = 0x30 + jax.random.randint(
      k_s,
      (n_experts, *swizzle.padded_shape(n, k // 16)),
      0,
      16,
      jnp.uint8,
    )
    node[prefix + "block_scale"] = jax.lax.bitcast_convert_type(
      scale_bytes, jnp.float8_e4m3fn
    )
    node[prefix + "alpha"] = jnp.full((n_experts,), 1e-3, jnp.float32)
    node[prefix + "input_scale_inv"] = jnp.full(
      (n_experts,), 500.0, jnp.float32
    )
  return node


def random_bf16_experts(key, n_experts: int, hidden: int, inter: int):
  """(w13 `[E, H, 2I]`, w2 `[E, I, H]`) bf16 for the ragged_dot anchor."""
  k1, k2 = jax.random.split(key)
  w13 = jax.random.normal(k1, (n_experts, hidden, 2 * inter), jnp.bfloat16)
  w2 = jax.random.normal(k2, (n_experts, inter, hidden), jnp.bfloat16)
  return w13 * 0.02, w2 * 0.02


def ragged_dot_moe(x, logits, w13, w2, *, top_k):
  """What a JAX user writes today: sort by expert, two ragged_dots in bf16."""
  n_experts, _, two_i = w13.shape
  weights, ids = base.route(logits, top_k=top_k)
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token = order // top_k
  sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
  h = jax.lax.ragged_dot(x[token], w13, sizes)
  act = (jax.nn.silu(h[:, : two_i // 2]) * h[:, two_i // 2 :]).astype(x.dtype)
  y = jax.lax.ragged_dot(act, w2, sizes).astype(jnp.float32)
  y = y * weights.reshape(-1)[order][:, None]
  return jnp.zeros(x.shape, jnp.float32).at[token].add(y).astype(x.dtype)


def runner(impl: str, top_k: int):
  """`fn(xs, logits, ws)`: the layer once per (activation, logits, weight)
  set."""
  if impl == "ragged_dot_bf16":
    layer = lambda x, logits, w: ragged_dot_moe(x, logits, *w, top_k=top_k)  # noqa: E731
  else:
    name = "xla" if impl == "fp4jax_xla" else "pallas"
    layer = lambda x, logits, w: pallas_kernels.nvfp4_moe(  # noqa: E731
      x, logits, w, top_k=top_k, implementation=name
    )
  return lambda xs, logits, ws: [
    layer(*s) for s in zip(xs, logits, ws, strict=True)
  ]


def active_reference(x, logits, experts, top_k: int) -> jax.Array:
  """The XLA reference over only the experts the tokens route to.

  The reference dequantizes every expert it is given to float32 (DeepSeek-V3's
  256: 45 GB); sixteen tokens use at most 128 of them.
  """
  weights, ids = base.route(logits, top_k=top_k)
  n_experts = logits.shape[-1]
  used = jnp.unique(ids)  # concrete: the check runs outside jit
  active = {
    name: leaf[used] if leaf.ndim and leaf.shape[0] == n_experts else leaf
    for name, leaf in experts.items()
  }
  return pallas_kernels.nvfp4_moe_experts(
    x,
    weights,
    jnp.searchsorted(used, ids).astype(jnp.int32),
    active,
    implementation="xla",
  ).astype(x.dtype)  # as nvfp4_moe returns it


def check_pallas(experts, model, key) -> float:
  """Max |pallas - reference| / max |reference| at 16 tokens."""
  n_experts, top_k, hidden, _ = model
  x = jax.random.normal(key, (16, hidden), jnp.bfloat16)
  logits = jax.random.normal(key, (16, n_experts), jnp.float32)
  got = pallas_kernels.nvfp4_moe(
    x, logits, experts, top_k=top_k, implementation="pallas"
  ).astype(jnp.float32)
  want = active_reference(x, logits, experts, top_k).astype(jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


# The reference dequantizes every expert to float32 per call (Qwen3-30B-A3B
# at 4096 tokens: 750 ms on the H200); it is timed up to this many tokens,
# and not at all where those float32 experts alone pass this many bytes
# (DeepSeek-V3: 45 GB, out of memory on the H200).
REFERENCE_MAX_TOKENS = 256
REFERENCE_MAX_BYTES = 32 * 2**30


def run(
  models: dict,
  tokens,
  time_budget: float,
  impls=IMPLEMENTATIONS,
  weight_layout="sm90",
):
  rows, checks = [], {}
  # Each model gets an equal share of the budget for its timings, tokens in
  # increasing order; its first token count is always timed (making
  # DeepSeek-V3's weights once took a whole 15 s share, and its one-token
  # row was skipped).
  share = time_budget / len(models)
  for name, model in models.items():
    n_experts, top_k, hidden, inter = model
    per_expert = expert_fp4_bytes(hidden, inter)
    # Enough sets that a decode step's active experts exceed L2 twice over.
    sets = max(1, math.ceil(2 * arg_specs.L2_BYTES / (top_k * per_expert)))
    if not timing.on_gpu():
      sets = 1
    key = jax.random.key(n_experts * 31 + hidden)
    fp4_sets = [
      random_experts(
        jax.random.fold_in(key, s), n_experts, hidden, inter, weight_layout
      )
      for s in range(sets)
    ]
    try:
      checks[name] = check_pallas(fp4_sets[0], model, key)
    except Exception as e:  # recorded; the timings still run
      checks[name] = f"failed: {type(e).__name__}: {e}"[:300]
    print(f"{name}: pallas vs reference {checks[name]}", flush=True)
    bf16_sets = None
    start = time.monotonic()
    for i, t in enumerate(tokens):
      xs = timing.rotating_inputs(
        jax.random.key(t), sets, (t, hidden), jnp.bfloat16
      )
      logits = timing.rotating_inputs(
        jax.random.key(t + 1), sets, (t, n_experts)
      )
      # Mean active experts of a call (each set routes its own logits).
      active = (
        sum(int(jnp.unique(base.route(g, top_k=top_k)[1]).size) for g in logits)
        / sets
      )
      active_bytes = active * per_expert
      flops = 2 * t * top_k * 3 * hidden * inter
      statuses, cases = {}, {}
      for impl in impls:
        if i and time.monotonic() - start > share:
          statuses[impl] = "skipped: time budget"
        elif impl == "fp4jax_xla" and t > REFERENCE_MAX_TOKENS:
          statuses[impl] = "skipped: reference only to T=256"
        elif impl == "fp4jax_xla" and 12 * n_experts * hidden * inter > (
          REFERENCE_MAX_BYTES
        ):
          statuses[impl] = "skipped: float32 experts too large"
        else:
          if impl == "ragged_dot_bf16" and bf16_sets is None:
            bf16_sets = [
              random_bf16_experts(
                jax.random.fold_in(key, s), n_experts, hidden, inter
              )
              for s in range(sets)
            ]
          ws = bf16_sets if impl == "ragged_dot_bf16" else fp4_sets
          cases[impl] = (runner(impl, top_k), (xs, logits, ws), sets)
      timed = timing.interleaved_medians(cases)
      for impl in impls:
        row = {"model": name, "T": t, "impl": impl, "sets": sets}
        got = timed.get(impl)
        if got is None:
          rows.append({**row, "status": statuses[impl]})
          continue
        if isinstance(got, Exception):  # out of memory and the like
          rows.append({**row, "status": timing.failure_status(got)})
          print(name, t, impl, rows[-1]["status"][:120], flush=True)
          continue
        us, samples, timer = got
        rows.append(
          {
            **row,
            "status": "ok",
            "timer": timer,
            "us": us,
            "samples_us": samples,
            "active_experts": round(active, 1),
            "fp4_tb_per_s": active_bytes / (us * 1e-6) / 1e12,
            "tflop_per_s": flops / (us * 1e-6) / 1e12,
          }
        )
        print(
          f"{name:16s} T={t:6d} {impl:20s} {us:10.1f} us"
          f" {rows[-1]['fp4_tb_per_s']:6.2f} TB/s(active fp4)"
          f" {rows[-1]['tflop_per_s']:7.1f} TFLOP/s",
          flush=True,
        )
    del fp4_sets, bf16_sets
  return {
    "meta": {
      **timing.run_meta("benchmarks.moe"),
      "timer": "cupti" if timing.on_gpu() else "host",
      "inputs_per_set": True,
      "interleaved_trials": True,
      "weight_layout": weight_layout,
      "models": {
        k: dict(zip(("E", "top_k", "H", "I"), v, strict=True))
        for k, v in models.items()
      },
      "pallas_vs_reference_rel_err": checks,
    },
    "rows": rows,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ci", action="store_true", help="tiny shapes")
  parser.add_argument("--out", default="moe_results.json")
  parser.add_argument("--time-budget", type=float, default=float("inf"))
  parser.add_argument("--models", default=None)
  parser.add_argument("--tokens", default=None)
  parser.add_argument(
    "--impls",
    default=",".join(IMPLEMENTATIONS),
    help="comma-separated subset of " + ",".join(IMPLEMENTATIONS),
  )
  parser.add_argument(
    "--weight-layout",
    default="sm90",
    choices=("natural", "sm90"),
    help="leaf layout of the fp4jax experts (fp4jax.prepare)",
  )
  args = parser.parse_args(argv)
  models = arg_specs.CI_MOE_MODELS if args.ci else arg_specs.MOE_MODELS
  if args.models:
    models = {k: arg_specs.MOE_MODELS[k] for k in args.models.split(",")}
  tokens = arg_specs.CI_MOE_TOKENS if args.ci else arg_specs.MOE_TOKENS
  if args.tokens:
    tokens = tuple(int(t) for t in args.tokens.split(","))
  impls = tuple(args.impls.split(","))
  unknown = set(impls) - set(IMPLEMENTATIONS)
  if unknown:
    parser.error(f"unknown --impls {sorted(unknown)}")
  result = run(models, tokens, args.time_budget, impls, args.weight_layout)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

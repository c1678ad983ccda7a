"""GPU diagnostic: where an NVFP4 MoE layer's time goes, kernel by kernel.

  PYTHONPATH=. python scripts/profile_moe.py [model] [tokens,...]
      [variants: plain,persistent,fused,rows64,rows64fused,auto,autofused,
       wide,wideplain; prefixes "old-": w13 rows not plane-ordered, "s3-":
       GEMM 2 with at most 3 stages]

Prints CUPTI time per kernel launch (name, µs) of one Pallas MoE call, for
the benchmark's weights (`benchmarks.moe`), so that XLA glue (sorting,
gathers, SwiGLU, combine) can be told apart from the two grouped GEMMs, and
the error against the reference.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from benchmarks import arg_specs
from benchmarks import moe
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu

CONFIGS_FOR = pallas_mosaic_gpu.configs_for


def _at_most_three_stages(*args, **kwargs):
  gemm1, gemm2 = CONFIGS_FOR(*args, **kwargs)
  stages = min(3, gemm2.num_stages)
  return gemm1, dataclasses.replace(gemm2, num_stages=stages)


def main(argv):
  name = argv[0] if argv else "qwen3-30b-a3b"
  tokens = [int(t) for t in argv[1].split(",")] if len(argv) > 1 else [1, 16]
  variants = argv[2].split(",") if len(argv) > 2 else ["persistent"]
  n_experts, top_k, hidden, inter = arg_specs.MOE_MODELS[name]
  experts = moe.random_experts(jax.random.key(0), n_experts, hidden, inter)
  for t in tokens:
    x = jax.random.normal(jax.random.key(t), (t, hidden), jnp.bfloat16)
    logits = jax.random.normal(jax.random.key(t + 1), (t, n_experts))

    for variant in variants:
      # "old-<variant>": w13 without plane-ordered rows (GEMM 2's input
      # planes made by an XLA pass), for comparison.
      old = variant.startswith("old-")
      variant = variant.removeprefix("old-")
      # "s3-<variant>": GEMM 2 with at most 3 pipeline stages (the stage
      # count before the heuristic counted its bf16 epilogue).
      three = variant.startswith("s3-")
      variant = variant.removeprefix("s3-")
      pallas_mosaic_gpu.configs_for = (
        _at_most_three_stages if three else CONFIGS_FOR
      )
      node = dict(experts)
      if old and "w13_weight_sm90_planes" in node:
        node["w13_weight_sm90"] = node.pop("w13_weight_sm90_planes")

      def layer(x, logits, experts, variant=variant):
        return pallas_mosaic_gpu.nvfp4_moe(
          x,
          logits,
          experts,
          top_k=top_k,
          persistent=not variant.endswith("plain"),
          # "auto*": the heuristic's CTAs; "rows64*": 64-row CTAs; "wide*":
          # 256-token tiles (SwiGLU unfused).
          cta_rows={"auto": None, "rows": 64}.get(variant[:4], 128),
          block_m=256 if variant.startswith("wide") else None,
          fused_swiglu=variant.endswith("fused"),
        )

      got, timings = profiler.measure(jax.jit(layer), aggregate=False)(
        x, logits, node
      )
      # The reference dequantizes the experts it is given to float32: only
      # the routed ones, and only at decode sizes (DeepSeek-V3 at 4096
      # tokens routes to all 256: 45 GB).
      err = "n/a"
      if t <= 64:
        want = moe.active_reference(x, logits, node, top_k)
        want = want.astype(jnp.float32)
        diff = jnp.max(jnp.abs(got.astype(jnp.float32) - want))
        err = f"{float(diff / jnp.max(jnp.abs(want))):.2e}"
      total = sum(ms for _, ms in timings)
      print(
        f"== {name} T={t} {'old-' * old}{'s3-' * three}{variant}:"
        f" {len(timings)} kernels,"
        f" {total * 1e3:.1f} us, rel err {err}"
      )
      for kernel, ms in timings:
        if t <= 64 or ms * 1e3 >= 3 or "mosaic" in kernel:
          print(f"  {ms * 1e3:9.1f} us  {kernel[:90]}")


if __name__ == "__main__":
  main(sys.argv[1:])

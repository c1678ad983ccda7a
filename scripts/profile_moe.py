"""GPU diagnostic: where an NVFP4 MoE layer's time goes, kernel by kernel.

  PYTHONPATH=. python scripts/profile_moe.py [model] [tokens,...]
      [variants: plain,persistent,fused,rows64,rows64fused,auto,autofused,
       wide,wideplain]

Prints CUPTI time per kernel launch (name, µs) of one Pallas MoE call, for
the benchmark's weights (`benchmarks.moe`), so that XLA glue (sorting,
gathers, SwiGLU, combine) can be told apart from the two grouped GEMMs, and
the error against the reference.
"""

import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

import pallas_kernels
from benchmarks import arg_specs
from benchmarks import moe
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu


def main(argv):
  name = argv[0] if argv else "qwen3-30b-a3b"
  tokens = [int(t) for t in argv[1].split(",")] if len(argv) > 1 else [1, 16]
  variants = argv[2].split(",") if len(argv) > 2 else ["persistent"]
  n_experts, top_k, hidden, inter = arg_specs.MOE_MODELS[name]
  experts = moe.random_experts(jax.random.key(0), n_experts, hidden, inter)
  for t in tokens:
    x = jax.random.normal(jax.random.key(t), (t, hidden), jnp.bfloat16)
    logits = jax.random.normal(jax.random.key(t + 1), (t, n_experts))

    want = pallas_kernels.nvfp4_moe(
      x, logits, experts, top_k=top_k, implementation="xla"
    ).astype(jnp.float32)
    for variant in variants:

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
        x, logits, experts
      )
      err = jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(
        jnp.abs(want)
      )
      total = sum(ms for _, ms in timings)
      print(
        f"== {name} T={t} {variant}: {len(timings)} kernels,"
        f" {total * 1e3:.1f} us, rel err {float(err):.2e}"
      )
      for kernel, ms in timings:
        if ms * 1e3 >= 3 or "mosaic" in kernel:
          print(f"  {ms * 1e3:9.1f} us  {kernel[:90]}")


if __name__ == "__main__":
  main(sys.argv[1:])

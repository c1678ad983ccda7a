"""GPU diagnostic: runs the Pallas NVFP4 matmul kernel with no profiler of
its own, for Nsight Compute (`ncu`) to read its hardware counters.

  PYTHONPATH=. ncu --kernel-name regex:mosaic_gpu ... \
    python scripts/ncu_matmul.py K:N M [variant] [calls] [overrides]

`variant` is one of `diag_decode_bound.VARIANTS` ("full": the kernel as it
is; the others switch parts of its work off and give wrong outputs). Each
call runs on the next of several rotating layers (larger than L2 together,
as the benchmarks), so that the profiled launch streams its weights from
HBM. `overrides` (`tune_matmul` syntax, e.g. "block_k=512,num_stages=3")
change the heuristic's config. `gpu_session.sh ncu` wraps it.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp

import pallas_kernels
from benchmarks import matmul as matmul_bench
from benchmarks import tune_matmul
from pallas_kernels.nvfp4_matmul import config as config_lib
from scripts import diag_decode_bound


def main(argv):
  k, n = (int(d) for d in argv[0].split(":"))
  m = int(argv[1])
  variant = argv[2] if len(argv) > 2 else "full"
  calls = int(argv[3]) if len(argv) > 3 else 6
  # No overrides, or an empty argument (gpu_session.sh passes one): none.
  (fields,) = tune_matmul.parse_overrides(" ".join(argv[4:5])) or [{}]
  config = dataclasses.replace(config_lib.heuristic(m, n, k), **fields)
  diag_decode_bound.select(variant)
  # No reference output: only the kernel under ncu needs to run.
  layers, _ = matmul_bench.rotating_layers(k, n)
  x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)

  @jax.jit
  def run(x, layer):
    return pallas_kernels.nvfp4_matmul(
      x, layer, implementation="pallas", config=config
    )

  for i in range(calls):
    run(x, layers[i % len(layers)]).block_until_ready()
  print(f"K={k} N={n} M={m} {variant} {config}: {calls} calls")


if __name__ == "__main__":
  main(sys.argv[1:])

"""Compiles one Pallas NVFP4 matmul config on the GPU with Mosaic GPU's
dumps on, and prints what ptxas said (register use, spills, wgmma
serialization warnings).

  MOSAIC_GPU_DUMP_TO=dir MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_PTX=1 \
    python scripts/ptxas_report.py M N K "block_k=128,block_m=128"

The environment variables must be set before jax starts, hence the shell.
"""

import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

import pallas_kernels
from benchmarks import matmul as matmul_bench
from benchmarks import tune_matmul
from pallas_kernels.nvfp4_matmul import config as config_lib


def main(m, n, k, fields):
  rng = np.random.default_rng(0)
  prepared_sets = matmul_bench.make_weights(k, n, 1)["prepared"]
  layer = prepared_sets[0]
  config = config_lib.Config(**tune_matmul.parse_overrides(fields)[0])
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  out = pallas_kernels.nvfp4_matmul(
    x, layer, implementation="pallas", config=config
  )
  print("finite:", bool(jnp.isfinite(out.astype(jnp.float32)).all()))
  dump = pathlib.Path(os.environ.get("MOSAIC_GPU_DUMP_TO", "."))
  for path in sorted(dump.glob("*")):
    print(path.name, path.stat().st_size)
    if "ptxas" in path.name:
      print(path.read_text()[-3000:])


if __name__ == "__main__":
  main(*map(int, sys.argv[1:4]), sys.argv[4])

"""GPU diagnostic: where an NVFP4 matmul's time goes, kernel by kernel.

  PYTHONPATH=. python scripts/profile_matmul.py [K:N,...] [M,...]
      [activations: bf16,nvfp4] [forms: operands,table,...]

Prints CUPTI time per kernel launch (name, µs) of one `nvfp4_matmul` call
on the benchmark's layers (`benchmarks.matmul`), so that the XLA passes
around the kernel (W4A4's activation quantization, the K split of the
activations, split-K sums) can be told apart from the Pallas kernel.
"""

import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

import pallas_kernels
from benchmarks import matmul
from pallas_kernels import activation_quant
from pallas_kernels.nvfp4_matmul import base
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu


def main(argv):
  shapes = [
    tuple(int(d) for d in s.split(":"))
    for s in (argv[0] if argv else "8192:28672,7168:2048").split(",")
  ]
  tokens = [int(t) for t in argv[1].split(",")] if len(argv) > 1 else [1, 16]
  activations = argv[2].split(",") if len(argv) > 2 else ["bf16", "nvfp4"]
  # A form is "operands" (the defaults) or switches joined by "+":
  # "table": the epilogue scales as an XLA-built table, as before
  # config.SCALES_AS_OPERANDS; "recompute": W4A4's quantizer recomputes
  # each block scale per element at any size (no stored scales); "planes":
  # W4A4's activations quantized, padded and split by the one-pass kernel
  # (`quantize_planes_sm90`, pallas_mosaic_gpu.QUANTIZE_PLANES_MIN_ELEMENTS);
  # "rowpairs": the layer stored in row pairs, read with natural activations
  # (`Config.row_pairs`, `pallas_mosaic_gpu.row_pair_layer`): no split.
  forms = argv[3].split(",") if len(argv) > 3 else ["operands"]
  recompute_default = activation_quant.RECOMPUTE_SCALES_MAX_ELEMENTS
  planes_default = pallas_mosaic_gpu.QUANTIZE_PLANES_MIN_ELEMENTS
  for k, n in shapes:
    prepared = matmul.make_weights(k, n, 1)["prepared"]
    layers = {False: prepared[0]}
    if any("rowpairs" in form.split("+") for form in forms):
      layers[True] = pallas_mosaic_gpu.row_pair_layer(
        base.PreparedLinear.from_mapping(prepared[0])
      ).to_mapping()
    for m in tokens:
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      for activation in activations:
        for form in forms:
          switches = form.split("+")
          config_lib.SCALES_AS_OPERANDS = "table" not in switches
          activation_quant.RECOMPUTE_SCALES_MAX_ELEMENTS = (
            1 << 62 if "recompute" in switches else recompute_default
          )
          pallas_mosaic_gpu.QUANTIZE_PLANES_MIN_ELEMENTS = (
            0 if "planes" in switches else planes_default
          )
          jax.clear_caches()  # the switches are not jit keys

          def call(x, layer, activation=activation):
            return pallas_kernels.nvfp4_matmul(
              x, layer, activation=activation, implementation="pallas"
            )

          layer = layers["rowpairs" in switches]
          _, timings = profiler.measure(jax.jit(call), aggregate=False)(
            x, layer
          )
          total = sum(ms for _, ms in timings)
          print(
            f"== K={k} N={n} M={m} {activation} {form}: {len(timings)}"
            f" kernels, {total * 1e3:.1f} us"
          )
          for kernel, ms in timings:
            print(f"  {ms * 1e3:9.1f} us  {kernel[:90]}")


if __name__ == "__main__":
  main(sys.argv[1:])

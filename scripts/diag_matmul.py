"""GPU diagnostic: one-hot activations reveal which weight the kernel uses."""

import os

import jax.numpy as jnp
import numpy as np

import fp4jax
import pallas_kernels
from pallas_kernels.nvfp4_matmul import config as C

out = os.environ.get("OUT", ".")
rng = np.random.default_rng(0)
n, k = 128, 128
res = {}
for name, unit in (("unit", True), ("rand", False)):
  w = rng.standard_normal((n, k)).astype(np.float32)
  if unit:
    w = (
      np.sign(w)
      * np.asarray([0.5, 1, 1.5, 2, 3, 4, 6], np.float32)[
        rng.integers(0, 7, (n, k))
      ]
    )
  t = fp4jax.quantize(jnp.asarray(w))
  src = {
    "weight": t.packed,
    "weight_scale": t.block_scale,
    "weight_scale_2": t.global_scale,
    "input_scale": jnp.float32(1.0),
  }
  layer, _ = fp4jax.prepare({"l": src})
  x = jnp.eye(k, dtype=jnp.bfloat16)
  got = pallas_kernels.nvfp4_matmul(
    x,
    layer["l"],
    implementation="pallas",
    config=C.Config(block_k=128, block_m=128, num_stages=2),
  )
  want = pallas_kernels.nvfp4_matmul(x, layer["l"], implementation="xla")
  res[name + "_got"] = np.asarray(got, np.float32)
  res[name + "_want"] = np.asarray(want, np.float32)
np.savez(os.path.join(out, "diag.npz"), **res)
print("saved", {k: float(np.abs(v).max()) for k, v in res.items()})

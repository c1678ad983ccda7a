"""The Pallas Mosaic GPU backend of `nvfp4_matmul`: checks, layout, dispatch.

Picks the kernel body by GPU generation: sm90 (Hopper) decodes FP4 in
registers for bf16 wgmma (`pallas_mosaic_gpu_kernel_sm90`). A Blackwell body
using the native block-scaled MMA (tcgen05, which reads the 128x4 swizzled
scales as they are) belongs beside it as `..._kernel_sm100.py`.

Status: v1, passes the GPU tier on the H200 and is the default on sm90.
Numbers and the targets not yet met: BENCHMARKS.md and NOTES.md. Requires
N % 128 and K % 64 (other shapes fall back to the reference when
implementation=None).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fp4jax.format import nvfp4
from pallas_kernels.nvfp4_matmul import base
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90


def _check_device(interpret: bool) -> None:
  if interpret:
    return
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise NotImplementedError(
      "the Mosaic GPU NVFP4 matmul needs an NVIDIA GPU"
      f" (found {device.platform}); interpret=True runs it on CPU"
    )
  major = str(device.compute_capability).split(".")[0]
  if major != "9":
    raise NotImplementedError(
      f"no NVFP4 Mosaic GPU kernel for compute capability"
      f" {device.compute_capability} yet (sm90 only)"
    )


def nvfp4_matmul(
  x: jax.Array,
  layer: base.PreparedLinear,
  *,
  activation: str = "bf16",
  config: config_lib.Config | None = None,
  interpret: bool = False,
) -> jax.Array:
  """`x @ W.T` on the Mosaic GPU kernel; see `api.nvfp4_matmul`.

  Raises:
    NotImplementedError: no suitable GPU (and not `interpret`), or a shape
      this version does not tile (N % 64, K % 128).
  """
  base.check_inputs(x, layer, activation)
  _check_device(interpret)
  n, k = layer.n, layer.k
  if n % config_lib.TILE_ROWS or k % 64:
    raise NotImplementedError(
      f"N={n} must be a multiple of 128 and K={k} of 64 (no padding yet)"
    )
  m = x.size // k
  config = config or config_lib.heuristic(m, n, k, _num_sms(interpret))
  if k % config.block_k or (k // config.block_k) % config.splits:
    raise ValueError(f"{config} does not tile K={k}")
  return _run(
    x,
    dataclasses.asdict(layer),
    activation=activation,
    config=config,
    interpret=interpret,
  )


def _num_sms(interpret: bool) -> int:
  if interpret:
    return 4
  return getattr(jax.devices()[0], "core_count", config_lib.H200_SMS)


@functools.partial(
  jax.jit, static_argnames=("activation", "config", "interpret")
)
def _run(x, leaves, *, activation, config, interpret):
  splits = config.splits
  layer = base.PreparedLinear(**leaves)
  lead, k = x.shape[:-1], x.shape[-1]
  rows = x.reshape(-1, k)
  m = rows.shape[0]
  if activation == "nvfp4":
    packed, scale = nvfp4.quantize_activation(rows, layer.input_scale_inv)
    # e2m1 x e4m3 products are exact in bf16, so the MMA sees the quantized
    # activations exactly; alpha supplies both tensor scales.
    rows = nvfp4.dequantize_blocks(packed, scale)
    factor = layer.alpha
  else:
    factor = layer.weight_scale_2()
  rows = rows.astype(jnp.bfloat16)
  padded = -(-m // config.block_m) * config.block_m
  rows = jnp.pad(rows, ((0, padded - m), (0, 0)))
  factor = jnp.asarray(factor, jnp.float32).reshape(1)
  x_even, x_odd = sm90.split_activations(rows)
  out = sm90.matmul(
    layer.weight,
    x_even,
    x_odd,
    # A free reshape: [tile, 2, 256] holds one 128x4 tile (512 bytes) of
    # the layout (TMA boxes take at most 256 elements per dimension).
    layer.block_scale.reshape(-1, 2, 256),
    factor,
    config=config,
    interpret=interpret,
  )
  if splits > 1:
    out = out.sum(axis=0).T * (factor[0] * 2.0**-sm90.PRODUCT_EXPONENT)
  y = out[:m]
  return y.astype(x.dtype).reshape(*lead, layer.n)

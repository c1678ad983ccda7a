"""The Pallas Mosaic GPU backend of `nvfp4_matmul`: checks, layout, dispatch.

Picks the kernel body by GPU generation: sm90 (Hopper) decodes FP4 in
registers for bf16 wgmma (`pallas_mosaic_gpu_kernel_sm90`). A Blackwell body
using the native block-scaled MMA (tcgen05, which reads the 128x4 swizzled
scales as they are) belongs beside it as `..._kernel_sm100.py`; it would
read natural-order weights, while `weight_layout="sm90"` layers carry the
bit order of the Hopper decoder (`fp4jax.format.sm90_layout`), so `prepare`
picks the layout for the GPU it serves on.

W4A4 quantizes the activations in one Pallas pass that also pads them and,
unless the layer is in row pairs, splits them (`quantize_planes_sm90`; in
XLA, `activation_quant`, where that cannot run: the reference's values bit
for bit either way); every E2M1 x E4M3 value is exact in
bf16, so the same kernel multiplies them and its epilogue scales by alpha.

Status: passes the GPU tier on the H200 and is the default on sm90.
Numbers and the targets not yet met: BENCHMARKS.md and NOTES.md. Any N and
any K (a multiple of 16) run: a partial last row tile reads zeros through
TMA. Mosaic GPU's swizzled TMA views need K % 64 == 0 and N % 8 == 0, so
other shapes copy a zero-padded weight per call (slow, and rare: no
published model has them; gpt-oss's 2880 needs no copy).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fp4jax.format import sm90_layout
from pallas_kernels import activation_quant
from pallas_kernels import common
from pallas_kernels.nvfp4_matmul import base
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90
from pallas_kernels.nvfp4_matmul import quantize_planes_sm90


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
    NotImplementedError: no suitable GPU (and not `interpret`).
  """
  base.check_inputs(x, layer, activation)
  common.check_sm90("the Mosaic GPU NVFP4 matmul", interpret)
  n, k = layer.n, layer.k
  m = x.size // k
  config = config or config_lib.heuristic(m, n, k, common.num_sms(interpret))
  padded_k = -(-k // K_ALIGN) * K_ALIGN
  if -(-padded_k // config.block_k) % config.splits:
    raise ValueError(f"{config} does not tile K={k} (padded to {padded_k})")
  return _run(
    x,
    layer.to_mapping(),
    activation=activation,
    config=config,
    interpret=interpret,
  )


# W4A4 activations of at least this many elements are quantized, padded
# (and split) by `quantize_planes_sm90` (one memory pass) instead of XLA
# (three passes above activation_quant.RECOMPUTE_SCALES_MAX_ELEMENTS, one
# fusion below); None: always XLA. H200, benchmarks.matmul W4A4 (eighteenth
# session), us: 7168x2048 M = 2048 118.3 -> 92.6, M = 8192 465 -> 362;
# 2048x5120 M = 8192 278 -> 243. Small sizes gain too, once every weight
# set has its own x (nineteenth session, from 1M elements -> from 0):
# 7168x2048 M = 16 10.3 -> 8.8, M = 64 13.5 -> 11.9; 2048x5120 M = 16 9.8
# -> 8.4, M = 64 12.7 -> 10.9; M = 1 equal (the earlier 1M came from a
# harness that shared x between calls).
QUANTIZE_PLANES_MIN_ELEMENTS = 0

K_ALIGN = 64  # K that the swizzled TMA views take in whole steps
N_ALIGN = 8  # weight rows per TMA tile row group


@functools.partial(
  jax.jit, static_argnames=("activation", "config", "interpret")
)
def _run(x, leaves, *, activation, config, interpret):
  splits = config.splits
  layer = base.PreparedLinear.from_mapping(leaves)
  lead, k = x.shape[:-1], x.shape[-1]
  rows = x.reshape(-1, k)
  m = rows.shape[0]
  weight = layer.weight
  # Row pairs group rows by 16.
  if sm90.uses_row_pairs(layer.weight_layout, config):
    n_align = sm90_layout.ROW_PAIR_ROWS
  else:
    n_align = N_ALIGN
  pad_k, pad_n = -k % K_ALIGN, -layer.n % n_align
  if pad_k or pad_n:  # a copy of the weight per call (module doc)
    weight = jnp.pad(weight, ((0, pad_n), (0, pad_k // 2)))
  weight, config = sm90.kernel_weight(weight, layer.weight_layout, config)
  padded = -(-m // config.block_m) * config.block_m
  factors = common.epilogue_scale_operands(
    layer.alpha, layer.input_scale_inv, activation
  )
  # e2m1 x e4m3 products are exact in bf16, so with W4A4 the MMA sees the
  # quantized activations exactly; alpha supplies both tensor scales.
  planes = not config.row_pairs  # else natural activations
  if activation == "nvfp4" and _quantizes_planes(rows, pad_k, interpret):
    x_planes = quantize_planes_sm90.quantize_planes(
      rows, layer.input_scale_inv, padded, planes=planes
    )
  else:
    if activation == "nvfp4":
      rows = activation_quant.fake_quantize_rows(rows, layer.input_scale_inv)
    rows = jnp.pad(rows.astype(jnp.bfloat16), ((0, padded - m), (0, pad_k)))
    x_planes = _activation_planes(rows) if planes else rows
  scale_rows, padded_blocks = layer.block_scale.shape
  n_tiles = scale_rows // 128
  out = sm90.matmul(
    weight[None],
    x_planes,
    # A free reshape: [1, row tile, K/64 chunk, 2, 256] holds one 128x4
    # tile (512 bytes) of the layout per chunk (TMA boxes take at most 256
    # elements per dimension).
    layer.block_scale.reshape(1, n_tiles, padded_blocks // 4, 2, 256),
    _epilogue_factor(factors, n_tiles),
    config=config,
    num_sms=common.num_sms(interpret),
    interpret=interpret,
  )
  if splits > 1:
    out = out[:, : layer.n].sum(axis=0).T
  y = out[:m, : layer.n]
  return y.astype(x.dtype).reshape(*lead, layer.n)


def row_pair_layer(layer: base.PreparedLinear) -> base.PreparedLinear:
  """`layer` with its weight in the "sm90_row_pairs" layout (N % 16 == 0):
  the row-pair kernel without a per-call regrouping (`Config.row_pairs`,
  for measurements)."""
  natural = common.natural_weight(layer.weight, layer.weight_layout)
  return dataclasses.replace(
    layer,
    weight=sm90_layout.twiddle(sm90_layout.to_row_pairs(natural)),
    weight_layout="sm90_row_pairs",
  )


def _quantizes_planes(rows, pad_k: int, interpret: bool) -> bool:
  """Whether W4A4's activations go through `quantize_planes_sm90` (inline
  Mosaic GPU code: not in the interpreter; bf16, K a multiple of 64, one
  input scale)."""
  return (
    QUANTIZE_PLANES_MIN_ELEMENTS is not None
    and rows.size >= QUANTIZE_PLANES_MIN_ELEMENTS
    and not interpret
    and rows.dtype == jnp.bfloat16
    and not pad_k
  )


def _activation_planes(rows):
  """The kernel's activations: stacked planes, which it loads in one TMA
  copy a step (`sm90.ONE_ACTIVATION_COPY`), else two arrays."""
  planes = sm90.split_activations(rows)
  return planes if sm90.ONE_ACTIVATION_COPY else tuple(planes)


def _epilogue_factor(factors, n_tiles: int):
  """The kernel's `factor` operand for one layer: the scalar leaves as they
  are (free reshapes), or the old per-block table (an XLA broadcast, ~1 us
  a call at decode) when `config.SCALES_AS_OPERANDS` is off."""
  factors = tuple(jnp.asarray(f, jnp.float32).reshape(1) for f in factors)
  if config_lib.SCALES_AS_OPERANDS:
    return factors
  product = functools.reduce(lambda a, b: a * b, factors)
  return jnp.broadcast_to(product[:, None], (1, 2 * n_tiles))

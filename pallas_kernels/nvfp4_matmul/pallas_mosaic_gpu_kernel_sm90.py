"""The sm90 (Hopper) NVFP4 x bf16 matmul body: decode in registers, bf16 wgmma.

Hopper has no FP4 MMA, so each pipeline step decodes a packed weight tile
into bf16 and feeds wgmma with float32 accumulation. Weights are the MMA's A
side (rows = output features), tokens its N side, so small token counts
still fill the MMA.

Natural NVFP4 order packs k = 2j in the low nibble and k = 2j + 1 in the
high one. Rather than interleave in registers, the kernel decodes the two
nibble planes into two A tiles and multiplies them with the even and the odd
activation columns (split outside, cheap at decode sizes): two wgmmas into
one accumulator. Within a plane, the 16 values of a block scale are 8
adjacent columns.

Codes decode exactly through the f16 bit pattern `(c & 8) << 12 |
(c & 7) << 9` times 2**14 (no subnormals, so it is also exact where interpret
mode flushes them); a block-scale multiply in bf16 is exact (2 x 4
significant bits).
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.nvfp4_matmul import config as config_lib

_PLANE_COLUMNS_PER_BLOCK = 8  # 16 values of one block scale, one nibble plane


def _swizzled(bits: int, swizzle: int):
  return (
    plgpu.TilingTransform((8, swizzle * 8 // bits)),
    plgpu.SwizzleTransform(swizzle),
  )


def _decode(codes):
  """uint16 E2M1 codes -> exact bf16 values."""
  bits = ((codes & 8) << 12) | ((codes & 7) << 9)
  half = lax.bitcast_convert_type(bits, jnp.float16) * jnp.float16(2.0**14)
  return half.astype(jnp.bfloat16)


def matmul(
  packed: jax.Array,  # uint8 [N, K/2]
  x_even: jax.Array,  # bf16 [M, K/2], columns k = 0, 2, 4, ...
  x_odd: jax.Array,  # bf16 [M, K/2], columns k = 1, 3, 5, ...
  scales_t: jax.Array,  # float32 [K/16, N], block scales transposed
  *,
  config: config_lib.Config,
  interpret: bool = False,
) -> jax.Array:
  """Returns `[N, M]` float32: `deq(W) @ x.T` without the tensor scale."""
  n, half_k = packed.shape
  m = x_even.shape[0]
  cfg = config
  if n % cfg.block_n or (2 * half_k) % cfg.block_k or m % cfg.block_m:
    raise ValueError(
      f"shapes {packed.shape}, {x_even.shape} not tiled by {cfg}"
    )
  plane_k = cfg.block_k // 2
  k_steps = 2 * half_k // cfg.block_k
  wg_tiles = cfg.block_n // config_lib.WGMMA_ROWS

  w_swizzle = min(128, plane_k)  # bytes per packed row in one step

  def body(w_gmem, xe_gmem, xo_gmem, s_gmem, o_gmem, a_smem, o_smem):
    ni = lax.axis_index("n")
    mi = lax.axis_index("m")

    def acc_scope(*accs):
      def step(_, w_smem, xe_smem, xo_smem, s_smem):
        for t, acc in enumerate(accs):
          rows = pl.ds(t * config_lib.WGMMA_ROWS, config_lib.WGMMA_ROWS)
          w = plgpu.load(w_smem.at[rows], layout=plgpu.Layout.WGMMA)
          w = w.astype(jnp.uint16)
          for plane, codes in enumerate((w & 0xF, w >> 4)):
            a_smem[t, plane] = _scaled(_decode(codes), s_smem, rows)
          plgpu.commit_smem()
          plgpu.wgmma(acc, a_smem.at[t, 0], xe_smem.T)
          plgpu.wgmma(acc, a_smem.at[t, 1], xo_smem.T)
        # The next step overwrites a_smem: finish reading it first.
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
        step,
        grid=(k_steps,),
        in_specs=[
          plgpu.BlockSpec(
            (cfg.block_n, plane_k),
            lambda k: (ni, k),
            transforms=_swizzled(8, w_swizzle),
          ),
          plgpu.BlockSpec(
            (cfg.block_m, plane_k),
            lambda k: (mi, k),
            transforms=_swizzled(16, 128),
          ),
          plgpu.BlockSpec(
            (cfg.block_m, plane_k),
            lambda k: (mi, k),
            transforms=_swizzled(16, 128),
          ),
          plgpu.BlockSpec(
            (cfg.blocks_per_step, cfg.block_n), lambda k: (k, ni)
          ),
        ],
        max_concurrent_steps=cfg.num_stages,
      )(w_gmem, xe_gmem, xo_gmem, s_gmem)
      for t, acc in enumerate(accs):
        rows = pl.ds(t * config_lib.WGMMA_ROWS, config_lib.WGMMA_ROWS)
        o_smem[rows] = acc[...]

    pl.run_scoped(
      acc_scope,
      *[
        plgpu.ACC((config_lib.WGMMA_ROWS, cfg.block_m), jnp.float32)
        for _ in range(wg_tiles)
      ],
    )
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
      o_smem,
      o_gmem.at[
        pl.ds(ni * cfg.block_n, cfg.block_n),
        pl.ds(mi * cfg.block_m, cfg.block_m),
      ],
    )
    plgpu.wait_smem_to_gmem(0)

  def _scaled(values, s_smem, rows):
    """Multiplies each 8-column group by its block scale, per row."""
    parts = []
    for b in range(cfg.blocks_per_step):
      scale = plgpu.load(
        s_smem.at[b, rows], layout=plgpu.Layout.WGMMA.reduce(1)
      ).astype(jnp.bfloat16)
      scale = plgpu.layout_cast(
        lax.broadcast_in_dim(
          scale, (config_lib.WGMMA_ROWS, _PLANE_COLUMNS_PER_BLOCK), (0,)
        ),
        plgpu.Layout.WGMMA,
      )
      cols = slice(
        b * _PLANE_COLUMNS_PER_BLOCK, (b + 1) * _PLANE_COLUMNS_PER_BLOCK
      )
      parts.append(values[:, cols] * scale)
    return jnp.concatenate(parts, axis=1)

  kernel = plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((n, m), jnp.float32),
    grid=(n // cfg.block_n, m // cfg.block_m),
    grid_names=("n", "m"),
    scratch_types=[
      plgpu.SMEM(
        (wg_tiles, 2, config_lib.WGMMA_ROWS, plane_k),
        jnp.bfloat16,
        transforms=_swizzled(16, 128),
      ),
      plgpu.SMEM((cfg.block_n, cfg.block_m), jnp.float32),
    ],
  )
  if interpret:
    # Mosaic GPU's CPU interpreter (plgpu.kernel(interpret=True) cannot
    # discharge the pipeline's TMA copies).
    with plgpu.force_gpu_interpret_mode():
      return kernel(packed, x_even, x_odd, scales_t)
  return kernel(packed, x_even, x_odd, scales_t)

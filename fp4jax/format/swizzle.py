"""The 128x4 block-scale layout that Blackwell's block-scaled MMA reads.

Rows are padded to a multiple of 128 and block columns to a multiple of 4
(zeros); each 128x4 tile is stored as `[32, 4, 4]` (row % 32, row // 32,
column). The 2-D shape of the result carries no meaning, only its bytes do:
byte `offset(m, k)` below holds the scale of row m, block column k.
"""

import jax.numpy as jnp
import numpy as np

ROW_TILE = 128
COL_TILE = 4


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def padded_shape(rows: int, cols: int) -> tuple[int, int]:
  """Shape of the swizzled scales for `rows` x `cols` block scales."""
  return _round_up(rows, ROW_TILE), _round_up(cols, COL_TILE)


def swizzle_block_scale(scale: jnp.ndarray) -> jnp.ndarray:
  """Row-major scales `[..., rows, cols]` -> swizzled `[..., Rp, Cp]`."""
  *batch, rows, cols = scale.shape
  rows_p, cols_p = padded_shape(rows, cols)
  pad = [(0, 0)] * len(batch) + [(0, rows_p - rows), (0, cols_p - cols)]
  s = jnp.pad(scale, pad)
  s = s.reshape(*batch, rows_p // 128, 4, 32, cols_p // 4, 4)
  n = len(batch)
  s = jnp.moveaxis(s, (n + 1, n + 2, n + 3), (n + 3, n + 2, n + 1))
  return s.reshape(*batch, rows_p, cols_p)


def unswizzle_block_scale(
  scale: jnp.ndarray, rows: int, cols: int
) -> jnp.ndarray:
  """Swizzled `[..., Rp, Cp]` -> row-major `[..., rows, cols]` (crops pad)."""
  *batch, rows_p, cols_p = scale.shape
  if (rows_p, cols_p) != padded_shape(rows, cols):
    raise ValueError(
      f"swizzled shape {(rows_p, cols_p)} does not hold {rows=} x {cols=};"
      f" expected {padded_shape(rows, cols)}"
    )
  s = scale.reshape(*batch, rows_p // 128, cols_p // 4, 32, 4, 4)
  n = len(batch)
  s = jnp.moveaxis(s, (n + 1, n + 2, n + 3), (n + 3, n + 2, n + 1))
  return s.reshape(*batch, rows_p, cols_p)[..., :rows, :cols]


def offset(row, col, padded_cols: int):
  """Byte offset of scale (row, col) in one swizzled matrix (closed form).

  This is CUTLASS's `[num_m_tiles, num_k_tiles, 32, 4, 4]` layout; it works
  on Python ints and on integer numpy/jnp arrays alike.
  """
  return (
    (row // 128) * (padded_cols // 4) * 512
    + (col // 4) * 512
    + (row % 32) * 16
    + ((row % 128) // 32) * 4
    + (col % 4)
  )


def offset_table(rows: int, cols: int) -> np.ndarray:
  """`[rows, cols]` int array of `offset` for every scale; for kernels/tests."""
  _, cols_p = padded_shape(rows, cols)
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  return offset(r, c, cols_p)

"""A bit layout of packed E2M1 weights that the sm90 decoder undoes cheaply.

The sm90 kernel turns each 32-bit register of 8 codes (4 packed bytes,
natural NVFP4 order) into four bf16x2 registers: `(n0, n4)`, `(n1, n5)`,
`(n2, n6)`, `(n3, n7)` for nibbles `n0..n7`. Each bf16 needs the code's
sign at bit 15 and its magnitude bits (m, e0, e1) at bits 6..8 of its
half. From natural order that takes 15 integer operations per register,
and the integer pipe is what limits the decode (NOTES.md).

Here the 32 bits of each 4-byte group are permuted so that output `o` is
the word rotated left by `ROTATIONS[o]` and masked; the last output takes
its mantissa bit from the word rotated by 8 (a byte permute) and the rest
in place. That is 9 integer operations per register. No single rotation
per output can serve all four ({6, 7, 8, 15} does not tile Z16); a search
over all layouts of three rotations plus one two-source output finds none
cheaper.

The permutation stays inside 4-byte groups along K, so it commutes with
every K split that keeps 16-element blocks whole (sharding, K steps).
"""

import jax
import jax.numpy as jnp
import numpy as np

# Leaf name of a packed weight in this layout (`fp4jax.transform.prepare`,
# with the prefix of a stacked experts projection where there is one).
WEIGHT_LEAF = "weight_sm90"
# Bit of each role (m, e0, e1, sign) in the target bf16 half.
TARGET_BITS = (6, 7, 8, 15)
# Left rotation that brings each role of output o into place; output 3
# takes its mantissa bit through a rotation by 8 (one prmt) and the rest
# unrotated.
ROTATIONS = ((2, 2, 2, 2), (6, 6, 6, 6), (12, 12, 12, 12), (8, 0, 0, 0))


def _sources() -> np.ndarray:
  """[nibble 0..7, role bit 0..3] -> bit of the twiddled 32-bit word."""
  table = np.zeros((8, 4), np.int64)
  for nibble in range(8):
    output, half = nibble % 4, nibble // 4
    for role in range(4):
      target = TARGET_BITS[role] + 16 * half
      table[nibble, role] = (target - ROTATIONS[output][role]) % 32
  assert sorted(table.ravel()) == list(range(32)), "not a permutation"
  return table


SOURCES = _sources()


def _words(packed):
  """uint8 [..., K/2] -> uint32 [..., K/8] (little-endian groups of 4)."""
  b = packed.astype(jnp.uint32).reshape(*packed.shape[:-1], -1, 4)
  return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _bytes(words, shape):
  out = jnp.stack([(words >> (8 * i)) & 0xFF for i in range(4)], axis=-1)
  return out.astype(jnp.uint8).reshape(shape)


def _move_bits(packed, sources, targets):
  """Bit `sources[i]` of each 32-bit group -> bit `targets[i]`."""
  words = _words(packed)
  out = jnp.zeros_like(words)
  for source, target in zip(sources, targets, strict=True):
    out = out | ((words >> int(source)) & 1) << int(target)
  return _bytes(out, packed.shape)


def twiddle(packed: jnp.ndarray) -> jnp.ndarray:
  """Natural packed E2M1 bytes `[..., K/2]` (K/2 % 4 == 0) -> this layout."""
  return _move_bits(packed, range(32), SOURCES.ravel())


def untwiddle(packed: jnp.ndarray) -> jnp.ndarray:
  """The inverse of `twiddle`."""
  return _move_bits(packed, SOURCES.ravel(), range(32))


# ------------------------------------------------------ gate/up row order
# Leaf name of a stacked [gate; up] projection (`w13_`) in this bit layout
# whose rows are, in addition, in plane order (below).
PLANE_ROWS_LEAF = "weight_sm90_planes"
# Rows per block that the plane order permutes (one sm90 output tile).
PLANE_BLOCK = 128
# Feature k = 128 b + 32 g + 8 u + 4 e + 2 h + p (natural, axes b g u e h p)
# sits at 128 b + 64 p + 16 g + 8 h + 2 u + e (plane order, axes b p g h u
# e): the first 64 of each block are the even features, the last 64 the odd
# ones, each in the column order the sm90 kernel reads activation planes in
# (`pallas_mosaic_gpu_kernel_sm90.split_activations`). A SwiGLU epilogue over
# rows in this order writes the next GEMM's activation planes directly.
_NATURAL_AXES = (4, 4, 2, 2, 2)  # g u e h p
_TO_PLANES = (0, 5, 1, 4, 2, 3)
_TO_NATURAL = tuple(int(i) for i in np.argsort(_TO_PLANES))


def _permuted(x, axis: int, order, sizes):
  """`x` with each 128-row block along `axis` split into axes `sizes` and
  those axes transposed into `order` (numpy or jax, as `x`)."""
  axis = axis % x.ndim
  n = x.shape[axis]
  if n % PLANE_BLOCK:
    raise ValueError(f"{n} rows are not whole {PLANE_BLOCK}-row blocks")
  lead, rest = x.shape[:axis], x.shape[axis + 1 :]
  y = x.reshape(*lead, n // PLANE_BLOCK, *sizes, *rest)
  perm = (
    *range(axis),
    *(axis + i for i in order),
    *range(axis + len(order), y.ndim),
  )
  return y.transpose(perm).reshape(x.shape)


def _permute_rows(x, axis: int, order, sizes) -> jnp.ndarray:
  if jax.default_backend() != "cpu":  # the transpose, as timed on the H200
    return _permuted(x, axis, order, sizes)
  # On CPU a gather by the static row order: XLA's CPU compiler takes 10-14
  # s over the reshape-transpose under jit (any dtype; [4, 512, 192]), the
  # gather 0.05-0.08 s, for each new shape.
  rows = _permuted(np.arange(x.shape[axis], dtype=np.int32), 0, order, sizes)
  return jnp.take(x, rows, axis=axis, unique_indices=True)


def gate_up_in_plane_order(rows: int) -> bool:
  """Whether a [gate; up] stack of `rows` rows takes plane order: each half
  whole blocks (I % 128 == 0), so that per-block order is per-half order."""
  return rows % (2 * PLANE_BLOCK) == 0


def to_plane_rows(x, axis: int = -2) -> jnp.ndarray:
  """Rows (features) along `axis`, natural -> plane order, per 128 rows."""
  return _permute_rows(x, axis, _TO_PLANES, _NATURAL_AXES)


def from_plane_rows(x, axis: int = -2) -> jnp.ndarray:
  """The inverse of `to_plane_rows`."""
  planes = tuple(_NATURAL_AXES[i - 1] for i in _TO_PLANES[1:])
  return _permute_rows(x, axis, _TO_NATURAL, planes)


# ------------------------------------------------------------- row pairs
# A regrouping of natural packed bytes (before `twiddle`) for an sm90 decode
# that reads activations in natural K order (no activation split; the
# "sm90_row_pairs" layout of `fp4jax.prepare`). In each 16-row group, the
# 16-byte group j of row q (q < 8) holds 16-column chunk 2j of rows q and q
# + 8, and that of row q + 8 chunk 2j + 1 of the same two rows: the
# WGMMA_8BIT register of thread t then carries the codes of one k16 wgmma's
# A fragment, columns 2t, 2t + 1, 2t + 8, 2t + 9 of rows q and q + 8. Its
# nibbles n0..n7 (n = u + 2 h + 4 e) are row q + 8h, column 8u + 2t + e of
# the chunk, so that the decode's outputs (n0, n4), (n1, n5), (n2, n6),
# (n3, n7) are the fragment's registers a0, a2, a1, a3.
ROW_PAIR_ROWS = 16
# Leaf name of a dense packed weight regrouped so and then twiddled.
ROW_PAIRS_LEAF = "weight_sm90_row_pairs"
# [group, h, q, J, p, u, t, e] (natural rows 16 group + 8h + q, columns 32J
# + 16p + 8u + 2t + e) -> [group, p, q, J, t, e, h, u] (rows 16 group + 8p
# + q, nibbles 32J + 8t + 4e + 2h + u).
_TO_ROW_PAIRS = (0, 4, 2, 3, 6, 7, 1, 5)
_FROM_ROW_PAIRS = tuple(int(i) for i in np.argsort(_TO_ROW_PAIRS))


def _regroup_codes(packed, order, from_shape) -> jnp.ndarray:
  n, half_k = packed.shape[-2:]
  if n % ROW_PAIR_ROWS or half_k % 16:
    raise ValueError(
      f"row pairs need rows % {ROW_PAIR_ROWS} == 0 and K % 32 == 0,"
      f" got {packed.shape}"
    )
  lead = packed.shape[:-2]
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1)  # [..., N, K]
  codes = codes.reshape(*lead, n // 16, *from_shape(half_k))
  perm = (*range(len(lead)), *(len(lead) + i for i in order))
  codes = codes.transpose(perm).reshape(*lead, n, half_k, 2)
  return (codes[..., 0] | codes[..., 1] << 4).astype(jnp.uint8)


def to_row_pairs(packed: jnp.ndarray) -> jnp.ndarray:
  """Natural packed E2M1 bytes `[..., N, K/2]` (N % 16 == 0, K % 32 == 0)
  -> the row-pair grouping above (still natural bit order)."""
  return _regroup_codes(
    packed, _TO_ROW_PAIRS, lambda hk: (2, 8, hk // 16, 2, 2, 4, 2)
  )


def from_row_pairs(packed: jnp.ndarray) -> jnp.ndarray:
  """The inverse of `to_row_pairs`."""
  return _regroup_codes(
    packed, _FROM_ROW_PAIRS, lambda hk: (2, 8, hk // 16, 4, 2, 2, 2)
  )

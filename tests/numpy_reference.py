"""Independent numpy versions of ModelOpt's and SGLang's formulas, for tests.

Written from the format doc (§1.5, §1.6) in a different style from
fp4jax.format (searchsorted, float64 where exact, numpy division, which is
IEEE), so an error in one is unlikely to be repeated in the other.
"""

import ml_dtypes
import numpy as np

E2M1 = np.array(
  [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32
)
_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def cast_fp4(x: np.ndarray) -> np.ndarray:
  """ModelOpt `_cast_fp4`: searchsorted plus the odd-bound tie bump."""
  mag = np.abs(x)
  order = np.searchsorted(_BOUNDS, mag, side="left").astype(np.uint8)
  order += np.isin(mag, _BOUNDS[[1, 3, 5]]).astype(np.uint8)
  return ((x < 0).astype(np.uint8) << 3) | order


def pack(codes: np.ndarray) -> np.ndarray:
  return ((codes[..., 1::2] << 4) | codes[..., 0::2]).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
  out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
  out[..., 0::2] = packed & 0xF
  out[..., 1::2] = packed >> 4
  return out


def to_e4m3(x: np.ndarray) -> np.ndarray:
  return np.minimum(x, np.float32(448)).astype(ml_dtypes.float8_e4m3fn)


def quantize(w: np.ndarray, global_scale=None):
  """ModelOpt NVFP4QTensor on one matrix `[N, K]` -> (packed, sf, gs)."""
  w = np.asarray(w, np.float32)
  if global_scale is None:
    global_scale = np.float32(np.abs(w).max()) / np.float32(2688.0)
  gs = np.float32(global_scale)
  blocks = w.reshape(w.shape[0], -1, 16)
  amax = np.abs(blocks).max(-1)
  sf_hp = amax / (np.float32(6.0) * gs)
  sf_hp[sf_hp == 0] = 1.0
  sf = to_e4m3(np.maximum(sf_hp, np.float32(2.0**-9)))
  per_block = sf.astype(np.float32) * gs
  scaled = blocks / per_block[..., None]
  codes = cast_fp4(scaled).reshape(w.shape)
  return pack(codes), sf, gs


def dequantize(packed, sf, gs) -> np.ndarray:
  vals = E2M1[unpack(packed)]
  per_block = sf.astype(np.float32) * np.float32(gs)
  out = vals.reshape(*vals.shape[:-1], -1, 16) * per_block[..., None]
  return out.reshape(vals.shape)


def quantize_activation(x: np.ndarray, gs):
  """SGLang `cvt_warp_fp16_to_fp4` with IEEE reciprocals -> (packed, sf)."""
  xf = np.asarray(x, np.float32)
  blocks = xf.reshape(*xf.shape[:-1], -1, 16)
  gs = np.asarray(gs, np.float32)
  if gs.ndim:
    gs = gs[..., None]
  vmax = np.abs(blocks).max(-1)
  sf = to_e4m3(gs * (vmax * np.float32(1 / 6)))
  sf32 = sf.astype(np.float32)
  with np.errstate(divide="ignore"):
    out_scale = np.where(
      sf32 == 0, np.float32(0), np.float32(1) / (sf32 * (np.float32(1) / gs))
    ).astype(np.float32)
  codes = cast_fp4(blocks * out_scale[..., None]).reshape(xf.shape)
  return pack(codes), sf


def swizzle_offsets(rows: int, cols: int) -> np.ndarray:
  """Closed-form byte offsets (format doc §4), written out independently."""
  cols_p = -(-cols // 4) * 4
  m, k = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  return (
    (m // 128) * (cols_p // 4) * 512
    + (k // 4) * 512
    + (m % 32) * 16
    + ((m % 128) // 32) * 4
    + (k % 4)
  )

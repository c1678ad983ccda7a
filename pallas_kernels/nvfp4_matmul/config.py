"""Tile configuration of the Mosaic GPU NVFP4 matmul."""

import dataclasses

from fp4jax.format import nvfp4

WGMMA_ROWS = 64  # rows of the A operand one warpgroup issues


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Tiles of the sm90 kernel.

  Attributes:
    block_n: weight rows per CTA (the MMA's M side); a multiple of 64.
    block_k: K per pipeline step; a multiple of 128 (two packed halves of
      64 bytes, each a 128-byte swizzled bf16 row after decoding).
    block_m: tokens per CTA (the MMA's N side); a multiple of 8, <= 256.
    num_stages: pipeline depth (concurrent TMA loads).
  """

  block_n: int = 64
  block_k: int = 128
  block_m: int = 16
  num_stages: int = 2

  def __post_init__(self):
    if self.block_n % WGMMA_ROWS:
      raise ValueError(f"{self.block_n=} must be a multiple of 64")
    if self.block_k % 128:
      raise ValueError(f"{self.block_k=} must be a multiple of 128")
    if self.block_m % 8 or not 8 <= self.block_m <= 256:
      raise ValueError(f"{self.block_m=} must be a multiple of 8 in [8, 256]")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")

  @property
  def blocks_per_step(self) -> int:
    return self.block_k // nvfp4.BLOCK_SIZE


def heuristic(m: int, n: int, k: int) -> Config:
  """A first guess per shape (not tuned on hardware yet)."""
  del n, k
  block_m = min(128, -(-m // 8) * 8)
  return Config(block_m=block_m)

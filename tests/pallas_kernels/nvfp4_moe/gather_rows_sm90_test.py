"""The prefill row gather's bulk copies equal XLA's gather on the used rows.

The CPU tier runs the kernel in the Mosaic GPU interpreter at small
shapes (chunks of 8, 4, 2 and 1 rows, CTAs with no chunk or several),
checks what it refuses and that it lowers for sm_90 at the models' sizes;
the GPU tier runs it at Qwen3-30B-A3B's and DeepSeek-V3's 4096-token
shapes and through the MoE.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nvfp4_moe import gather_rows_sm90
from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu
from tests.pallas_kernels.nvfp4_moe import pallas_mosaic_gpu_test


def _inputs(rng, sources, width, rows, used_tiles, block_m):
  planes = jnp.asarray(rng.standard_normal((2, sources, width)), jnp.bfloat16)
  index = jnp.asarray(rng.integers(0, sources, rows), jnp.int32)
  return planes, index, jnp.int32(used_tiles * block_m)


def _check(planes, index, used_rows, out):
  used = int(used_rows)
  want = np.asarray(planes[:, index[:used]])
  got = np.stack([np.asarray(plane[:used]) for plane in out])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  "width, block_m, used_tiles, num_sms, chunk, spare_tiles",
  [
    (256, 24, 3, 4, 8, 2),  # 1 KB rows: 8-row chunks, 9 over 8 CTAs (4 SMs)
    (2048, 24, 2, 4, 4, 2),  # 8 KB rows (both planes): 4 a 32 KB stage
    (4096, 8, 5, 3, 2, 2),
    (8192, 40, 1, 16, 1, 2),  # more CTAs than chunks
    (256, 24, 0, 4, 8, 2),  # no used tile: nothing to copy
    # Every tile used: the last CTA's indices are the array's last span.
    (256, 24, 12, 2, 8, 0),
    (256, 8, 1, 4, 8, 2),  # fewer rows than a span of indices (padded)
  ],
)
def test_interpret_gathers_the_used_rows(
  rng, width, block_m, used_tiles, num_sms, chunk, spare_tiles
):
  rows = (used_tiles + spare_tiles) * block_m
  planes, index, used_rows = _inputs(rng, 37, width, rows, used_tiles, block_m)
  assert gather_rows_sm90._chunk_rows(planes, block_m) == chunk
  out = gather_rows_sm90.gather_planes(
    planes,
    index,
    used_rows,
    block_m=block_m,
    num_sms=num_sms,
    interpret=True,
  )
  assert [(o.shape, o.dtype) for o in out] == [
    ((rows, width), planes.dtype)
  ] * 2
  _check(planes, index, used_rows, out)


def test_refuses_rows_the_copies_cannot_split():
  # gpt-oss-120b: H = 2880, plane rows of 2880 bytes (not a multiple of
  # the 128 threads that share a copy's expected bytes).
  planes = jnp.zeros((2, 9, 1440), jnp.bfloat16)
  assert not gather_rows_sm90.supports(planes, 152, 152)
  assert gather_rows_sm90.supports(
    jnp.zeros((2, 9, 1024), jnp.bfloat16), 144, 144
  )
  assert not gather_rows_sm90.supports(
    jnp.zeros((2, 9, 1024), jnp.bfloat16), 100, 144
  )
  # Index copies start on 16 bytes: rows a multiple of 4.
  assert not gather_rows_sm90.supports(
    jnp.zeros((2, 9, 1024), jnp.bfloat16), 6, 2
  )
  with pytest.raises(ValueError, match="2880|1440"):
    gather_rows_sm90.gather_planes(
      planes, jnp.zeros(152, jnp.int32), jnp.int32(0), block_m=152, num_sms=4
    )


@pytest.mark.parametrize(
  "hidden, rows, block_m",
  [(2048, 51840, 144), (7168, 71744, 152), (4096, 8296, 136)],
)
def test_lowers_for_sm90(hidden, rows, block_m):
  lowered = (
    jax.jit(
      lambda p, i, u: gather_rows_sm90.gather_planes(
        p, i, u, block_m=block_m, num_sms=132
      )
    )
    .trace(
      jax.ShapeDtypeStruct((2, 4097, hidden // 2), jnp.bfloat16),
      jax.ShapeDtypeStruct((rows,), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.int32),
    )
    .lower(lowering_platforms=("cuda",))
  )
  assert lowered.as_text().count("stablehlo.custom_call") == 1


def test_interpret_moe_through_the_gather_kernel(rng, monkeypatch):
  monkeypatch.setattr(pallas_mosaic_gpu, "GATHER_KERNEL_MIN_ROWS", 0)
  jax.clear_caches()
  calls = []
  gather = gather_rows_sm90.gather_planes

  def spy(*args, **kwargs):
    calls.append(kwargs["block_m"])
    return gather(*args, **kwargs)

  monkeypatch.setattr(gather_rows_sm90, "gather_planes", spy)
  # 40 tokens top-2 over 4 experts: sorted (not counted) placement.
  monkeypatch.setattr(pallas_mosaic_gpu, "COUNTING_MAX_PAIRS", 0)
  pallas_mosaic_gpu_test.check_interpret_against_numpy(rng, (40, 4, 128, 128))
  assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize(
  "hidden, block_m, used_tiles",
  [(2048, 144, 256), (7168, 152, 300), (4096, 136, 61)],
)
def test_gathers_the_used_rows_on_gpu(rng, hidden, block_m, used_tiles):
  rows = (used_tiles + 40) * block_m
  planes, index, used_rows = _inputs(
    rng, 4097, hidden // 2, rows, used_tiles, block_m
  )
  out = gather_rows_sm90.gather_planes(
    planes, index, used_rows, block_m=block_m, num_sms=132
  )
  _check(planes, index, used_rows, out)

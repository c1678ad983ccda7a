"""The MoE prefill's row gather as bulk copies (sm90).

GEMM 1 reads its activations sorted by expert: row r of the sorted buffer
is token `index[r]`'s row. XLA's gather writes every row of the buffer,
whose size is the worst case (`config.Plan.max_tiles` tiles: E - 1 partly
empty tiles more than the pairs need), at ~3.6 TB/s. The persistent GEMM reads
only the used tiles, which come first. Here each CTA copies chunks of the
used rows only: one bulk copy (`cp.async.bulk`, contiguous bytes, no
tensor map) per row and plane into shared memory, and one bulk store per
plane and chunk back out, a few chunks in flight. Rows past `used_rows`
are not written.

Hopper's TMA cannot gather rows in one instruction (Blackwell's gather4
can), so the rows come one copy each; they are whole K rows (2-14 KB), so
the copies stay large.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Shared memory per pipeline stage, stages in flight per CTA, and CTAs per
# SM. On the H200 1-2 CTAs per SM and 3-4 stages of 16-32 KB took the same
# time within 3%, except one CTA with three 16 KB stages (10-12% slower).
STAGE_BYTES = 32 * 1024
STAGES = 3
CTAS_PER_SM = 2
MAX_CHUNK_ROWS = 8
# Mosaic GPU splits a copy's expected bytes over a warpgroup's 128 threads.
COPY_BYTES_MULTIPLE = 128
INDEX_BYTES = 4


def supports(planes, rows: int, block_m: int) -> bool:
  """Whether `gather_planes` takes these planes (arrays `[R, W]`) into
  `rows` sorted rows in tiles of `block_m`."""
  shapes = {(p.shape, p.dtype) for p in planes}
  if len(shapes) != 1:
    return False
  ((shape, dtype),) = shapes
  return (
    len(shape) == 2
    and shape[1] * dtype.itemsize % COPY_BYTES_MULTIPLE == 0
    and rows % block_m == 0
    # Index copies start 16 bytes apart.
    and rows % (16 // INDEX_BYTES) == 0
  )


def _chunk_rows(planes, block_m: int) -> int:
  """Rows per chunk: a power of two dividing `block_m` (so that whole
  tiles are whole chunks) whose planes fit a stage, at least 1."""
  row_bytes = sum(p.shape[1] * p.dtype.itemsize for p in planes)
  chunk = MAX_CHUNK_ROWS
  while chunk > 1 and (block_m % chunk or chunk * row_bytes > STAGE_BYTES):
    chunk //= 2
  return chunk


@functools.partial(jax.jit, static_argnames=("block_m", "num_sms", "interpret"))
def gather_planes(
  planes: tuple[jax.Array, ...],
  index: jax.Array,
  used_rows: jax.Array,
  *,
  block_m: int,
  num_sms: int,
  interpret: bool = False,
) -> tuple[jax.Array, ...]:
  """`plane[index]` of each plane for the first `used_rows` rows.

  Args:
    planes: arrays `[R, W]` of one dtype (the activation planes of R rows).
    index: int32 `[rows]`, each in `[0, R)` below `used_rows` (not checked:
      the copies promise to stay in bounds).
    used_rows: int32 scalar, a multiple of `block_m` (whole token tiles).
    block_m: the token tile; `rows % block_m == 0` and `rows % 4 == 0`.
    num_sms: the GPU's SMs.

  Returns:
    arrays `[rows, W]`, one a plane; rows from `used_rows` on are undefined.
  """
  planes = tuple(planes)
  n_planes = len(planes)
  (rows,) = index.shape
  if not supports(planes, rows, block_m):
    raise ValueError(
      f"gather_planes takes planes {[(p.shape, p.dtype) for p in planes]} with"
      f" rows of a multiple of {COPY_BYTES_MULTIPLE} bytes into {rows}"
      f" rows (a multiple of 4) in tiles of {block_m}"
    )
  chunk = _chunk_rows(planes, block_m)
  ctas = num_sms * CTAS_PER_SM
  # Each CTA takes a run of whole chunks and copies its indices into shared
  # memory at once (one bulk copy of `span` indices, 16-byte aligned: runs
  # of a multiple of `align` chunks), so no row waits on a load of its
  # index. A run near the end copies the last `span` indices instead.
  align = max(1, 16 // (INDEX_BYTES * chunk))
  max_run = -(-rows // chunk // ctas)
  max_run = -(-max_run // align) * align
  span = max_run * chunk
  span = -(-span * INDEX_BYTES // COPY_BYTES_MULTIPLE) * (
    COPY_BYTES_MULTIPLE // INDEX_BYTES
  )

  last_span = max(rows, span) - span  # 16-byte aligned (`supports`)

  def kernel(*refs):
    srcs_gmem = refs[:n_planes]
    index_gmem, used_gmem = refs[n_planes : n_planes + 2]
    outs_gmem = refs[n_planes + 2 : 2 * n_planes + 2]
    buffer, loaded, index_smem, index_loaded = refs[2 * n_planes + 2 :]
    chunks = used_gmem[0] // chunk
    run = -(-chunks // ctas)
    run = -(-run // align) * align
    first_chunk = lax.axis_index("cta") * run
    mine = jnp.clip(chunks - first_chunk, 0, run)
    copied_from = jnp.minimum(first_chunk * chunk, last_span)
    skipped = first_chunk * chunk - copied_from

    def load(i):
      slot = i % STAGES
      for r in range(chunk):
        token = index_smem[skipped + i * chunk + r]
        for p in range(n_planes):
          plgpu.copy_gmem_to_smem(
            srcs_gmem[p].at[pl.ds(token, 1)],
            buffer.at[slot, p, pl.ds(r, 1)],
            loaded.at[slot],
            oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS,
          )

    @pl.when(mine > 0)
    def _():
      plgpu.copy_gmem_to_smem(
        index_gmem.at[pl.ds(copied_from, span)],
        index_smem,
        index_loaded,
        oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS,
      )
      plgpu.barrier_wait(index_loaded)

    for i in range(STAGES - 1):
      pl.when(i < mine)(functools.partial(load, i))

    @pl.loop(0, mine)
    def _(i):
      slot = i % STAGES
      plgpu.barrier_wait(loaded.at[slot])
      first = (first_chunk + i) * chunk
      for p in range(n_planes):
        plgpu.copy_smem_to_gmem(
          buffer.at[slot, p], outs_gmem[p].at[pl.ds(first, chunk)]
        )
      # The next load refills the slot stored one step ago: only this
      # step's stores may still be reading.
      plgpu.wait_smem_to_gmem(n_planes, wait_read_only=True)
      pl.when(i + STAGES - 1 < mine)(functools.partial(load, i + STAGES - 1))

    plgpu.wait_smem_to_gmem(0)

  _, width = planes[0].shape
  dtype = planes[0].dtype
  call = plgpu.kernel(
    kernel,
    out_type=[jax.ShapeDtypeStruct((rows, width), dtype)] * n_planes,
    grid=(ctas,),
    grid_names=("cta",),
    scratch_types=[
      plgpu.SMEM((STAGES, n_planes, chunk, width), dtype),
      plgpu.Barrier(num_arrivals=chunk * n_planes, num_barriers=STAGES),
      plgpu.SMEM((span,), jnp.int32),
      plgpu.Barrier(num_arrivals=1),
    ],
  )
  index = index.astype(jnp.int32)
  if rows < span:  # only sizes far below a prefill's
    index = jnp.pad(index, (0, span - rows))
  args = (*planes, index, jnp.reshape(used_rows, (1,)).astype(jnp.int32))
  if interpret:
    with plgpu.force_gpu_interpret_mode():
      return tuple(call(*args))
  return tuple(call(*args))

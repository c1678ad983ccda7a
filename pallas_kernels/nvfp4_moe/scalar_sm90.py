"""One thread's int32 scalar program in inline Mosaic GPU code (sm90).

The MoE's routing and placement kernels (`route_decode_sm90`,
`place_prefill_sm90`) are bookkeeping, not tiles: each thread loads a few
integers, compares and counts, and stores them at computed addresses. These
are the few MLIR pieces they are written in. Values are int32 unless a
function takes another `element` type. Call them inside an
`plgpu.inline_mgpu` body (they need its MLIR context).
"""

from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax._src.lib.mlir.dialects import gpu
from jax._src.lib.mlir.dialects import llvm
from jax.experimental.mosaic.gpu import utils as mgpu_utils


def i32():
  return ir.IntegerType.get_signless(32)


def const(value: int):
  return arith.constant(i32(), value)


def shape(ref) -> tuple[int, ...]:
  return tuple(ir.MemRefType(ref.type).shape)


def element_type(ref):
  return ir.MemRefType(ref.type).element_type


def _ptr(ref, index, element):
  return mgpu_utils.getelementptr(mgpu_utils.memref_ptr(ref), [index], element)


def load(ref, index, element=None):
  """`ref`'s element at flat (row-major) `index`."""
  element = element or i32()
  return llvm.load(element, _ptr(ref, index, element))


def store(value, ref, index):
  """Writes `value` at `ref`'s flat `index`."""
  llvm.store(value, _ptr(ref, index, value.type))


def lt(a, b):
  return arith.cmpi(arith.CmpIPredicate.slt, a, b)


def ge(a, b):
  return arith.cmpi(arith.CmpIPredicate.sge, a, b)


def eq(a, b):
  return arith.cmpi(arith.CmpIPredicate.eq, a, b)


def round_up(value, multiple: int):
  """`value` (>= 0) rounded up to a multiple of `multiple`."""
  return arith.muli(
    arith.divui(arith.addi(value, const(multiple - 1)), const(multiple)),
    const(multiple),
  )


def barrier():
  """All of the CTA's threads, and their shared-memory writes, meet here.

  gpu.barrier lowers to the barrier intrinsic, which LLVM treats as
  convergent and as ordering memory. A bare "bar.sync 0" in inline PTX is
  neither: with Mixtral's 8 experts the first routing kernel wrote tokens
  out of bounds on the H200 (eighteenth session).
  """
  gpu.barrier()


def warp_op(ptx: str, value):
  """A warp-collective PTX instruction of one int32 operand."""
  return mgpu_utils.inline_ptx(ptx, value, result_types=i32(), convergent=True)


def popc(value):
  return mgpu_utils.inline_ptx("popc.b32 $0, $1;", value, result_types=i32())


def inclusive_warp_scan(value, lane):
  """Each lane's sum of `value` over the lanes up to it (itself included)."""
  through = value
  for distance in (1, 2, 4, 8, 16):
    earlier = warp_op(f"shfl.sync.up.b32 $0, $1, {distance}, 0, -1;", through)
    through = arith.select(
      lt(lane, const(distance)), through, arith.addi(through, earlier)
    )
  return through


def from_last_lane(value):
  """Lane 31's `value`, in every lane."""
  return warp_op("shfl.sync.idx.b32 $0, $1, 31, 31, -1;", value)


def padded_groups(count_of, experts: int, block_m: int, lane):
  """One warp lays out the experts' groups, each padded to whole tiles of
  `block_m` rows, in expert order: lane l takes experts l * n onwards (n =
  ceil(E / 32)).

  Args:
    count_of: int32 `expert` -> the expert's rows (called for this lane's
      experts, with 0 for those past E).
    lane: this thread's lane.

  Returns:
    ([(valid, expert, count, start, padded rows)] for this lane's experts,
    the rows of the experts up to this lane's last, padded: lane 31 holds
    all of them).
  """
  per_lane = -(-experts // 32)
  own = []
  for j in range(per_lane):
    expert = arith.addi(arith.muli(lane, const(per_lane)), const(j))
    valid = lt(expert, const(experts))
    expert = arith.select(valid, expert, const(0))
    count = arith.select(valid, count_of(expert), const(0))
    own.append((valid, expert, count, round_up(count, block_m)))
  lane_rows = own[0][3]
  for *_, rows in own[1:]:
    lane_rows = arith.addi(lane_rows, rows)
  through = inclusive_warp_scan(lane_rows, lane)
  start = arith.subi(through, lane_rows)
  groups = []
  for valid, expert, count, rows in own:
    groups.append((valid, expert, count, start, rows))
    start = arith.addi(start, rows)
  return groups, through


def write_group(
  expert,
  valid,
  start,
  count,
  end,
  token_ref,
  tile_ref,
  *,
  tokens: int,
  block_m: int,
  thread=None,
  step: int = 1,
):
  """If `valid`: the padding rows of `expert`'s group (its `count` rows
  from `start`, padded to `end`) get token `tokens` (a zero row), and its
  tiles its id. One thread writes them all (`thread` None), or threads
  share them: thread t (`thread`) rows and tiles t, t + `step`, ...."""

  def offset(j):
    return const(j) if thread is None else arith.addi(thread, const(j))

  for j in range(0, block_m - 1, step):  # count to the tile's end
    row = arith.addi(arith.addi(start, count), offset(j))
    with mgpu_utils.when(arith.andi(valid, lt(row, end))):
      store(const(tokens), token_ref, row)
  # An expert has at most one pair a token: <= ceil(T / block_m) tiles.
  first_tile = arith.divui(start, const(block_m))
  for j in range(0, -(-tokens // block_m), step):
    tile = arith.addi(first_tile, offset(j))
    inside = lt(arith.muli(tile, const(block_m)), end)
    with mgpu_utils.when(arith.andi(valid, inside)):
      store(expert, tile_ref, tile)


def write_past_used(
  used, token_ref, tile_ref, *, tokens: int, block_m: int, thread, step: int
):
  """Rows from `used` on get token `tokens` and tiles from `used /
  block_m` on -1 (no expert); thread t (`thread`) takes rows and tiles t,
  t + `step`, ...."""
  (n_rows,) = shape(token_ref)
  (n_tiles,) = shape(tile_ref)
  for first in range(0, n_rows, step):
    row = arith.addi(thread, const(first))
    past = arith.andi(lt(row, const(n_rows)), ge(row, used))
    with mgpu_utils.when(past):
      store(const(tokens), token_ref, row)
  for first in range(0, n_tiles, step):
    tile = arith.addi(thread, const(first))
    tile_row = arith.muli(tile, const(block_m))
    past = arith.andi(lt(tile, const(n_tiles)), ge(tile_row, used))
    with mgpu_utils.when(past):
      store(const(-1), tile_ref, tile)

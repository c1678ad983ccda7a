"""The post-restore pass: source NVFP4 leaves -> the leaves inference reads.

`prepare` is a pure tree-to-tree function, run once after a checkpoint or
Orbax restore. For each NVFP4 linear node it derives

  alpha           = input_scale * weight_scale_2      (float32 scalar)
  input_scale_inv = 1 / input_scale                   (float32 scalar)
  block_scale     = swizzle_128x4(weight_scale)       (the one copy)

keeps `weight` (or, with `weight_layout="sm90"`, replaces it by
`weight_sm90`: the same bytes with the bits of each 4-byte group in the
order the Hopper kernel decodes fastest, `fp4jax.format.sm90_layout`; with
`weight_layout="sm90_row_pairs"`, by `weight_sm90_row_pairs`: each 16-row
group's bytes regrouped into row pairs and twiddled, which the Hopper
kernel reads with activations in natural K order, no split pass), and
removes `weight_scale`, `weight_scale_2` and `input_scale`. A weight-only node (no `input_scale`) gets
`alpha = weight_scale_2` and no `input_scale_inv`. Weight-only kernels read
`weight_scale_2` back as `alpha * input_scale_inv`, which is within one ulp
(far below bf16 output rounding).

MoE `experts` nodes (`w13_*`, `w2_*`, stacked over experts) get per-expert
`alpha [E]`, `input_scale_inv [E]` and per-expert swizzled block scales;
`w13_alpha_up` appears only where gate and up `weight_scale_2` differ. With
`weight_layout="sm90"` and I % 128 == 0 the [gate; up] stack is stored as
`w13_weight_sm90_planes`: rows (and their block scales) permuted within each
half into `sm90_layout.to_plane_rows` order, so that the Hopper kernel's
SwiGLU epilogue writes GEMM 2's activation planes without a reorder pass
(with PAD_INTERMEDIATE_TO_TILES, other I are zero-padded to whole 128-row
halves first; outputs are unchanged).

Reload: derived leaves are a function of all source leaves, so to load new
weights restore the whole source set again and rerun `prepare`; never patch
one leaf of a prepared tree (SGLang PR #25107 -> #25190). A node that holds
source leaves is always re-derived from them, and any stale derived leaves in
it are replaced; an already prepared node passes through unchanged.
"""

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import errors
from fp4jax.format import nvfp4
from fp4jax.format import sm90_layout
from fp4jax.format import swizzle

SOURCE_LEAVES = ("weight_scale", "weight_scale_2", "input_scale")
DERIVED_LEAVES = (
  "block_scale",
  "alpha",
  "input_scale_inv",
  sm90_layout.WEIGHT_LEAF,
  sm90_layout.PLANE_ROWS_LEAF,
  sm90_layout.ROW_PAIRS_LEAF,
)
MOE_PREFIXES = ("w13_", "w2_")
WEIGHT_LAYOUTS = ("natural", "sm90", "sm90_row_pairs")
# With weight_layout="sm90", experts whose I is no multiple of 128
# (gpt-oss: 2880) get I padded to the next one (`pad_intermediate`), so
# that w13 takes the plane order: the H200 spent 132 of 2110 us of
# gpt-oss-120b's layer at 4096 tokens reordering the intermediate into GEMM
# 2's activation planes (eleventh session), for 2.2% more expert bytes.
# Padded, the layer took 1931 us instead of 2106 at 4096 tokens and 5749
# instead of 6175 at 16384 (twelfth session, `profile_moe.py padinter-`).
PAD_INTERMEDIATE_TO_TILES = True


@dataclasses.dataclass(frozen=True)
class LeafRecord:
  """One leaf the pass removed or created."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  nbytes: int

  @classmethod
  def of(cls, path: str, x) -> "LeafRecord":
    shape = tuple(int(d) for d in x.shape)
    return cls(path, shape, str(x.dtype), _nbytes(x))


@dataclasses.dataclass(frozen=True)
class PrepareReport:
  """What `prepare` removed and created, with bytes."""

  removed: tuple[LeafRecord, ...] = ()
  created: tuple[LeafRecord, ...] = ()

  @property
  def freed_bytes(self) -> int:
    """Bytes of the removed leaves (released when `donate=True`)."""
    return sum(r.nbytes for r in self.removed)

  @property
  def created_bytes(self) -> int:
    return sum(r.nbytes for r in self.created)

  def by_kind(self) -> dict[str, tuple[int, int, int]]:
    """Leaf name -> (count removed or created, bytes removed, bytes created)."""
    kinds: dict[str, list[int]] = {}
    for records, col in ((self.removed, 1), (self.created, 2)):
      for r in records:
        row = kinds.setdefault(r.path.rsplit("/", 1)[-1], [0, 0, 0])
        row[0] += 1
        row[col] += r.nbytes
    return {k: tuple(v) for k, v in sorted(kinds.items())}

  def table(self) -> str:
    """A plain-text table of leaf kinds with bytes removed and created."""
    lines = [f"{'leaf':<24}{'count':>8}{'removed B':>14}{'created B':>14}"]
    for name, (count, removed, created) in self.by_kind().items():
      lines.append(f"{name:<24}{count:>8}{removed:>14,}{created:>14,}")
    lines.append(
      f"{'total':<24}{'':>8}{self.freed_bytes:>14,}{self.created_bytes:>14,}"
    )
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def _nbytes(x) -> int:
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _check(ok: bool, path: str, message: str) -> None:
  if not ok:
    raise errors.TransformError(f"{path}: {message}")


def _check_dtype(path: str, x, dtype) -> None:
  _check(
    np.dtype(x.dtype) == np.dtype(dtype),
    path,
    f"expected dtype {np.dtype(dtype)}, got {x.dtype}",
  )


@jax.jit
def _per_tensor(weight_scale_2, input_scale):
  alpha = input_scale * weight_scale_2
  inv = nvfp4._true_divide(jnp.float32(1.0), input_scale)
  return alpha, inv


@jax.jit
def _swizzle(weight_scale):
  return swizzle.swizzle_block_scale(weight_scale)


# Jitted: eagerly, each of the bit permutation's ~100 integer ops writes a
# temporary the size of the weight (several weights' worth of transient
# memory on a device); fused, it reads the weight once and writes once.
@jax.jit
def _twiddled(weight):
  return sm90_layout.twiddle(weight)


@jax.jit
def _row_pairs_twiddled(weight):
  return sm90_layout.twiddle(sm90_layout.to_row_pairs(weight))


def _check_scales(path: str, **scales) -> None:
  """Host-side check of per-tensor scales: finite and positive."""
  for name, value in scales.items():
    v = np.asarray(value, np.float32)
    _check(
      bool(np.all(np.isfinite(v)) and np.all(v > 0)),
      f"{path}/{name}",
      f"must be finite and > 0, got {v.ravel()[:8]}",
    )


def _derive_linear(
  path: str,
  node: Mapping[str, Any],
  swizzle_scales: bool = True,
  weight_layout: str = "natural",
  plane_rows: bool = False,
) -> dict[str, Any]:
  """Derived leaves of one linear node in source state.

  `swizzle_scales=False` leaves `block_scale` out (fp4jax.sharding swizzles
  per shard; everything else here runs on the host, on whole tensors).
  `plane_rows` (an experts' [gate; up] stack, sm90 layout): both halves'
  rows go into `sm90_layout.to_plane_rows` order.
  """
  missing = [
    k for k in ("weight", "weight_scale", "weight_scale_2") if k not in node
  ]
  _check(not missing, path, f"NVFP4 linear is missing source leaves {missing}")
  w, ws, ws2 = node["weight"], node["weight_scale"], node["weight_scale_2"]
  _check_dtype(f"{path}/weight", w, jnp.uint8)
  _check_dtype(f"{path}/weight_scale", ws, jnp.float8_e4m3fn)
  _check_dtype(f"{path}/weight_scale_2", ws2, jnp.float32)
  *lead, n, half_k = w.shape
  _check(
    ws.shape == (*lead, n, 2 * half_k // nvfp4.BLOCK_SIZE)
    and (2 * half_k) % nvfp4.BLOCK_SIZE == 0,
    path,
    f"weight {w.shape} and weight_scale {ws.shape} disagree"
    f" (K = {2 * half_k} must be a multiple of 16, scales [.., N, K/16])",
  )
  if plane_rows:
    # Scales swizzled elsewhere (per shard) would miss the permutation.
    _check(swizzle_scales, path, "plane-ordered rows need swizzle_scales")
    w, ws = (gate_up_plane_rows(x) for x in (w, ws))
    out = {sm90_layout.PLANE_ROWS_LEAF: _twiddled(w)}
  elif weight_layout == "sm90_row_pairs" and row_pairs_fit(w.shape):
    out = {sm90_layout.ROW_PAIRS_LEAF: _row_pairs_twiddled(w)}
  elif weight_layout in ("sm90", "sm90_row_pairs"):
    out = {sm90_layout.WEIGHT_LEAF: _twiddled(w)}
  else:
    out = {"weight": w}
  if swizzle_scales:
    out["block_scale"] = _swizzle(ws)
  if "input_scale" in node:
    inp = node["input_scale"]
    _check_dtype(f"{path}/input_scale", inp, jnp.float32)
    _check_scales(path, weight_scale_2=ws2, input_scale=inp)
    out["alpha"], out["input_scale_inv"] = _per_tensor(ws2, inp)
  else:
    _check_scales(path, weight_scale_2=ws2)
    out["alpha"] = ws2
  return out


def row_pairs_fit(packed_shape) -> bool:
  """Whether a packed `[..., N, K/2]` weight takes the row-pair layout (N
  % 16 == 0, K % 32 == 0); others stay in "sm90"."""
  *_, n, half_k = packed_shape
  return n % sm90_layout.ROW_PAIR_ROWS == 0 and half_k % 16 == 0


def experts_layout(weight_layout: str) -> str:
  """The layout `prepare` gives experts nodes: the MoE kernels have no
  row-pair form yet, so "sm90_row_pairs" keeps its experts in "sm90"."""
  return "sm90" if weight_layout == "sm90_row_pairs" else weight_layout


@jax.jit
def gate_up_plane_rows(x):
  """`[E, 2I, ...]` gate and up rows in plane order (module doc; with
  I % 128 == 0 each half is whole blocks; `fp4jax.sharding` applies it per
  shard)."""
  return sm90_layout.to_plane_rows(x, axis=1)


def plane_ordered(prefix: str, rows: int, weight_layout: str) -> bool:
  """Whether `prepare` puts an experts projection's rows (`rows` N of its
  `[E, N, K/2]` stack) in plane order (module doc)."""
  return (
    prefix == "w13_"
    and weight_layout == "sm90"
    and sm90_layout.gate_up_in_plane_order(rows)
  )


def experts_weight_leaf(prefix: str, rows: int, weight_layout: str) -> str:
  """Leaf name `prepare` gives the packed weight of an experts projection
  (`prefix` "w13_" or "w2_", `rows` N of its `[E, N, K/2]` stack)."""
  if plane_ordered(prefix, rows, weight_layout):
    return prefix + sm90_layout.PLANE_ROWS_LEAF
  if weight_layout == "sm90":
    return prefix + sm90_layout.WEIGHT_LEAF
  return prefix + "weight"


def padded_intermediate(inter: int, weight_layout: str) -> int:
  """The I that `prepare` stores for experts of intermediate size `inter`
  (PAD_INTERMEDIATE_TO_TILES)."""
  if PAD_INTERMEDIATE_TO_TILES and weight_layout == "sm90":
    return -(-inter // sm90_layout.PLANE_BLOCK) * sm90_layout.PLANE_BLOCK
  return inter


def pad_intermediate(node: Mapping[str, Any], inter: int) -> dict[str, Any]:
  """A source experts node with I padded to `inter`: zero rows after each
  of w13's gate and up halves, zero K columns after w2's. Code 0 is +0.0
  and a zero block scale zeroes its block, so silu(0) * 0 = 0 feeds zero
  weights and every output is unchanged. A node whose shapes disagree is
  returned as it is (the derivation names the problem)."""
  w13, w2 = node.get("w13_weight"), node.get("w2_weight")
  if w13 is None or w2 is None or w13.ndim != 3 or w2.ndim != 3:
    return node
  e, two_i, half_h = w13.shape
  old = two_i // 2
  shapes = {
    "w13_weight": (e, two_i, half_h),
    "w13_weight_scale": (e, two_i, 2 * half_h // nvfp4.BLOCK_SIZE),
    "w2_weight": (e, w2.shape[1], old // 2),
    "w2_weight_scale": (e, w2.shape[1], old // nvfp4.BLOCK_SIZE),
  }
  if (
    inter == old
    or two_i % 2
    or (inter - old) % nvfp4.BLOCK_SIZE
    or any(node.get(k) is None or node[k].shape != v for k, v in shapes.items())
  ):
    return node
  pad = inter - old
  out = dict(node)
  for name in ("w13_weight", "w13_weight_scale"):
    halves = node[name].reshape(e, 2, old, -1)
    out[name] = jnp.pad(halves, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(
      e, 2 * inter, -1
    )
  for name, per_column in (("w2_weight", 2), ("w2_weight_scale", 16)):
    out[name] = jnp.pad(node[name], ((0, 0), (0, 0), (0, pad // per_column)))
  return out


def padded_for_layout(
  node: Mapping[str, Any], weight_layout: str
) -> Mapping[str, Any]:
  """A source experts node with I padded to `padded_intermediate` (itself
  when there is nothing to pad)."""
  w13 = node.get("w13_weight")
  if w13 is None or w13.ndim != 3:
    return node
  inter = padded_intermediate(w13.shape[1] // 2, weight_layout)
  return pad_intermediate(node, inter)


def _derive_experts(
  path: str,
  node: Mapping[str, Any],
  swizzle_scales: bool = True,
  weight_layout: str = "natural",
) -> dict[str, Any]:
  """Derived leaves of one stacked MoE `experts` node in source state (I
  padded as `padded_for_layout`)."""
  node = padded_for_layout(node, weight_layout)
  out = {}
  for prefix in MOE_PREFIXES:
    sub = {k[len(prefix) :]: v for k, v in node.items() if k.startswith(prefix)}
    if "weight_scale" not in sub:
      _check(
        not any(k in sub for k in SOURCE_LEAVES),
        path,
        f"{prefix}weight_scale is missing",
      )
      out.update({prefix + k: v for k, v in sub.items()})
      continue
    ws2 = sub.get("weight_scale_2")
    _check(ws2 is not None, path, f"{prefix}weight_scale_2 is missing")
    n_experts = sub["weight"].shape[0]
    gated = prefix == "w13_"
    want = (n_experts, 2) if gated else (n_experts,)
    _check(
      ws2.shape == want,
      f"{path}/{prefix}weight_scale_2",
      f"expected shape {want}, got {ws2.shape}",
    )
    inp = sub.get("input_scale")
    if inp is not None:
      _check(
        inp.shape == want,
        f"{path}/{prefix}input_scale",
        f"expected shape {want}, got {inp.shape}",
      )
      if gated:
        inp = _gate_up_input_scale(f"{path}/{prefix}input_scale", inp)
    gate_scale, up_scale = (ws2[:, 0], ws2[:, 1]) if gated else (ws2, None)
    # The expert node reuses the linear derivation on stacked leaves.
    derived = _derive_linear(
      f"{path}/{prefix}*",
      {
        "weight": sub["weight"],
        "weight_scale": sub["weight_scale"],
        "weight_scale_2": gate_scale,
        **({} if inp is None else {"input_scale": inp}),
      },
      swizzle_scales,
      weight_layout,
      # A malformed weight (checked in there) takes no plane order.
      plane_rows=sub["weight"].ndim == 3
      and plane_ordered(prefix, sub["weight"].shape[1], weight_layout),
    )
    if gated and not np.array_equal(
      np.asarray(gate_scale), np.asarray(up_scale)
    ):
      _check_scales(path, up_weight_scale_2=up_scale)
      derived["alpha_up"] = (
        up_scale if inp is None else _per_tensor(up_scale, inp)[0]
      )
    out.update({prefix + k: v for k, v in derived.items()})
  return out


def _gate_up_input_scale(path: str, input_scale: jax.Array) -> jax.Array:
  """One activation scale per expert for the shared gate/up input.

  ModelOpt equalises them at export. If a checkpoint's differ, the max is
  used (coarser, never clipping) and alpha is computed from it, so the math
  stays exact; only activation rounding changes.
  """
  both = np.asarray(input_scale)
  if not np.array_equal(both[:, 0], both[:, 1]):
    warnings.warn(
      f"{path}: gate and up input_scale differ; using their max per expert",
      stacklevel=4,
    )
  return jnp.max(input_scale, axis=-1)


def _is_linear_source(node: Mapping[str, Any]) -> bool:
  return any(k in node for k in SOURCE_LEAVES)


def _is_experts_source(node: Mapping[str, Any]) -> bool:
  return any(p + k in node for p in MOE_PREFIXES for k in SOURCE_LEAVES)


def _records(path: str, leaves: Mapping[str, Any]) -> list[LeafRecord]:
  return [LeafRecord.of(f"{path}/{k}", v) for k, v in leaves.items()]


def _owned_leaves(experts: bool, weight_layout: str) -> set[str]:
  """Leaf names the pass derives from, or derives, in one node."""
  names = SOURCE_LEAVES + DERIVED_LEAVES + ("alpha_up",)
  if weight_layout != "natural":  # the natural weight is a source leaf then
    names += ("weight",)
  if experts:
    return {p + n for p in MOE_PREFIXES for n in names}
  return set(names)


def _prepare_node(path, node, donate, removed, created, layout):
  experts = _is_experts_source(node)
  if not (experts or _is_linear_source(node)):
    return {
      k: (
        _prepare_node(
          f"{path}/{k}" if path else str(k),
          v,
          donate,
          removed,
          created,
          layout,
        )
        if isinstance(v, Mapping)
        else v
      )
      for k, v in node.items()
    }
  derive = _derive_experts if experts else _derive_linear
  if experts:
    layout = experts_layout(layout)
  derived = derive(path, node, weight_layout=layout)
  owned = _owned_leaves(experts, layout)
  # Stale derived leaves from an earlier pass count as removed: everything
  # owned is rebuilt from the source leaves.
  gone = {
    k: v for k, v in node.items() if k in owned and derived.get(k) is not v
  }
  new = {k: v for k, v in derived.items() if node.get(k) is not v}
  removed.extend(_records(path, gone))
  created.extend(_records(path, new))
  if donate:
    jax.block_until_ready(list(new.values()))
    free_replaced(gone.values(), kept=derived.values())
  out = {k: v for k, v in node.items() if k not in owned and k not in derived}
  out.update(derived)
  return out


def free_replaced(leaves, kept) -> None:
  """Deletes the device buffers of `leaves` that are not also in `kept`
  (the replaced source leaves, once their derived leaves exist)."""
  alive = {id(v) for v in kept}
  for v in leaves:
    if isinstance(v, jax.Array) and id(v) not in alive and not v.is_deleted():
      v.delete()


def prepare(
  params: Mapping[str, Any],
  *,
  donate: bool = False,
  weight_layout: str = "natural",
):
  """Derives inference leaves and drops the NVFP4 source leaves.

  Args:
    params: nested dict as `fp4jax.checkpoint.load_modelopt` or an Orbax
      restore returns it. Non-NVFP4 leaves pass through untouched.
    donate: delete the removed source buffers as soon as each node's new
      leaves exist, so peak memory stays within one node's new leaves of the
      source tree. The caller must not use those arrays afterwards.
    weight_layout: "natural" keeps `weight` as the checkpoint packs it;
      "sm90" stores `weight_sm90` instead, which the Hopper kernels decode
      with 9 instead of 15 integer operations per 8 weights (same bytes;
      every implementation reads both). "sm90_row_pairs" stores dense
      linears as `weight_sm90_row_pairs` (where N % 16 == 0 and K % 32 ==
      0; others as "sm90"): the Hopper kernel then reads activations as
      they are, without the pass that splits them into two K planes, which
      is faster from a few hundred tokens but ~10% slower at decode on the
      large layers (BENCHMARKS.md). Experts stay "sm90".

  Returns:
    `(prepared, report)`: a new nested dict (the input is not mutated) and a
    `PrepareReport` of removed and created leaves.

  Raises:
    TransformError: a node with missing, mistyped or misshapen source leaves,
      or with non-finite or non-positive per-tensor scales.
  """
  if weight_layout not in WEIGHT_LAYOUTS:
    raise ValueError(f"{weight_layout=} must be one of {WEIGHT_LAYOUTS}")
  removed: list[LeafRecord] = []
  created: list[LeafRecord] = []
  prepared = _prepare_node("", params, donate, removed, created, weight_layout)
  return prepared, PrepareReport(tuple(removed), tuple(created))

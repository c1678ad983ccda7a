"""Tensor and expert parallelism for NVFP4 params on a `jax.sharding.Mesh`.

Layouts, for a mesh axis of size S (`jax.sharding.PartitionSpec` per leaf):

- column-parallel linear (output features N split): `weight [N, K/2]` and
  the row-major source `weight_scale [N, K/16]` split along N; the prepared
  `block_scale [ceil128(N), ceil4(K/16)]` too, which hands each shard whole
  128-row swizzle tiles (needs N/S % 128 == 0), so the sharded leaf equals
  the single-device one.
- row-parallel linear (input features K split): `weight` and `weight_scale`
  split along K; the prepared `block_scale` is one swizzle per shard of its
  own K range, stored `[S, ceil128(N), ceil4(K/16/S)]` and split along the
  first axis (needs K/S % 64 == 0: whole 16-element blocks, whole 4-block
  scale tiles). Each shard's kernel reads its own 128x4 tiles.
- experts (expert-parallel): every `w13_*`/`w2_*` leaf is stacked over
  experts and split along E; the per-expert swizzle is unchanged.
- per-tensor scalars (`weight_scale_2`, `input_scale`, `alpha`,
  `input_scale_inv`) are replicated.
- `weight_sm90` (`weight_layout="sm90"`) splits as `weight`: its bit
  permutation stays inside 4-byte groups along K, so every shard's bytes
  are the permutation of its own natural bytes (twiddled per shard). The
  experts' `w13_weight_sm90_planes` also permutes rows, within each expert,
  so it splits along E the same way. `weight_sm90_row_pairs`
  (`weight_layout="sm90_row_pairs"`) regroups within 16-row groups and
  32-column chunks, which whole shards of the divisibility checks below
  keep (a column shard whose K is no multiple of 32 stays "sm90", as on one
  device); experts take "sm90" under that layout.

`prepare_linear` / `prepare_experts` swizzle the block scales per shard
under `jax.jit(jax.shard_map(...))`, optionally donating the source scales
(checks and per-tensor leaves come from `fp4jax.transform` on the whole
node); `matmul` runs the NVFP4 matmul per shard, `moe` the experts: each
device runs its own experts on the tokens routed to them. Two dispatches:
tokens replicated (a float32 `psum` adds the partial outputs: an
all-reduce of T x H x 4 bytes), or tokens split over the expert axis
(`tokens_sharded=True`: an all-gather of the bf16 tokens in and a
reduce-scatter of the float32 partials out, so each device ends with its
own tokens; T x H x 6 bytes against the all-reduce's 8, counted as ring
traffic). All-to-all dispatch (only the rows each device's experts need)
is not written: with top-8 routing over a few devices nearly every token
visits every device. Neither is measured on GPUs yet:
`tests/sharding_gpu_test.py` and `benchmarks.sharded_moe` (per-rank memory
around the prepare, speed against one GPU) are written for two GPUs.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from fp4jax import errors
from fp4jax import transform
from fp4jax.format import sm90_layout
from fp4jax.format import swizzle
from pallas_kernels import common
from pallas_kernels.nvfp4_moe import base as moe_base

KINDS = ("column", "row")
SCALARS = ("weight_scale_2", "input_scale", "alpha", "input_scale_inv")


def linear_specs(kind: str, axis: str, *, prepared: bool) -> dict[str, P]:
  """PartitionSpecs of a linear node's leaves (source or prepared)."""
  if kind not in KINDS:
    raise ValueError(f"{kind=} must be one of {KINDS}")
  split = P(axis, None) if kind == "column" else P(None, axis)
  specs = {name: P() for name in SCALARS}
  for name in ("weight", sm90_layout.WEIGHT_LEAF, sm90_layout.ROW_PAIRS_LEAF):
    specs[name] = split
  if prepared:
    specs["block_scale"] = P(axis, None) if kind == "column" else P(axis)
  else:
    specs["weight_scale"] = split
  return specs


def experts_specs(node: Mapping[str, Any], axis: str) -> dict[str, P]:
  """Every leaf of an experts node split along its leading E axis."""
  return {name: P(axis) for name in node}


def _check_divisible(path, kind, n, k, size):
  if kind == "column" and n % (128 * size):
    raise errors.NVFP4Error(
      f"{path}: column-parallel N={n} must split into whole 128-row swizzle"
      f" tiles over {size} shards (N % {128 * size} == 0)"
    )
  if kind == "row" and k % (64 * size):
    raise errors.NVFP4Error(
      f"{path}: row-parallel K={k} must split into whole 64-wide scale"
      f" tiles over {size} shards (K % {64 * size} == 0)"
    )


def _specs_for(node, specs):
  return {name: specs[name] for name in node}


def source_shardings(
  node: Mapping[str, Any], mesh, kind: str, axis: str
) -> dict[str, NamedSharding]:
  """Restore targets for a source node (`fp4jax.checkpoint.restore_params`).

  kind: "column" or "row" (linear) or "experts".
  """
  if kind == "experts":
    specs = experts_specs(node, axis)
  else:
    specs = linear_specs(kind, axis, prepared=False)
  return {name: NamedSharding(mesh, specs[name]) for name in node}


def place(node: Mapping[str, Any], mesh, specs: Mapping[str, P]) -> dict:
  """Puts each leaf of `node` on its NamedSharding (a no-op if it is)."""
  return {
    name: jax.device_put(x, NamedSharding(mesh, specs[name]))
    for name, x in node.items()
  }


def _per_shard(mesh, fn, leaves, specs, out_specs, donate):
  """`fn(name, shard)` on each shard of `leaves` (`{name: array}`), under
  jit."""
  run = jax.jit(
    jax.shard_map(
      lambda shards: {k: fn(k, v) for k, v in shards.items()},
      mesh=mesh,
      in_specs=(specs,),
      out_specs=out_specs,
    ),
    donate_argnums=(0,) if donate else (),
  )
  return run(place(leaves, mesh, specs))


def _swizzle_per_shard(
  mesh, scales, specs, *, axis, stack, donate, plane_rows=()
):
  """Swizzles each shard's block scales (`{name: [..., N, K/16]}`).

  `stack`: each shard's swizzle goes on a new leading axis split on `axis`
  (row-parallel); else the shards' swizzles tile the global one. Names in
  `plane_rows` (experts' gate/up stacks) get plane-ordered rows first.
  """

  def local(name, scale):
    if name in plane_rows:
      scale = transform.gate_up_plane_rows(scale)
    out = swizzle.swizzle_block_scale(scale)
    return out[None] if stack else out

  out_specs = {k: P(axis) if stack else specs[k] for k in scales}
  return _per_shard(mesh, local, scales, specs, out_specs, donate)


def _sm90_weights(
  out, node, prefixes, spec, mesh, donate, plane_rows=(), row_pairs=False
):
  """Replaces `out`'s natural weights (`prefix + "weight"`) by their
  per-shard sm90 permutation, donating the natural ones; prefixes in
  `plane_rows` (experts' gate/up stacks) also get plane-ordered rows, and
  with `row_pairs` (dense) every shard is regrouped into row pairs."""
  leaf = {True: sm90_layout.PLANE_ROWS_LEAF, False: sm90_layout.WEIGHT_LEAF}
  if row_pairs:
    leaf[False] = sm90_layout.ROW_PAIRS_LEAF
  names = {p + "weight": p + leaf[p in plane_rows] for p in prefixes}
  specs = {name: spec for name in names}

  def local(name, weight):
    if name.removesuffix("weight") in plane_rows:
      weight = transform.gate_up_plane_rows(weight)
    if row_pairs:
      weight = sm90_layout.to_row_pairs(weight)
    return sm90_layout.twiddle(weight)

  twiddled = _per_shard(
    mesh,
    local,
    {name: node[name] for name in names},
    specs,
    specs,
    donate,
  )
  for name, new_name in names.items():
    del out[name]
    out[new_name] = twiddled[name]


def prepare_linear(
  node: Mapping[str, Any],
  mesh,
  kind: str,
  *,
  axis: str = "tp",
  path: str = "linear",
  donate: bool = False,
  weight_layout: str = "natural",
) -> dict[str, jax.Array]:
  """Prepares one source linear node shard by shard (see module doc).

  The per-tensor leaves and every check come from `fp4jax.transform` on
  the whole node (host side, small); the block scales are swizzled on each
  shard, donating the source scales when `donate`; with `weight_layout`
  "sm90" each shard's weight is permuted too (`fp4jax.transform.prepare`).
  """
  _check_layout(weight_layout)
  size = mesh.shape[axis]
  n, k = node["weight"].shape[0], 2 * node["weight"].shape[1]
  _check_divisible(path, kind, n, k, size)
  out = transform._derive_linear(path, node, swizzle_scales=False)
  source = linear_specs(kind, axis, prepared=False)
  prepared = linear_specs(kind, axis, prepared=True)
  scales = _swizzle_per_shard(
    mesh,
    {"weight_scale": node["weight_scale"]},
    {"weight_scale": source["weight_scale"]},
    axis=axis,
    stack=kind == "row",
    donate=donate,
  )
  out["block_scale"] = scales["weight_scale"]
  if weight_layout != "natural":
    shard_shape = (
      (n // size, k // 2) if kind == "column" else (n, k // 2 // size)
    )
    _sm90_weights(
      out,
      node,
      [""],
      source["weight"],
      mesh,
      donate,
      row_pairs=weight_layout == "sm90_row_pairs"
      and transform.row_pairs_fit(shard_shape),
    )
  return place(out, mesh, prepared)


def prepare_experts(
  node: Mapping[str, Any],
  mesh,
  *,
  axis: str = "ep",
  path: str = "experts",
  donate: bool = False,
  weight_layout: str = "natural",
) -> dict[str, jax.Array]:
  """Prepares one source experts node with the experts split across `axis`
  (`weight_layout` as in `prepare_linear`)."""
  _check_layout(weight_layout)
  weight_layout = transform.experts_layout(weight_layout)
  size = mesh.shape[axis]
  n_experts = node["w13_weight"].shape[0]
  if n_experts % size:
    raise errors.NVFP4Error(
      f"{path}: {n_experts} experts do not split over {size} shards"
    )
  # As `fp4jax.transform.prepare` pads I for the sm90 layout (the leaves
  # below are derived in natural layout, then twiddled per shard).
  source, node = node, transform.padded_for_layout(node, weight_layout)
  out = transform._derive_experts(path, node, swizzle_scales=False)
  names = [p + "weight_scale" for p in transform.MOE_PREFIXES]
  # As `fp4jax.transform.prepare` stores them: per expert, so per shard.
  plane_rows = [
    p
    for p in transform.MOE_PREFIXES
    if transform.plane_ordered(p, node[p + "weight"].shape[1], weight_layout)
  ]
  scales = _swizzle_per_shard(
    mesh,
    {name: node[name] for name in names},
    {name: P(axis) for name in names},
    axis=axis,
    stack=False,
    donate=donate,
    plane_rows=[p + "weight_scale" for p in plane_rows],
  )
  for prefix, name in zip(transform.MOE_PREFIXES, names, strict=True):
    out[prefix + "block_scale"] = scales[name]
  if weight_layout == "sm90":
    _sm90_weights(
      out,
      node,
      transform.MOE_PREFIXES,
      P(axis),
      mesh,
      donate,
      plane_rows=plane_rows,
    )
  out = place(out, mesh, experts_specs(out, axis))
  if donate and node is not source:
    # The jits above were donated the padded copies; the caller's source
    # leaves are freed here, once the prepared ones exist.
    jax.block_until_ready(out)
    padded = [v for k, v in source.items() if k in node and node[k] is not v]
    transform.free_replaced(padded, kept=out.values())
  return out


def _check_layout(weight_layout: str) -> None:
  if weight_layout not in transform.WEIGHT_LAYOUTS:
    raise ValueError(
      f"{weight_layout=} must be one of {transform.WEIGHT_LAYOUTS}"
    )


def bytes_per_device(tree: Any) -> dict[str, int]:
  """Bytes each device holds of the arrays in `tree` (a per-rank report)."""
  totals: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      name = str(shard.device)
      totals[name] = totals.get(name, 0) + shard.data.nbytes
  return dict(sorted(totals.items()))


def matmul(
  x: jax.Array,
  layer: Mapping[str, jax.Array],
  mesh,
  kind: str,
  *,
  axis: str = "tp",
  **kwargs,
) -> jax.Array:
  """`pallas_kernels.nvfp4_matmul` on a prepared, sharded linear node.

  column: `x` replicated, output split along N. row: `x` split along K, the
  shards' partial products summed (`psum`), output replicated. `kwargs` go
  to `nvfp4_matmul` (activation, implementation, config).
  """
  specs = _specs_for(layer, linear_specs(kind, axis, prepared=True))
  lead = (None,) * (x.ndim - 1)
  if kind == "column":
    x_spec, out_spec = P(*lead, None), P(*lead, axis)
  else:
    x_spec, out_spec = P(*lead, axis), P(*lead, None)

  def local(x, shard):
    shard = dict(shard)
    if kind == "row":
      shard["block_scale"] = shard["block_scale"][0]
    y = pallas_kernels.nvfp4_matmul(x, shard, **kwargs)
    if kind == "row":
      # Partial sums in float32, as the unsharded kernel accumulates.
      y = jax.lax.psum(y.astype(jnp.float32), axis).astype(x.dtype)
    return y

  run = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(x_spec, specs),
    out_specs=out_spec,
    check_vma=False,  # Pallas kernels carry no varying-axes annotations
  )
  return run(x, layer)


def moe(
  x: jax.Array,
  router_logits: jax.Array,
  experts: Mapping[str, jax.Array],
  mesh,
  *,
  top_k: int,
  axis: str = "ep",
  activation: str = "bf16",
  implementation: str | None = None,
  correction_bias: jax.Array | None = None,
  tokens_sharded: bool = False,
  **routing,
) -> jax.Array:
  """`pallas_kernels.nvfp4_moe` with the experts split across `axis`.

  With `tokens_sharded`, `x` and `router_logits` are split over `axis`
  along tokens (any T: padded to a multiple of the axis size) and so is
  the result; otherwise all three are replicated (module doc).
  `routing` takes `nvfp4_moe`'s routing options (renormalize, scoring,
  num_groups, top_groups, routed_scaling).
  """
  specs = experts_specs(experts, axis)
  bias = (
    jnp.zeros(router_logits.shape[-1], jnp.float32)
    if correction_bias is None
    else correction_bias
  )

  def local(x, logits, bias, shard):
    if tokens_sharded:
      x = jax.lax.all_gather(x, axis, tiled=True)
      logits = jax.lax.all_gather(logits, axis, tiled=True)
    weights, ids = moe_base.route(
      logits,
      top_k=top_k,
      correction_bias=None if correction_bias is None else bias,
      **routing,
    )
    local_experts = shard[common.weight_key(shard, "w13_")[0]].shape[0]
    first = jax.lax.axis_index(axis) * local_experts
    partial = pallas_kernels.nvfp4_moe_experts(
      x,
      weights,
      ids - first,  # ids of other devices' experts fall outside [0, E/S)
      shard,
      activation=activation,
      # tiles for the groups of the pairs that stay (T top_k / E rows)
      routed_experts=logits.shape[-1],
      implementation=implementation,
    )
    if tokens_sharded:
      partial = jax.lax.psum_scatter(
        partial, axis, scatter_dimension=0, tiled=True
      )
      return partial.astype(x.dtype)
    return jax.lax.psum(partial, axis).astype(x.dtype)

  tokens = x.shape[0]
  token_spec = P(axis) if tokens_sharded else P()
  if tokens_sharded:  # whole rows per device; padding rows route anywhere
    pad = -tokens % mesh.shape[axis]
    x = jnp.pad(x, ((0, pad), (0, 0)))
    router_logits = jnp.pad(router_logits, ((0, pad), (0, 0)))
  run = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(token_spec, token_spec, P(), specs),
    out_specs=token_spec,
    check_vma=False,
  )
  return run(x, router_logits, bias, experts)[:tokens]

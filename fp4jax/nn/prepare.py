"""`prepare_model`: run the post-restore transform over a whole NNX model."""

from collections.abc import Callable

from flax import nnx

from fp4jax import sharding
from fp4jax import transform
from fp4jax.nn import _prepared


def prepare_model(
  model: nnx.Module,
  *,
  donate: bool = False,
  mesh=None,
  plan: Callable[[str], tuple[str, str] | None] | None = None,
  weight_layout: str = "natural",
) -> transform.PrepareReport:
  """Prepares every NVFP4 module in `model` in place; returns the report.

  Runs `fp4jax.transform.prepare` once over the source leaves of all NVFP4
  modules, then swaps the prepared leaves into them. Modules already prepared
  are left alone. With `donate=True` the source buffers are deleted.

  With a `mesh`, `plan(path)` names how each module is split: `(kind,
  axis)` with kind "column", "row" or "experts" (see `fp4jax.sharding`), or
  None to keep it whole on one device. Split modules are prepared shard by
  shard and run their kernels per shard; the report lists the others.

  `weight_layout` as in `fp4jax.transform.prepare` ("sm90": the bit order
  the Hopper kernels decode fastest), for split modules too.
  """
  targets = {
    "/".join(map(str, path)) or "<root>": module
    for path, module in nnx.iter_graph(model)
    if isinstance(module, _prepared.NVFP4Leaves) and not module.prepared
  }
  if mesh is not None:
    for path in list(targets):
      split = plan(path) if plan else None
      if split is None:
        continue
      module = targets.pop(path)
      kind, axis = split
      leaves = module.nvfp4_leaves()
      if kind == "experts":
        out = sharding.prepare_experts(
          leaves,
          mesh,
          axis=axis,
          path=path,
          donate=donate,
          weight_layout=weight_layout,
        )
      else:
        out = sharding.prepare_linear(
          leaves,
          mesh,
          kind,
          axis=axis,
          path=path,
          donate=donate,
          weight_layout=weight_layout,
        )
      module.replace_nvfp4_leaves(out)
      module.parallel = (mesh, kind, axis)
  sources = {path: m.nvfp4_leaves() for path, m in targets.items()}
  prepared, report = transform.prepare(
    sources, donate=donate, weight_layout=weight_layout
  )
  for path, module in targets.items():
    module.replace_nvfp4_leaves(prepared[path])
  return report

"""`prepare_model`: run the post-restore transform over a whole NNX model."""

from flax import nnx

from fp4jax import transform
from fp4jax.nn import _prepared


def prepare_model(
  model: nnx.Module, *, donate: bool = False
) -> transform.PrepareReport:
  """Prepares every NVFP4 module in `model` in place; returns the report.

  Runs `fp4jax.transform.prepare` once over the source leaves of all NVFP4
  modules, then swaps the prepared leaves into them. Modules already prepared
  are left alone. With `donate=True` the source buffers are deleted.
  """
  targets = {
    "/".join(map(str, path)) or "<root>": module
    for path, module in nnx.iter_graph(model)
    if isinstance(module, _prepared.NVFP4Leaves) and not module.prepared
  }
  sources = {path: m.nvfp4_leaves() for path, m in targets.items()}
  prepared, report = transform.prepare(sources, donate=donate)
  for path, module in targets.items():
    module.replace_nvfp4_leaves(prepared[path])
  return report

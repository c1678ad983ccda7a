"""`nvfp4_matmul`: pick an implementation, fall through on NotImplementedError."""

from collections.abc import Callable
from collections.abc import Mapping

import jax

from pallas_kernels import _dispatch
from pallas_kernels.nvfp4_matmul import base
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu


def _pallas(x, layer, *, activation, config):
  return pallas_mosaic_gpu.nvfp4_matmul(
    x, layer, activation=activation, config=config
  )


def _xla(x, layer, *, activation, config):
  del config  # the reference has no tiles
  return base.reference_matmul(x, layer, activation=activation)


IMPLEMENTATIONS: dict[str, Callable] = {"pallas": _pallas, "xla": _xla}
# Tried in this order when implementation=None: the Pallas kernel (passes the
# GPU tier on the H200) where it runs and tiles the shape, else the reference.
DEFAULT_ORDER = ("pallas", "xla")


def nvfp4_matmul(
  x: jax.Array,
  layer: Mapping,
  *,
  activation: str = "bf16",
  implementation: str | None = None,
  config=None,
) -> jax.Array:
  """`x @ W.T` for a prepared NVFP4 layer, float32 accumulation.

  Args:
    x: activations `[..., M, K]`, usually bf16.
    layer: a prepared layer (`weight` or `weight_sm90`, `block_scale`,
      `alpha`, optional `input_scale_inv`), as `fp4jax.transform.prepare`
      makes it in either weight layout.
    activation: "bf16" keeps activations in bf16 (W4A16); "nvfp4" quantizes
      them first with the layer's `input_scale_inv` (W4A4).
    implementation: None picks the fastest that supports the inputs; "xla" is
      the pure-jnp reference; "pallas" the Mosaic GPU kernel.
    config: tiles for "pallas" (`pallas_kernels.nvfp4_matmul.config.Config`);
      None uses the heuristic.

  Returns:
    `[..., M, N]` in x.dtype.

  Raises:
    ValueError: bad shapes, dtypes or leaves.
    NotImplementedError: the named implementation cannot run these inputs.
  """
  prepared = base.PreparedLinear.from_mapping(layer)
  base.check_inputs(x, prepared, activation)
  return _dispatch.dispatch(
    "NVFP4 matmul",
    IMPLEMENTATIONS,
    DEFAULT_ORDER,
    implementation,
    x,
    prepared,
    activation=activation,
    config=config,
  )

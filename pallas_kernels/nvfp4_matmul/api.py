"""`nvfp4_matmul`: pick an implementation, fall through on NotImplementedError."""

from collections.abc import Callable, Mapping

import jax

from pallas_kernels.nvfp4_matmul import base


def _pallas(x, layer, *, activation):
  del x, layer, activation
  raise NotImplementedError(
    "the Pallas Mosaic GPU NVFP4 matmul is not implemented yet"
  )


IMPLEMENTATIONS: dict[str, Callable] = {
  "pallas": _pallas,
  "xla": base.reference_matmul,
}
# Tried in this order when implementation=None; the reference comes last.
DEFAULT_ORDER = ("pallas", "xla")


def nvfp4_matmul(
  x: jax.Array,
  layer: Mapping,
  *,
  activation: str = "bf16",
  implementation: str | None = None,
) -> jax.Array:
  """`x @ W.T` for a prepared NVFP4 layer, float32 accumulation.

  Args:
    x: activations `[..., M, K]`, usually bf16.
    layer: a prepared layer (`weight`, `block_scale`, `alpha`, optional
      `input_scale_inv`), as `fp4jax.transform.prepare` makes it.
    activation: "bf16" keeps activations in bf16 (W4A16); "nvfp4" quantizes
      them first with the layer's `input_scale_inv` (W4A4).
    implementation: None picks the fastest that supports the inputs; "xla" is
      the pure-jnp reference; "pallas" the Mosaic GPU kernel.

  Returns:
    `[..., M, N]` in x.dtype.

  Raises:
    ValueError: bad shapes, dtypes or leaves.
    NotImplementedError: the named implementation cannot run these inputs.
  """
  prepared = base.PreparedLinear.from_mapping(layer)
  base.check_inputs(x, prepared, activation)
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(
        f"{implementation=} must be None or one of {tuple(IMPLEMENTATIONS)}"
      )
    return IMPLEMENTATIONS[implementation](x, prepared, activation=activation)
  failures = []
  for name in DEFAULT_ORDER:
    try:
      return IMPLEMENTATIONS[name](x, prepared, activation=activation)
    except NotImplementedError as e:
      failures.append(e)
  raise ExceptionGroup("no NVFP4 matmul implementation ran", failures)

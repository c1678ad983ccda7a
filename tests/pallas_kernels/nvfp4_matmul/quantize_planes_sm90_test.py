"""W4A4's one-pass quantize-and-split kernel equals the XLA passes (split
into planes, or in natural order for row-pair layers).

The kernel is inline Mosaic GPU code: the CPU tier checks its geometry and
that it lowers for sm_90; the GPU tier checks it bit for bit against the
reference quantizer followed by the activation split, and through the
matmul.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from fp4jax.format import nvfp4
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90
from pallas_kernels.nvfp4_matmul import quantize_planes_sm90
from tests.pallas_kernels import activation_quant_test
from tests.pallas_kernels.nvfp4_matmul import test_base


def test_plane_positions_are_the_activation_split():
  x = jnp.arange(64, dtype=jnp.float32)[None]
  planes = np.asarray(sm90.split_activations(x))
  for k in range(64):
    group, column = divmod(k, quantize_planes_sm90.GROUP)
    n, position = quantize_planes_sm90.plane_position(column)
    assert planes[n, 0, 16 * group + position] == k


@pytest.mark.parametrize(
  "m, k, rows, planes",
  [
    (1, 2048, 8, True),
    (300, 7168, 384, True),
    (2048, 5120, 2048, True),
    (300, 7168, 384, False),
  ],
)
def test_lowers_for_sm90(m, k, rows, planes):
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  quantize = jax.jit(
    lambda x, s: quantize_planes_sm90.quantize_planes(x, s, rows, planes)
  )
  assert quantize.eval_shape(x, scale).shape == (
    (2, rows, k // 2) if planes else (rows, k)
  )
  lowered = quantize.trace(x, scale).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("leaf", ["weight_sm90", "weight_sm90_row_pairs"])
def test_matmul_lowers_through_it(monkeypatch, leaf):
  monkeypatch.setattr(pallas_mosaic_gpu, "QUANTIZE_PLANES_MIN_ELEMENTS", 0)
  n, k = 2048, 7168
  layer = {
    leaf: jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
    "block_scale": jax.ShapeDtypeStruct((n, k // 16), jnp.float8_e4m3fn),
    "alpha": jax.ShapeDtypeStruct((), jnp.float32),
    "input_scale_inv": jax.ShapeDtypeStruct((), jnp.float32),
  }
  x = jax.ShapeDtypeStruct((300, k), jnp.bfloat16)
  config = pallas_mosaic_gpu.config_lib.heuristic(300, n, k)

  def f(x, leaves):
    return pallas_mosaic_gpu._run(
      x, leaves, activation="nvfp4", config=config, interpret=False
    )

  lowered = jax.jit(f).trace(x, layer).lower(lowering_platforms=("cuda",))
  # Two kernels (the quantizer and the matmul), one custom call each.
  assert lowered.as_text().count("stablehlo.custom_call") == 2


@pytest.mark.parametrize(
  "dtype, shape, rows",
  [
    (jnp.float32, (4, 256), 8),  # not bf16
    (jnp.bfloat16, (4, 2080), 8),  # K % 64 != 0
    (jnp.bfloat16, (9, 256), 8),  # fewer rows than M
  ],
)
def test_rejects_what_it_cannot_quantize(dtype, shape, rows):
  with pytest.raises(ValueError, match="quantize_planes"):
    quantize_planes_sm90.quantize_planes(
      jnp.zeros(shape, dtype), jnp.float32(1), rows
    )


def _xla_planes(x, input_scale_inv, rows, planes=True):
  """The XLA path: reference quantizer, bf16, zero rows, split."""
  q = nvfp4.fake_quantize_activation(x, input_scale_inv).astype(jnp.bfloat16)
  q = jnp.pad(q, ((0, rows - x.shape[0]), (0, 0)))
  return sm90.split_activations(q) if planes else q


@pytest.mark.gpu
@pytest.mark.parametrize("planes", [True, False])
@pytest.mark.parametrize("input_scale_inv", [1e-3, 37.5, 900.0, 1e6])
def test_equals_reference_then_split_bit_for_bit(rng, input_scale_inv, planes):
  # Every finite bf16 value, blocks on E2M1 thresholds, scaled gaussians
  # (zero blocks and E4M3-subnormal scales among them); K = 256.
  x = jnp.asarray(activation_quant_test._inputs(rng), jnp.bfloat16)
  rows = -(-x.shape[0] // 64) * 64 + 64  # zero rows after them
  inv = jnp.float32(input_scale_inv)
  got = jax.jit(quantize_planes_sm90.quantize_planes, static_argnums=(2, 3))(
    x, inv, rows, planes
  )
  want = jax.jit(_xla_planes, static_argnums=(2, 3))(x, inv, rows, planes)
  got, want = np.asarray(got), np.asarray(want)
  assert not np.isnan(want.astype(np.float32)).any()
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.gpu
def test_nan_blocks_stay_nan(rng):
  x = rng.standard_normal((3, 2048)).astype(np.float32)
  x[1, 40] = np.nan  # block 2 of row 1
  got = quantize_planes_sm90.quantize_planes(
    jnp.asarray(x, jnp.bfloat16), jnp.float32(100.0), 8
  )
  want = _xla_planes(jnp.asarray(x, jnp.bfloat16), jnp.float32(100.0), 8)
  got = np.asarray(got, np.float32)
  np.testing.assert_array_equal(
    np.isnan(got), np.isnan(np.asarray(want, np.float32))
  )
  assert np.isnan(got).sum() == 16  # the NaN's block, nothing else


@pytest.mark.gpu
@pytest.mark.parametrize("weight_layout", ["sm90", "sm90_row_pairs"])
@pytest.mark.parametrize(
  "m, n, k", [(5, 2048, 7168), (300, 2048, 7168), (2048, 5120, 2048)]
)
def test_w4a4_matmul_through_it_equals_the_xla_path(
  rng, m, n, k, weight_layout, monkeypatch
):
  layer, _ = test_base.make_layer(rng, n, k, weight_layout=weight_layout)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)

  def matmul(x, layer):
    return pallas_kernels.nvfp4_matmul(
      x, layer, activation="nvfp4", implementation="pallas"
    )

  monkeypatch.setattr(pallas_mosaic_gpu, "QUANTIZE_PLANES_MIN_ELEMENTS", None)
  want = np.asarray(jax.jit(matmul)(x, layer))
  monkeypatch.setattr(pallas_mosaic_gpu, "QUANTIZE_PLANES_MIN_ELEMENTS", 0)
  jax.clear_caches()  # the switch is no jit key
  got = np.asarray(jax.jit(matmul)(x, layer))
  assert not np.isnan(want.astype(np.float32)).any()
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))

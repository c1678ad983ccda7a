"""The Mosaic GPU NVFP4 matmul: CPU interpreter, sm_90 lowering, GPU tier.

Mosaic GPU's interpreter runs this kernel (its A operand comes from SMEM),
so the CPU tier checks the numbers at small shapes; lowering for sm_90 on a
CPU-only jax catches every Python-side error at real shapes.
"""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels.nvfp4_matmul import base
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu
from tests import conftest
from tests import tolerance
from tests.pallas_kernels.nvfp4_matmul import test_base

# bf16 activations, f32 accumulation: as the reference, plus summation order.
RTOL = 2.0**-7


def run(x, layer, activation, config=None, interpret=True):
  return pallas_mosaic_gpu.nvfp4_matmul(
    x,
    base.PreparedLinear.from_mapping(layer),
    activation=activation,
    config=config,
    interpret=interpret,
  )


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize(
  "m, n, k, config",
  [
    (1, 64, 128, None),
    (5, 128, 256, None),
    (16, 64, 384, config_lib.Config(block_m=8, num_stages=1)),
    (9, 256, 512, config_lib.Config(block_n=128, block_k=256, block_m=16)),
  ],
)
def test_interpret_matches_numpy_oracle(rng, m, n, k, config, activation):
  layer, src = test_base.make_layer(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  out = run(x, layer, activation, config)
  assert out.shape == (m, n) and out.dtype == jnp.bfloat16
  want = test_base.numpy_matmul(x.astype(jnp.float32), src, activation)
  tolerance.assert_close(out, want, RTOL)


def test_interpret_batch_dims_and_weight_only(rng):
  layer, src = test_base.make_layer(rng, 64, 128, weight_only=True)
  x = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.bfloat16)
  out = run(x, layer, "bf16")
  want = test_base.numpy_matmul(
    x.reshape(6, 128).astype(jnp.float32), src, "bf16"
  )
  tolerance.assert_close(out.reshape(6, 64), want, RTOL)


@pytest.mark.parametrize(
  "m, n, k, config",
  [
    (16, 8192, 8192, None),
    (
      128,
      28672,
      8192,
      config_lib.Config(block_n=128, block_k=256, block_m=64, num_stages=2),
    ),
  ],
)
def test_lowers_for_sm90(m, n, k, config):
  # Lowering also checks that the tiles fit in shared memory (227 KiB).
  layer = {
    "weight": jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
    "block_scale": jax.ShapeDtypeStruct(
      (-(-n // 128) * 128, -(-(k // 16) // 4) * 4), jnp.float8_e4m3fn
    ),
    "alpha": jax.ShapeDtypeStruct((), jnp.float32),
    "input_scale_inv": jax.ShapeDtypeStruct((), jnp.float32),
  }
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  config = config or config_lib.heuristic(m, n, k)

  def f(x, leaves):
    return pallas_mosaic_gpu._run(
      x, leaves, activation="bf16", config=config, interpret=False
    )

  jax.jit(f).trace(x, layer).lower(lowering_platforms=("cuda",))


def test_shapes_it_does_not_tile_fall_through(rng):
  layer, _ = test_base.make_layer(rng, 200, 48)
  x = jnp.ones((2, 48), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="multiple of 64"):
    run(x, layer, "bf16")


def test_config_validation():
  with pytest.raises(ValueError, match="block_n"):
    config_lib.Config(block_n=96)
  with pytest.raises(ValueError, match="block_m"):
    config_lib.Config(block_m=12)
  assert config_lib.heuristic(3, 64, 128).block_m == 8


def test_named_pallas_without_a_gpu_says_why(rng):
  layer, _ = test_base.make_layer(rng, 64, 128)
  x = jnp.ones((2, 128), jnp.bfloat16)
  if conftest.has_gpu():
    out = pallas_kernels.nvfp4_matmul(x, layer, implementation="pallas")
    assert out.shape == (2, 64)
  else:
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
      pallas_kernels.nvfp4_matmul(x, layer, implementation="pallas")


@pytest.mark.gpu
class TestOnGPU(test_base.NVFP4MatmulTestBase):
  """The shared suite on the H200, at the shapes this version tiles."""

  IMPLEMENTATION = "pallas"

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize(
    "m, n, k",
    [(1, 4096, 4096), (16, 8192, 2048), (64, 2048, 7168), (300, 1024, 1024)],
  )
  def test_matches_numpy_oracle(self, rng, m, n, k, activation):
    super().test_matches_numpy_oracle(rng, m, n, k, activation)

  def test_batch_dims(self, rng):
    layer, src = test_base.make_layer(rng, 128, 256)
    x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
    want = test_base.numpy_matmul(
      x.reshape(6, 256).astype(jnp.float32), src, "bf16"
    )
    self.check(self.matmul(x, layer, "bf16").reshape(6, 128), want)

  def test_weight_only_layer(self, rng):
    pass  # covered by the interpreter test above

  def test_under_jit(self, rng):
    layer, src = test_base.make_layer(rng, 128, 256)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    out = jax.jit(lambda x, lay: self.matmul(x, lay, "nvfp4"))(x, layer)
    self.check(out, test_base.numpy_matmul(x.astype(jnp.float32), src, "nvfp4"))

  def test_rejects_bad_inputs(self, rng):
    pass  # shared input checks run before dispatch; see base_test.py

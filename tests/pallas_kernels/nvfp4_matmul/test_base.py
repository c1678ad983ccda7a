"""The shared NVFP4 matmul suite; each implementation subclasses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
import pallas_kernels
from tests import numpy_reference as ref
from tests import tolerance


def make_layer(
  rng, n, k, *, weight_only=False, act_amax=4.0, weight_layout="natural"
):
  """A prepared layer from fresh random weights, plus its numpy pieces."""
  w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
  t = fp4jax.quantize(jnp.asarray(w))
  src = {
    "weight": t.packed,
    "weight_scale": t.block_scale,
    "weight_scale_2": t.global_scale,
  }
  if not weight_only:
    src["input_scale"] = jnp.float32(act_amax / 2688.0)
  layer, _ = fp4jax.prepare({"l": src}, weight_layout=weight_layout)
  return layer["l"], src


def numpy_matmul(x, src, activation):
  """float64 numpy oracle: (deq(x) @ deq(W).T) * scale."""
  packed = np.asarray(src["weight"])
  sf = np.asarray(src["weight_scale"])
  w = ref.dequantize(packed, sf, np.float32(1)).astype(np.float64)
  ws2 = np.float64(np.asarray(src["weight_scale_2"]))
  xf = np.asarray(x, np.float32)
  if activation == "bf16":
    return (xf.astype(np.float64) @ w.T) * ws2
  inp = np.float32(np.asarray(src["input_scale"]))
  xp, xsf = ref.quantize_activation(xf, np.float32(1) / inp)
  xd = ref.dequantize(xp, xsf, np.float32(1)).astype(np.float64)
  return (xd @ w.T) * (np.float64(inp) * ws2)


class NVFP4MatmulTestBase:
  """Subclasses set IMPLEMENTATION (and may narrow the shapes)."""

  IMPLEMENTATION: str | None = None
  # Output is bf16: a correct result is within bf16 rounding of the oracle,
  # plus f32 summation-order noise.
  RTOL = 2.0**-7

  def matmul(self, x, layer, activation):
    return pallas_kernels.nvfp4_matmul(
      x, layer, activation=activation, implementation=self.IMPLEMENTATION
    )

  def check(self, out, want):
    tolerance.assert_close(out, want, self.RTOL)

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize(
    "m, n, k",
    [(1, 128, 64), (7, 200, 48), (16, 256, 256), (64, 96, 128), (3, 8, 16)],
  )
  def test_matches_numpy_oracle(self, rng, m, n, k, activation):
    layer, src = make_layer(rng, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = self.matmul(x, layer, activation)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    self.check(out, numpy_matmul(x.astype(jnp.float32), src, activation))

  @pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
  @pytest.mark.parametrize("m, n, k", [(5, 256, 512), (16, 200, 128)])
  def test_sm90_weight_layout(self, rng, m, n, k, activation):
    # Layers prepared with weight_layout="sm90" hold `weight_sm90`; every
    # implementation gives the numbers of the natural layout.
    layer, src = make_layer(rng, n, k, weight_layout="sm90")
    assert "weight" not in layer and "weight_sm90" in layer
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    out = self.matmul(x, layer, activation)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    self.check(out, numpy_matmul(x.astype(jnp.float32), src, activation))

  def test_batch_dims(self, rng):
    layer, src = make_layer(rng, 64, 32)
    x = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.bfloat16)
    out = self.matmul(x, layer, "bf16")
    assert out.shape == (2, 3, 64)
    want = numpy_matmul(x.reshape(6, 32).astype(jnp.float32), src, "bf16")
    self.check(out.reshape(6, 64), want)

  def test_weight_only_layer(self, rng):
    layer, src = make_layer(rng, 32, 64, weight_only=True)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    self.check(
      self.matmul(x, layer, "bf16"),
      numpy_matmul(x.astype(jnp.float32), src, "bf16"),
    )
    with pytest.raises(ValueError, match="input_scale_inv"):
      self.matmul(x, layer, "nvfp4")

  def test_under_jit(self, rng):
    layer, src = make_layer(rng, 48, 64)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    out = jax.jit(lambda x, lay: self.matmul(x, lay, "nvfp4"))(x, layer)
    self.check(out, numpy_matmul(x.astype(jnp.float32), src, "nvfp4"))

  def test_rejects_bad_inputs(self, rng):
    layer, src = make_layer(rng, 32, 64)
    x = jnp.ones((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="K=48"):
      self.matmul(jnp.ones((2, 48), jnp.bfloat16), layer, "bf16")
    with pytest.raises(ValueError, match="activation"):
      self.matmul(x, layer, "int8")
    with pytest.raises(ValueError, match="prepare"):
      self.matmul(x, src, "bf16")
    bad = dict(layer, block_scale=layer["block_scale"][:64])
    with pytest.raises(ValueError, match="block_scale"):
      self.matmul(x, bad, "bf16")

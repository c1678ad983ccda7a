"""NVFP4Linear and NVFP4MoE: states, prepare_model, restore, numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fp4jax
import pallas_kernels
from fp4jax import nn
from fp4jax import transform
from tests import tolerance
from tests.pallas_kernels.nvfp4_matmul import test_base as matmul_suite
from tests.pallas_kernels.nvfp4_moe import test_base as moe_suite


class Block(nnx.Module):
  """A toy block with HF-style names, as a model would nest the layers."""

  def __init__(self, rngs):
    self.q_proj = nn.NVFP4Linear(64, 64, rngs=rngs)
    self.mlp = nn.NVFP4MoE(64, 32, 4, 2, rngs=rngs)

  def __call__(self, x):
    return self.mlp(self.q_proj(x))


def test_linear_must_be_prepared_before_call(key):
  layer = nn.NVFP4Linear(32, 16, rngs=nnx.Rngs(key))
  assert not layer.prepared
  with pytest.raises(nn.NotPreparedError, match="prepare_model"):
    layer(jnp.ones((1, 32), jnp.bfloat16))
  report = fp4jax.prepare_model(layer)
  assert layer.prepared
  assert set(layer.nvfp4_leaves()) == {
    "weight",
    "block_scale",
    "alpha",
    "input_scale_inv",
  }
  assert report.freed_bytes == 16 * 2 + 4 + 4


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_linear_matches_the_op(rng, activation):
  layer = nn.NVFP4Linear(
    64,
    48,
    use_bias=True,
    activation=activation,
    rngs=nnx.Rngs(int(rng.integers(1 << 30))),
  )
  fp4jax.prepare_model(layer)
  layer.bias[...] = jnp.asarray(rng.standard_normal(48), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.bfloat16)
  want = (
    pallas_kernels.nvfp4_matmul(
      x, layer.nvfp4_leaves(), activation=activation
    ).astype(jnp.float32)
    + layer.bias[...][None, None]
  )
  np.testing.assert_allclose(
    np.asarray(layer(x), np.float32), np.asarray(want), rtol=1e-2, atol=1e-2
  )
  # Under one jit XLA may fuse the bias add into the matmul's epilogue and
  # skip the bf16 rounding in between: equal up to bf16 rounding.
  jitted = nnx.jit(lambda m, x: m(x))(layer, x)
  eager = np.asarray(layer(x), np.float32)
  np.testing.assert_allclose(
    np.asarray(jitted, np.float32),
    eager,
    rtol=2**-7,
    atol=2**-7 * np.abs(eager).max(),
  )


def test_restore_into_abstract_module_then_prepare(rng):
  """The Orbax recipe: eval_shape -> split -> fill state -> merge -> prepare."""
  n, k = 40, 64
  _, src = matmul_suite.make_layer(rng, n, k)
  abstract = nnx.eval_shape(lambda: nn.NVFP4Linear(k, n, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, dict(src))
  layer = nnx.merge(graphdef, state)
  fp4jax.prepare_model(layer)
  x = jnp.asarray(rng.standard_normal((3, k)), jnp.bfloat16)
  want = matmul_suite.numpy_matmul(x.astype(jnp.float32), src, "bf16")
  np.testing.assert_allclose(
    np.asarray(layer(x), np.float64),
    want,
    rtol=2**-7,
    atol=2**-7 * np.abs(want).max(),
  )


def test_weight_only_linear(key):
  layer = nn.NVFP4Linear(32, 16, weight_only=True, rngs=nnx.Rngs(key))
  assert "input_scale" not in layer.nvfp4_leaves()
  fp4jax.prepare_model(layer)
  assert layer(jnp.ones((1, 32), jnp.bfloat16)).shape == (1, 16)
  with pytest.raises(ValueError, match="weight_only"):
    nn.NVFP4Linear(
      32, 16, weight_only=True, activation="nvfp4", rngs=nnx.Rngs(key)
    )
  with pytest.raises(ValueError, match="multiple of 16"):
    nn.NVFP4Linear(24, 16, rngs=nnx.Rngs(key))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_moe_matches_dense_loop(rng, monkeypatch, activation, padded):
  # padded: the sm90 layout with I = 32 stored as 128
  # (transform.PAD_INTERMEDIATE_TO_TILES); the outputs must not change.
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", padded)
  moe = nn.NVFP4MoE(
    64,
    32,
    4,
    2,
    activation=activation,
    rngs=nnx.Rngs(int(rng.integers(1 << 30))),
  )
  with pytest.raises(nn.NotPreparedError):
    moe(jnp.ones((1, 64), jnp.bfloat16))
  experts, src = moe_suite.make_experts(rng, 4, 64, 32)
  graphdef, state = nnx.split(moe)
  pure = nnx.to_pure_dict(state)
  pure["experts"] = src
  nnx.replace_by_pure_dict(state, pure)
  moe = nnx.merge(graphdef, state)
  fp4jax.prepare_model(moe, weight_layout="sm90" if padded else "natural")
  if padded:
    assert moe.experts.w13_weight_sm90_planes.shape == (4, 256, 32)
  x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.bfloat16)
  tokens = x.reshape(6, 64)
  logits = moe.gate(tokens)
  want = moe_suite.numpy_moe(tokens, logits, src, 2, True, activation)
  out = np.asarray(moe(x), np.float64).reshape(6, 64)
  tolerance.assert_close(out, want, 2**-6)


def test_prepare_model_walks_nested_modules_and_donates(key):
  block = Block(nnx.Rngs(key))
  sources = [v for k, v in block.q_proj.nvfp4_leaves().items() if k != "weight"]
  report = fp4jax.prepare_model(block, donate=True)
  assert all(s.is_deleted() for s in sources)
  paths = {r.path.rsplit("/", 1)[0] for r in report.removed}
  assert paths == {"q_proj", "mlp/experts"}
  y = nnx.jit(lambda m, x: m(x))(block, jnp.ones((3, 64), jnp.bfloat16))
  assert y.shape == (3, 64) and bool(jnp.all(jnp.isfinite(y)))
  again = fp4jax.prepare_model(block)
  assert again.removed == () and again.created == ()


def test_prepared_model_state_round_trips_through_split_merge(key):
  block = Block(nnx.Rngs(key))
  fp4jax.prepare_model(block)
  graphdef, state = nnx.split(block)
  clone = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  x = jnp.ones((2, 64), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(block(x)))

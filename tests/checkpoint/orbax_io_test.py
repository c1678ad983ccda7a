"""Tests for fp4jax.checkpoint.orbax_io."""

import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

from fp4jax import errors
from fp4jax.checkpoint import modelopt
from fp4jax.checkpoint import orbax_io
from fp4jax.checkpoint import synthetic
from tests import trees

CheckpointError = errors.CheckpointError
P = jax.sharding.PartitionSpec


def _params(rng):
  """A tree with every e4m3 byte (NaN too), random bf16 bits and scalars."""
  e4m3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  bf16_bits = rng.integers(0, 2**16, (8, 16), dtype=np.uint16)
  params = {
    "model": {
      "layers": {
        "0": {
          "q_proj": {
            "weight": rng.integers(0, 256, (16, 32), dtype=np.uint8),
            "weight_scale": e4m3.reshape(16, 16),
            "weight_scale_2": np.float32(rng.uniform(1e-5, 1e-2)),
            "input_scale": np.float32(1e-40),
          },
          "experts": synthetic.nvfp4_experts(rng, 2, 32, 16),
          "norm": {"weight": bf16_bits.view(ml_dtypes.bfloat16)},
        }
      }
    }
  }
  return jax.tree.map(jax.numpy.asarray, params)


def test_round_trip_through_abstract_tree(tmp_path, rng):
  params = _params(rng)
  orbax_io.save_params(tmp_path / "ckpt", params)
  abstract = jax.eval_shape(lambda: params)
  restored = orbax_io.restore_params(
    tmp_path / "ckpt", abstract_params=abstract
  )
  trees.assert_bit_equal(params, restored, device_arrays=True)


def test_round_trip_from_stored_metadata(tmp_path, rng):
  params = _params(rng)
  orbax_io.save_params(str(tmp_path / "ckpt"), params)
  restored = orbax_io.restore_params(str(tmp_path / "ckpt"))
  trees.assert_bit_equal(params, restored, device_arrays=True)
  device = jax.devices()[0]
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(device)


def _mesh():
  n = len(jax.devices())
  return jax.make_mesh((n if 16 % n == 0 else 1,), ("x",))


def test_one_sharding_for_all_leaves(tmp_path, rng):
  params = _params(rng)
  orbax_io.save_params(tmp_path / "ckpt", params)
  sharding = jax.sharding.NamedSharding(_mesh(), P())
  restored = orbax_io.restore_params(tmp_path / "ckpt", sharding=sharding)
  trees.assert_bit_equal(params, restored, device_arrays=True)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == sharding


def test_tree_of_shardings(tmp_path, rng):
  params = _params(rng)
  orbax_io.save_params(tmp_path / "ckpt", params)
  mesh = _mesh()
  abstract = jax.eval_shape(lambda: params)
  # Row-shard every matrix whose rows divide; replicate the rest.
  shardings = jax.tree.map(
    lambda x: jax.sharding.NamedSharding(
      mesh,
      P("x") if x.ndim and x.shape[0] % mesh.size == 0 else P(),
    ),
    abstract,
  )
  restored = orbax_io.restore_params(
    tmp_path / "ckpt", abstract_params=abstract, sharding=shardings
  )
  trees.assert_bit_equal(params, restored, device_arrays=True)
  for got, want in zip(
    jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True
  ):
    assert got.sharding == want


def test_shardings_on_abstract_leaves_are_used(tmp_path, rng):
  params = _params(rng)
  orbax_io.save_params(tmp_path / "ckpt", params)
  sharding = jax.sharding.NamedSharding(_mesh(), P())
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    params,
  )
  restored = orbax_io.restore_params(
    tmp_path / "ckpt", abstract_params=abstract
  )
  assert all(x.sharding == sharding for x in jax.tree.leaves(restored))


def test_relative_paths(tmp_path, rng, monkeypatch):
  monkeypatch.chdir(tmp_path)
  params = _params(rng)
  orbax_io.save_params("ckpt", params)
  assert (tmp_path / "ckpt").is_dir()
  trees.assert_bit_equal(
    params, orbax_io.restore_params(pathlib.Path("ckpt")), device_arrays=True
  )


def test_refuses_bad_paths_and_trees(tmp_path, rng):
  params = _params(rng)
  orbax_io.save_params(tmp_path / "ckpt", params)
  with pytest.raises(CheckpointError, match="already exists"):
    orbax_io.save_params(tmp_path / "ckpt", params)
  with pytest.raises(CheckpointError, match="nope"):
    orbax_io.restore_params(tmp_path / "nope")
  wrong = jax.eval_shape(lambda: params)
  q_proj = wrong["model"]["layers"]["0"]["q_proj"]
  q_proj["weight"] = jax.ShapeDtypeStruct((8, 32), np.uint8)
  with pytest.raises(CheckpointError, match="ckpt"):
    orbax_io.restore_params(tmp_path / "ckpt", abstract_params=wrong)


def test_modelopt_to_orbax_and_back(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(
    rng, model_type="qwen3_moe", num_layers=1
  )
  modelopt.save_modelopt(tmp_path / "hf", params, hf_config, quant)
  loaded, _ = modelopt.load_modelopt(tmp_path / "hf", progress=False)
  orbax_io.save_params(tmp_path / "orbax", loaded)
  restored = orbax_io.restore_params(
    tmp_path / "orbax", abstract_params=jax.eval_shape(lambda: loaded)
  )
  trees.assert_bit_equal(params, restored, device_arrays=True)

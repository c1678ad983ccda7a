"""Strict numerics for every test, and the GPU marker."""

import os
import zlib

# Eight host devices for the sharding tests (before JAX starts); on a GPU
# machine the GPUs stay the default devices.
if "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax  # noqa: E402
import numpy as np
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)

# JAX compiles on first call, so per-example deadlines only measure that.
settings.register_profile("fp4jax", deadline=None, max_examples=50)
settings.load_profile("fp4jax")


def has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run on a GPU runner)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def rng(request) -> np.random.Generator:
  """Fresh random inputs each run; the seed is printed so a failure replays.

  Set FP4JAX_TEST_SEED to replay a run.
  """
  base = int(
    os.environ.get("FP4JAX_TEST_SEED", np.random.SeedSequence().entropy % 2**32)
  )
  seed = (base + zlib.crc32(request.node.nodeid.encode())) % 2**32
  print(f"FP4JAX_TEST_SEED={base} (test seed {seed})")
  return np.random.default_rng(seed)


@pytest.fixture
def key(rng) -> jax.Array:
  return jax.random.key(int(rng.integers(2**31)))

"""Tensor and expert parallelism on two GPUs: the Pallas kernels per shard
give the one-GPU results, and restore and prepare stay per rank.

The same properties as `sharding_test.py` (which runs them on host
devices), on real devices with NCCL collectives; skipped with fewer than two
GPUs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import fp4jax
import pallas_kernels
from fp4jax import checkpoint
from fp4jax import sharding
from tests import sources
from tests.sharding_test import linear_source
from tests.sharding_test import unsharded

pytestmark = pytest.mark.gpu


def gpu_mesh(axis: str) -> Mesh:
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    devices = []
  if len(devices) < 2:
    pytest.skip("needs two GPUs (benchmarks run on nvidia-h200-x2)")
  return Mesh(np.array(devices[:2]), (axis,))


def assert_close(got, want, bound):
  got32 = np.asarray(got, np.float32)
  want32 = np.asarray(want, np.float32)
  assert got32.shape == want32.shape
  assert not np.isnan(got32).any() and not np.isnan(want32).any()
  err = np.abs(got32 - want32).max()
  assert err <= bound * np.abs(want32).max(), err


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_sharded_pallas_matmul_equals_one_gpu(rng, kind, activation):
  mesh = gpu_mesh("tp")
  node = linear_source(rng, 1024, 2048)
  layer = sharding.prepare_linear(node, mesh, kind, weight_layout="sm90")
  x = jnp.asarray(rng.standard_normal((16, 2048)), jnp.bfloat16)
  got = jax.jit(
    lambda x, layer: sharding.matmul(
      x, layer, mesh, kind, activation=activation, implementation="pallas"
    )
  )(x, layer)
  want = pallas_kernels.nvfp4_matmul(
    x,
    unsharded(node, "sm90"),
    activation=activation,
    implementation="pallas",
  )
  # Row shards add two float32 partial sums, then round once; column shards
  # may take other split-K configs for their narrower N (another float32
  # summation order).
  assert_close(got, want, 2.0**-7)


@pytest.mark.parametrize("tokens_sharded", [False, True])
@pytest.mark.parametrize("tokens", [1, 37])
def test_expert_parallel_pallas_moe_equals_one_gpu(rng, tokens_sharded, tokens):
  mesh = gpu_mesh("ep")
  src = sources.experts_source(rng, 16, 256, 128)
  experts = sharding.prepare_experts(src, mesh, weight_layout="sm90")
  whole, _ = fp4jax.prepare({"experts": src}, weight_layout="sm90")
  x = jnp.asarray(rng.standard_normal((tokens, 256)), jnp.bfloat16)
  logits = jnp.asarray(rng.standard_normal((tokens, 16)), jnp.float32)
  got = jax.jit(
    lambda x, logits, e: sharding.moe(
      x,
      logits,
      e,
      mesh,
      top_k=4,
      implementation="pallas",
      tokens_sharded=tokens_sharded,
    )
  )(x, logits, experts)
  want = pallas_kernels.nvfp4_moe(
    x, logits, whole["experts"], top_k=4, implementation="pallas"
  )
  # Two partial outputs added in float32, rounded to bf16 once.
  assert_close(got, want, 2.0**-7)


def test_restore_and_prepare_stay_per_rank(rng, tmp_path):
  mesh = gpu_mesh("ep")
  src = sources.experts_source(rng, 8, 256, 128)
  checkpoint.save_params(tmp_path / "ckpt", {"experts": src})
  target = {"experts": sharding.source_shardings(src, mesh, "experts", "ep")}
  restored = checkpoint.restore_params(
    tmp_path / "ckpt",
    abstract_params=jax.eval_shape(lambda: {"experts": src}),
    sharding=target,
  )["experts"]
  before = sharding.bytes_per_device(restored)
  whole = sum(x.nbytes for x in jax.tree.leaves(restored))
  assert len(before) == 2
  assert all(b == whole // 2 for b in before.values()), before
  prepared = sharding.prepare_experts(
    restored, mesh, donate=True, weight_layout="sm90"
  )
  assert restored["w13_weight_scale"].is_deleted()
  after = sharding.bytes_per_device(prepared)
  assert len(set(after.values())) == 1
  want, _ = fp4jax.prepare({"experts": src}, weight_layout="sm90")
  for name, w in want["experts"].items():
    np.testing.assert_array_equal(
      np.asarray(prepared[name]).view(np.uint8), np.asarray(w).view(np.uint8)
    )

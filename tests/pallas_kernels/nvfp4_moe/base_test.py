"""The pure-jnp MoE reference ("xla") on the shared suite."""

import jax.numpy as jnp
import pytest

import pallas_kernels
from tests.pallas_kernels.nvfp4_moe import test_base


class TestReference(test_base.NVFP4MoETestBase):
  IMPLEMENTATION = "xla"


class TestDefaultDispatch(test_base.NVFP4MoETestBase):
  IMPLEMENTATION = None


def test_sigmoid_scoring_is_not_supported_yet(rng):
  experts, _ = test_base.make_experts(rng, 4, 32, 16)
  with pytest.raises(NotImplementedError, match="scoring"):
    pallas_kernels.nvfp4_moe(
      jnp.ones((2, 32), jnp.bfloat16),
      jnp.ones((2, 4)),
      experts,
      top_k=2,
      scoring="sigmoid",
      implementation="xla",
    )

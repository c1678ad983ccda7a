"""Flax NNX modules holding NVFP4 weights."""

from fp4jax.nn._prepared import NotPreparedError as NotPreparedError
from fp4jax.nn.linear import NVFP4Linear as NVFP4Linear
from fp4jax.nn.moe import NVFP4Experts as NVFP4Experts
from fp4jax.nn.moe import NVFP4MoE as NVFP4MoE
from fp4jax.nn.prepare import prepare_model as prepare_model
from fp4jax.nn.variables import NVFP4Param as NVFP4Param

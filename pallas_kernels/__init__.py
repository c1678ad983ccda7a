"""GPU kernels for NVFP4 ops, each with a pure-jnp reference implementation."""

from pallas_kernels.nvfp4_matmul.api import nvfp4_matmul as nvfp4_matmul
from pallas_kernels.nvfp4_moe.api import nvfp4_moe as nvfp4_moe
from pallas_kernels.nvfp4_moe.api import nvfp4_moe_experts as nvfp4_moe_experts

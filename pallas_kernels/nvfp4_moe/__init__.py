"""NVFP4 Mixture-of-Experts: routing, grouped GEMMs, weighted combine."""

from pallas_kernels.nvfp4_moe.api import nvfp4_moe as nvfp4_moe
from pallas_kernels.nvfp4_moe.api import nvfp4_moe_experts as nvfp4_moe_experts

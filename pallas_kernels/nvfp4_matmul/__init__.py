"""Block-scaled NVFP4 matmul."""

from pallas_kernels.nvfp4_matmul.api import nvfp4_matmul as nvfp4_matmul

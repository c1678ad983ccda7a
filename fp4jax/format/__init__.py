"""The NVFP4 format: E2M1 codes, the 128x4 scale swizzle, quantize/dequantize."""

from fp4jax.format.e2m1 import E2M1_VALUES as E2M1_VALUES
from fp4jax.format.nvfp4 import BLOCK_SIZE as BLOCK_SIZE
from fp4jax.format.nvfp4 import NVFP4Tensor as NVFP4Tensor
from fp4jax.format.nvfp4 import dequantize as dequantize
from fp4jax.format.nvfp4 import dequantize_blocks as dequantize_blocks
from fp4jax.format.nvfp4 import global_scale_from_amax as global_scale_from_amax
from fp4jax.format.nvfp4 import quantize as quantize
from fp4jax.format.nvfp4 import quantize_activation as quantize_activation
from fp4jax.format.swizzle import swizzle_block_scale as swizzle_block_scale
from fp4jax.format.swizzle import unswizzle_block_scale as unswizzle_block_scale

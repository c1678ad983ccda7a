"""fp4jax: NVIDIA ModelOpt NVFP4 models in JAX, Flax NNX and Pallas."""

from fp4jax.errors import CheckpointError as CheckpointError
from fp4jax.errors import NVFP4Error as NVFP4Error
from fp4jax.errors import TransformError as TransformError
from fp4jax.format.nvfp4 import NVFP4Tensor as NVFP4Tensor
from fp4jax.format.nvfp4 import dequantize as dequantize
from fp4jax.format.nvfp4 import quantize as quantize
from fp4jax.format.nvfp4 import quantize_activation as quantize_activation
from fp4jax.nn.prepare import prepare_model as prepare_model
from fp4jax.transform import PrepareReport as PrepareReport
from fp4jax.transform import prepare as prepare

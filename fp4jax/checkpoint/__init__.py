"""Reading and writing NVFP4 checkpoints: safetensors, ModelOpt HF, Orbax."""

from fp4jax.checkpoint.modelopt import CheckpointConfig as CheckpointConfig
from fp4jax.checkpoint.modelopt import QuantizationConfig as QuantizationConfig
from fp4jax.checkpoint.modelopt import is_excluded as is_excluded
from fp4jax.checkpoint.modelopt import list_tensors as list_tensors
from fp4jax.checkpoint.modelopt import load_modelopt as load_modelopt
from fp4jax.checkpoint.modelopt import (
  parse_quantization_config as parse_quantization_config,
)
from fp4jax.checkpoint.modelopt import (
  read_checkpoint_config as read_checkpoint_config,
)
from fp4jax.checkpoint.modelopt import save_modelopt as save_modelopt
from fp4jax.checkpoint.orbax_io import restore_params as restore_params
from fp4jax.checkpoint.orbax_io import save_params as save_params
from fp4jax.checkpoint.safetensors_io import open_tensors as open_tensors
from fp4jax.checkpoint.safetensors_io import read_header as read_header
from fp4jax.checkpoint.safetensors_io import save_file as save_file

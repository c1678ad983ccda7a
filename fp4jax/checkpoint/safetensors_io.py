"""Reads and writes safetensors files with numpy, float8 included, no pickle.

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
are relative to the end of the header) plus an optional ``"__metadata__"``
string map, then the raw little-endian tensor bytes.

safetensors 0.8.0's own ``numpy`` and ``flax`` loaders fail on ``F8_E4M3``
(numpy has no float8), so this module parses the header itself and views the
bytes through ``ml_dtypes``. Nothing here unpickles or imports torch.
"""

import json
import math
import mmap
import os
import pathlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from fp4jax import errors

CheckpointError = errors.CheckpointError

# safetensors dtype string -> numpy dtype (all little-endian).
DTYPES: Mapping[str, np.dtype] = {
  "BOOL": np.dtype(np.bool_),
  "U8": np.dtype(np.uint8),
  "I8": np.dtype(np.int8),
  "U16": np.dtype("<u2"),
  "I16": np.dtype("<i2"),
  "U32": np.dtype("<u4"),
  "I32": np.dtype("<i4"),
  "U64": np.dtype("<u8"),
  "I64": np.dtype("<i8"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype("<f4"),
  "F64": np.dtype("<f8"),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

METADATA_KEY = "__metadata__"
# The official reader's limit; a larger length means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000
# Data starts on this boundary so memory-mapped views are aligned.
_HEADER_ALIGN = 8

PathLike = str | os.PathLike


def dtype_name(dtype) -> str:
  """Returns the safetensors name (``"F8_E4M3"``...) of a numpy dtype."""
  dtype = np.dtype(dtype)
  if dtype.byteorder == ">":
    dtype = dtype.newbyteorder("<")
  try:
    return _DTYPE_NAMES[dtype]
  except KeyError:
    raise CheckpointError(
      f"dtype {dtype} has no safetensors equivalent"
    ) from None


def _no_duplicates(pairs):
  # json.loads keeps the last duplicate silently; a header naming a tensor
  # twice is ambiguous, so refuse it.
  result = {}
  for key, value in pairs:
    if key in result:
      raise CheckpointError(f"duplicate key {key!r} in header")
    result[key] = value
  return result


def _is_int(x) -> bool:
  # bool is an int subclass; JSON true must not pass as a shape.
  return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(where: str, name: str, entry, data_len: int):
  """Validates one header entry; returns (dtype, shape, begin, end)."""
  ctx = f"{where}: tensor {name!r}"
  if not isinstance(entry, dict):
    raise CheckpointError(f"{ctx}: header entry is not an object")
  for key in ("dtype", "shape", "data_offsets"):
    if key not in entry:
      raise CheckpointError(f"{ctx}: header entry has no {key!r}")
  dtype_str = entry["dtype"]
  if not isinstance(dtype_str, str) or dtype_str not in DTYPES:
    raise CheckpointError(
      f"{ctx}: unknown dtype {dtype_str!r} (known: {', '.join(DTYPES)})"
    )
  shape = entry["shape"]
  if not isinstance(shape, list) or not all(
    _is_int(d) and d >= 0 for d in shape
  ):
    raise CheckpointError(f"{ctx}: invalid shape {shape!r}")
  offsets = entry["data_offsets"]
  if (
    not isinstance(offsets, list)
    or len(offsets) != 2
    or not all(_is_int(o) for o in offsets)
  ):
    raise CheckpointError(f"{ctx}: invalid data_offsets {offsets!r}")
  begin, end = offsets
  if not 0 <= begin <= end <= data_len:
    raise CheckpointError(
      f"{ctx}: data_offsets {offsets} out of range for a data section of "
      f"{data_len} bytes (truncated file?)"
    )
  dtype = DTYPES[dtype_str]
  nbytes = math.prod(shape) * dtype.itemsize
  if end - begin != nbytes:
    raise CheckpointError(
      f"{ctx}: data_offsets {offsets} hold {end - begin} bytes but "
      f"{dtype_str}{shape} needs {nbytes}"
    )
  return dtype, tuple(shape), begin, end


def _read_header(path: PathLike):
  """Returns (header dict, data section start, file size)."""
  where = os.fspath(path)
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise CheckpointError(
          f"{where}: {size} bytes is too short for a safetensors file"
        )
      header_len = int.from_bytes(prefix, "little")
      if header_len > min(size - 8, _MAX_HEADER_BYTES):
        raise CheckpointError(
          f"{where}: header length {header_len} does not fit in a file of "
          f"{size} bytes (truncated or not a safetensors file)"
        )
      raw = f.read(header_len)
  except OSError as e:
    raise CheckpointError(f"{where}: cannot read: {e}") from e
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
  except CheckpointError as e:
    raise CheckpointError(f"{where}: {e}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{where}: header is not valid JSON: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{where}: header is not a JSON object")
  return header, 8 + header_len, size


def _parse(path: PathLike):
  """Returns (metadata, {name: (dtype, shape, begin, end)}, data start)."""
  where = os.fspath(path)
  header, data_start, size = _read_header(path)
  data_len = size - data_start
  metadata = header.get(METADATA_KEY)
  if metadata is not None and not (
    isinstance(metadata, dict)
    and all(isinstance(v, str) for v in metadata.values())
  ):
    raise CheckpointError(f"{where}: {METADATA_KEY} is not a string map")
  entries = {
    name: _check_entry(where, name, entry, data_len)
    for name, entry in header.items()
    if name != METADATA_KEY
  }
  # Overlapping tensors would alias each other's bytes.
  spans = sorted(
    (begin, end, name)
    for name, (_, _, begin, end) in entries.items()
    if end > begin
  )
  for (_, prev_end, prev), (begin, _, name) in zip(
    spans, spans[1:], strict=False
  ):
    if begin < prev_end:
      raise CheckpointError(
        f"{where}: tensor {name!r} overlaps tensor {prev!r}"
      )
  return metadata, entries, data_start


def read_header(path: PathLike) -> dict:
  """Reads and validates the JSON header of a safetensors file.

  Checks that the header length fits the file, the JSON is an object without
  duplicate keys, every entry has a known dtype, a shape and in-range,
  non-overlapping data_offsets whose size matches ``prod(shape) * itemsize``.

  Args:
    path: the ``.safetensors`` file.

  Returns:
    The header: tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus
    ``"__metadata__"`` when the file has it.

  Raises:
    CheckpointError: the file is truncated or its header is malformed; the
      message names the file and, where one is at fault, the tensor.
  """
  metadata, entries, _ = _parse(path)
  header = {}
  if metadata is not None:
    header[METADATA_KEY] = dict(metadata)
  for name, (dtype, shape, begin, end) in entries.items():
    header[name] = {
      "dtype": _DTYPE_NAMES[dtype],
      "shape": list(shape),
      "data_offsets": [begin, end],
    }
  return header


def open_tensors(path: PathLike) -> dict[str, np.ndarray]:
  """Memory-maps every tensor of a safetensors file as a read-only array.

  Pages are read on first access, so opening a large file is cheap. The
  arrays keep the mapping alive; it closes when the last one is dropped.

  Args:
    path: the ``.safetensors`` file.

  Returns:
    Tensor name -> read-only numpy array (float8/bf16 via ``ml_dtypes``).

  Raises:
    CheckpointError: as for `read_header`.
  """
  _, entries, data_start = _parse(path)
  arrays = {}
  if not any(end > begin for _, _, begin, end in entries.values()):
    buf = None
  else:
    with open(path, "rb") as f:
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  for name, (dtype, shape, begin, end) in entries.items():
    if end == begin:
      array = np.empty(shape, dtype)
      array.flags.writeable = False
    else:
      array = np.ndarray(shape, dtype, buffer=buf, offset=data_start + begin)
    arrays[name] = array
  return arrays


def save_file(
  path: PathLike,
  tensors: Mapping[str, np.ndarray],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes tensors to a safetensors file readable by the official library.

  Tensors are laid out contiguously, widest dtype first, after a header padded
  to 8 bytes (as the official writer does). The file is written to a
  temporary name and renamed, so readers never see a partial file.

  Args:
    path: destination ``.safetensors`` file.
    tensors: name -> array; anything ``np.asarray`` accepts (jax arrays too).
    metadata: optional string -> string map stored as ``__metadata__``.

  Raises:
    CheckpointError: a name, dtype or metadata value cannot be stored.
  """
  where = os.fspath(path)
  if metadata is not None and not all(
    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
  ):
    raise CheckpointError(f"{where}: metadata must map str to str")
  arrays = {}
  for name, value in tensors.items():
    if not isinstance(name, str) or not name or name == METADATA_KEY:
      raise CheckpointError(f"{where}: invalid tensor name {name!r}")
    array = np.asarray(value)
    try:
      dtype_name(array.dtype)
    except CheckpointError as e:
      raise CheckpointError(f"{where}: tensor {name!r}: {e}") from None
    if array.dtype.byteorder == ">":
      array = array.astype(array.dtype.newbyteorder("<"))
    # Not np.ascontiguousarray: it turns a 0-d scalar into shape [1].
    arrays[name] = np.require(array, requirements="C")
  order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
  header = {}
  if metadata is not None:
    header[METADATA_KEY] = dict(metadata)
  offset = 0
  for name in order:
    array = arrays[name]
    header[name] = {
      "dtype": dtype_name(array.dtype),
      "shape": list(array.shape),
      "data_offsets": [offset, offset + array.nbytes],
    }
    offset += array.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % _HEADER_ALIGN)
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(len(raw).to_bytes(8, "little"))
      f.write(raw)
      for name in order:
        # A flat uint8 view writes the bytes without a copy, float8 included.
        f.write(arrays[name].reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)

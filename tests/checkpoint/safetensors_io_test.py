"""Tests for fp4jax.checkpoint.safetensors_io."""

import json
import mmap
import pathlib

import hypothesis
import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import strategies as st
from safetensors import numpy as safetensors_numpy

from fp4jax import errors
from fp4jax.checkpoint import safetensors_io

CheckpointError = errors.CheckpointError

_ALL_DTYPES = (
  np.bool_,
  np.uint8,
  np.int8,
  np.int16,
  np.int32,
  np.int64,
  np.float16,
  ml_dtypes.bfloat16,
  np.float32,
  np.float64,
  ml_dtypes.float8_e4m3fn,
  ml_dtypes.float8_e5m2,
)


def _random(rng, shape, dtype) -> np.ndarray:
  """Random bytes viewed as dtype (every bit pattern, NaNs included)."""
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return rng.integers(0, 2, shape).astype(np.bool_)
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = rng.integers(0, 256, n, dtype=np.uint8)
  return raw.view(dtype).reshape(shape)


def _same_bytes(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return (
    a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  )


def _write_raw(path: pathlib.Path, header, data: bytes = b"") -> pathlib.Path:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
  return path


def test_round_trip_all_dtypes(tmp_path, rng):
  tensors = {
    f"t.{np.dtype(d).name}": _random(rng, (3, 5), d) for d in _ALL_DTYPES
  }
  tensors["scalar"] = np.float32(rng.random())
  tensors["empty"] = np.zeros((0, 4), ml_dtypes.float8_e4m3fn)
  tensors["big_endian"] = np.arange(6, dtype=">i4").reshape(2, 3)
  path = tmp_path / "all.safetensors"
  safetensors_io.save_file(path, tensors, {"format": "pt"})

  header = safetensors_io.read_header(path)
  assert header["__metadata__"] == {"format": "pt"}
  assert header["t.float8_e4m3fn"]["dtype"] == "F8_E4M3"
  assert header["scalar"]["shape"] == []
  loaded = safetensors_io.open_tensors(path)
  assert set(loaded) == set(tensors)
  for name, value in tensors.items():
    expected = np.asarray(value).astype(
      np.asarray(value).dtype.newbyteorder("<")
    )
    assert _same_bytes(loaded[name], expected), name
    assert not loaded[name].flags.writeable
  # Views over the file's memory map, not copies.
  assert isinstance(loaded["t.uint8"].base, mmap.mmap)


def test_official_library_reads_our_file(tmp_path, rng):
  # Not by dtype.kind: ml_dtypes reports float8_e5m2 as kind "f".
  numpy_dtypes = [d for d in _ALL_DTYPES if not d.__module__.startswith("ml_")]
  tensors = {
    f"x{i}": _random(rng, (2, 3), d) for i, d in enumerate(numpy_dtypes)
  }
  tensors["scale"] = np.float32(0.25)
  # float8 and bf16 in the same file must not confuse the official parser.
  tensors["f8"] = _random(rng, (4, 4), ml_dtypes.float8_e4m3fn)
  tensors["bf16"] = _random(rng, (4,), ml_dtypes.bfloat16)
  path = tmp_path / "m.safetensors"
  safetensors_io.save_file(path, tensors, {"format": "pt"})
  with safetensors.safe_open(path, framework="numpy") as f:
    assert set(f.keys()) == set(tensors)
    assert f.metadata() == {"format": "pt"}
    for name in [f"x{i}" for i in range(len(numpy_dtypes))] + ["scale"]:
      assert _same_bytes(f.get_tensor(name), tensors[name]), name


def test_we_read_official_files(tmp_path, rng):
  tensors = {
    "a": _random(rng, (7,), np.float32),
    "b": _random(rng, (2, 2, 2), np.int16),
    "c": _random(rng, (5,), np.uint8),
  }
  path = tmp_path / "official.safetensors"
  path.write_bytes(safetensors_numpy.save(tensors, metadata={"k": "v"}))
  loaded = safetensors_io.open_tensors(path)
  for name, value in tensors.items():
    assert _same_bytes(loaded[name], value)


def test_save_file_rejects_unsupported_dtype(tmp_path):
  with pytest.raises(CheckpointError, match="'z'.*complex"):
    safetensors_io.save_file(
      tmp_path / "c.safetensors", {"z": np.ones(2, "c8")}
    )


def test_save_file_rejects_bad_metadata(tmp_path):
  with pytest.raises(CheckpointError, match="meta.safetensors"):
    safetensors_io.save_file(
      tmp_path / "meta.safetensors", {"a": np.ones(2)}, {"n": 1}
    )


_GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _with(**changes):
  return {"layer.w": {**_GOOD, **changes}}


@pytest.mark.parametrize(
  "header, data, needle",
  [
    pytest.param(b"{}", b"", "", id="fine_control"),
    pytest.param(b'{"a":', b"", "not valid JSON", id="cut_json"),
    pytest.param(b"\xff\xfe\x00", b"", "not valid JSON", id="not_utf8"),
    pytest.param(b"[1, 2]", b"", "not a JSON object", id="not_object"),
    pytest.param(
      b'{"layer.w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
      b'"layer.w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
      b"\0\0",
      "layer.w",
      id="duplicate_name",
    ),
    pytest.param(
      {"layer.w": {"shape": [2], "data_offsets": [0, 8]}},
      bytes(8),
      "layer.w.*'dtype'",
      id="no_dtype",
    ),
    pytest.param(
      {"layer.w": {"dtype": "F32", "data_offsets": [0, 8]}},
      bytes(8),
      "layer.w.*'shape'",
      id="no_shape",
    ),
    pytest.param(
      {"layer.w": {"dtype": "F32", "shape": [2]}},
      bytes(8),
      "layer.w.*'data_offsets'",
      id="no_offsets",
    ),
    pytest.param({"layer.w": "x"}, b"", "layer.w", id="entry_not_object"),
    pytest.param(_with(dtype="F4"), bytes(8), "layer.w.*F4", id="dtype_F4"),
    pytest.param(_with(dtype=7), bytes(8), "layer.w.*dtype", id="dtype_int"),
    pytest.param(_with(shape=[-2]), bytes(8), "layer.w", id="neg_shape"),
    pytest.param(_with(shape=[2.0]), bytes(8), "layer.w", id="float_dim"),
    pytest.param(_with(shape=[True]), bytes(8), "layer.w", id="bool_dim"),
    pytest.param(_with(shape="2"), bytes(8), "layer.w", id="str_shape"),
    pytest.param(_with(data_offsets=[0]), bytes(8), "layer.w", id="one_offset"),
    pytest.param(
      _with(data_offsets=[8, 0]), bytes(8), "layer.w", id="reversed"
    ),
    pytest.param(
      _with(data_offsets=[-8, 0]), bytes(8), "layer.w", id="negative"
    ),
    pytest.param(
      _with(data_offsets=[0, 8]), bytes(7), "layer.w.*range", id="past_end"
    ),
    pytest.param(
      _with(data_offsets=[0, 12]),
      bytes(12),
      "layer.w.*needs 8",
      id="size_mismatch",
    ),
    pytest.param(
      {
        "layer.a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "layer.w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
      },
      bytes(12),
      "layer.w.*overlaps.*layer.a",
      id="overlap",
    ),
    pytest.param(
      {"__metadata__": {"a": 1}}, b"", "__metadata__", id="metadata_value"
    ),
    pytest.param(
      {"__metadata__": ["a"]}, b"", "__metadata__", id="metadata_list"
    ),
  ],
)
def test_bad_header(tmp_path, header, data, needle):
  path = _write_raw(tmp_path / "bad.safetensors", header, data)
  if not needle:  # The control case proves the harness writes valid files.
    assert safetensors_io.read_header(path) == {}
    return
  for fn in (safetensors_io.read_header, safetensors_io.open_tensors):
    with pytest.raises(CheckpointError, match=f"bad.safetensors.*{needle}"):
      fn(path)


@pytest.mark.parametrize(
  "raw",
  [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x10\x00\x00", id="five_bytes"),
    pytest.param((2**63).to_bytes(8, "little") + b"{}", id="huge_length"),
    pytest.param((100).to_bytes(8, "little") + b"{}", id="length_past_end"),
  ],
)
def test_bad_length_prefix(tmp_path, raw):
  path = tmp_path / "short.safetensors"
  path.write_bytes(raw)
  with pytest.raises(CheckpointError, match="short.safetensors"):
    safetensors_io.read_header(path)


def test_missing_file(tmp_path):
  with pytest.raises(CheckpointError, match="nope.safetensors"):
    safetensors_io.open_tensors(tmp_path / "nope.safetensors")


def _valid_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tensors = {
    "w": _random(rng, (8, 4), np.uint8),
    "s": _random(rng, (8, 2), ml_dtypes.float8_e4m3fn),
    "s2": np.float32(0.5),
    "b": _random(rng, (3, 5), ml_dtypes.bfloat16),
    "e": np.zeros((0,), np.float32),
  }
  safetensors_io.save_file(path, tensors, {"format": "pt"})
  return tensors


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncation_never_silently_wrong(tmp_path_factory, cut):
  tmp = tmp_path_factory.mktemp("trunc")
  full = tmp / "full.safetensors"
  tensors = _valid_file(full)
  raw = full.read_bytes()
  short = tmp / "short.safetensors"
  short.write_bytes(raw[: int(cut * len(raw))])
  try:
    loaded = safetensors_io.open_tensors(short)
  except CheckpointError as e:
    assert "short.safetensors" in str(e)
    return
  # Only reachable if the truncation removed nothing that is read.
  assert set(loaded) == set(tensors)
  for name, value in tensors.items():
    assert _same_bytes(loaded[name], value)


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
  specs=st.dictionaries(
    st.text("abc._0123", min_size=1, max_size=8).filter(
      lambda s: s != "__metadata__"
    ),
    st.tuples(
      st.sampled_from(_ALL_DTYPES),
      st.lists(st.integers(0, 4), max_size=3),
    ),
    max_size=6,
  ),
  seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(tmp_path_factory, specs, seed):
  rng = np.random.default_rng(seed)
  tensors = {n: _random(rng, tuple(s), d) for n, (d, s) in specs.items()}
  path = tmp_path_factory.mktemp("prop") / "p.safetensors"
  safetensors_io.save_file(path, tensors)
  loaded = safetensors_io.open_tensors(path)
  assert set(loaded) == set(tensors)
  for name, value in tensors.items():
    assert _same_bytes(loaded[name], value), name

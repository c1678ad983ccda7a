"""Loads and saves NVIDIA ModelOpt NVFP4 Hugging Face checkpoints.

Tensors of one NVFP4 linear ``<m>`` with N outputs and K inputs (format spec
§2.1; the table of SGLang's ``ModelOptNVFP4LinearMethod``):

| tensor | dtype | shape | meaning |
|---|---|---|---|
| ``<m>.weight`` | uint8 | ``[N, K/2]`` | packed E2M1, even k in low nibble |
| ``<m>.weight_scale`` | float8_e4m3fn | ``[N, K/16]`` | per-16 block scale |
| ``<m>.weight_scale_2`` | float32 | ``[]`` | per-tensor scale, amax_w / 2688 |
| ``<m>.input_scale`` | float32 | ``[]`` | activation scale, amax_x / 2688 |

``W = e2m1(weight) * weight_scale * weight_scale_2``. Scalars stored as
``[1]`` are squeezed to ``[]``. Modules matched by ``exclude_modules`` keep
their stored dtype (bf16) ``weight`` and may not carry NVFP4 tensors.

Per-expert MoE tensors, ``<p>.experts.<e>.{gate_proj,up_proj,down_proj}.*``
(Qwen3-MoE, DeepSeek, Kimi) or Mixtral's ``<p>.experts.<e>.{w1,w3,w2}.*``,
are stacked into one ``experts`` node (E experts, H hidden, I intermediate):

| leaf of ``<p>.experts`` | dtype | shape | meaning |
|---|---|---|---|
| ``w13_weight`` | uint8 | ``[E, 2I, H/2]`` | gate (w1) rows, then up (w3) |
| ``w13_weight_scale`` | float8_e4m3fn | ``[E, 2I, H/16]`` | block scales |
| ``w13_weight_scale_2`` | float32 | ``[E, 2]`` | column 0 gate, 1 up |
| ``w13_input_scale`` | float32 | ``[E, 2]`` | column 0 gate, 1 up |
| ``w2_weight`` | uint8 | ``[E, H, I/2]`` | down (w2) |
| ``w2_weight_scale`` | float8_e4m3fn | ``[E, H, I/16]`` | block scales |
| ``w2_weight_scale_2`` | float32 | ``[E]`` | per-tensor scale |
| ``w2_input_scale`` | float32 | ``[E]`` | activation scale |

Excluded (unquantized) experts stack to ``w13_weight [E, 2I, H]`` and
``w2_weight [E, H, I]`` in their stored dtype, with no scales.

Choices:

* Fused shards (spec §3). q/k/v stay separate modules with their own scalar
  scales, which is exact. Gate/up keep both columns of ``w13_weight_scale_2``
  and ``w13_input_scale``; unequal ``weight_scale_2`` is kept as it is (the
  transform emits a separate up alpha). A pre-fused ``gate_up_proj`` expert
  with one scalar scale has it copied into both columns, so no slot is ever
  left unset (SGLang PR #14102). Unequal q/k/v or gate/up ``input_scale``
  only warns: ModelOpt equalises them at export, so it hints at a producer
  bug, but the tensors are still valid.
* Weight-only checkpoints (NVFP4A16) have no ``input_scale`` at all; a
  checkpoint where only some NVFP4 modules have one is rejected.
* ``quant_algo`` must be ``NVFP4`` (or ``W4A16_NVFP4``, the weight-only name
  vLLM accepts from ModelOpt) with ``group_size`` 16; FP8 and mixed
  checkpoints are refused.
* Every bad input raises `errors.CheckpointError` naming the tensor or file;
  structure (names, dtypes, shapes) is checked from the headers before any
  data is read, values (NaN/negative scales) as each tensor is loaded.
"""

import dataclasses
import functools
import json
import os
import pathlib
import re
import warnings
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fp4jax import errors
from fp4jax.checkpoint import safetensors_io

CheckpointError = errors.CheckpointError
PathLike = str | os.PathLike

GROUP_SIZE = 16
SUPPORTED_QUANT_ALGOS = ("NVFP4", "W4A16_NVFP4")

CONFIG_FILE = "config.json"
LEGACY_CONFIG_FILE = "hf_quant_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Suffixes that make a module NVFP4 (besides a uint8 `weight`).
_SCALES = ("weight_scale", "weight_scale_2", "input_scale")
_LINEAR_SUFFIXES = ("weight",) + _SCALES
_DTYPES = {
  "weight": "U8",
  "weight_scale": "F8_E4M3",
  "weight_scale_2": "F32",
  "input_scale": "F32",
}
_EXPERT_RE = re.compile(
  r"(?P<node>(?:.+\.)?experts)\.(?P<index>0|[1-9][0-9]*)\.(?P<proj>[^.]+)"
)
# Expert projection naming styles: gate, up, down (gate_up when pre-fused).
_HF_NAMES = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = ("w1", "w3", "w2")
_FUSED_NAMES = ("gate_up_proj", "down_proj")
# Sibling modules that ModelOpt gives one shared input_scale at export.
_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Config keys that give the number of routed experts.
_NUM_EXPERTS_KEYS = ("num_local_experts", "n_routed_experts", "num_experts")
# Block scales are checked in slices of this many bytes to bound temporaries.
_CHECK_CHUNK = 1 << 24
_PRODUCER = {"name": "modelopt", "version": "0.0.0+fp4jax"}


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
  """The parsed ``quantization_config`` of a ModelOpt checkpoint.

  Attributes:
    quant_algo: ``"NVFP4"`` (or ``"W4A16_NVFP4"``).
    group_size: elements per block scale; always 16.
    exclude_modules: glob patterns of modules left unquantized.
    kv_cache_quant_algo: ``"FP8"``, ``"NVFP4"`` or None.
  """

  quant_algo: str
  group_size: int
  exclude_modules: tuple[str, ...]
  kv_cache_quant_algo: str | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """What a checkpoint directory says about itself.

  Attributes:
    hf_config: ``config.json`` as read (empty if the file is absent).
    quantization: the parsed quantization config.
  """

  hf_config: dict = dataclasses.field(hash=False)
  quantization: QuantizationConfig


# ---------------------------------------------------------------- configs


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise CheckpointError(message)


def _flat_group_size(config: Mapping[str, Any], source: str) -> Any:
  sizes = {}
  if "group_size" in config:
    sizes["group_size"] = config["group_size"]
  groups = config.get("config_groups", {})
  _require(isinstance(groups, dict), f"{source}: config_groups is not a map")
  for name, group in groups.items():
    weights = group.get("weights") if isinstance(group, dict) else None
    if isinstance(weights, dict) and "group_size" in weights:
      sizes[f"config_groups.{name}.weights.group_size"] = weights["group_size"]
  _require(bool(sizes), f"{source}: no group_size")
  # Like ModelOpt's common_group_size(): disagreeing groups are an error.
  _require(
    len({json.dumps(v) for v in sizes.values()}) == 1,
    f"{source}: group sizes disagree: {sizes}",
  )
  return next(iter(sizes.values()))


def _kv_from_scheme(scheme: Any, source: str) -> str | None:
  if scheme is None:
    return None
  if isinstance(scheme, dict) and scheme.get("type") == "float":
    bits = scheme.get("num_bits")
    if bits == 8 or bits == 4:
      return "FP8" if bits == 8 else "NVFP4"
  raise CheckpointError(f"{source}: unsupported kv_cache_scheme {scheme!r}")


def parse_quantization_config(
  config: Mapping[str, Any], *, source: str = "quantization_config"
) -> QuantizationConfig:
  """Parses either ModelOpt quantization config form (format spec §2.2).

  The legacy nested form (``hf_quant_config.json``) is
  ``{"producer": ..., "quantization": {"quant_algo", "group_size",
  "exclude_modules", "kv_cache_quant_algo"}}``; the flat form
  (``config.json: quantization_config``) is ``{"quant_method": "modelopt",
  "quant_algo", "ignore", "config_groups": {...: {"weights": {"group_size"}}},
  "kv_cache_scheme"}``, with ``group_size`` at the top level or per group.

  Args:
    config: the JSON object.
    source: where it came from, for error messages.

  Returns:
    The parsed config.

  Raises:
    CheckpointError: not an NVFP4 ModelOpt config, or group_size is missing
      or not 16.
  """
  _require(isinstance(config, dict), f"{source}: not a JSON object")
  nested = "quantization" in config
  fields = config["quantization"] if nested else config
  _require(isinstance(fields, dict), f"{source}: quantization is not a map")
  if not nested:
    method = config.get("quant_method", "modelopt")
    _require(
      method == "modelopt",
      f"{source}: quant_method {method!r} is not a ModelOpt checkpoint",
    )
  # The algorithm first: for FP8 or mixed checkpoints it is the real error.
  algo = fields.get("quant_algo")
  _require(algo is not None, f"{source}: no quant_algo")
  _require(
    algo in SUPPORTED_QUANT_ALGOS,
    f"{source}: quant_algo {algo!r} is not supported; fp4jax loads only "
    f"NVFP4 checkpoints ({', '.join(SUPPORTED_QUANT_ALGOS)})",
  )
  if nested:
    _require("group_size" in fields, f"{source}: no group_size")
    group_size = fields["group_size"]
    _require("exclude_modules" in fields, f"{source}: no exclude_modules")
    exclude = fields["exclude_modules"]
    kv_algo = fields.get("kv_cache_quant_algo")
  else:
    group_size = _flat_group_size(config, source)
    # `ignore` is optional in the flat form; older exports used the legacy
    # key even there.
    exclude = config.get("ignore", config.get("exclude_modules", []))
    kv_algo = config.get("kv_cache_quant_algo")
    if kv_algo is None:
      kv_algo = _kv_from_scheme(config.get("kv_cache_scheme"), source)
  _require(
    isinstance(group_size, int) and not isinstance(group_size, bool),
    f"{source}: group_size {group_size!r} is not an integer",
  )
  _require(
    group_size == GROUP_SIZE,
    f"{source}: group_size {group_size} is not supported; NVFP4 uses "
    f"{GROUP_SIZE}",
  )
  _require(
    isinstance(exclude, list) and all(isinstance(p, str) for p in exclude),
    f"{source}: exclude_modules/ignore is not a list of strings",
  )
  _require(
    kv_algo is None or isinstance(kv_algo, str),
    f"{source}: kv_cache_quant_algo {kv_algo!r} is not a string",
  )
  return QuantizationConfig(algo, group_size, tuple(exclude), kv_algo)


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read JSON: {e}") from e


def read_checkpoint_config(path: PathLike) -> CheckpointConfig:
  """Reads ``config.json`` and/or ``hf_quant_config.json`` of a directory.

  When both carry a quantization config, quant_algo and group_size must
  agree; if their exclude lists or kv-cache algos differ, ``config.json``
  wins with a warning.

  Args:
    path: the checkpoint directory.

  Returns:
    The configs.

  Raises:
    CheckpointError: no quantization config, unreadable JSON, or as for
      `parse_quantization_config`.
  """
  directory = pathlib.Path(path)
  _require(directory.is_dir(), f"{directory}: not a checkpoint directory")
  hf_config = {}
  parsed = {}
  config_path = directory / CONFIG_FILE
  if config_path.exists():
    hf_config = _read_json(config_path)
    _require(isinstance(hf_config, dict), f"{config_path}: not a JSON object")
    if "quantization_config" in hf_config:
      parsed[CONFIG_FILE] = parse_quantization_config(
        hf_config["quantization_config"],
        source=f"{config_path}: quantization_config",
      )
  legacy_path = directory / LEGACY_CONFIG_FILE
  if legacy_path.exists():
    parsed[LEGACY_CONFIG_FILE] = parse_quantization_config(
      _read_json(legacy_path), source=str(legacy_path)
    )
  _require(
    bool(parsed),
    f"{directory}: no quantization_config in {CONFIG_FILE} and no "
    f"{LEGACY_CONFIG_FILE}; not a ModelOpt checkpoint",
  )
  if len(parsed) == 2:
    new, old = parsed[CONFIG_FILE], parsed[LEGACY_CONFIG_FILE]
    for field in ("quant_algo", "group_size"):
      _require(
        getattr(new, field) == getattr(old, field),
        f"{directory}: {field} is {getattr(new, field)!r} in {CONFIG_FILE} "
        f"but {getattr(old, field)!r} in {LEGACY_CONFIG_FILE}",
      )
    if (set(new.exclude_modules), new.kv_cache_quant_algo) != (
      set(old.exclude_modules),
      old.kv_cache_quant_algo,
    ):
      warnings.warn(
        f"{directory}: {CONFIG_FILE} and {LEGACY_CONFIG_FILE} disagree on "
        f"exclude_modules or kv_cache_quant_algo; using {CONFIG_FILE}",
        stacklevel=2,
      )
  quantization = parsed.get(CONFIG_FILE) or parsed[LEGACY_CONFIG_FILE]
  return CheckpointConfig(hf_config, quantization)


@functools.lru_cache(maxsize=1024)
def _pattern(glob: str) -> re.Pattern:
  return re.compile(re.escape(glob).replace(r"\*", ".*"))


def excluding_pattern(module_name: str, patterns: Iterable[str]) -> str | None:
  """Returns the first exclude pattern that matches a module, or None."""
  names = [module_name]
  if module_name.startswith("language_model."):
    names.append(module_name.removeprefix("language_model."))
  for glob in patterns:
    regex = _pattern(glob)
    for name in names:
      if regex.fullmatch(name) or any(
        regex.fullmatch(part) for part in name.split(".")
      ):
        return glob
  return None


def is_excluded(module_name: str, patterns: Iterable[str]) -> bool:
  """Whether a module is left unquantized (SGLang ``is_layer_excluded``).

  A glob's ``*`` matches any run of characters; the pattern must match the
  whole module name or one dot-separated part of it (``lm_head`` excludes
  ``lm_head``, ``mlp.gate`` excludes nothing deeper). A ``language_model.``
  prefix is also stripped and the name retried.

  Args:
    module_name: dotted module name, e.g. ``model.layers.0.mlp.gate``.
    patterns: the config's ``exclude_modules`` / ``ignore`` globs.

  Returns:
    True if some pattern matches.
  """
  return excluding_pattern(module_name, patterns) is not None


# ---------------------------------------------------------------- files


@dataclasses.dataclass(frozen=True)
class _Ref:
  """One tensor as the header describes it."""

  name: str
  file: str
  dtype: str
  shape: tuple[int, ...]

  def fail(self, message: str) -> CheckpointError:
    return CheckpointError(f"{self.name} (in {self.file}): {message}")


def _inside(directory: pathlib.Path, file: str, index: str) -> pathlib.Path:
  """Resolves an index entry, refusing anything outside the directory."""
  parts = re.split(r"[/\\]", file)
  _require(
    bool(file)
    and not os.path.isabs(file)
    and not pathlib.PureWindowsPath(file).drive
    and ".." not in parts,
    f"{index}: shard {file!r} is not a file inside the checkpoint directory",
  )
  path = directory / file
  real, root = os.path.realpath(path), os.path.realpath(directory)
  _require(
    os.path.commonpath([real, root]) == root,
    f"{index}: shard {file!r} resolves to {real}, outside {root}",
  )
  _require(path.is_file(), f"{index}: shard file {file!r} does not exist")
  return path


def _collect_tensors(directory: pathlib.Path) -> dict[str, _Ref]:
  """Reads every shard header; returns tensor name -> reference."""
  index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
  _require(
    not (index_path.exists() and single.exists()),
    f"{directory}: both {SINGLE_FILE} and {INDEX_FILE} exist; remove one",
  )
  if index_path.exists():
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    _require(
      isinstance(weight_map, dict)
      and all(isinstance(f, str) for f in weight_map.values()),
      f"{index_path}: no weight_map of tensor name -> file",
    )
    expected: dict[str, set[str]] = {}
    for name, file in weight_map.items():
      expected.setdefault(file, set()).add(name)
    files = {f: _inside(directory, f, str(index_path)) for f in expected}
  else:
    _require(
      single.is_file(),
      f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}",
    )
    files, expected = {SINGLE_FILE: single}, None
  tensors = {}
  for file, path in files.items():
    header = safetensors_io.read_header(path)
    header.pop(safetensors_io.METADATA_KEY, None)
    if expected is not None:
      missing = sorted(expected[file] - header.keys())
      if missing:
        raise CheckpointError(
          f"{missing[0]}: {INDEX_FILE} places it in {file}, which lacks it"
        )
      unlisted = sorted(header.keys() - expected[file])
      if unlisted:
        raise CheckpointError(
          f"{unlisted[0]} (in {file}): not listed in {INDEX_FILE}"
        )
    for name, entry in header.items():
      _require(
        all(name.split(".")),
        f"{name} (in {file}): empty component in tensor name",
      )
      tensors[name] = _Ref(name, file, entry["dtype"], tuple(entry["shape"]))
  return tensors


def list_tensors(path: PathLike) -> list[tuple[str, str, str, tuple[int, ...]]]:
  """Every tensor of a checkpoint directory from its headers (no data read).

  Returns:
    `(name, file, safetensors dtype, shape)` sorted by name.
  """
  tensors = _collect_tensors(pathlib.Path(path))
  return sorted((r.name, r.file, r.dtype, r.shape) for r in tensors.values())


# ---------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _Linear:
  """The validated source set of one NVFP4 linear."""

  module: str
  weight: _Ref
  weight_scale: _Ref
  weight_scale_2: _Ref
  input_scale: _Ref | None

  @property
  def shape(self) -> tuple[int, int]:
    """(N, K) of the dequantized weight."""
    n, half_k = self.weight.shape
    return n, 2 * half_k


def _check_linear(module: str, refs: Mapping[str, _Ref]) -> _Linear:
  """Checks names, dtypes and shapes of one NVFP4 module from headers."""
  present = sorted(s for s in refs if s in _LINEAR_SUFFIXES)
  for suffix in ("weight", "weight_scale", "weight_scale_2"):
    if suffix not in refs:
      raise CheckpointError(
        f"{module}.{suffix}: missing; NVFP4 module {module} has only {present}"
      )
  for suffix, want in _DTYPES.items():
    ref = refs.get(suffix)
    if ref is not None and ref.dtype != want:
      raise ref.fail(f"dtype {ref.dtype}, NVFP4 needs {want}")
  weight, scale = refs["weight"], refs["weight_scale"]
  if len(weight.shape) != 2:
    raise weight.fail(f"shape {list(weight.shape)} is not [N, K/2]")
  n, k = weight.shape[0], 2 * weight.shape[1]
  if k % GROUP_SIZE:
    raise weight.fail(
      f"K = 2 * {weight.shape[1]} = {k} is not a multiple of {GROUP_SIZE}"
    )
  if scale.shape != (n, k // GROUP_SIZE):
    raise scale.fail(
      f"shape {list(scale.shape)}, expected [{n}, {k // GROUP_SIZE}] "
      f"for weight {list(weight.shape)}"
    )
  for suffix in ("weight_scale_2", "input_scale"):
    ref = refs.get(suffix)
    if ref is not None and ref.shape not in ((), (1,)):
      raise ref.fail(f"shape {list(ref.shape)} is not a scalar")
  return _Linear(
    module,
    weight,
    scale,
    refs["weight_scale_2"],
    refs.get("input_scale"),
  )


def _is_nvfp4(refs: Mapping[str, _Ref]) -> bool:
  weight = refs.get("weight")
  packed = weight is not None and weight.dtype == "U8"
  return packed or any(s in refs for s in _SCALES)


def _check_not_excluded(
  module: str, refs: Mapping[str, _Ref], patterns: tuple[str, ...]
) -> None:
  glob = excluding_pattern(module, patterns)
  if glob is not None and _is_nvfp4(refs):
    culprit = next((refs[s] for s in _SCALES if s in refs), refs.get("weight"))
    raise culprit.fail(
      f"module {module} is excluded (pattern {glob!r}) but carries NVFP4 "
      "tensors"
    )


@dataclasses.dataclass(frozen=True)
class _Experts:
  """The validated sources of one experts node.

  ``projections[e]`` is (gate, up, down), or (gate_up, None, down) when
  pre-fused; each a `_Linear` (NVFP4) or a `_Ref` (unquantized weight).
  """

  node: str
  projections: tuple[tuple[Any, Any, Any], ...]
  quantized: bool

  @property
  def num_tensors(self) -> int:
    count = 0
    for projs in self.projections:
      for p in projs:
        if isinstance(p, _Linear):
          count += 3 + (p.input_scale is not None)
        elif p is not None:
          count += 1
    return count


def _expected_num_experts(hf_config: Mapping[str, Any]) -> int | None:
  for config in (hf_config, hf_config.get("text_config")):
    if isinstance(config, dict):
      for key in _NUM_EXPERTS_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
          return value
  return None


def _expert_slots(node: str, e: int, projs: Mapping[str, Any]):
  """(gate, up, down) projection names of one expert; up is None if fused."""
  names = set(projs)
  if "gate_up_proj" in names:
    style = _FUSED_NAMES
  elif names & set(_MIXTRAL_NAMES):
    style = _MIXTRAL_NAMES
  else:
    style = _HF_NAMES
  extra = sorted(names - set(style))
  if extra:
    raise CheckpointError(
      f"{node}.{e}.{extra[0]}: unexpected expert projection; expert {e} has "
      f"{sorted(names)}, expected {list(style)}"
    )
  return (style[0], None, style[1]) if style is _FUSED_NAMES else style


def _plan_experts(
  node: str,
  experts: Mapping[int, Mapping[str, Mapping[str, _Ref]]],
  patterns: tuple[str, ...],
  expected: int | None,
) -> _Experts:
  count = max(experts) + 1
  if expected is not None and expected > count:
    count = expected
  for e in range(count):
    if e not in experts:
      raise CheckpointError(
        f"{node}.{e}: expert missing (checkpoint has "
        f"{len(experts)} experts, indices up to {max(experts)}"
        + (f", config says {expected})" if expected else ")")
      )
  if expected is not None and count != expected:
    raise CheckpointError(
      f"{node}.{expected}: unexpected expert; config says {expected} experts"
    )
  slots = _expert_slots(node, 0, experts[0])
  projections = []
  kinds = {}
  for e in range(count):
    projs = experts[e]
    if _expert_slots(node, e, projs) != slots:
      raise CheckpointError(
        f"{node}.{e}: projections {sorted(projs)} differ from expert 0's "
        f"{sorted(experts[0])}"
      )
    row = []
    for name in slots:
      if name is None:
        row.append(None)
        continue
      module = f"{node}.{e}.{name}"
      if name not in projs:
        raise CheckpointError(f"{module}: missing expert projection")
      refs = projs[name]
      _check_not_excluded(module, refs, patterns)
      kinds.setdefault(_is_nvfp4(refs), module)
      if _is_nvfp4(refs):
        extra = sorted(set(refs) - set(_LINEAR_SUFFIXES))
        if extra:
          raise refs[extra[0]].fail("unsupported tensor in an NVFP4 expert")
        row.append(_check_linear(module, refs))
      else:
        extra = sorted(set(refs) - {"weight"})
        if extra or "weight" not in refs:
          culprit = refs[extra[0]] if extra else None
          if culprit is None:
            raise CheckpointError(f"{module}.weight: missing")
          raise culprit.fail("unsupported tensor in an unquantized expert")
        row.append(refs["weight"])
    projections.append(tuple(row))
  if len(kinds) > 1:
    raise CheckpointError(
      f"{kinds[True]}: NVFP4 expert next to unquantized {kinds[False]} in "
      f"the same experts node"
    )
  quantized = next(iter(kinds))
  _check_expert_shapes(node, projections, quantized)
  return _Experts(node, tuple(projections), quantized)


def _check_expert_shapes(node: str, projections, quantized: bool) -> None:
  """All experts alike; gate/up [I, H] (gate_up [2I, H]), down [H, I]."""
  first = projections[0]
  for row in projections:
    for p, ref0 in zip(row, first, strict=True):
      if p is None:
        continue
      ref = p.weight if quantized else p
      want = ref0.weight if quantized else ref0
      if ref.shape != want.shape or ref.dtype != want.dtype:
        raise ref.fail(
          f"{ref.dtype}{list(ref.shape)} differs from "
          f"{want.name}'s {want.dtype}{list(want.shape)} (ragged experts)"
        )
      if not quantized and (
        len(ref.shape) != 2 or ref.dtype not in ("F16", "BF16", "F32")
      ):
        raise ref.fail(
          f"{ref.dtype}{list(ref.shape)} is not a 2-D float expert weight"
        )
  gate, up, down = first
  g_rows, hidden = gate.shape
  inter = g_rows if up is not None else g_rows // 2
  if up is not None and up.shape != (inter, hidden):
    bad = up.weight if quantized else up
    raise bad.fail(f"up shape {up.shape} != gate's {(inter, hidden)}")
  if up is None and g_rows % 2:
    bad = gate.weight if quantized else gate
    raise bad.fail(f"gate_up has an odd number of rows ({g_rows})")
  if down.shape != (hidden, inter):
    bad = down.weight if quantized else down
    raise bad.fail(
      f"down [N, K] = {list(down.shape)}, expected "
      f"[{hidden}, {inter}] from gate [I, H] = [{inter}, {hidden}]"
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
  leaves: tuple[_Ref, ...]
  linears: tuple[_Linear, ...]
  experts: tuple[_Experts, ...]


def _plan(
  tensors: Mapping[str, _Ref],
  quantization: QuantizationConfig,
  hf_config: Mapping[str, Any],
) -> _Plan:
  """Groups tensors into plain leaves, NVFP4 linears and experts nodes."""
  patterns = quantization.exclude_modules
  modules: dict[str, dict[str, _Ref]] = {}
  for name, ref in tensors.items():
    module, _, suffix = name.rpartition(".")
    modules.setdefault(module, {})[suffix] = ref
  experts: dict[str, dict[int, dict[str, dict[str, _Ref]]]] = {}
  leaves, linears = [], []
  for module, refs in modules.items():
    match = _EXPERT_RE.fullmatch(module)
    if match:
      node = experts.setdefault(match["node"], {})
      node.setdefault(int(match["index"]), {})[match["proj"]] = refs
      continue
    _check_not_excluded(module, refs, patterns)
    if _is_nvfp4(refs):
      linears.append(_check_linear(module, refs))
      leaves.extend(r for s, r in refs.items() if s not in _LINEAR_SUFFIXES)
    else:
      leaves.extend(refs.values())
  expected = _expected_num_experts(hf_config)
  nodes = tuple(
    _plan_experts(node, by_index, patterns, expected)
    for node, by_index in experts.items()
  )
  _check_input_scales(linears, nodes)
  return _Plan(tuple(leaves), tuple(linears), nodes)


def _check_input_scales(linears, nodes) -> None:
  """All NVFP4 modules have an input_scale (W4A4), or none do (W4A16)."""
  every = list(linears)
  for node in nodes:
    if node.quantized:
      every.extend(p for row in node.projections for p in row if p)
  has = [p for p in every if p.input_scale is not None]
  lacks = [p for p in every if p.input_scale is None]
  if has and lacks:
    raise CheckpointError(
      f"{lacks[0].module}.input_scale: missing, but "
      f"{has[0].input_scale.name} exists; a checkpoint has input_scale on "
      "every NVFP4 module (W4A4) or on none (weight-only)"
    )


# ---------------------------------------------------------------- loading


def _scalar(ref: _Ref, array: np.ndarray) -> np.ndarray:
  """A checked per-tensor scale as a float32 0-d array."""
  value = np.asarray(array, np.float32).reshape(())
  if not (np.isfinite(value) and value > 0):
    raise ref.fail(f"{float(value)} is not a finite positive scale")
  return value


def _check_block_scales(ref: _Ref, array: np.ndarray) -> None:
  """Rejects NaN (S.1111.111) and negative e4m3 block scales by bytes."""
  raw = np.asarray(array).view(np.uint8).reshape(-1)
  for start in range(0, raw.size, _CHECK_CHUNK):
    chunk = raw[start : start + _CHECK_CHUNK]
    # 0x80 is -0.0, which dequantizes like +0.0; other sign-bit bytes are
    # negative, and 0x7F/0xFF are NaN.
    bad = ((chunk & 0x7F) == 0x7F) | (chunk > 0x80)
    if bad.any():
      i = start + int(np.argmax(bad))
      byte = int(raw[i])
      kind = "NaN" if byte & 0x7F == 0x7F else "negative"
      where = tuple(int(j) for j in np.unravel_index(i, array.shape))
      raise ref.fail(f"{kind} block scale 0x{byte:02X} at {list(where)}")


class _Loader:
  """Opens shards lazily and builds the nested param tree."""

  def __init__(self, directory: pathlib.Path, dtype, progress: bool, total):
    self._directory = directory
    self._dtype = None if dtype is None else jnp.dtype(dtype)
    self._open: dict[str, dict[str, np.ndarray]] = {}
    self.params: dict[str, Any] = {}
    self.input_scales: dict[str, float] = {}
    self.bar = tqdm.tqdm(
      total=total,
      desc=f"Loading {directory.name}",
      unit="tensor",
      disable=not progress,
    )

  def array(self, ref: _Ref) -> np.ndarray:
    if ref.file not in self._open:
      self._open[ref.file] = safetensors_io.open_tensors(
        self._directory / ref.file
      )
    return self._open[ref.file][ref.name]

  def cast(self, leaf_name: str, array: np.ndarray) -> np.ndarray:
    # Scales (k_scale, v_scale, ...) keep their precision; float8 is data.
    if (
      self._dtype is not None
      and jnp.issubdtype(array.dtype, jnp.floating)
      and array.dtype.itemsize > 1
      and "scale" not in leaf_name
    ):
      return array.astype(self._dtype)
    return array

  def put(self, name: str, array: np.ndarray) -> None:
    node = self.params
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise CheckpointError(
          f"{name}: conflicts with tensor {'.'.join(parts[: i + 1])}"
        )
    if parts[-1] in node:
      raise CheckpointError(
        f"{name}: conflicts with another tensor or stacked leaf of that name"
      )
    node[parts[-1]] = jax.device_put(array)

  def close(self) -> None:
    self.bar.close()
    self._open.clear()


def _load_linear(loader: _Loader, lin: _Linear) -> None:
  weight = loader.array(lin.weight)
  scale = loader.array(lin.weight_scale)
  scale_2 = _scalar(lin.weight_scale_2, loader.array(lin.weight_scale_2))
  input_scale = None
  if lin.input_scale is not None:
    input_scale = _scalar(lin.input_scale, loader.array(lin.input_scale))
  _check_block_scales(lin.weight_scale, scale)
  loader.put(lin.weight.name, weight)
  loader.put(lin.weight_scale.name, scale)
  loader.put(lin.weight_scale_2.name, scale_2)
  if input_scale is not None:
    loader.put(lin.input_scale.name, input_scale)
    loader.input_scales[lin.module] = float(input_scale)
  loader.bar.update(3 + (input_scale is not None))


def _stack_rows(loader: _Loader, rows: list[list[_Ref]], check=None):
  """[E, R, C]: expert e's tensors in rows[e] concatenated along rows.

  Fills one preallocated array from the memory maps, so the host holds one
  copy of the stacked leaf and no per-expert temporaries.
  """
  first = rows[0]
  shape = (len(rows), sum(r.shape[0] for r in first), first[0].shape[1])
  out = None
  for e, refs in enumerate(rows):
    start = 0
    for ref in refs:
      src = loader.array(ref)
      if out is None:
        out = np.empty(shape, src.dtype)
      dst = out[e, start : start + ref.shape[0]]
      dst[...] = src
      if check is not None:
        check(ref, dst)
      start += ref.shape[0]
  return out


def _load_experts(loader: _Loader, node: _Experts) -> None:
  prefix = node.node
  # (leaf prefix, per-expert projections): w13 = gate then up, w2 = down.
  groups = (
    ("w13", [[p for p in row[:2] if p] for row in node.projections]),
    ("w2", [[row[2]] for row in node.projections]),
  )
  for leaf, sources in groups:
    if not node.quantized:
      out = _stack_rows(loader, sources)
      loader.put(f"{prefix}.{leaf}_weight", loader.cast(leaf, out))
      del out  # Free the host copy before stacking the next leaf.
      continue
    out = _stack_rows(loader, [[p.weight for p in r] for r in sources])
    loader.put(f"{prefix}.{leaf}_weight", out)
    del out
    out = _stack_rows(
      loader,
      [[p.weight_scale for p in r] for r in sources],
      _check_block_scales,
    )
    loader.put(f"{prefix}.{leaf}_weight_scale", out)
    del out
    for suffix in ("weight_scale_2", "input_scale"):
      if getattr(sources[0][0], suffix) is None:
        continue  # Weight-only: no input_scale anywhere (checked earlier).
      scales = np.empty((len(sources), 2), np.float32)
      for e, row in enumerate(sources):
        values = [
          _scalar(getattr(p, suffix), loader.array(getattr(p, suffix)))
          for p in row
        ]
        # A pre-fused gate_up_proj (and w2) has one scale; it fills both
        # columns, so no slot is ever left unset (SGLang PR #14102).
        scales[e] = values * (2 // len(values))
      if leaf == "w2":
        scales = np.ascontiguousarray(scales[:, 0])
      elif suffix == "input_scale":
        _warn_experts_input_scales(prefix, scales)
      loader.put(f"{prefix}.{leaf}_{suffix}", scales)


def _warn_experts_input_scales(node: str, scales: np.ndarray) -> None:
  differ = np.flatnonzero(scales[:, 0] != scales[:, 1])
  if differ.size:
    warnings.warn(
      f"{node}: gate and up input_scale differ for experts "
      f"{differ[:8].tolist()}{'...' if differ.size > 8 else ''} "
      "(ModelOpt equalises them at export; kept as stored)",
      stacklevel=4,
    )


def _warn_fused_input_scales(input_scales: Mapping[str, float]) -> None:
  parents: dict[str, dict[str, float]] = {}
  for module, value in input_scales.items():
    parent, _, leaf = module.rpartition(".")
    parents.setdefault(parent, {})[leaf] = value
  for parent, leaves in parents.items():
    for group in _FUSED_GROUPS:
      values = {g: leaves[g] for g in group if g in leaves}
      if len(values) > 1 and len(set(values.values())) > 1:
        warnings.warn(
          f"{parent}: {'/'.join(values)} input_scale differ {values} "
          "(ModelOpt equalises them at export; kept as stored)",
          stacklevel=3,
        )


def load_modelopt(
  path: PathLike, *, dtype=None, progress: bool = True
) -> tuple[dict[str, Any], CheckpointConfig]:
  """Loads a ModelOpt NVFP4 Hugging Face checkpoint directory.

  Reads ``model.safetensors`` or the shards of
  ``model.safetensors.index.json`` through memory maps, one tensor at a time,
  validating every NVFP4 tensor set (see the module docstring for layouts).

  Args:
    path: directory with ``config.json`` (``quantization_config``) and/or
      ``hf_quant_config.json``, and the safetensors files.
    dtype: if set, non-quantized floating leaves (bf16 weights, norms) are
      cast to it; packed weights and all scales keep their dtypes.
    progress: show a tqdm progress bar.

  Returns:
    ``(params, config)``: params is a nested dict keyed by the dotted
    checkpoint names (``params["model"]["layers"]["0"]["self_attn"]
    ["q_proj"]["weight"]``) of ``jax.Array`` leaves, with per-expert tensors
    stacked under ``experts``.

  Raises:
    CheckpointError: any malformed file, config or tensor; the message names
      it.
  """
  directory = pathlib.Path(path)
  _require(directory.is_dir(), f"{directory}: not a checkpoint directory")
  config = read_checkpoint_config(directory)
  tensors = _collect_tensors(directory)
  plan = _plan(tensors, config.quantization, config.hf_config)
  loader = _Loader(directory, dtype, progress, len(tensors))
  try:
    for ref in plan.leaves:
      leaf = ref.name.rpartition(".")[2]
      loader.put(ref.name, loader.cast(leaf, loader.array(ref)))
      loader.bar.update(1)
    for lin in plan.linears:
      _load_linear(loader, lin)
    for node in plan.experts:
      _load_experts(loader, node)
      loader.bar.update(node.num_tensors)
  finally:
    loader.close()
  _warn_fused_input_scales(loader.input_scales)
  return loader.params, config


# ---------------------------------------------------------------- saving


def _expert_names(hf_config: Mapping[str, Any]) -> tuple[str, str, str]:
  if hf_config.get("model_type") == "mixtral":
    return _MIXTRAL_NAMES
  return _HF_NAMES


_EXPERT_LEAVES = tuple(
  f"{p}_{s}" for p in ("w13", "w2") for s in _LINEAR_SUFFIXES
)


def _unstack_experts(
  prefix: str, node: Mapping[str, Any], names: tuple[str, str, str]
) -> Iterator[tuple[str, np.ndarray]]:
  unknown = sorted(set(node) - set(_EXPERT_LEAVES))
  if unknown:
    raise CheckpointError(f"{prefix}.{unknown[0]}: not a stacked expert leaf")
  gate, up, down = names
  leaves = {k: np.asarray(v) for k, v in node.items()}
  rows = leaves["w13_weight"].shape[1]
  if rows % 2:
    raise CheckpointError(f"{prefix}.w13_weight: odd row count {rows}")
  inter = rows // 2
  for e in range(leaves["w13_weight"].shape[0]):
    for suffix in _LINEAR_SUFFIXES:
      w13, w2 = leaves.get(f"w13_{suffix}"), leaves.get(f"w2_{suffix}")
      if w13 is not None:
        if suffix in ("weight", "weight_scale"):
          halves = w13[e, :inter], w13[e, inter:]
        else:
          halves = w13[e, 0], w13[e, 1]
        yield f"{prefix}.{e}.{gate}.{suffix}", halves[0]
        yield f"{prefix}.{e}.{up}.{suffix}", halves[1]
      if w2 is not None:
        yield f"{prefix}.{e}.{down}.{suffix}", w2[e]


def _flatten(
  node: Mapping[str, Any], prefix: str, names: tuple[str, str, str]
) -> Iterator[tuple[str, np.ndarray]]:
  for key, value in node.items():
    if not isinstance(key, str) or not key or "." in key:
      raise CheckpointError(f"{prefix}: invalid param key {key!r}")
    name = f"{prefix}.{key}" if prefix else key
    if isinstance(value, Mapping):
      if "w13_weight" in value:
        yield from _unstack_experts(name, value, names)
      else:
        yield from _flatten(value, name, names)
    else:
      yield name, np.asarray(value)


def _quantization_configs(
  q: QuantizationConfig, has_input_scale: bool
) -> tuple[dict, dict]:
  """The modern flat and the legacy nested forms of one config."""
  scheme = {
    "type": "float",
    "num_bits": 4,
    "dynamic": False,
    "group_size": q.group_size,
  }
  group = {"targets": ["Linear"], "weights": scheme}
  if has_input_scale:
    group["input_activations"] = dict(scheme)
  flat = {
    "quant_method": "modelopt",
    "quant_algo": q.quant_algo,
    "producer": dict(_PRODUCER),
    "ignore": list(q.exclude_modules),
    "config_groups": {"group_0": group},
  }
  if q.kv_cache_quant_algo is not None:
    bits = {"FP8": 8, "NVFP4": 4}.get(q.kv_cache_quant_algo)
    _require(
      bits is not None,
      f"kv_cache_quant_algo {q.kv_cache_quant_algo!r} cannot be written",
    )
    flat["kv_cache_scheme"] = {
      "type": "float",
      "num_bits": bits,
      "dynamic": False,
    }
  legacy = {
    "producer": dict(_PRODUCER),
    "quantization": {
      "quant_algo": q.quant_algo,
      "kv_cache_quant_algo": q.kv_cache_quant_algo,
      "group_size": q.group_size,
      "exclude_modules": list(q.exclude_modules),
    },
  }
  return flat, legacy


def _shards(
  tensors: list[tuple[str, np.ndarray]], max_shard_bytes: int | None
) -> list[list[tuple[str, np.ndarray]]]:
  shards, size = [[]], 0
  for name, array in tensors:
    if max_shard_bytes and shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, array))
    size += array.nbytes
  return shards


def save_modelopt(
  path: PathLike,
  params: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  quantization: QuantizationConfig,
  *,
  max_shard_bytes: int | None = None,
) -> None:
  """Writes params as a ModelOpt-format Hugging Face checkpoint directory.

  The inverse of `load_modelopt`: ``experts`` nodes are unstacked to
  per-expert ``gate_proj/up_proj/down_proj`` tensors (``w1/w3/w2`` when
  ``hf_config["model_type"] == "mixtral"``). Writes ``config.json`` with the
  flat ``quantization_config``, ``hf_quant_config.json`` in the legacy form,
  and ``model.safetensors`` or shards plus ``model.safetensors.index.json``.
  Values are not validated, so tests can write malformed checkpoints. The
  whole tree is copied to host memory; meant for small models and tests.

  Args:
    path: output directory; created if needed, must hold no checkpoint.
    params: nested dict as `load_modelopt` returns it.
    hf_config: the model's ``config.json`` contents; its
      ``quantization_config`` is replaced.
    quantization: written to both config files.
    max_shard_bytes: if set, split tensors into shards of at most this many
      bytes (a larger single tensor gets its own shard).

  Raises:
    FileExistsError: the directory already holds a checkpoint.
    CheckpointError: a param key or experts node cannot be written.
  """
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  existing = [
    p.name
    for p in directory.iterdir()
    if p.name.endswith(".safetensors")
    or p.name in (INDEX_FILE, CONFIG_FILE, LEGACY_CONFIG_FILE)
  ]
  if existing:
    raise FileExistsError(f"{directory} already holds {sorted(existing)}")
  tensors = list(_flatten(params, "", _expert_names(hf_config)))
  has_input_scale = any(n.endswith("input_scale") for n, _ in tensors)
  shards = _shards(tensors, max_shard_bytes)
  metadata = {"format": "pt"}  # transformers refuses files without it.
  if len(shards) == 1:
    safetensors_io.save_file(directory / SINGLE_FILE, dict(tensors), metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards, 1):
      file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
      safetensors_io.save_file(directory / file, dict(shard), metadata)
      weight_map.update((name, file) for name, _ in shard)
    index = {
      "metadata": {"total_size": sum(a.nbytes for _, a in tensors)},
      "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  flat, legacy = _quantization_configs(quantization, has_input_scale)
  config = {**hf_config, "quantization_config": flat}
  (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  (directory / LEGACY_CONFIG_FILE).write_text(
    json.dumps(legacy, indent=2) + "\n"
  )

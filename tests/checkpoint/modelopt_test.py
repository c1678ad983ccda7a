"""Tests for fp4jax.checkpoint.modelopt (synthetic checkpoints, no GPU)."""

import json
import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fp4jax import errors
from fp4jax.checkpoint import modelopt
from fp4jax.checkpoint import safetensors_io
from fp4jax.checkpoint import synthetic
from tests import trees

CheckpointError = errors.CheckpointError
E4M3 = ml_dtypes.float8_e4m3fn


def _load(directory, **kwargs):
  kwargs.setdefault("progress", False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Well-formed checkpoints load quietly.
    return modelopt.load_modelopt(directory, **kwargs)


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize(
  "model_type, options",
  [
    ("llama", {}),
    ("llama", {"weight_only": True}),
    ("qwen3_moe", {}),
    ("qwen3_moe", {"weight_only": True}),
    ("qwen3_moe", {"exclude_experts": True}),
    ("mixtral", {}),
    ("mixtral", {"exclude_experts": True}),
  ],
)
@pytest.mark.parametrize("max_shard_bytes", [None, 4096])
def test_round_trip(tmp_path, rng, model_type, options, max_shard_bytes):
  params, hf_config, quant = synthetic.tiny_model(
    rng, model_type=model_type, **options
  )
  modelopt.save_modelopt(
    tmp_path, params, hf_config, quant, max_shard_bytes=max_shard_bytes
  )
  sharded = (tmp_path / modelopt.INDEX_FILE).exists()
  assert sharded == (max_shard_bytes is not None)
  assert (tmp_path / modelopt.SINGLE_FILE).exists() != sharded

  loaded, config = _load(tmp_path)
  trees.assert_bit_equal(params, loaded)
  assert config.quantization == quant
  assert config.hf_config["model_type"] == model_type
  assert config.hf_config["quantization_config"]["quant_method"] == "modelopt"
  for leaf in jax.tree.leaves(loaded):
    assert isinstance(leaf, jax.Array)


def test_layout_of_loaded_leaves(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(
    rng, model_type="qwen3_moe", hidden=64, intermediate=32, num_experts=4
  )
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  loaded, _ = _load(tmp_path)
  q = loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]
  assert (q["weight"].dtype, q["weight"].shape) == (jnp.uint8, (64, 32))
  assert (q["weight_scale"].dtype, q["weight_scale"].shape) == (E4M3, (64, 4))
  assert q["weight_scale_2"].shape == q["input_scale"].shape == ()
  experts = loaded["model"]["layers"]["1"]["mlp"]["experts"]
  want = {
    "w13_weight": (jnp.uint8, (4, 64, 32)),
    "w13_weight_scale": (E4M3, (4, 64, 4)),
    "w13_weight_scale_2": (jnp.float32, (4, 2)),
    "w13_input_scale": (jnp.float32, (4, 2)),
    "w2_weight": (jnp.uint8, (4, 64, 16)),
    "w2_weight_scale": (E4M3, (4, 64, 2)),
    "w2_weight_scale_2": (jnp.float32, (4,)),
    "w2_input_scale": (jnp.float32, (4,)),
  }
  assert {k: (v.dtype, v.shape) for k, v in experts.items()} == want
  assert loaded["lm_head"]["weight"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
  "model_type, parent, names",
  [
    ("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    ("mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
  ],
)
def test_experts_file_names_and_gate_first(
  tmp_path, rng, model_type, parent, names
):
  params, hf_config, quant = synthetic.tiny_model(
    rng, model_type=model_type, num_layers=1, num_experts=3
  )
  node = params["model"]["layers"]["0"][parent]["experts"]
  node.update(synthetic.nvfp4_experts(rng, 3, 64, 32, equal_gate_up=False))
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  files = safetensors_io.open_tensors(tmp_path / modelopt.SINGLE_FILE)
  assert not any("w13" in n or "w2_" in n for n in files)
  loaded, _ = _load(tmp_path)
  got = loaded["model"]["layers"]["0"][parent]["experts"]
  gate, up, down = names
  inter = 32
  for e in range(3):
    prefix = f"model.layers.0.{parent}.experts.{e}"
    file_gate = files[f"{prefix}.{gate}.weight"]
    file_up = files[f"{prefix}.{up}.weight"]
    np.testing.assert_array_equal(got["w13_weight"][e, :inter], file_gate)
    np.testing.assert_array_equal(got["w13_weight"][e, inter:], file_up)
    np.testing.assert_array_equal(
      got["w2_weight"][e], files[f"{prefix}.{down}.weight"]
    )
    for col, proj in enumerate((gate, up)):
      for leaf in ("weight_scale_2", "input_scale"):
        assert got[f"w13_{leaf}"][e, col] == files[f"{prefix}.{proj}.{leaf}"]
  # Unequal gate/up weight_scale_2 is kept per column, not merged.
  scale_2 = np.asarray(got["w13_weight_scale_2"])
  assert (scale_2[:, 0] != scale_2[:, 1]).all()


def _write(directory, tensors, *, exclude=("lm_head",), hf_config=None):
  directory.mkdir(exist_ok=True)
  safetensors_io.save_file(directory / modelopt.SINGLE_FILE, tensors)
  quant = {
    "quant_method": "modelopt",
    "quant_algo": "NVFP4",
    "ignore": list(exclude),
    "config_groups": {"group_0": {"weights": {"group_size": 16}}},
  }
  config = {**(hf_config or {}), "quantization_config": quant}
  (directory / modelopt.CONFIG_FILE).write_text(json.dumps(config))
  return directory


def _add(tensors, prefix, leaves):
  for name, value in leaves.items():
    tensors[f"{prefix}.{name}"] = value


def test_prefused_gate_up_proj_fills_both_columns(tmp_path, rng):
  tensors = {}
  for e in range(2):
    prefix = f"model.layers.0.mlp.experts.{e}"
    _add(tensors, f"{prefix}.gate_up_proj", synthetic.nvfp4_linear(rng, 32, 32))
    _add(tensors, f"{prefix}.down_proj", synthetic.nvfp4_linear(rng, 32, 16))
  loaded, _ = _load(_write(tmp_path, tensors))
  got = loaded["model"]["layers"]["0"]["mlp"]["experts"]
  assert got["w13_weight"].shape == (2, 32, 16)
  for e in range(2):
    prefix = f"model.layers.0.mlp.experts.{e}.gate_up_proj"
    np.testing.assert_array_equal(
      got["w13_weight"][e], tensors[f"{prefix}.weight"]
    )
    for leaf in ("weight_scale_2", "input_scale"):
      want = tensors[f"{prefix}.{leaf}"]
      np.testing.assert_array_equal(got[f"w13_{leaf}"][e], [want, want])


def test_scalar_stored_as_shape_1_is_squeezed(tmp_path, rng):
  leaves = synthetic.nvfp4_linear(rng, 16, 32)
  leaves["weight_scale_2"] = leaves["weight_scale_2"].reshape(1)
  leaves["input_scale"] = leaves["input_scale"].reshape(1)
  tensors = {}
  _add(tensors, "proj", leaves)
  loaded, _ = _load(_write(tmp_path, tensors))
  assert loaded["proj"]["weight_scale_2"].shape == ()
  assert loaded["proj"]["input_scale"].shape == ()
  assert loaded["proj"]["input_scale"] == leaves["input_scale"][0]


def test_dtype_casts_only_unquantized_floats(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(
    rng, model_type="qwen3_moe", exclude_experts=True, num_layers=1
  )
  params["model"]["layers"]["0"]["self_attn"]["k_proj"]["k_scale"] = np.float32(
    0.5
  )
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  loaded, _ = _load(tmp_path, dtype=jnp.float32)
  layer = loaded["model"]["layers"]["0"]
  assert loaded["lm_head"]["weight"].dtype == jnp.float32
  assert layer["mlp"]["experts"]["w13_weight"].dtype == jnp.float32
  q = layer["self_attn"]["q_proj"]
  assert q["weight"].dtype == jnp.uint8
  assert q["weight_scale"].dtype == E4M3
  assert layer["self_attn"]["k_proj"]["k_scale"].dtype == jnp.float32
  np.testing.assert_array_equal(
    loaded["lm_head"]["weight"],
    np.asarray(params["lm_head"]["weight"], np.float32),
  )


def test_progress_bar(tmp_path, rng, capsys):
  params, hf_config, quant = synthetic.tiny_model(rng, num_layers=1)
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  _load(tmp_path, progress=True)
  assert "Loading" in capsys.readouterr().err
  _load(tmp_path, progress=False)
  assert capsys.readouterr().err == ""


def test_warns_when_qkv_input_scales_differ(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(rng, num_layers=1)
  attn = params["model"]["layers"]["0"]["self_attn"]
  attn["k_proj"]["input_scale"] = attn["k_proj"]["input_scale"] * 2
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  with pytest.warns(UserWarning, match=r"layers\.0\.self_attn: q_proj/k_"):
    loaded, _ = modelopt.load_modelopt(tmp_path, progress=False)
  trees.assert_bit_equal(params, loaded)  # Kept as stored.


def test_warns_when_expert_gate_up_input_scales_differ(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(
    rng, model_type="qwen3_moe", num_layers=1
  )
  experts = params["model"]["layers"]["0"]["mlp"]["experts"]
  experts["w13_input_scale"][2, 1] *= 3
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  with pytest.warns(UserWarning, match=r"0\.mlp\.experts: gate and up.*\[2\]"):
    loaded, _ = modelopt.load_modelopt(tmp_path, progress=False)
  trees.assert_bit_equal(params, loaded)


# ------------------------------------------------------------ configs


def _quant(**kw):
  return modelopt.QuantizationConfig(
    **{
      "quant_algo": "NVFP4",
      "group_size": 16,
      "exclude_modules": ("lm_head",),
      "kv_cache_quant_algo": None,
      **kw,
    }
  )


@pytest.mark.parametrize(
  "config, want",
  [
    pytest.param(
      {
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {
          "quant_algo": "NVFP4",
          "group_size": 16,
          "exclude_modules": ["lm_head"],
          "kv_cache_quant_algo": "FP8",
        },
      },
      _quant(kv_cache_quant_algo="FP8"),
      id="legacy",
    ),
    pytest.param(
      {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "ignore": ["lm_head"],
      },
      _quant(),
      id="flat_top_level_group_size",
    ),
    pytest.param(
      {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "ignore": ["lm_head"],
        "config_groups": {
          "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "float", "group_size": 16},
            "input_activations": {"num_bits": 4, "group_size": 16},
          }
        },
        "kv_cache_scheme": {"type": "float", "num_bits": 8, "dynamic": False},
      },
      _quant(kv_cache_quant_algo="FP8"),
      id="flat_config_groups",
    ),
    pytest.param(
      {"quant_algo": "W4A16_NVFP4", "group_size": 16},
      _quant(quant_algo="W4A16_NVFP4", exclude_modules=()),
      id="flat_weight_only_no_ignore",
    ),
  ],
)
def test_parse_quantization_config(config, want):
  assert modelopt.parse_quantization_config(config) == want


def _legacy(**quantization):
  base = {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": []}
  return {"quantization": {**base, **quantization}}


def _flat(**fields):
  return {"quant_method": "modelopt", "quant_algo": "NVFP4", **fields}


@pytest.mark.parametrize(
  "config, needle",
  [
    pytest.param(_legacy(quant_algo="FP8"), "'FP8'", id="fp8"),
    pytest.param(_flat(quant_algo="MIXED_PRECISION"), "MIXED", id="mixed"),
    pytest.param(_flat(quant_algo="INT4_AWQ"), "INT4_AWQ", id="int4"),
    pytest.param({"quant_method": "modelopt"}, "quant_algo", id="no_algo"),
    pytest.param(_legacy(group_size=32), "group_size 32", id="legacy_32"),
    pytest.param(_flat(group_size=8), "group_size 8", id="flat_8"),
    pytest.param(_flat(group_size="16"), "group_size '16'", id="str_16"),
    pytest.param(_flat(), "no group_size", id="flat_no_group_size"),
    pytest.param(
      {"quantization": {"quant_algo": "NVFP4", "exclude_modules": []}},
      "no group_size",
      id="legacy_no_group_size",
    ),
    pytest.param(
      {"quantization": {"quant_algo": "NVFP4", "group_size": 16}},
      "exclude_modules",
      id="legacy_no_exclude",
    ),
    pytest.param(
      _flat(
        config_groups={
          "a": {"weights": {"group_size": 16}},
          "b": {"weights": {"group_size": 32}},
        }
      ),
      "disagree",
      id="groups_disagree",
    ),
    pytest.param(
      _flat(group_size=16, quant_method="compressed-tensors"),
      "compressed-tensors",
      id="not_modelopt",
    ),
    pytest.param(_flat(group_size=16, ignore="lm_head"), "ignore", id="ignore"),
    pytest.param(
      _flat(group_size=16, kv_cache_scheme={"type": "int", "num_bits": 8}),
      "kv_cache_scheme",
      id="kv_scheme",
    ),
    pytest.param([1], "not a JSON object", id="not_object"),
  ],
)
def test_parse_quantization_config_rejects(config, needle):
  with pytest.raises(CheckpointError, match=re.escape(needle)):
    modelopt.parse_quantization_config(config, source="cfg.json")


@pytest.mark.parametrize("keep", ["flat", "legacy", "both"])
def test_config_from_either_file(tmp_path, rng, keep):
  params, hf_config, quant = synthetic.tiny_model(rng, num_layers=1)
  quant = _quant(
    exclude_modules=("lm_head", "*norm*"), kv_cache_quant_algo="FP8"
  )
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  config_path = tmp_path / modelopt.CONFIG_FILE
  if keep == "legacy":
    config = json.loads(config_path.read_text())
    del config["quantization_config"]
    config_path.write_text(json.dumps(config))
  elif keep == "flat":
    (tmp_path / modelopt.LEGACY_CONFIG_FILE).unlink()
  loaded, config = _load(tmp_path)
  assert config.quantization == quant
  trees.assert_bit_equal(params, loaded)


def test_config_files_disagree(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(rng, num_layers=1)
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  legacy = tmp_path / modelopt.LEGACY_CONFIG_FILE
  config = json.loads(legacy.read_text())
  config["quantization"]["exclude_modules"].append("*o_proj")
  legacy.write_text(json.dumps(config))
  with pytest.warns(UserWarning, match="disagree on exclude_modules"):
    _, got = modelopt.load_modelopt(tmp_path, progress=False)
  assert got.quantization.exclude_modules == ("lm_head",)
  config["quantization"]["quant_algo"] = "FP8"
  legacy.write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=modelopt.LEGACY_CONFIG_FILE):
    modelopt.load_modelopt(tmp_path, progress=False)


def test_no_quantization_config(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(rng, num_layers=1)
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  (tmp_path / modelopt.LEGACY_CONFIG_FILE).unlink()
  (tmp_path / modelopt.CONFIG_FILE).write_text(json.dumps(hf_config))
  with pytest.raises(CheckpointError, match="no quantization_config"):
    modelopt.load_modelopt(tmp_path, progress=False)
  (tmp_path / modelopt.CONFIG_FILE).write_text("{not json")
  with pytest.raises(CheckpointError, match=modelopt.CONFIG_FILE):
    modelopt.load_modelopt(tmp_path, progress=False)


@pytest.mark.parametrize(
  "name, patterns, excluded",
  [
    ("lm_head", ["lm_head"], True),
    ("model.layers.0.mlp.gate", ["*mlp.gate"], True),
    ("model.layers.0.mlp.gate_proj", ["*mlp.gate"], False),
    ("model.layers.0.mlp.gate", ["gate"], True),  # A dotted part matches.
    ("model.layers.0.self_attn.q_proj", ["*self_attn*"], True),
    ("model.layers.3.self_attn.q_proj", ["model.layers.3.*"], True),
    ("model.layers.30.self_attn.q_proj", ["model.layers.3.*"], False),
    ("model.layersX3.q_proj", ["model.layers.3.*"], False),  # "." literal.
    ("language_model.lm_head", ["lm_head"], True),
    ("language_model.model.layers.0.mlp", ["model.layers.0.*"], True),
    ("model.layers.0.mlp.experts.7.up_proj", ["*experts*"], True),
    ("model.layers.0.mlp.shared_expert", ["*experts*"], False),
    ("mtp.layers.0.proj", ["mtp*"], True),
    ("model.layers.0.self_attn.q_proj", [], False),
    ("model.layers.0.self_attn.q_proj", ["q"], False),
  ],
)
def test_is_excluded(name, patterns, excluded):
  assert modelopt.is_excluded(name, patterns) == excluded


# ------------------------------------------------------------ bad tensors

ATTN = "model.layers.0.self_attn.q_proj"
EXPERTS = "model.layers.0.mlp.experts"


def _base(rng, num_experts=3):
  """q_proj [32, 64], 3 experts with H=32, I=16, bf16 lm_head and norm."""
  tensors = {}
  _add(tensors, ATTN, synthetic.nvfp4_linear(rng, 32, 64))
  for e in range(num_experts):
    gate = synthetic.nvfp4_linear(rng, 16, 32)
    up = synthetic.nvfp4_linear(rng, 16, 32)
    synthetic.share_scales(gate, up)
    _add(tensors, f"{EXPERTS}.{e}.gate_proj", gate)
    _add(tensors, f"{EXPERTS}.{e}.up_proj", up)
    _add(
      tensors, f"{EXPERTS}.{e}.down_proj", synthetic.nvfp4_linear(rng, 32, 16)
    )
  tensors["lm_head.weight"] = synthetic.bf16(rng, (8, 32))
  tensors["model.norm.weight"] = synthetic.bf16(rng, (32,))
  return tensors


def test_base_checkpoint_is_valid(tmp_path, rng):
  tensors = _base(rng)
  loaded, _ = _load(_write(tmp_path, tensors), dtype=jnp.float32)
  assert loaded["model"]["layers"]["0"]["mlp"]["experts"][
    "w2_weight"
  ].shape == (
    3,
    32,
    8,
  )


def _drop(prefix):
  def mutate(t):
    for name in [n for n in t if n == prefix or n.startswith(prefix + ".")]:
      del t[name]

  return mutate


def _set(name, fn):
  def mutate(t):
    t[name] = fn(t[name])

  return mutate


def _also(*mutations):
  def mutate(t):
    for m in mutations:
      m(t)

  return mutate


def _put(name, value):
  def mutate(t):
    t[name] = value

  return mutate


_BAD = [
  # Missing members of an NVFP4 set.
  (_drop(f"{ATTN}.weight_scale"), f"{ATTN}.weight_scale:"),
  (_drop(f"{ATTN}.weight_scale_2"), f"{ATTN}.weight_scale_2:"),
  (_drop(f"{ATTN}.weight"), f"{ATTN}.weight:"),
  (_drop(f"{ATTN}.input_scale"), f"{ATTN}.input_scale"),
  (_drop(f"{EXPERTS}.1.up_proj.input_scale"), f"{EXPERTS}.1.up_proj.input"),
  (_drop(f"{EXPERTS}.2.down_proj.weight_scale"), f"{EXPERTS}.2.down_proj"),
  # Wrong dtypes.
  (_set(f"{ATTN}.weight", lambda a: a.view(np.int8)), f"{ATTN}.weight "),
  (
    _set(f"{ATTN}.weight_scale", lambda a: a.view(np.uint8)),
    f"{ATTN}.weight_scale ",
  ),
  (
    _set(f"{ATTN}.weight_scale", lambda a: a.view(ml_dtypes.float8_e5m2)),
    f"{ATTN}.weight_scale ",
  ),
  (
    _set(f"{ATTN}.weight_scale_2", lambda a: a.astype(ml_dtypes.bfloat16)),
    f"{ATTN}.weight_scale_2 ",
  ),
  (
    _set(f"{ATTN}.input_scale", lambda a: a.astype(np.float64)),
    f"{ATTN}.input_scale ",
  ),
  (
    _set(f"{EXPERTS}.0.gate_proj.weight_scale_2", lambda a: a.astype("f2")),
    f"{EXPERTS}.0.gate_proj.weight_scale_2 ",
  ),
  # Wrong shapes.
  (
    _set(f"{ATTN}.weight_scale", lambda a: a[:, :-1]),
    f"{ATTN}.weight_scale ",
  ),
  (_set(f"{ATTN}.weight_scale", lambda a: a.T), f"{ATTN}.weight_scale "),
  (_set(f"{ATTN}.weight", lambda a: a.reshape(-1)), f"{ATTN}.weight "),
  (
    _also(
      _put(f"{ATTN}.weight", np.zeros((32, 36), np.uint8)),  # K = 72
      _put(f"{ATTN}.weight_scale", np.ones((32, 4), E4M3)),
    ),
    "multiple of 16",
  ),
  (
    _set(f"{ATTN}.weight_scale_2", lambda a: np.stack([a, a])),
    f"{ATTN}.weight_scale_2 ",
  ),
  # Exclusion.
  (_put("lm_head.weight_scale", np.ones((8, 2), E4M3)), "lm_head.weight_scale"),
  (
    _put("lm_head.weight", np.zeros((8, 16), np.uint8)),
    "lm_head.weight ",
  ),
  # Experts.
  (_drop(f"{EXPERTS}.1"), f"{EXPERTS}.1: expert missing"),
  (_drop(f"{EXPERTS}.2.up_proj"), f"{EXPERTS}.2.up_proj: missing"),
  (
    _also(
      _set(f"{EXPERTS}.1.gate_proj.weight", lambda a: a[:8]),
      _set(f"{EXPERTS}.1.gate_proj.weight_scale", lambda a: a[:8]),
    ),
    f"{EXPERTS}.1.gate_proj.weight ",
  ),
  (
    _also(
      *[
        _set(f"{EXPERTS}.{e}.down_proj.{leaf}", lambda a: a[:16])
        for e in range(3)
        for leaf in ("weight", "weight_scale")
      ]
    ),
    f"{EXPERTS}.0.down_proj.weight ",
  ),
  (
    _also(
      _drop(f"{EXPERTS}.1.gate_proj"),
      _put(f"{EXPERTS}.1.gate_proj.weight", np.ones((16, 32), "f2")),
    ),
    f"{EXPERTS}.1.gate_proj",
  ),
  (
    _also(
      _drop(f"{EXPERTS}.1.up_proj"),
      _put(f"{EXPERTS}.1.w3.weight", np.ones((16, 32), "f2")),
    ),
    f"{EXPERTS}.1.",
  ),
  (
    _put(f"{EXPERTS}.0.foo_proj.weight", np.ones((16, 32), "f2")),
    f"{EXPERTS}.0.foo_proj",
  ),
  (
    _put(f"{EXPERTS}.0.down_proj.bias", np.ones((32,), "f2")),
    f"{EXPERTS}.0.down_proj.bias",
  ),
  (_put(f"{EXPERTS}.w13_weight", np.ones(2, "f2")), f"{EXPERTS}.w13_weight"),
  # Names.
  (_put("model.norm", np.ones(2, "f2")), "model.norm"),
  (_put("model..x", np.ones(2, "f2")), "model..x"),
]


@pytest.mark.parametrize(
  "mutate, needle", _BAD, ids=[re.sub(r"\W+", "_", n) for _, n in _BAD]
)
def test_bad_tensors(tmp_path, rng, mutate, needle):
  tensors = _base(rng)
  mutate(tensors)
  with pytest.raises(CheckpointError, match=re.escape(needle)):
    modelopt.load_modelopt(_write(tmp_path, tensors), progress=False)


def test_excluded_module_with_nvfp4_tensors(tmp_path, rng):
  directory = _write(tmp_path, _base(rng), exclude=("lm_head", "*q_proj"))
  with pytest.raises(CheckpointError, match=f"{ATTN}.*excluded.*q_proj"):
    modelopt.load_modelopt(directory, progress=False)


def test_experts_mixed_nvfp4_and_bf16(tmp_path, rng):
  tensors = _base(rng)
  _drop(f"{EXPERTS}.2")(tensors)
  for proj, shape in (("gate_proj", (16, 32)), ("up_proj", (16, 32))):
    tensors[f"{EXPERTS}.2.{proj}.weight"] = synthetic.bf16(rng, shape)
  tensors[f"{EXPERTS}.2.down_proj.weight"] = synthetic.bf16(rng, (32, 16))
  directory = _write(tmp_path, tensors, exclude=("lm_head", f"{EXPERTS}.2.*"))
  with pytest.raises(
    CheckpointError, match=re.escape(f"{EXPERTS}.2.gate_proj")
  ):
    modelopt.load_modelopt(directory, progress=False)


@pytest.mark.parametrize("num_experts", [2, 4])
def test_expert_count_must_match_config(tmp_path, rng, num_experts):
  directory = _write(
    tmp_path, _base(rng), hf_config={"num_experts": num_experts}
  )
  with pytest.raises(CheckpointError, match=re.escape(f"{EXPERTS}.")):
    modelopt.load_modelopt(directory, progress=False)


def test_expert_count_matching_config_loads(tmp_path, rng):
  directory = _write(
    tmp_path, _base(rng), hf_config={"text_config": {"n_routed_experts": 3}}
  )
  _load(directory)


@pytest.mark.parametrize("leaf", ["weight_scale_2", "input_scale"])
@pytest.mark.parametrize(
  "module", [ATTN, f"{EXPERTS}.1.up_proj", f"{EXPERTS}.2.down_proj"]
)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 0.0, -0.0, -0.25])
def test_bad_per_tensor_scale(tmp_path, rng, leaf, module, value):
  tensors = _base(rng)
  tensors[f"{module}.{leaf}"] = np.float32(value)
  with pytest.raises(CheckpointError, match=re.escape(f"{module}.{leaf} ")):
    modelopt.load_modelopt(_write(tmp_path, tensors), progress=False)


@pytest.mark.parametrize(
  "byte, kind", [(0x7F, "NaN"), (0xFF, "NaN"), (0x81, "negative"), (0xC8, "")]
)
@pytest.mark.parametrize(
  "module", [ATTN, f"{EXPERTS}.0.gate_proj", f"{EXPERTS}.2.up_proj"]
)
def test_bad_block_scale(tmp_path, rng, byte, kind, module):
  tensors = _base(rng)
  name = f"{module}.weight_scale"
  raw = tensors[name].view(np.uint8).copy()
  where = tuple(int(rng.integers(d)) for d in raw.shape)
  raw[where] = byte
  tensors[name] = raw.view(E4M3)
  with pytest.raises(
    CheckpointError, match=re.escape(f"{name} ") + f".*{kind}.*{list(where)}"
  ):
    modelopt.load_modelopt(_write(tmp_path, tensors), progress=False)


def test_negative_zero_block_scale_is_accepted(tmp_path, rng):
  tensors = _base(rng)
  raw = tensors[f"{ATTN}.weight_scale"].view(np.uint8).copy()
  raw[0, 0] = 0x80
  tensors[f"{ATTN}.weight_scale"] = raw.view(E4M3)
  _load(_write(tmp_path, tensors))


def test_weight_only_checkpoint(tmp_path, rng):
  tensors = {n: v for n, v in _base(rng).items() if "input_scale" not in n}
  loaded, _ = _load(_write(tmp_path, tensors))
  assert (
    "input_scale" not in loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]
  )
  assert (
    "w13_input_scale" not in loaded["model"]["layers"]["0"]["mlp"]["experts"]
  )


# ------------------------------------------------------------ files


def _sharded(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(rng, num_layers=1)
  directory = tmp_path / "ckpt"
  modelopt.save_modelopt(
    directory, params, hf_config, quant, max_shard_bytes=2048
  )
  index_path = directory / modelopt.INDEX_FILE
  return directory, json.loads(index_path.read_text())


def _rewrite_index(directory, index):
  (directory / modelopt.INDEX_FILE).write_text(json.dumps(index))


def test_sharded_index_lists_every_tensor(tmp_path, rng):
  directory, index = _sharded(tmp_path, rng)
  files = set(index["weight_map"].values())
  assert len(files) > 2
  names = set()
  for file in files:
    names |= set(safetensors_io.read_header(directory / file)) - {
      "__metadata__"
    }
  assert names == set(index["weight_map"])


@pytest.mark.parametrize(
  "target",
  [
    "../outside.safetensors",
    "/abs/model.safetensors",
    "sub/../../x.safetensors",
  ],
)
def test_index_entry_outside_directory(tmp_path, rng, target):
  directory, index = _sharded(tmp_path, rng)
  name = next(iter(index["weight_map"]))
  index["weight_map"][name] = target
  _rewrite_index(directory, index)
  with pytest.raises(CheckpointError, match=re.escape(target)):
    modelopt.load_modelopt(directory, progress=False)


def test_index_entry_symlink_escaping(tmp_path, rng):
  directory, index = _sharded(tmp_path, rng)
  name, file = next(iter(index["weight_map"].items()))
  outside = tmp_path / "outside.safetensors"
  os.replace(directory / file, outside)
  os.symlink(outside, directory / "evil.safetensors")
  index["weight_map"] = {
    n: ("evil.safetensors" if f == file else f)
    for n, f in index["weight_map"].items()
  }
  _rewrite_index(directory, index)
  with pytest.raises(CheckpointError, match="evil.safetensors.*outside"):
    modelopt.load_modelopt(directory, progress=False)


def test_symlink_inside_directory_is_fine(tmp_path, rng):
  directory, index = _sharded(tmp_path, rng)
  file = next(iter(index["weight_map"].values()))
  (directory / "blobs").mkdir()
  os.replace(directory / file, directory / "blobs" / "x")
  os.symlink(directory / "blobs" / "x", directory / file)
  _load(directory)


def test_missing_shard(tmp_path, rng):
  directory, index = _sharded(tmp_path, rng)
  file = sorted(set(index["weight_map"].values()))[1]
  (directory / file).unlink()
  with pytest.raises(CheckpointError, match=re.escape(file)):
    modelopt.load_modelopt(directory, progress=False)


def test_index_names_tensor_the_shard_lacks(tmp_path, rng):
  directory, index = _sharded(tmp_path, rng)
  index["weight_map"]["model.extra.weight"] = next(
    iter(index["weight_map"].values())
  )
  _rewrite_index(directory, index)
  with pytest.raises(CheckpointError, match="model.extra.weight"):
    modelopt.load_modelopt(directory, progress=False)


def test_shard_has_tensor_missing_from_index(tmp_path, rng):
  directory, index = _sharded(tmp_path, rng)
  files = list(index["weight_map"].values())
  # A tensor that shares its shard: dropping a whole shard from the index
  # is undetectable (HF loaders ignore unlisted files too).
  name = next(n for n, f in index["weight_map"].items() if files.count(f) > 1)
  del index["weight_map"][name]
  _rewrite_index(directory, index)
  with pytest.raises(CheckpointError, match=re.escape(name)):
    modelopt.load_modelopt(directory, progress=False)


@pytest.mark.parametrize("content", ["{oops", '{"weight_map": [1]}', "[]"])
def test_bad_index_json(tmp_path, rng, content):
  directory, _ = _sharded(tmp_path, rng)
  (directory / modelopt.INDEX_FILE).write_text(content)
  with pytest.raises(CheckpointError, match=re.escape(modelopt.INDEX_FILE)):
    modelopt.load_modelopt(directory, progress=False)


def test_truncated_shard(tmp_path, rng):
  directory, index = _sharded(tmp_path, rng)
  file = sorted(set(index["weight_map"].values()))[0]
  raw = (directory / file).read_bytes()
  (directory / file).write_bytes(raw[:-3])
  with pytest.raises(CheckpointError, match=re.escape(file)):
    modelopt.load_modelopt(directory, progress=False)


def test_missing_or_ambiguous_weights(tmp_path, rng):
  directory, _ = _sharded(tmp_path, rng)
  safetensors_io.save_file(directory / modelopt.SINGLE_FILE, {})
  with pytest.raises(CheckpointError, match="both"):
    modelopt.load_modelopt(directory, progress=False)
  (directory / modelopt.SINGLE_FILE).unlink()
  (directory / modelopt.INDEX_FILE).unlink()
  with pytest.raises(CheckpointError, match=re.escape(modelopt.SINGLE_FILE)):
    modelopt.load_modelopt(directory, progress=False)
  with pytest.raises(CheckpointError, match="not a checkpoint directory"):
    modelopt.load_modelopt(directory / "nope", progress=False)


def test_save_refuses_to_overwrite(tmp_path, rng):
  params, hf_config, quant = synthetic.tiny_model(rng, num_layers=1)
  modelopt.save_modelopt(tmp_path, params, hf_config, quant)
  with pytest.raises(FileExistsError):
    modelopt.save_modelopt(tmp_path, params, hf_config, quant)


# ------------------------------------------------------------ real exports

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "modelopt"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3_moe"])
def test_real_modelopt_export_round_trips(tmp_path, model):
  """A ModelOpt 0.47 export loads quietly and saves back to the same bytes."""
  source = FIXTURES / model
  params, config = _load(source)
  modelopt.save_modelopt(
    tmp_path, params, config.hf_config, config.quantization
  )
  want = safetensors_io.open_tensors(source / modelopt.SINGLE_FILE)
  got = safetensors_io.open_tensors(tmp_path / modelopt.SINGLE_FILE)
  assert set(got) == set(want)
  for name, value in want.items():
    assert got[name].dtype == value.dtype, name
    assert got[name].shape == value.shape, name
    assert got[name].tobytes() == value.tobytes(), name

  # Both config forms match ModelOpt's own, up to the producer stamp.
  def read(directory, file):
    return json.loads((directory / file).read_text())

  ours, theirs = (read(d, modelopt.CONFIG_FILE) for d in (tmp_path, source))
  quant = [c.pop("quantization_config") for c in (ours, theirs)]
  quant += [read(d, modelopt.LEGACY_CONFIG_FILE) for d in (tmp_path, source)]
  for q in quant:
    del q["producer"]
  assert ours == theirs
  assert quant[0] == quant[1]
  assert quant[2] == quant[3]

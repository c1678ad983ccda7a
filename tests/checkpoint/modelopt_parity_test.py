"""Bit-exact agreement with checkpoints exported by NVIDIA ModelOpt 0.47.

The fixtures (tests/fixtures/modelopt, made by
scripts/make_modelopt_fixtures.py) hold ModelOpt's export, the bf16 weights
it was given and its own dequantization of every NVFP4 layer.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
from fp4jax import checkpoint
from fp4jax.checkpoint import safetensors_io
from fp4jax.format import nvfp4

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "modelopt"
CHECKPOINTS = ("tiny_llama", "tiny_qwen3_moe")
# ModelOpt gives each fused group one weight_scale_2 from the group's amax.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@pytest.fixture(scope="module", params=CHECKPOINTS)
def fixture(request):
  params, config = checkpoint.load_modelopt(
    FIXTURES / request.param, progress=False
  )
  ref = safetensors_io.open_tensors(
    FIXTURES / request.param / "reference.safetensors"
  )
  modules = sorted(
    k.removesuffix(".original_weight")
    for k in ref
    if k.endswith(".original_weight")
  )
  assert modules, "fixture has no NVFP4 modules"
  return params, config, ref, modules


def node_at(params, dotted: str):
  node = params
  for part in dotted.split("."):
    node = node[part]
  return node


def exported(params, module: str) -> fp4jax.NVFP4Tensor:
  """The checkpoint's tensors for one module (experts unstacked)."""
  if ".experts." not in module:
    node = node_at(params, module)
    return fp4jax.NVFP4Tensor(
      node["weight"], node["weight_scale"], node["weight_scale_2"]
    )
  prefix, rest = module.split(".experts.")
  expert, proj = rest.split(".")
  e = int(expert)
  node = node_at(params, prefix + ".experts")
  if proj == "down_proj":
    return fp4jax.NVFP4Tensor(
      node["w2_weight"][e],
      node["w2_weight_scale"][e],
      node["w2_weight_scale_2"][e],
    )
  inter = node["w13_weight"].shape[1] // 2
  rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
  col = 0 if proj == "gate_proj" else 1
  return fp4jax.NVFP4Tensor(
    node["w13_weight"][e, rows],
    node["w13_weight_scale"][e, rows],
    node["w13_weight_scale_2"][e, col],
  )


def group_of(module: str) -> list[str]:
  parent, _, name = module.rpartition(".")
  for group in FUSED_GROUPS:
    if name in group:
      return [f"{parent}.{member}" for member in group]
  return [module]


def bytes_of(x) -> np.ndarray:
  return np.asarray(x).reshape(-1).view(np.uint8)


def test_quantize_given_weight_scale_2_reproduces_packed_and_scales(fixture):
  params, _, ref, modules = fixture
  for module in modules:
    want = exported(params, module)
    got = fp4jax.quantize(
      jnp.asarray(ref[module + ".original_weight"]),
      global_scale=want.global_scale,
    )
    np.testing.assert_array_equal(
      bytes_of(got.packed), bytes_of(want.packed), err_msg=module
    )
    np.testing.assert_array_equal(
      bytes_of(got.block_scale), bytes_of(want.block_scale), err_msg=module
    )


def test_global_scale_is_group_amax_over_2688(fixture):
  params, _, ref, modules = fixture
  for module in modules:
    amax = max(
      np.abs(np.asarray(ref[m + ".original_weight"], np.float32)).max()
      for m in group_of(module)
    )
    got = nvfp4.global_scale_from_amax(jnp.float32(amax))
    assert (
      bytes_of(got).tobytes()
      == bytes_of(exported(params, module).global_scale).tobytes()
    ), module


def test_quantize_from_bf16_alone_reproduces_unfused_layers(fixture):
  params, _, ref, modules = fixture
  singles = [m for m in modules if group_of(m) == [m]]
  assert singles
  for module in singles:
    want = exported(params, module)
    got = fp4jax.quantize(jnp.asarray(ref[module + ".original_weight"]))
    for a, b in zip(
      (got.packed, got.block_scale, got.global_scale),
      (want.packed, want.block_scale, want.global_scale),
      strict=True,
    ):
      np.testing.assert_array_equal(bytes_of(a), bytes_of(b), err_msg=module)


def test_dequantize_matches_modelopt_bit_for_bit(fixture):
  params, _, ref, modules = fixture
  for module in modules:
    got = fp4jax.dequantize(exported(params, module))
    want = np.asarray(ref[module + ".dequantized"])
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_array_equal(bytes_of(got), bytes_of(want), module)


def test_fixture_covers_the_hard_cases(fixture):
  params, _, _, modules = fixture
  scales = np.concatenate(
    [
      np.asarray(exported(params, m).block_scale, np.float32).ravel()
      for m in modules
    ]
  )
  assert (scales == 1.0).any()  # all-zero blocks
  assert (scales == 2.0**-9).any()  # clamped tiny blocks
  assert (scales < 2.0**-6).any()  # subnormal E4M3 scales
  assert (scales == 448.0).any()
  codes = np.concatenate(
    [np.asarray(exported(params, m).packed).ravel() for m in modules]
  )
  assert ((codes & 0xF) == 8).any() or ((codes >> 4) == 8).any()


def test_prepare_on_fixture_removes_all_sources(fixture):
  params, _, _, _ = fixture
  prepared, report = fp4jax.prepare(params)
  assert report.freed_bytes > 0

  def walk(node, path=""):
    for k, v in node.items():
      if isinstance(v, dict):
        yield from walk(v, f"{path}/{k}")
      else:
        yield f"{path}/{k}"

  leaves = list(walk(prepared))
  assert not [
    p
    for p in leaves
    if p.endswith(("weight_scale", "weight_scale_2", "input_scale"))
  ]
  assert any(p.endswith("/w13_block_scale") for p in leaves) == (
    "experts" in "".join(leaves)
  )

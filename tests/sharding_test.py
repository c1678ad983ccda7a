"""Tensor and expert parallelism on 8 host devices: sharded == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import fp4jax
import pallas_kernels
from fp4jax import checkpoint
from fp4jax import sharding
from fp4jax import transform
from tests import sources
from tests.pallas_kernels.nvfp4_matmul import test_base as matmul_base
from tests.tolerance import assert_close


def cpu_mesh(size: int, axis: str) -> Mesh:
  devices = jax.devices("cpu")
  if len(devices) < size:
    pytest.skip(f"needs {size} host devices (XLA_FLAGS in tests/conftest.py)")
  return Mesh(np.array(devices[:size]), (axis,))


def linear_source(rng, n, k):
  """A source linear node (the matmul suite's random layer)."""
  return matmul_base.make_layer(rng, n, k)[1]


def unsharded(node, weight_layout="natural"):
  prepared, _ = fp4jax.prepare({"l": node}, weight_layout=weight_layout)
  return prepared["l"]


@pytest.mark.parametrize("weight_layout", transform.WEIGHT_LAYOUTS)
def test_column_parallel_prepare_equals_the_unsharded_leaves(
  rng, weight_layout
):
  mesh = cpu_mesh(4, "tp")
  node = linear_source(rng, 512, 256)
  got = sharding.prepare_linear(
    node, mesh, "column", weight_layout=weight_layout
  )
  want = unsharded(node, weight_layout)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(
      np.asarray(got[name]).view(np.uint8)
      if got[name].dtype != jnp.float32
      else np.asarray(got[name]),
      np.asarray(want[name]).view(np.uint8)
      if want[name].dtype != jnp.float32
      else np.asarray(want[name]),
    )
  # Each device holds a quarter of the weight and of the block scales.
  shard = got["block_scale"].addressable_shards[0].data
  assert shard.shape == (128, want["block_scale"].shape[1])


def test_row_parallel_scales_are_one_swizzle_per_shard(rng):
  mesh = cpu_mesh(4, "tp")
  node = linear_source(rng, 128, 1024)
  got = sharding.prepare_linear(node, mesh, "row")
  assert got["block_scale"].shape == (4, 128, 16)  # K/4 = 256: 16 blocks
  for s in range(4):
    local = {
      "weight": node["weight"][:, s * 128 : (s + 1) * 128],
      "weight_scale": node["weight_scale"][:, s * 16 : (s + 1) * 16],
      "weight_scale_2": node["weight_scale_2"],
      "input_scale": node["input_scale"],
    }
    np.testing.assert_array_equal(
      np.asarray(got["block_scale"][s]).view(np.uint8),
      np.asarray(unsharded(local)["block_scale"]).view(np.uint8),
    )


@pytest.mark.parametrize(
  "weight_layout, leaf",
  [("sm90", "weight_sm90"), ("sm90_row_pairs", "weight_sm90_row_pairs")],
)
def test_row_parallel_sm90_weight_is_the_unsharded_one(
  rng, weight_layout, leaf
):
  # The bit permutation stays inside 4-byte groups along K and row pairs
  # inside 32-column chunks, so each K shard's layout is the slice of the
  # whole weight's.
  mesh = cpu_mesh(4, "tp")
  node = linear_source(rng, 128, 1024)
  got = sharding.prepare_linear(node, mesh, "row", weight_layout=weight_layout)
  assert "weight" not in got
  assert got[leaf].sharding.spec == jax.sharding.PartitionSpec(None, "tp")
  np.testing.assert_array_equal(
    np.asarray(got[leaf]), np.asarray(unsharded(node, weight_layout)[leaf])
  )


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize(
  "activation, weight_layout",
  [
    ("bf16", "natural"),
    ("nvfp4", "natural"),
    ("bf16", "sm90"),
    ("nvfp4", "sm90_row_pairs"),
  ],
)
def test_sharded_matmul_equals_unsharded(rng, kind, activation, weight_layout):
  mesh = cpu_mesh(4, "tp")
  node = linear_source(rng, 512, 1024)
  layer = sharding.prepare_linear(node, mesh, kind, weight_layout=weight_layout)
  x = jnp.asarray(rng.standard_normal((3, 5, 1024)), jnp.bfloat16)
  got = jax.jit(
    lambda x, layer: sharding.matmul(
      x, layer, mesh, kind, activation=activation, implementation="xla"
    )
  )(x, layer)
  want = pallas_kernels.nvfp4_matmul(
    x, unsharded(node), activation=activation, implementation="xla"
  )
  assert got.shape == want.shape == (3, 5, 512)
  if kind == "column":  # the same dot products, split by output column
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  else:  # four partial sums added: float32 summation order differs
    want32 = np.asarray(want, np.float32)
    err = np.abs(np.asarray(got, np.float32) - want32).max()
    assert err <= 2.0**-7 * np.abs(want32).max()


def test_sharded_prepare_donates_and_reports_bytes_per_device(rng):
  mesh = cpu_mesh(4, "tp")
  node = linear_source(rng, 512, 512)
  placed = sharding.place(
    node, mesh, sharding.linear_specs("column", "tp", prepared=False)
  )
  before = sharding.bytes_per_device(placed)
  out = sharding.prepare_linear(placed, mesh, "column", donate=True)
  after = sharding.bytes_per_device(out)
  assert len(before) == len(after) == 4
  assert placed["weight_scale"].is_deleted()  # donated source scales
  for device, nbytes in after.items():
    # Each rank: a quarter of the weight (512*256/4) and of the swizzled
    # scales (512*32/4), plus the replicated scalars.
    assert nbytes == 512 * 256 // 4 + 512 * 32 // 4 + 2 * 4
    assert before[device] == 512 * 256 // 4 + 512 * 32 // 4 + 2 * 4


def test_bad_splits_are_refused_with_the_path(rng):
  mesh = cpu_mesh(4, "tp")
  with pytest.raises(fp4jax.NVFP4Error, match="proj.*128-row"):
    sharding.prepare_linear(
      linear_source(rng, 256, 256), mesh, "column", path="proj"
    )
  with pytest.raises(fp4jax.NVFP4Error, match="64-wide"):
    sharding.prepare_linear(linear_source(rng, 128, 128), mesh, "row")


@pytest.mark.parametrize(
  "weight_layout, inter, pad",
  [
    ("natural", 64, False),
    ("sm90", 64, False),
    ("sm90", 128, False),
    ("sm90", 192, True),
  ],
)
def test_expert_parallel_prepare_equals_the_unsharded_leaves(
  rng, monkeypatch, weight_layout, inter, pad
):
  # sm90 with I % 128 == 0: w13 rows in plane order (w13_weight_sm90_planes);
  # with `pad`, I = 192 padded to 256 first (PAD_INTERMEDIATE_TO_TILES).
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", pad)
  mesh = cpu_mesh(4, "ep")
  src = sources.experts_source(rng, 8, 128, inter, up_factor=1.25)
  got = sharding.prepare_experts(src, mesh, weight_layout=weight_layout)
  want, _ = fp4jax.prepare({"experts": src}, weight_layout=weight_layout)
  want = want["experts"]
  assert set(got) == set(want)
  planes = weight_layout == "sm90" and (inter % 128 == 0 or pad)
  assert ("w13_weight_sm90_planes" in got) == planes
  for name, w in want.items():
    g = got[name]
    assert g.sharding.spec == jax.sharding.PartitionSpec("ep")
    np.testing.assert_array_equal(
      np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8)
    )
  # The experts' outputs are the same numbers through the reference, up to
  # float32 summation order: XLA partitions the reference over the sharded
  # leaves (seed 3152277877 moved one bf16 output by one ulp). Where terms of
  # thousands cancel to a small output, reordering moves it by float32 ulps of
  # the terms, not of the output (seed 2921085903: 1.8e-4 on 0.0146 in a row
  # whose largest output is 2048), hence the floor: 2**-16 of the largest
  # output, far below what a wrong leaf would move.
  x = jnp.asarray(rng.standard_normal((6, 128)), jnp.bfloat16)
  logits = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
  out = pallas_kernels.nvfp4_moe(x, logits, got, top_k=2, implementation="xla")
  ref = pallas_kernels.nvfp4_moe(x, logits, want, top_k=2, implementation="xla")
  assert np.all(np.isfinite(np.asarray(ref, np.float32)))
  assert_close(out, np.asarray(ref, np.float32), rtol=2.0**-7, floor=2.0**-9)


@pytest.mark.parametrize("pad", [False, True])
def test_expert_parallel_prepare_donates_the_callers_leaves(
  rng, monkeypatch, pad
):
  """donate=True frees the caller's source weights and scales, also when I
  is padded first (the jits then receive padded copies)."""
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", pad)
  mesh = cpu_mesh(4, "ep")
  src = sources.experts_source(rng, 8, 128, 192)
  placed = sharding.place(src, mesh, sharding.experts_specs(src, "ep"))
  out = sharding.prepare_experts(
    placed, mesh, donate=True, weight_layout="sm90"
  )
  assert ("w13_weight_sm90_planes" in out) == pad
  for prefix in transform.MOE_PREFIXES:
    for name in ("weight", "weight_scale"):
      assert placed[prefix + name].is_deleted(), prefix + name
  assert not any(leaf.is_deleted() for leaf in out.values())


def test_orbax_restore_lands_each_shard_on_its_device(rng, tmp_path):
  mesh = cpu_mesh(4, "tp")
  node = linear_source(rng, 512, 512)
  checkpoint.save_params(tmp_path / "ckpt", {"proj": node})
  target = {"proj": sharding.source_shardings(node, mesh, "row", "tp")}
  restored = checkpoint.restore_params(
    tmp_path / "ckpt",
    abstract_params=jax.eval_shape(lambda: {"proj": node}),
    sharding=target,
  )
  per_device = sharding.bytes_per_device(restored)
  # No device holds the whole tree: a quarter of the weight and scales each.
  whole = sum(x.nbytes for x in jax.tree.leaves(restored))
  assert len(per_device) == 4
  assert all(
    b == 512 * 256 // 4 + 512 * 32 // 4 + 8 for b in per_device.values()
  )
  assert max(per_device.values()) < whole / 3
  layer = sharding.prepare_linear(restored["proj"], mesh, "row", donate=True)
  x = jnp.asarray(rng.standard_normal((4, 512)), jnp.bfloat16)
  got = sharding.matmul(x, layer, mesh, "row", implementation="xla")
  want = pallas_kernels.nvfp4_matmul(x, unsharded(node), implementation="xla")
  want32 = np.asarray(want, np.float32)
  err = np.abs(np.asarray(got, np.float32) - want32).max()
  assert err <= 2.0**-7 * np.abs(want32).max()


@pytest.mark.parametrize(
  "routing",
  [
    {"top_k": 2},
    {
      "top_k": 3,
      "scoring": "sigmoid",
      "num_groups": 4,
      "top_groups": 2,
      "routed_scaling": 2.5,
    },
  ],
)
@pytest.mark.parametrize("tokens_sharded", [False, True])
def test_expert_parallel_moe_equals_unsharded(rng, routing, tokens_sharded):
  mesh = cpu_mesh(4, "ep")
  src = sources.experts_source(rng, 16, 128, 64)
  experts = sharding.prepare_experts(src, mesh)
  want_experts, _ = fp4jax.prepare({"experts": src})
  x = jnp.asarray(rng.standard_normal((9, 128)), jnp.bfloat16)
  logits = jnp.asarray(rng.standard_normal((9, 16)), jnp.float32)
  bias = None
  if routing.get("scoring") == "sigmoid":
    bias = jnp.asarray(rng.uniform(-0.1, 0.1, 16), jnp.float32)
  got = jax.jit(
    lambda x, logits, e: sharding.moe(
      x,
      logits,
      e,
      mesh,
      implementation="xla",
      correction_bias=bias,
      tokens_sharded=tokens_sharded,
      **routing,
    )
  )(x, logits, experts)
  assert got.shape == x.shape and got.dtype == x.dtype
  want = pallas_kernels.nvfp4_moe(
    x,
    logits,
    want_experts["experts"],
    implementation="xla",
    correction_bias=bias,
    **routing,
  )
  want32 = np.asarray(want, np.float32)
  err = np.abs(np.asarray(got, np.float32) - want32).max()
  # Partial sums of 4 devices added in float32, then rounded to bf16 once.
  assert err <= 2.0**-8 * np.abs(want32).max()


@pytest.mark.parametrize(
  "model_type, weight_layout",
  [("llama", "natural"), ("mixtral", "natural"), ("mixtral", "sm90")],
)
def test_from_pretrained_on_a_mesh_matches_one_device(
  rng, tmp_path, model_type, weight_layout
):
  from fp4jax import models
  from fp4jax.checkpoint import synthetic

  mesh = cpu_mesh(2, "tp")
  # Sizes that split: 128-row tiles per shard for column-parallel layers,
  # 64-wide scale tiles per shard for row-parallel ones, 2 experts each.
  params, hf, quant = synthetic.tiny_model(
    rng,
    model_type=model_type,
    hidden=256,
    intermediate=256,
    num_heads=4,
    num_kv_heads=4,
    head_dim=64,
    vocab=128,
  )
  # Every token to all 4 experts: the sharded model's bf16 hidden states
  # differ from one device's by partial-sum rounding, which flips a top-2
  # choice at a near tie (seed 757367179: a 17% difference). Selection
  # under sharding is checked layer by layer above, on identical inputs.
  hf["num_experts_per_tok"] = 4
  checkpoint.save_modelopt(tmp_path / "c", params, hf, quant)
  ids = jnp.asarray(rng.integers(0, 128, (2, 7)), jnp.int32)
  whole = models.from_pretrained(tmp_path / "c", progress=False)
  split = models.from_pretrained(
    tmp_path / "c", progress=False, mesh=mesh, weight_layout=weight_layout
  )
  layer = split.model.layers[0]
  proj = layer.self_attn.o_proj
  assert proj.parallel[1] == "row"
  if model_type == "mixtral":
    experts = layer.block_sparse_moe.experts
    assert experts.parallel[1] == "experts"
    # I = 256: plane-ordered gate/up rows in the sm90 layout.
    w13 = (
      experts.w13_weight_sm90_planes
      if weight_layout == "sm90"
      else (experts.w13_weight)
    )
    assert w13[...].sharding.spec[0] == "tp"
  assert proj.block_scale[...].shape[0] == 2  # one swizzle per shard
  want = np.asarray(whole(ids)[0], np.float32)
  got = np.asarray(split(ids)[0], np.float32)
  # bf16 activations; row-parallel layers add two float32 partial sums,
  # and the random model amplifies those roundings along the sequence: the
  # llama case over 60 seeds at most 1.1% of max |want|, but FP4JAX_TEST_SEED
  # =1832559886 3.0% (spread over all tokens). A wrong shard is off by O(1).
  assert np.abs(got - want).max() <= 4e-2 * np.abs(want).max()
  tokens = np.asarray(models.generate(split, ids, max_new_tokens=4))
  assert tokens.shape == (2, 11)  # prompt, then 4 cached decode steps
  np.testing.assert_array_equal(tokens[:, :7], np.asarray(ids))


def test_token_sharded_moe_gathers_and_scatters():
  # Tokens split over the expert axis: one all-gather of the tokens (and
  # one of the logits) in, one reduce-scatter out, no all-reduce.
  rng = np.random.default_rng(0)
  mesh = cpu_mesh(4, "ep")
  experts = sharding.prepare_experts(
    sources.experts_source(rng, 8, 128, 64), mesh
  )
  x = jnp.zeros((16, 128), jnp.bfloat16)
  logits = jnp.zeros((16, 8), jnp.float32)
  hlo = (
    jax.jit(
      lambda x, logits, e: sharding.moe(
        x, logits, e, mesh, top_k=2, implementation="xla", tokens_sharded=True
      )
    )
    .lower(x, logits, experts)
    .compile()
    .as_text()
  )
  assert hlo.count("all-gather-start(") + hlo.count("all-gather(") == 2
  assert "reduce-scatter(" in hlo
  assert "all-reduce(" not in hlo and "all-reduce-start(" not in hlo


@pytest.fixture
def pallas_for_sm90(monkeypatch):
  """Route the sharded ops to the Mosaic GPU kernels, lowered for sm_90.

  Mosaic GPU's interpreter cannot run inside a multi-device shard_map (its
  simulated shared memory is keyed by device and trips over itself), so the
  CPU tier lowers the sharded kernels for the H200 instead: this checks
  every shard's shapes, tiles and SMEM against the kernel; the GPU tier and
  the two-GPU run check the numbers.
  """
  from pallas_kernels import common
  from pallas_kernels.nvfp4_matmul import base as matmul_api_base
  from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu as matmul_gpu
  from pallas_kernels.nvfp4_moe import pallas_mosaic_gpu as moe_gpu

  def matmul(x, layer, *, activation="bf16", implementation=None, config=None):
    assert implementation == "pallas"
    return matmul_gpu.nvfp4_matmul(
      x,
      matmul_api_base.PreparedLinear.from_mapping(layer),
      activation=activation,
      config=config,
    )

  routed = []  # each call's routed_experts

  def experts(
    x,
    weights,
    ids,
    node,
    *,
    activation="bf16",
    routed_experts=None,
    implementation=None,
  ):
    assert implementation == "pallas"
    routed.append(routed_experts)
    return moe_gpu.experts_forward(
      x,
      weights,
      ids,
      node,
      activation=activation,
      routed_experts=routed_experts,
    )

  monkeypatch.setattr(common, "check_sm90", lambda *args, **kwargs: None)
  monkeypatch.setattr(common, "num_sms", lambda *args, **kwargs: 132)
  monkeypatch.setattr(pallas_kernels, "nvfp4_matmul", matmul)
  monkeypatch.setattr(pallas_kernels, "nvfp4_moe_experts", experts)
  return routed


def mosaic_kernels_in_lowering(fn, *args) -> int:
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return text.count("custom_call @mosaic_gpu")


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_pallas_matmul_inside_shard_map_lowers_for_sm90(
  rng, kind, activation, pallas_for_sm90
):
  mesh = cpu_mesh(4, "tp")
  layer = sharding.prepare_linear(linear_source(rng, 512, 1024), mesh, kind)
  x = jnp.zeros((3, 1024), jnp.bfloat16)
  count = mosaic_kernels_in_lowering(
    lambda x, layer: sharding.matmul(
      x, layer, mesh, kind, activation=activation, implementation="pallas"
    ),
    x,
    layer,
  )
  # W4A4 quantizes its activations in a kernel of its own first.
  assert count == (2 if activation == "nvfp4" else 1)


@pytest.mark.parametrize("tokens_sharded", [False, True])
def test_pallas_moe_inside_shard_map_lowers_for_sm90(
  rng, tokens_sharded, pallas_for_sm90
):
  mesh = cpu_mesh(2, "ep")
  experts = sharding.prepare_experts(
    sources.experts_source(rng, 4, 256, 128), mesh
  )
  x = jnp.zeros((6, 256), jnp.bfloat16)
  logits = jnp.zeros((6, 4), jnp.float32)
  count = mosaic_kernels_in_lowering(
    lambda x, logits, e: sharding.moe(
      x,
      logits,
      e,
      mesh,
      top_k=2,
      implementation="pallas",
      tokens_sharded=tokens_sharded,
    ),
    x,
    logits,
    experts,
  )
  assert count == 2  # both grouped GEMMs
  # Each device's tiles are sized for all 4 experts' routing, not its 2.
  assert pallas_for_sm90 == [4]

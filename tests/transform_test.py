"""The post-restore transform: derived leaves, removal, memory, reload."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fp4jax
import pallas_kernels
from fp4jax import transform
from fp4jax.format import sm90_layout
from fp4jax.format import swizzle
from tests import numpy_reference as ref
from tests import sources
from tests import trees
from tests.tolerance import assert_close


def linear_source(rng, n, k, *, weight_only=False):
  t = fp4jax.quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
  node = {
    "weight": t.packed,
    "weight_scale": t.block_scale,
    "weight_scale_2": t.global_scale,
  }
  if not weight_only:
    node["input_scale"] = jnp.float32(rng.uniform(1e-3, 1e-1))
  return node


def experts_source(rng, e, hidden, inter, *, equal_gate_up=True):
  return sources.experts_source(
    rng, e, hidden, inter, up_factor=1.0 if equal_gate_up else 1.5
  )


def model_source(rng, *, equal_gate_up=True):
  return {
    "model": {
      "embed_tokens": {"weight": jnp.ones((8, 64), jnp.bfloat16)},
      "layers": {
        "0": {
          "self_attn": {
            "q_proj": linear_source(rng, 64, 64),
            "o_proj": linear_source(rng, 200, 48),  # N, K/16 unaligned
          },
          "mlp": {
            "gate": {"weight": jnp.ones((4, 64), jnp.bfloat16)},
            "experts": experts_source(
              rng, 4, 64, 32, equal_gate_up=equal_gate_up
            ),
          },
        },
      },
    },
    "lm_head": {"weight": jnp.ones((8, 64), jnp.bfloat16)},
  }


def leaves_by_path(tree) -> dict[str, jax.Array]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(p.key) for p in path): v for path, v in flat}


def nbytes(x) -> int:
  return x.size * x.dtype.itemsize


def test_prepared_tree_has_no_source_leaves_and_exact_derived_leaves(rng):
  params = model_source(rng)
  prepared, report = fp4jax.prepare(params)
  names = {p.rsplit("/", 1)[-1] for p in leaves_by_path(prepared)}
  assert not names & {"weight_scale", "weight_scale_2", "input_scale"}
  assert not any(
    n.endswith(("_weight_scale", "_weight_scale_2", "_input_scale"))
    for n in names
  )

  for name in ("q_proj", "o_proj"):
    src = params["model"]["layers"]["0"]["self_attn"][name]
    out = prepared["model"]["layers"]["0"]["self_attn"][name]
    assert set(out) == {"weight", "block_scale", "alpha", "input_scale_inv"}
    assert out["weight"] is src["weight"]
    inp, ws2 = np.float32(src["input_scale"]), np.float32(src["weight_scale_2"])
    assert np.asarray(out["alpha"]) == np.float32(inp * ws2)
    assert np.asarray(out["input_scale_inv"]) == np.float32(1) / inp
    n, kb = src["weight_scale"].shape
    flat = np.asarray(out["block_scale"]).view(np.uint8).ravel()
    np.testing.assert_array_equal(
      flat[ref.swizzle_offsets(n, kb)],
      np.asarray(src["weight_scale"]).view(np.uint8),
    )
    assert out["block_scale"].shape == (-(-n // 128) * 128, -(-kb // 4) * 4)

  # Untouched leaves pass through as the same arrays.
  assert prepared["lm_head"]["weight"] is params["lm_head"]["weight"]

  removed = leaves_by_path(params)
  want_freed = sum(
    nbytes(v)
    for p, v in removed.items()
    if p.endswith(("weight_scale", "weight_scale_2", "input_scale"))
  )
  assert report.freed_bytes == want_freed
  created = leaves_by_path(prepared)
  want_created = sum(
    nbytes(v)
    for p, v in created.items()
    if p.endswith(("block_scale", "alpha", "input_scale_inv"))
  )
  assert report.created_bytes == want_created
  assert "block_scale" in report.table()


def test_experts_derived_per_expert(rng):
  params = {"experts": experts_source(rng, 4, 64, 32)}
  src = params["experts"]
  out, _ = fp4jax.prepare(params)
  out = out["experts"]
  assert "w13_alpha_up" not in out
  inp13 = np.asarray(src["w13_input_scale"])[:, 0]
  np.testing.assert_array_equal(
    np.asarray(out["w13_alpha"]),
    inp13 * np.asarray(src["w13_weight_scale_2"])[:, 0],
  )
  np.testing.assert_array_equal(
    np.asarray(out["w13_input_scale_inv"]), np.float32(1) / inp13
  )
  np.testing.assert_array_equal(
    np.asarray(out["w2_alpha"]),
    np.asarray(src["w2_input_scale"]) * np.asarray(src["w2_weight_scale_2"]),
  )
  e, n, kb = src["w2_weight_scale"].shape
  offsets = ref.swizzle_offsets(n, kb)
  for i in range(e):
    flat = np.asarray(out["w2_block_scale"][i]).view(np.uint8).ravel()
    np.testing.assert_array_equal(
      flat[offsets], np.asarray(src["w2_weight_scale"][i]).view(np.uint8)
    )


def test_unequal_gate_up_scales_get_alpha_up(rng):
  params = {"experts": experts_source(rng, 3, 32, 16, equal_gate_up=False)}
  src = params["experts"]
  out, report = fp4jax.prepare(params)
  inp = np.asarray(src["w13_input_scale"])[:, 0]
  np.testing.assert_array_equal(
    np.asarray(out["experts"]["w13_alpha_up"]),
    inp * np.asarray(src["w13_weight_scale_2"])[:, 1],
  )
  assert any(r.path.endswith("w13_alpha_up") for r in report.created)


def test_unequal_gate_up_input_scales_use_max_and_warn(rng):
  params = {"experts": experts_source(rng, 3, 32, 16)}
  inp = params["experts"]["w13_input_scale"]
  params["experts"]["w13_input_scale"] = inp.at[1, 1].multiply(2.0)
  with pytest.warns(UserWarning, match="input_scale differ"):
    out, _ = fp4jax.prepare(params)
  want = np.float32(1) / np.asarray(inp)[1, 0] / np.float32(2)
  assert np.asarray(out["experts"]["w13_input_scale_inv"])[1] == want


def test_weight_only_layer(rng):
  src = linear_source(rng, 32, 64, weight_only=True)
  out, _ = fp4jax.prepare({"l": src})
  assert set(out["l"]) == {"weight", "block_scale", "alpha"}
  assert np.asarray(out["l"]["alpha"]) == np.asarray(src["weight_scale_2"])


def test_prepare_is_idempotent_and_pure(rng):
  params = model_source(rng)
  before = {p: v for p, v in leaves_by_path(params).items()}
  once, _ = fp4jax.prepare(params)
  assert leaves_by_path(params).keys() == before.keys()  # input not mutated
  twice, report = fp4jax.prepare(once)
  assert report.removed == () and report.created == ()
  assert leaves_by_path(twice) == leaves_by_path(once)


def test_reload_into_prepared_tree_equals_fresh_load(rng):
  # A weight update restores the full source set for a layer into a tree
  # that still holds derived leaves from the old weights: prepare must
  # rebuild from the new sources, not keep the stale alpha or block_scale.
  old = model_source(rng)
  new = model_source(rng)
  prepared_old, _ = fp4jax.prepare(old)
  mixed = jax.tree.map(lambda x: x, prepared_old)
  for name, node in new["model"]["layers"]["0"]["self_attn"].items():
    mixed["model"]["layers"]["0"]["self_attn"][name].update(node)
  mixed["model"]["layers"]["0"]["mlp"]["experts"].update(
    new["model"]["layers"]["0"]["mlp"]["experts"]
  )
  reloaded, report = fp4jax.prepare(mixed)
  fresh, _ = fp4jax.prepare(new)
  trees.assert_bit_equal(fresh, reloaded)
  assert any(r.path.endswith("/alpha") for r in report.removed)


def test_sm90_weight_layout_replaces_weight(rng, monkeypatch):
  # Unpadded experts (the fixture's I is no multiple of 128), so that the
  # sm90 leaves hold the same bytes as the natural ones; padding is
  # test_sm90_pads_intermediate_to_whole_tiles's.
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", False)
  params = model_source(rng)
  natural, _ = fp4jax.prepare(params)
  sm90, report = fp4jax.prepare(params, weight_layout="sm90")
  layers = ("model", "layers", "0")
  q_nat = natural[layers[0]][layers[1]][layers[2]]["self_attn"]["q_proj"]
  q = sm90[layers[0]][layers[1]][layers[2]]["self_attn"]["q_proj"]
  assert "weight" not in q
  np.testing.assert_array_equal(
    sm90_layout.untwiddle(q["weight_sm90"]), q_nat["weight"]
  )
  experts = sm90[layers[0]][layers[1]][layers[2]]["mlp"]["experts"]
  for prefix in transform.MOE_PREFIXES:
    assert prefix + "weight" not in experts
    assert experts[prefix + "weight_sm90"].dtype == jnp.uint8
  # The natural weights are reported removed and the twiddled ones created
  # (same bytes), next to the scale leaves.
  removed = {r.path for r in report.removed}
  assert "model/layers/0/self_attn/q_proj/weight" in removed
  assert report.created_bytes - report.freed_bytes == (
    fp4jax.prepare(params)[1].created_bytes
    - fp4jax.prepare(params)[1].freed_bytes
  )
  # Prepared once, it passes through; a reload of sources re-derives it.
  again, again_report = fp4jax.prepare(sm90, weight_layout="sm90")
  assert again_report.removed == () and again_report.created == ()
  trees.assert_bit_equal(again, sm90)


def test_row_pairs_layout_for_dense_layers_sm90_for_the_rest(rng):
  """ "sm90_row_pairs": dense layers with N % 16 == 0 and K % 32 == 0 get
  the row-pair leaf (the natural bytes regrouped, then twiddled), other
  dense layers "sm90", experts "sm90"; re-running passes through, and a
  reload of sources over it re-derives the same tree."""
  params = {
    "fits": linear_source(rng, 48, 96),
    "odd_rows": linear_source(rng, 40, 96),
    "odd_k": linear_source(rng, 48, 80),
    "experts": experts_source(rng, 3, 64, 128),
  }
  natural, _ = fp4jax.prepare(params)
  prepared, report = fp4jax.prepare(params, weight_layout="sm90_row_pairs")
  sm90, _ = fp4jax.prepare(params, weight_layout="sm90")
  fits = prepared["fits"]
  assert "weight" not in fits and "weight_sm90" not in fits
  np.testing.assert_array_equal(
    sm90_layout.from_row_pairs(
      sm90_layout.untwiddle(fits["weight_sm90_row_pairs"])
    ),
    natural["fits"]["weight"],
  )
  for name in ("odd_rows", "odd_k", "experts"):
    trees.assert_bit_equal(prepared[name], sm90[name])
  assert "fits/weight" in {r.path for r in report.removed}
  again, again_report = fp4jax.prepare(prepared, weight_layout="sm90_row_pairs")
  assert again_report.removed == () and again_report.created == ()
  reloaded, reload_report = fp4jax.prepare(
    {"fits": {**fits, **params["fits"]}}, weight_layout="sm90_row_pairs"
  )
  trees.assert_bit_equal(reloaded["fits"], fits)
  assert "fits/weight_sm90_row_pairs" in {r.path for r in reload_report.removed}
  # Every implementation reads the leaf: the XLA reference agrees bit for
  # bit with the natural layer.
  x = jnp.asarray(rng.standard_normal((5, 96)), jnp.bfloat16)
  np.testing.assert_array_equal(
    np.asarray(pallas_kernels.nvfp4_matmul(x, fits, implementation="xla")),
    np.asarray(
      pallas_kernels.nvfp4_matmul(x, natural["fits"], implementation="xla")
    ),
  )


def test_sm90_gate_up_rows_in_plane_order_when_whole_tiles(rng, monkeypatch):
  """I % 128 == 0: w13's halves (weight and block scales) in plane order;
  w2, and other I when not padded to whole tiles, keep the plain sm90
  leaf."""
  src = experts_source(rng, 3, 64, 256)
  prepared, _ = fp4jax.prepare({"experts": src}, weight_layout="sm90")
  node = prepared["experts"]
  assert "w13_weight_sm90" not in node and "w2_weight_sm90" in node

  def halves_in_plane_order(x):
    halves = np.asarray(x).reshape(3, 2, 256, -1)
    return sm90_layout.to_plane_rows(halves, axis=2).reshape(x.shape)

  np.testing.assert_array_equal(
    sm90_layout.untwiddle(node["w13_weight_sm90_planes"]),
    halves_in_plane_order(src["w13_weight"]),
  )
  planes_scale = halves_in_plane_order(
    np.asarray(src["w13_weight_scale"]).view(np.uint8)
  ).view(jnp.float8_e4m3fn)
  np.testing.assert_array_equal(
    np.asarray(node["w13_block_scale"]).view(np.uint8),
    np.asarray(swizzle.swizzle_block_scale(planes_scale)).view(np.uint8),
  )
  # A re-run passes through; a reload of the sources re-derives the same.
  again, report = fp4jax.prepare(prepared, weight_layout="sm90")
  assert report.removed == () and report.created == ()
  reloaded, _ = fp4jax.prepare(
    {"experts": {**node, **src}}, weight_layout="sm90"
  )
  trees.assert_bit_equal(reloaded, prepared)
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", False)
  small, _ = fp4jax.prepare(
    {"experts": experts_source(rng, 3, 64, 192)}, weight_layout="sm90"
  )
  assert "w13_weight_sm90" in small["experts"]


@pytest.mark.parametrize("activation", ["bf16", "nvfp4"])
def test_sm90_pads_intermediate_to_whole_tiles(rng, monkeypatch, activation):
  """PAD_INTERMEDIATE_TO_TILES: I = 192 is stored as 256 (zero rows after
  each w13 half, zero K columns of w2), w13 then in plane order; the MoE's
  outputs do not change."""
  monkeypatch.setattr(transform, "PAD_INTERMEDIATE_TO_TILES", True)
  src = experts_source(rng, 3, 64, 192)
  prepared, report = fp4jax.prepare({"experts": src}, weight_layout="sm90")
  node = prepared["experts"]
  assert node["w13_weight_sm90_planes"].shape == (3, 512, 32)
  assert node["w2_weight_sm90"].shape == (3, 64, 128)
  rows = sm90_layout.untwiddle(node["w13_weight_sm90_planes"])
  halves = np.asarray(rows).reshape(3, 2, 256, 32)
  natural = sm90_layout.from_plane_rows(halves, axis=2)
  np.testing.assert_array_equal(
    natural[:, :, :192].reshape(3, 384, 32), src["w13_weight"]
  )
  assert not natural[:, :, 192:].any()
  w2 = np.asarray(sm90_layout.untwiddle(node["w2_weight_sm90"]))
  np.testing.assert_array_equal(w2[..., :96], src["w2_weight"])
  assert not w2[..., 96:].any()
  # Same outputs as the unpadded natural layout (the reference, up to
  # float32 summation order: one bf16 ulp, and 2**-16 of the largest output
  # where terms cancel).
  plain, plain_report = fp4jax.prepare({"experts": src})
  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
  logits = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  moe = functools.partial(
    pallas_kernels.nvfp4_moe,
    x,
    logits,
    top_k=2,
    activation=activation,
    implementation="xla",
  )
  got = np.asarray(moe(node), np.float32)
  want = np.asarray(moe(plain["experts"]), np.float32)
  assert np.all(np.isfinite(want))
  assert_close(got, want, rtol=2.0**-7, floor=2.0**-9)
  # A re-run passes through; a reload of the sources re-derives the same.
  again, again_report = fp4jax.prepare(prepared, weight_layout="sm90")
  assert again_report.removed == () and again_report.created == ()
  reloaded, _ = fp4jax.prepare(
    {"experts": {**node, **src}}, weight_layout="sm90"
  )
  trees.assert_bit_equal(reloaded, prepared)
  # The padding is memory the report counts.
  assert report.created_bytes > plain_report.created_bytes


def test_sm90_reload_into_prepared_tree_equals_fresh_load(rng):
  new = model_source(rng)
  mixed, _ = fp4jax.prepare(model_source(rng), weight_layout="sm90")
  attn = new["model"]["layers"]["0"]["self_attn"]
  for name, node in attn.items():
    mixed["model"]["layers"]["0"]["self_attn"][name].update(node)
  mixed["model"]["layers"]["0"]["mlp"]["experts"].update(
    new["model"]["layers"]["0"]["mlp"]["experts"]
  )
  reloaded, _ = fp4jax.prepare(mixed, weight_layout="sm90")
  fresh, _ = fp4jax.prepare(new, weight_layout="sm90")
  trees.assert_bit_equal(fresh, reloaded)


def test_unknown_weight_layout_is_rejected(rng):
  with pytest.raises(ValueError, match="weight_layout"):
    fp4jax.prepare(model_source(rng), weight_layout="sm100")


def live_bytes() -> int:
  return sum(nbytes(a) for a in jax.live_arrays() if not a.is_deleted())


def test_donate_frees_exactly_the_report(rng):
  params = model_source(rng)
  sources = [
    v
    for p, v in leaves_by_path(params).items()
    if p.endswith(("weight_scale", "weight_scale_2", "input_scale"))
  ]
  jax.block_until_ready(params)
  before = live_bytes()
  prepared, report = fp4jax.prepare(params, donate=True)
  jax.block_until_ready(prepared)
  after = live_bytes()
  assert all(s.is_deleted() for s in sources)
  assert after == before - report.freed_bytes + report.created_bytes
  assert report.freed_bytes > 0


def test_hundred_reload_cycles_do_not_grow_memory(rng):
  host = jax.tree.map(np.asarray, model_source(rng))
  fresh, _ = fp4jax.prepare(jax.tree.map(jnp.asarray, host))
  del fresh
  baseline = None
  for cycle in range(100):
    params = jax.tree.map(jnp.asarray, host)  # "restore" from disk
    prepared, _ = fp4jax.prepare(params, donate=True)
    del params
    jax.block_until_ready(prepared)
    used = live_bytes()
    baseline = used if baseline is None else baseline
    assert used == baseline, f"cycle {cycle}: {used} != {baseline}"
    del prepared


@pytest.mark.parametrize(
  "edit, match",
  [
    (lambda n: n.pop("weight_scale_2"), "missing source leaves"),
    (lambda n: n.pop("weight"), "missing source leaves"),
    (lambda n: n.update(weight=n["weight"].astype(jnp.int8)), "uint8"),
    (lambda n: n.update(weight_scale=n["weight_scale"][:, :1]), "disagree"),
    (lambda n: n.update(input_scale=jnp.float32(jnp.nan)), "finite"),
    (lambda n: n.update(weight_scale_2=jnp.float32(0)), "finite and > 0"),
    (lambda n: n.update(input_scale=jnp.float32(jnp.inf)), "finite"),
    (
      lambda n: n.update(weight_scale=n["weight_scale"].astype(jnp.float32)),
      "float8_e4m3fn",
    ),
  ],
)
def test_bad_source_leaves_name_the_path(rng, edit, match):
  node = linear_source(rng, 32, 64)
  edit(node)
  with pytest.raises(fp4jax.TransformError, match=match) as info:
    fp4jax.prepare({"model": {"layers": {"3": {"q_proj": node}}}})
  assert "model/layers/3/q_proj" in str(info.value)


def test_bad_experts_shapes_name_the_path(rng):
  node = experts_source(rng, 2, 32, 16)
  node["w13_weight_scale_2"] = node["w13_weight_scale_2"][:, 0]
  with pytest.raises(fp4jax.TransformError, match="mlp/experts"):
    fp4jax.prepare({"mlp": {"experts": node}})


def test_report_totals(rng):
  _, report = transform.prepare({"l": linear_source(rng, 16, 32)})
  kinds = report.by_kind()
  assert kinds["weight_scale"] == (1, 16 * 2, 0)
  assert kinds["block_scale"] == (1, 0, 128 * 4)
  assert report.freed_bytes == 16 * 2 + 4 + 4

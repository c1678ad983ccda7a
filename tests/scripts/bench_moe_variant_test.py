"""The MoE benchmark under a profile_moe.py variant."""

import json

import pytest

from pallas_kernels.nvfp4_moe import config as moe_config
from scripts import bench_moe_variant
from tests.scripts.profile_moe_test import profile_moe  # noqa: F401


def test_prefixes_are_checked_before_any_work():
  assert bench_moe_variant.prefixes_of("none") == set()
  assert bench_moe_variant.prefixes_of("g2pair-g2x2") == {"g2pair", "g2x2"}
  with pytest.raises(ValueError, match="unknown variant or prefix"):
    bench_moe_variant.prefixes_of("g2bogus")


def test_out_is_required():
  assert bench_moe_variant.out_path(["--ci", "--out", "a.json"]) == "a.json"
  assert bench_moe_variant.out_path(["--out=b.json"]) == "b.json"
  with pytest.raises(SystemExit, match="needs --out"):
    bench_moe_variant.out_path(["--ci", "--out"])


def test_records_the_variant(tmp_path, monkeypatch, profile_moe):  # noqa: F811
  monkeypatch.setattr(moe_config, "configs_for", moe_config.configs_for)
  out = tmp_path / "moe.json"
  bench_moe_variant.main(["g2x2", "--ci", "--out", str(out)])
  results = json.loads(out.read_text())
  assert results["meta"]["variant"] == "g2x2"
  assert results["rows"]

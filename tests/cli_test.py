"""The fp4jax command on the ModelOpt fixtures."""

import pathlib

import numpy as np
import pytest

from fp4jax import cli
from fp4jax.checkpoint import safetensors_io

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "modelopt" / "tiny_llama"


def test_inspect(capsys):
  cli.main(["inspect", str(LLAMA)])
  out = capsys.readouterr().out
  assert "NVFP4, group 16" in out
  assert "excluded modules: lm_head, model.embed_tokens" in out
  assert "model.layers.*.self_attn.q_proj.weight_scale " in out
  assert "F8_E4M3 [128, 8]" in out
  cli.main(["inspect", str(LLAMA), "--tensors"])
  assert "model.layers.1.mlp.down_proj.weight " in capsys.readouterr().out


def test_memory(capsys):
  cli.main(["memory", str(LLAMA), "--quiet"])
  out = capsys.readouterr().out
  assert "block_scale" in out and "before prepare" in out
  assert "weight_sm90" not in out
  cli.main(["memory", str(LLAMA), "--quiet", "--weight-layout", "sm90"])
  assert "weight_sm90" in capsys.readouterr().out
  cli.main(
    ["memory", str(LLAMA), "--quiet", "--weight-layout", "sm90_row_pairs"]
  )
  assert "weight_sm90_row_pairs" in capsys.readouterr().out


def test_convert_then_generate_from_the_orbax_cache(tmp_path, capsys):
  cli.main(["convert", str(LLAMA), "--orbax", str(tmp_path / "o")])
  assert (tmp_path / "o").is_dir()
  ref = safetensors_io.open_tensors(LLAMA / "reference.safetensors")
  want = np.asarray(ref["greedy_tokens"])[0]
  prompt = [str(t) for t in want[:8]]
  capsys.readouterr()
  cli.main(
    [
      "generate",
      str(LLAMA),
      "--prompt-ids",
      *prompt,
      "--max-new-tokens",
      "8",
      "--orbax-cache",
      str(tmp_path / "o"),
    ]
  )
  got = [int(t) for t in capsys.readouterr().out.split()]
  # bf16 compute here, so only the first tokens are compared with the f32
  # transformers run; the full match is tested in float32 in tests/models.
  assert got[:9] == want[:9].tolist()
  # The Hopper weight layouts hold the same weights: the same tokens.
  for layout in ("sm90", "sm90_row_pairs"):
    cli.main(
      ["generate", str(LLAMA), "--prompt-ids", *prompt, "--max-new-tokens"]
      + ["8", "--weight-layout", layout]
    )
    assert [int(t) for t in capsys.readouterr().out.split()] == got, layout


def test_bad_path_is_a_clear_error(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["inspect", "/no/such/checkpoint"])
  assert info.value.code == 2
  assert "not a checkpoint directory" in capsys.readouterr().err

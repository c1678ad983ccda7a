"""Generate the NVIDIA ModelOpt NVFP4 test fixtures in tests/fixtures/modelopt/.

Run ONCE, by hand, outside CI. The fixtures are committed; tests never import
torch or modelopt. The script needs its own Python 3.11 venv with a CPU torch
(no GPU is needed or used):

  python3.11 -m venv /tmp/envs/v11
  /tmp/envs/v11/bin/pip install torch==2.13.0 \\
      --index-url https://download.pytorch.org/whl/cpu   # CPU wheel, never CUDA
  /tmp/envs/v11/bin/pip install nvidia-modelopt==0.47.0 'transformers<5.15' \\
      safetensors accelerate requests
  # (modelopt 0.47 imports `requests` but does not declare it)
  cd <repo root>
  /tmp/envs/v11/bin/python scripts/make_modelopt_fixtures.py

The fixtures were made with torch 2.13.0+cpu, nvidia-modelopt 0.47.0,
transformers 5.14.1, safetensors 0.8.0, accelerate 1.15.0.

What it does, for each of a tiny LlamaForCausalLM and a tiny
Qwen3MoeForCausalLM (bf16, seeded random weights):

0. Random init is transformers' (std 0.02), then norm weights 1 + 0.1*randn,
   MoE router weights 0.5*randn (transformers zero-initialises them) and
   lm_head 0.15*randn (logits of std ~1.7, so greedy margins are not tiny).
1. Plants hard cases in some linear weights (see `_plant_*`): an outlier row
   (x100), an all-zero 16-element block, blocks of tiny values whose E4M3 block
   scale is subnormal or hits the 2**-9 clamp, an all-zero row, and layers
   whose per-tensor amax is 2688 * 2**-14, so weight_scale_2 == 2**-14 exactly
   and planted values sit exactly on the E2M1 rounding ties
   (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 times the block scale), including
   small negatives that round to code 8 (-0).
2. Quantizes with `mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)`.
   This works on CPU as is: ModelOpt's max calibration
   (`model_calib.max_calibrate`) collects statistics with quantization
   disabled (`enable_stats_collection` calls `disable_quant()`), so the CUDA
   fake-quant kernels never run. Weight amax comes from `weight_only_quantize`
   (max|W| over the bf16 weight, for every expert too); input amax comes from
   the bf16 calibration forward over a few seeded random token batches. The
   Qwen3-MoE experts (transformers 5 fused `Qwen3MoeExperts`, wrapped by
   ModelOpt's `_QuantFusedExperts`) have ONE input quantizer per projection
   type shared by all experts of a layer, so every expert gets an input_scale
   even if no token was routed to it. We still check that every expert saw
   tokens during calibration and print the routing counts.
3. Exports with `modelopt.torch.export.export_hf_checkpoint` (unified HF
   export; runs on CPU, its dummy forward runs with all quantizers disabled)
   to tests/fixtures/modelopt/<name>/: config.json (with quantization_config),
   hf_quant_config.json, model.safetensors, generation_config.json.
4. Writes <name>/reference.safetensors (plain safetensors, no pickle) with:
   - `<m>.original_weight` (bf16 [N, K]): the bf16 weight ModelOpt quantized,
     for every NVFP4 linear `<m>` of the export (for MoE experts, the slice
     of the fused gate_up_proj / down_proj parameter that export splits out).
   - `<m>.dequantized` (float32 [N, K]): ModelOpt's own dequantization of the
     exported `<m>.weight`: `NVFP4QTensor(shape, float32, weight).dequantize(
     dtype=float32, scale=<m>.weight_scale, double_scale=<m>.weight_scale_2,
     block_sizes={-1: 16})`, i.e. `e2m1[code] * (f32(weight_scale) *
     weight_scale_2)` (the scale product is rounded to f32 first; it
     INCLUDES weight_scale_2).
   - `input_ids` (int64 [2, 16]): fixed seeded tokens.
   - `logits` (float32 [2, 16, vocab]): transformers' forward in float32,
     attn_implementation="eager", of the same architecture, where every NVFP4
     linear weight is replaced by `<m>.dequantized` (for MoE the per-expert
     dequantized gate/up/down are stacked back into the fused
     gate_up_proj [E, 2I, H] / down_proj [E, H, I]) and every other weight
     (embeddings, norms, lm_head, MoE router) is the bf16 original cast to
     float32. Activations are NOT quantized: this is the W4A16-style
     reference ("weights as ModelOpt dequantizes them, math in f32").
   - `greedy_tokens` (int64 [1, 16]): `generate(input_ids[:1, :8],
     do_sample=False, max_new_tokens=8)` with the same float32 model, an
     all-ones attention_mask (generate would otherwise mask prompt tokens
     equal to pad_token_id) and eos disabled (always 8 new tokens): the 8
     prompt tokens followed by the 8 generated ones. Checked against the
     argmax of a no-cache forward.

Everything is seeded; the output is deterministic on a given machine (torch
CPU kernels may differ across CPU types in the last bits of the bf16
calibration activations, which can move an input_scale by an ulp).
"""

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT_ROOT = REPO / "tests" / "fixtures" / "modelopt"

SEED = 0
BLOCK = 16
# weight_scale_2 = amax / 2688; amax = 2688 * 2**-14 gives weight_scale_2 = 2**-14.
TIE_WSC2_LOG2 = -14
TIE_AMAX = 2688.0 * 2.0**TIE_WSC2_LOG2  # 0.1640625, exact in bf16


def _llama_config():
  from transformers import LlamaConfig

  return LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    dtype="bfloat16",
  )


def _qwen3_moe_config():
  from transformers import Qwen3MoeConfig

  return Qwen3MoeConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,  # unused (no dense MLP layers)
    moe_intermediate_size=64,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    dtype="bfloat16",
  )


# --------------------------------------------------------------------------
# Hard cases. All edits are on [N, K] bf16 weight views (K = contraction dim,
# blocks of 16 along K).


def _plant_outlier_row(w, row):
  w[row] = w[row] * 100.0


def _plant_zero_block(w, row, blk):
  w[row, blk * BLOCK : (blk + 1) * BLOCK] = 0.0


def _plant_zero_row(w, row):
  w[row] = 0.0


def _plant_tiny_blocks(w, row, gen):
  """Blocks whose amax is so small relative to the tensor amax that the E4M3
  block scale is subnormal (2**-9 .. 2**-6) or below 2**-9 (clamped).

  sf_hp = blockamax / (6 * amax / 2688) = 448 * blockamax / amax.
  """
  amax = w.abs().max().float().item()
  # target sf_hp values: clamp region (< 2**-9), several subnormals, 2**-6.
  targets = [
    2.0**-11,
    2.0**-9 * 0.7,
    2.0**-9,
    2.0**-9 * 3,
    2.0**-9 * 5.5,
    2.0**-7,
    2.0**-6,
  ]
  n_blocks = w.shape[1] // BLOCK
  for i, t in enumerate(targets):
    bamax = t * amax / 448.0
    vals = torch.randn(BLOCK, generator=gen) * 0.5
    vals = vals / vals.abs().max() * bamax
    r, b = row + i // n_blocks, i % n_blocks
    w[r, b * BLOCK : (b + 1) * BLOCK] = vals.to(w.dtype)


def _plant_ties(w, gen):
  """Make the tensor amax 2688 * 2**-14 (weight_scale_2 = 2**-14 exactly) and
  fill some blocks so that W / (sf * wsc2) lands exactly on E2M1 ties.

  Row 0: element 0 = +TIE_AMAX (block scale 448, the E4M3 max).
  Rows 1..: block b gets block scale s (an E4M3 value): element 0 is 6*s*u
  (u = 2**-14, sets the block amax, so sf == s), then the ties
  {0.25,0.75,1.25,1.75,2.5,3.5,5} * s*u with both signs, then a
  tiny negative (-0.0625 * s*u: rounds to -0 -> code 8).
  """
  # Shrink the random part so nothing else exceeds TIE_AMAX.
  scale = 0.5 * TIE_AMAX / w.abs().max().float().item()
  if scale < 1.0:
    w.mul_(scale)
  u = 2.0**TIE_WSC2_LOG2
  w[0, 0] = TIE_AMAX
  ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
  # E4M3 block scales: normals, the subnormal range, and 2**-9.
  scales = [
    1.0,
    1.5,
    0.875,
    3.25,
    40.0,
    2.0**-7,
    2.0**-9 * 3,
    2.0**-9,
    2.0**-6 * 1.125,
  ]
  n_blocks = w.shape[1] // BLOCK
  for i, s in enumerate(scales):
    row = 1 + i // n_blocks
    b = i % n_blocks
    vals = [6.0] + ties + [-t for t in ties] + [-0.0625]
    vals = torch.tensor(vals[:BLOCK], dtype=torch.float32) * (s * u)
    assert vals.numel() == BLOCK
    vals_bf16 = vals.to(torch.bfloat16)
    assert torch.equal(vals_bf16.float(), vals), (s, vals)
    w[row, b * BLOCK : (b + 1) * BLOCK] = vals_bf16
  # One more row: ties at the largest scale that keeps 6*s*u <= TIE_AMAX (s=448)
  s = 448.0
  row = 1 + len(scales) // n_blocks + 1
  vals = torch.tensor([-6.0, 5.0, -3.5, 2.5, 1.75, -1.25, 0.75, 0.25] * 2) * (
    s * u
  )
  w[row, :BLOCK] = vals.to(torch.bfloat16)
  # Also a row of random values snapped so every element is an exact tie
  # or grid value at scale s=2.0.
  s = 2.0
  grid = torch.tensor(
    [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0]
  )
  idx = torch.randint(0, grid.numel(), (w.shape[1],), generator=gen)
  sign = torch.where(torch.rand(w.shape[1], generator=gen) < 0.5, -1.0, 1.0)
  vals = grid[idx] * sign * (s * u)
  vals[0::BLOCK] = 6.0 * s * u  # every block's amax -> sf == 2.0
  w[row + 1] = vals.to(torch.bfloat16)


def plant_llama(model, gen):
  L = model.model.layers
  with torch.no_grad():
    # q_proj outlier row: q/k/v are equalised to the max amax at export, so
    # k and v inherit q's big weight_scale_2.
    _plant_outlier_row(L[0].self_attn.q_proj.weight, row=5)
    _plant_zero_block(L[0].mlp.gate_proj.weight, row=3, blk=2)
    _plant_zero_block(L[0].mlp.gate_proj.weight, row=200, blk=7)
    _plant_tiny_blocks(L[0].self_attn.o_proj.weight, row=7, gen=gen)
    _plant_zero_row(L[1].mlp.down_proj.weight, row=11)
    _plant_ties(L[1].self_attn.o_proj.weight, gen)
    # up_proj outlier: gate/up equalised at export
    _plant_outlier_row(L[1].mlp.up_proj.weight, row=100)
    _plant_tiny_blocks(L[1].mlp.gate_proj.weight, row=9, gen=gen)


def plant_qwen3_moe(model, gen):
  L = model.model.layers
  I = model.config.moe_intermediate_size  # noqa: E741
  with torch.no_grad():
    ex0 = L[0].mlp.experts
    # expert 5 gate rows: outlier (gate and up share one weight quantizer)
    _plant_outlier_row(ex0.gate_up_proj.data[5, :I], row=4)
    # expert 2 up_proj: all-zero row; expert 1 gate_proj: zero block
    _plant_zero_row(ex0.gate_up_proj.data[2, I:], row=6)
    _plant_zero_block(ex0.gate_up_proj.data[1, :I], row=0, blk=3)
    # expert 3 down_proj: exact ties (its own per-expert weight quantizer)
    _plant_ties(ex0.down_proj.data[3], gen)
    # expert 6 down_proj: tiny blocks
    _plant_tiny_blocks(ex0.down_proj.data[6], row=2, gen=gen)
    ex1 = L[1].mlp.experts
    _plant_ties(
      ex1.gate_up_proj.data[0, I:], gen
    )  # up half only; gate max < up max
    _plant_zero_row(ex1.down_proj.data[7], row=0)
    _plant_outlier_row(L[0].self_attn.k_proj.weight, row=1)
    _plant_tiny_blocks(L[1].self_attn.o_proj.weight, row=3, gen=gen)
    _plant_ties(L[1].self_attn.v_proj.weight, gen)  # q/k equalisation may win


# --------------------------------------------------------------------------


def _randomize_norms(model, gen):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def _calib_batches(vocab, gen, n=4, bsz=4, seqlen=32):
  return [
    torch.randint(0, vocab, (bsz, seqlen), generator=gen) for _ in range(n)
  ]


def _build(kind):
  from transformers import LlamaForCausalLM
  from transformers import Qwen3MoeForCausalLM

  torch.manual_seed(SEED)
  if kind == "llama":
    cfg, cls = _llama_config(), LlamaForCausalLM
  else:
    cfg, cls = _qwen3_moe_config(), Qwen3MoeForCausalLM
  cfg._attn_implementation = "eager"
  # A config built in code has architectures=None; checkpoints from the Hub
  # have it, and ModelOpt's export (is_multimodal_model) iterates over it.
  cfg.architectures = [cls.__name__]
  model = cls(cfg).to(torch.bfloat16).eval()
  gen = torch.Generator().manual_seed(SEED + 1)
  # MoE routers are zero-initialised by __init__; make sure they are random.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("mlp.gate.weight"):
        p.copy_((0.5 * torch.randn(p.shape, generator=gen)).to(p.dtype))
  _randomize_norms(model, gen)
  # lm_head std 0.15 instead of 0.02: logits of std ~2 (like a real LM), so
  # the greedy fixture's top1-top2 margins are not razor thin.
  with torch.no_grad():
    w = model.lm_head.weight
    w.copy_((0.15 * torch.randn(w.shape, generator=gen)).to(w.dtype))
  if kind == "llama":
    plant_llama(model, gen)
  else:
    plant_qwen3_moe(model, gen)
  return model, cls


def _route_counts(model, batches):
  """Tokens routed to each expert, per MoE layer, for the calibration data."""
  counts = {}
  hooks = []
  for name, mod in model.named_modules():
    if type(mod).__name__.endswith("TopKRouter"):

      def hook(m, inp, out, name=name):
        idx = out[2].reshape(-1)
        c = torch.bincount(idx, minlength=m.num_experts)
        counts[name] = counts.get(name, 0) + c

      hooks.append(mod.register_forward_hook(hook))
  with torch.no_grad():
    for b in batches:
      model(b)
  for h in hooks:
    h.remove()
  return {k: v.tolist() for k, v in counts.items()}


def _original_linear_weights(model):
  """{export module name: bf16 [N, K] weight}, in export naming."""
  out = {}
  for name, mod in model.named_modules():
    if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
      out[name] = mod.weight.detach().clone()
    if type(mod).__name__.endswith("Experts") and hasattr(mod, "gate_up_proj"):
      I = mod.gate_up_proj.shape[1] // 2  # noqa: E741
      for e in range(mod.gate_up_proj.shape[0]):
        out[f"{name}.{e}.gate_proj"] = mod.gate_up_proj[e, :I].detach().clone()
        out[f"{name}.{e}.up_proj"] = mod.gate_up_proj[e, I:].detach().clone()
        out[f"{name}.{e}.down_proj"] = mod.down_proj[e].detach().clone()
  return out


def _modelopt_dequantize(packed, scale, scale_2):
  from modelopt.torch.quantization.qtensor import NVFP4QTensor

  n, kh = packed.shape
  qt = NVFP4QTensor(torch.Size([n, kh * 2]), torch.float32, packed)
  return qt.dequantize(
    dtype=torch.float32,
    scale=scale,
    double_scale=scale_2,
    block_sizes={-1: BLOCK},
  )


def _reference_model(cls, config, orig_sd, deq):
  """float32 model: dequantized NVFP4 weights, everything else bf16 -> f32."""
  ref = cls(config).eval()
  ref.load_state_dict({k: v.float() for k, v in orig_sd.items()}, strict=True)
  ref = ref.float()
  with torch.no_grad():
    for name, w in deq.items():
      parts = name.split(".")
      if (
        parts[-1] in ("gate_proj", "up_proj", "down_proj")
        and parts[-3] == "experts"
      ):
        experts = ref.get_submodule(".".join(parts[:-2]))
        e = int(parts[-2])
        I = experts.gate_up_proj.shape[1] // 2  # noqa: E741
        if parts[-1] == "gate_proj":
          experts.gate_up_proj[e, :I] = w
        elif parts[-1] == "up_proj":
          experts.gate_up_proj[e, I:] = w
        else:
          experts.down_proj[e] = w
      else:
        lin = ref.get_submodule(name)
        assert lin.weight.shape == w.shape, (name, lin.weight.shape, w.shape)
        lin.weight.copy_(w)
  return ref


def make(kind, out_dir):
  import modelopt
  import modelopt.torch.quantization as mtq
  import transformers
  from modelopt.torch.export import export_hf_checkpoint
  from safetensors.torch import load_file
  from safetensors.torch import save_file
  from transformers import GenerationConfig

  print(f"== {kind} -> {out_dir}")
  model, cls = _build(kind)
  config = model.config
  orig_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  orig_lin = _original_linear_weights(model)

  gen = torch.Generator().manual_seed(SEED + 2)
  batches = _calib_batches(config.vocab_size, gen)
  if kind == "qwen3_moe":
    counts = _route_counts(model, batches)
    print("calibration routing counts per expert:", json.dumps(counts))
    for name, c in counts.items():
      assert min(c) > 0, f"{name}: an expert got no calibration token: {c}"

  def forward_loop(m):
    with torch.no_grad():
      for b in batches:
        m(b)

  mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
  mtq.print_quant_summary(model)

  if out_dir.exists():
    shutil.rmtree(out_dir)
  with warnings.catch_warnings():
    warnings.simplefilter("always")
    export_hf_checkpoint(model, export_dir=out_dir)

  exported = load_file(str(out_dir / "model.safetensors"))
  qnames = sorted(
    k[: -len(".weight_scale")] for k in exported if k.endswith(".weight_scale")
  )
  deq = {}
  ref_tensors = {}
  for m in qnames:
    assert m in orig_lin, (
      f"exported quantized module {m} has no original weight"
    )
    d = _modelopt_dequantize(
      exported[m + ".weight"],
      exported[m + ".weight_scale"],
      exported[m + ".weight_scale_2"],
    )
    assert d.shape == orig_lin[m].shape
    deq[m] = d
    ref_tensors[m + ".original_weight"] = orig_lin[m].contiguous()
    ref_tensors[m + ".dequantized"] = d.contiguous()
  missing = sorted(set(orig_lin) - set(qnames))
  print("linear modules NOT quantized:", missing)

  # Unquantized tensors in the export must be the bf16 originals.
  qset = set(qnames)
  for k, v in exported.items():
    if k.rsplit(".", 1)[0] in qset:
      continue
    if k in orig_sd:
      assert torch.equal(v, orig_sd[k]), k
    else:
      print("  exported tensor not in the original state dict:", k)

  ref_config = cls.config_class.from_dict(config.to_dict())
  ref_config._attn_implementation = "eager"
  ref = _reference_model(cls, ref_config, orig_sd, deq)
  gen = torch.Generator().manual_seed(SEED + 3)
  input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=gen)
  with torch.no_grad():
    logits = ref(input_ids).logits.float()
    gcfg = GenerationConfig(
      do_sample=False,
      max_new_tokens=8,
      eos_token_id=None,
      pad_token_id=0,
      bos_token_id=None,
    )
    prompt = input_ids[:1, :8]
    # explicit all-ones mask: generate would otherwise treat token == pad as padding
    greedy = ref.generate(
      prompt, attention_mask=torch.ones_like(prompt), generation_config=gcfg
    )
  assert greedy.shape == (1, 16), greedy.shape
  # Greedy must agree with argmax of a no-cache forward on its own output.
  with torch.no_grad():
    chk = ref(greedy).logits.argmax(-1)
    lg = ref(greedy).logits[0, 7:15]
  top2 = lg.topk(2, dim=-1).values
  print(
    "greedy step margins (top1 - top2):", (top2[:, 0] - top2[:, 1]).tolist()
  )
  print("logits std:", logits.std().item())
  assert torch.equal(chk[0, 7:15], greedy[0, 8:16]), (chk, greedy)

  ref_tensors["input_ids"] = input_ids.to(torch.int64)
  ref_tensors["logits"] = logits.contiguous()
  ref_tensors["greedy_tokens"] = greedy.to(torch.int64)
  meta = {
    "modelopt": modelopt.__version__,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "generator": "scripts/make_modelopt_fixtures.py",
    "dequantized": "NVFP4QTensor.dequantize: e2m1[code] * (f32(weight_scale) * weight_scale_2)",
    "logits": "float32 eager forward; NVFP4 linears = <m>.dequantized, rest = bf16 originals as f32",
    "greedy_tokens": "generate(input_ids[:1, :8], greedy, 8 new tokens), prompt + new",
  }
  # One metadata key: safetensors writes a multi-key metadata map in hash
  # order, which would make the file bytes differ from run to run.
  save_file(
    ref_tensors,
    str(out_dir / "reference.safetensors"),
    metadata={"info": json.dumps(meta, sort_keys=True)},
  )
  for f in sorted(out_dir.iterdir()):
    print(f"  {f.name}: {f.stat().st_size} bytes")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", choices=["llama", "qwen3_moe"], default=None)
  args = ap.parse_args()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  if torch.cuda.is_available():
    print(
      "note: CUDA is visible but this script runs everything on CPU",
      file=sys.stderr,
    )
  kinds = [args.only] if args.only else ["llama", "qwen3_moe"]
  for kind in kinds:
    sub = "tiny_llama" if kind == "llama" else "tiny_qwen3_moe"
    make(kind, OUT_ROOT / sub)


if __name__ == "__main__":
  main()

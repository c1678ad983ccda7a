"""The end-to-end demo: bf16 model -> ModelOpt checkpoint -> Orbax -> prepare.

A small seeded bf16 network (a dense SwiGLU MLP layer and an MoE layer, each
with a residual) is calibrated, quantized as ModelOpt would, written as a
ModelOpt-format Hugging Face checkpoint, imported, saved to Orbax, restored,
prepared and run. It prints what `prepare` removed and created, and the error
of the NVFP4 model against the bf16 one. Then a small seeded bf16 Llama-style
decoder goes the same way as a weight-only NVFP4 checkpoint through
`fp4jax.models.from_pretrained` and generates tokens next to its bf16 self.
Run: `python -m fp4jax.demo`.
"""

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fp4jax
from fp4jax import checkpoint
from fp4jax import models
from fp4jax import nn
from fp4jax import ptq
from fp4jax import transform
from fp4jax.models import causal_lm
from fp4jax.models import config as config_lib

HIDDEN, INTERMEDIATE = 256, 512
EXPERTS, TOP_K, MOE_INTERMEDIATE = 8, 2, 128


class DenseMLP(nnx.Module):
  def __init__(self, rngs):
    self.gate_proj = nn.NVFP4Linear(HIDDEN, INTERMEDIATE, rngs=rngs)
    self.up_proj = nn.NVFP4Linear(HIDDEN, INTERMEDIATE, rngs=rngs)
    self.down_proj = nn.NVFP4Linear(INTERMEDIATE, HIDDEN, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(h)


class Layer(nnx.Module):
  def __init__(self, moe: bool, rngs):
    self.mlp = (
      nn.NVFP4MoE(HIDDEN, MOE_INTERMEDIATE, EXPERTS, TOP_K, rngs=rngs)
      if moe
      else DenseMLP(rngs)
    )

  def __call__(self, x):
    return x + self.mlp(x)


class DemoModel(nnx.Module):
  """Two residual layers: a dense MLP, then an MoE block (HF leaf names)."""

  def __init__(self, rngs):
    self.layers = nnx.List([Layer(False, rngs), Layer(True, rngs)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def bf16_weights(seed: int) -> dict:
  """The seeded bf16 model in the checkpoint's tree layout."""
  keys = iter(jax.random.split(jax.random.key(seed), 16))

  def w(*shape):
    return (jax.random.normal(next(keys), shape) / np.sqrt(shape[-1])).astype(
      jnp.bfloat16
    )

  dense = {
    "gate_proj": {"weight": w(INTERMEDIATE, HIDDEN)},
    "up_proj": {"weight": w(INTERMEDIATE, HIDDEN)},
    "down_proj": {"weight": w(HIDDEN, INTERMEDIATE)},
  }
  moe = {
    "gate": {"weight": w(EXPERTS, HIDDEN)},
    "experts": {
      "w13_weight": w(EXPERTS, 2 * MOE_INTERMEDIATE, HIDDEN),
      "w2_weight": w(EXPERTS, HIDDEN, MOE_INTERMEDIATE),
    },
  }
  return {"model": {"layers": {"0": {"mlp": dense}, "1": {"mlp": moe}}}}


def bf16_forward(weights: dict, x: jax.Array, amax: dict | None = None):
  """The bf16 model (f32 math); records input amaxes when `amax` is given."""

  def record(name, v):
    if amax is not None:
      amax[name] = max(amax.get(name, 0.0), float(jnp.max(jnp.abs(v))))

  def linear(name, node, v):
    record(name, v)
    return v @ node["weight"].astype(jnp.float32).T

  x = x.astype(jnp.float32)
  dense = weights["model"]["layers"]["0"]["mlp"]
  p = "model.layers.0.mlp."
  g = linear(p + "gate_proj", dense["gate_proj"], x)
  u = linear(p + "up_proj", dense["up_proj"], x)
  x = x + linear(p + "down_proj", dense["down_proj"], jax.nn.silu(g) * u)

  moe = weights["model"]["layers"]["1"]["mlp"]
  logits = x @ moe["gate"]["weight"].astype(jnp.float32).T
  probs = jax.nn.softmax(logits, axis=-1)
  top_w, top_i = jax.lax.top_k(probs, TOP_K)
  top_w = top_w / top_w.sum(-1, keepdims=True)
  w13 = moe["experts"]["w13_weight"].astype(jnp.float32)
  w2 = moe["experts"]["w2_weight"].astype(jnp.float32)
  h = jnp.einsum("th,eih->tei", x, w13)
  act = jax.nn.silu(h[..., :MOE_INTERMEDIATE]) * h[..., MOE_INTERMEDIATE:]
  y = jnp.einsum("tei,ehi->teh", act, w2)
  chosen = jnp.take_along_axis(y, top_i[..., None], axis=1)
  routed = jnp.take_along_axis(act, top_i[..., None], axis=1)
  p = "model.layers.1.mlp.experts"
  if amax is not None:
    record(p + ".w13", x)
    record(p + ".w2", routed)
  return x + jnp.sum(chosen * top_w[..., None], axis=1)


def dequantized_weights(quantized: dict) -> dict:
  """The bf16 tree's layout with ModelOpt's dequantized NVFP4 weights."""

  def walk(node):
    if "weight_scale" in node:
      t = fp4jax.NVFP4Tensor(
        node["weight"], node["weight_scale"], node["weight_scale_2"]
      )
      return {"weight": fp4jax.dequantize(t)}
    if "w13_weight_scale" in node:
      return {
        p + "weight": fp4jax.dequantize(
          fp4jax.NVFP4Tensor(
            node[p + "weight"],
            node[p + "weight_scale"],
            node[p + "weight_scale_2"][..., 0]
            if p == "w13_"
            else node[p + "weight_scale_2"],
          )
        )
        for p in ("w13_", "w2_")
      }
    return {k: walk(v) if isinstance(v, dict) else v for k, v in node.items()}

  return walk(quantized)


def rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def set_activation(model: nnx.Module, activation: str) -> None:
  for _, m in nnx.iter_graph(model):
    if isinstance(m, (nn.NVFP4Linear, nn.NVFP4MoE)):
      m.activation = activation


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run(out_dir: pathlib.Path, seed: int, tokens: int) -> dict:
  """The whole pipeline; returns the numbers it prints."""
  weights = bf16_weights(seed)
  calib = jax.random.normal(jax.random.key(seed + 1), (256, HIDDEN))
  amax: dict = {}
  bf16_forward(weights, calib.astype(jnp.bfloat16), amax)
  targets = {k: v for k, v in amax.items() if not k.endswith((".w13", ".w2"))}
  targets["model.layers.1.mlp.experts"] = (
    amax["model.layers.1.mlp.experts.w13"],
    amax["model.layers.1.mlp.experts.w2"],
  )
  quantized = ptq.quantize_params(weights, targets)

  hf_dir, orbax_dir = out_dir / "hf_checkpoint", out_dir / "orbax"
  checkpoint.save_modelopt(
    hf_dir,
    quantized,
    {"model_type": "fp4jax_demo", "hidden_size": HIDDEN},
    checkpoint.QuantizationConfig(
      quant_algo="NVFP4", group_size=16, exclude_modules=("*.mlp.gate",)
    ),
  )
  loaded, _ = checkpoint.load_modelopt(hf_dir, progress=False)
  checkpoint.save_params(orbax_dir, loaded)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loaded
  )
  restored = checkpoint.restore_params(orbax_dir, abstract_params=abstract)

  model_abstract = nnx.eval_shape(lambda: DemoModel(nnx.Rngs(0)))
  graphdef, state = nnx.split(model_abstract)
  nnx.replace_by_pure_dict(state, restored["model"])
  model = nnx.merge(graphdef, state)
  before = tree_bytes(restored)
  del loaded, restored, state
  report = fp4jax.prepare_model(model, donate=True)
  after = tree_bytes(nnx.state(model))

  x = jax.random.normal(jax.random.key(seed + 2), (tokens, HIDDEN))
  x = x.astype(jnp.bfloat16)
  want = bf16_forward(weights, x)
  # Same weights as the NVFP4 model, dequantized: isolates the kernels'
  # rounding (bf16 activations) from the quantization error.
  want_dequantized = bf16_forward(dequantized_weights(quantized), x)
  errors = {}
  for activation in ("bf16", "nvfp4"):
    set_activation(model, activation)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    errors[activation] = (rel_error(y, want), rel_error(y, want_dequantized))
  return dict(report=report, before=before, after=after, errors=errors)


LLAMA_CONFIG = {
  "model_type": "llama",
  "vocab_size": 512,
  "hidden_size": 256,
  "intermediate_size": 512,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 64,
  "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0,
  "tie_word_embeddings": False,
}


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def run_model(out_dir: pathlib.Path, seed: int, new_tokens: int) -> dict:
  """bf16 decoder -> weight-only NVFP4 checkpoint -> from_pretrained."""
  cfg = config_lib.ModelConfig.from_hf(LLAMA_CONFIG)
  bf16_model = causal_lm.CausalLM(
    cfg, lambda name: False, dtype=jnp.bfloat16, rngs=nnx.Rngs(seed)
  )
  weights = _str_keys(nnx.to_pure_dict(nnx.state(bf16_model)))
  linears = {
    f"model.layers.{i}.{block}.{name}": 0.0
    for i in range(cfg.num_hidden_layers)
    for block, names in (
      ("self_attn", causal_lm.ATTENTION),
      ("mlp", causal_lm.MLP),
    )
    for name in names
  }
  quantized = ptq.quantize_params(weights, linears, weight_only=True)
  path = out_dir / "llama_nvfp4a16"
  checkpoint.save_modelopt(
    path,
    quantized,
    LLAMA_CONFIG,
    checkpoint.QuantizationConfig(
      "NVFP4", 16, ("lm_head", "model.embed_tokens"), None
    ),
  )
  loaded, _ = checkpoint.load_modelopt(path, progress=False)
  _, report = transform.prepare(loaded)
  model = models.from_pretrained(
    path,
    dtype=jnp.float32,
    orbax_cache=out_dir / "llama_orbax",
    progress=False,
  )
  # The same decoder, unquantized, holding the dequantized NVFP4 weights.
  graphdef, state = nnx.split(
    causal_lm.CausalLM(
      cfg, lambda name: False, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
  )
  nnx.replace_by_pure_dict(
    state,
    jax.tree.map(
      lambda x: x.astype(jnp.float32), dequantized_weights(quantized)
    ),
  )
  dequantized_model = nnx.merge(graphdef, state)
  prompt = jax.random.randint(
    jax.random.key(seed + 3), (1, 8), 0, cfg.vocab_size
  )
  got, _ = model(prompt)
  return dict(
    report=report,
    logits_error=rel_error(got, bf16_model(prompt)[0]),
    logits_error_dequantized=rel_error(got, dequantized_model(prompt)[0]),
    tokens=models.generate(model, prompt, new_tokens),
    dequantized_tokens=models.generate(dequantized_model, prompt, new_tokens),
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help="where to write the checkpoints (default: temp)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=16)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    out = args.out or pathlib.Path(tmp)
    result = run(out, args.seed, args.tokens)
    model_result = run_model(out, args.seed, args.new_tokens)
  report = result["report"]
  print("Leaves removed and created by fp4jax.prepare (bytes):")
  print(report.table())
  print(
    f"\nremoved leaves: {len(report.removed)}, freed: {report.freed_bytes:,} B,"
    f" created: {report.created_bytes:,} B"
  )
  print(
    f"param tree: {result['before']:,} B restored -> {result['after']:,} B"
    " prepared"
  )
  print(
    "\nRelative L2 error of the NVFP4 model's output against the bf16 model"
    "\nand against the bf16 model run with the dequantized NVFP4 weights:"
  )
  print(f"{'activations':<16}{'vs bf16':>10}{'vs dequantized':>16}")
  for activation, (err, err_deq) in result["errors"].items():
    name = {"bf16": "bf16 (W4A16)", "nvfp4": "nvfp4 (W4A4)"}[activation]
    print(f"{name:<16}{err:>10.4f}{err_deq:>16.4f}")

  print(
    "\nA Llama-style decoder (2 layers, hidden 256) as a weight-only NVFP4"
    "\nModelOpt checkpoint -> Orbax cache -> from_pretrained -> generate."
    "\nLeaves removed and created by prepare (bytes):"
  )
  print(model_result["report"].table())
  print(
    "relative L2 error of its logits: vs the bf16 decoder"
    f" {model_result['logits_error']:.4f}, vs the same decoder run with the"
    f" dequantized weights {model_result['logits_error_dequantized']:.2e}"
  )
  tokens = model_result["tokens"][0].tolist()
  reference = model_result["dequantized_tokens"][0].tolist()
  same = sum(a == b for a, b in zip(tokens[8:], reference[8:], strict=True))
  print(f"prompt                 {tokens[:8]}")
  print(f"NVFP4 greedy           {tokens[8:]}")
  print(
    f"dequantized reference  {reference[8:]}  ({same}/{len(tokens) - 8} same)"
  )


if __name__ == "__main__":
  main()

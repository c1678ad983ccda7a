"""The `fp4jax` command: inspect, convert, memory, generate, bench, demo."""

import argparse
import collections
import math
import pathlib
import re
import subprocess
import sys

import numpy as np

from fp4jax import checkpoint
from fp4jax import errors
from fp4jax import transform
from fp4jax.checkpoint import safetensors_io

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pattern(name: str) -> str:
  """`model.layers.3.mlp.experts.7.up_proj.weight` -> `...layers.*...*...`."""
  return re.sub(r"\.\d+\.", ".*.", re.sub(r"\.\d+\.", ".*.", name))


def inspect(args) -> None:
  config = checkpoint.read_checkpoint_config(args.path)
  tensors = checkpoint.list_tensors(args.path)
  q = config.quantization
  print(
    f"{args.path}: {config.hf_config.get('model_type', '?')},"
    f" {q.quant_algo}, group {q.group_size}, kv cache"
    f" {q.kv_cache_quant_algo}"
  )
  print(f"excluded modules: {', '.join(q.exclude_modules) or '(none)'}")
  rows = collections.OrderedDict()
  for name, _, dtype, shape in tensors:
    key = name if args.tensors else _pattern(name)
    itemsize = np.dtype(safetensors_io.DTYPES[dtype]).itemsize
    count, nbytes, shapes = rows.get(key, (0, 0, set()))
    rows[key] = (
      count + 1,
      nbytes + math.prod(shape) * itemsize,
      shapes | {(dtype, tuple(shape))},
    )
  width = max(len(k) for k in rows)
  print(f"{'tensor':<{width}}  {'count':>6}  {'bytes':>14}  dtype shape")
  for key, (count, nbytes, shapes) in rows.items():
    desc = "; ".join(f"{d} {list(s)}" for d, s in sorted(shapes))
    print(f"{key:<{width}}  {count:>6}  {nbytes:>14,}  {desc}")
  total = sum(v[1] for v in rows.values())
  print(f"{len(tensors)} tensors, {total:,} bytes")


def convert(args) -> None:
  params, _ = checkpoint.load_modelopt(args.path)
  checkpoint.save_params(args.orbax, params)
  print(f"wrote {args.orbax}")


def memory(args) -> None:
  import jax

  params, _ = checkpoint.load_modelopt(args.path, progress=not args.quiet)
  before = sum(x.nbytes for x in jax.tree.leaves(params))
  prepared, report = transform.prepare(
    params, donate=True, weight_layout=args.weight_layout
  )
  after = sum(x.nbytes for x in jax.tree.leaves(prepared))
  print(report.table())
  print(
    f"\nparams: {before:,} B before prepare, {after:,} B after"
    f" (freed {report.freed_bytes:,} B, created"
    f" {report.created_bytes:,} B)"
  )


def generate(args) -> None:
  import jax
  import jax.numpy as jnp

  from fp4jax import models

  model = models.from_pretrained(
    args.path,
    activation=args.activation,
    implementation=args.implementation,
    orbax_cache=args.orbax_cache,
    weight_layout=args.weight_layout,
  )
  ids = jnp.asarray([args.prompt_ids], jnp.int32)
  rng = jax.random.key(args.seed) if args.temperature > 0 else None
  out = models.generate(
    model, ids, args.max_new_tokens, temperature=args.temperature, rng=rng
  )
  print(" ".join(str(int(t)) for t in out[0]))


def bench(args) -> None:
  if not (REPO / "benchmarks" / "matmul.py").exists():
    raise errors.NVFP4Error(
      "the benchmarks live in the fp4jax source tree; run from a checkout"
    )
  command = [sys.executable, "-m", "benchmarks.matmul", *args.rest]
  raise SystemExit(subprocess.call(command, cwd=REPO))


def demo(args) -> None:
  from fp4jax import demo as demo_lib

  demo_lib.main(args.rest)


def _weight_layout_option(s) -> None:
  s.add_argument(
    "--weight-layout",
    choices=transform.WEIGHT_LAYOUTS,
    default="natural",
    help="packed-weight layout after prepare (on Hopper: sm90 fastest at"
    " decode, sm90_row_pairs for prefill-heavy work)",
  )


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="fp4jax", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("inspect", help="tensors, dtypes, shapes, bytes")
  s.add_argument("path")
  s.add_argument(
    "--tensors",
    action="store_true",
    help="one row per tensor instead of per name pattern",
  )
  s.set_defaults(run=inspect)
  s = sub.add_parser("convert", help="ModelOpt checkpoint -> Orbax")
  s.add_argument("path")
  s.add_argument("--orbax", required=True)
  s.set_defaults(run=convert)
  s = sub.add_parser("memory", help="bytes before and after prepare")
  s.add_argument("path")
  s.add_argument("--quiet", action="store_true")
  _weight_layout_option(s)
  s.set_defaults(run=memory)
  s = sub.add_parser("generate", help="generate token ids")
  s.add_argument("path")
  s.add_argument("--prompt-ids", type=int, nargs="+", required=True)
  s.add_argument("--max-new-tokens", type=int, default=16)
  s.add_argument("--temperature", type=float, default=0.0)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--activation", choices=("bf16", "nvfp4"), default="bf16")
  s.add_argument("--implementation", default=None)
  s.add_argument("--orbax-cache", default=None)
  _weight_layout_option(s)
  s.set_defaults(run=generate)
  for name, run, text in (
    ("bench", bench, "run the benchmarks"),
    ("demo", demo, "the end-to-end demo"),
  ):
    s = sub.add_parser(name, help=text)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(run=run)
  return p


def main(argv=None) -> None:
  args = parser().parse_args(argv)
  try:
    args.run(args)
  except (errors.NVFP4Error, FileNotFoundError) as e:
    print(f"fp4jax {args.command}: error: {e}", file=sys.stderr)
    raise SystemExit(2) from e


if __name__ == "__main__":
  main()

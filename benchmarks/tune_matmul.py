"""Tries tile configs of the Pallas NVFP4 matmul per shape; checks and times.

  python -m benchmarks.tune_matmul [--out tuning.json] [--shapes K:N,...]
      [--tokens M,...] [--configs "wg_pairs=2;block_k=128,wg_pairs=2"]
      [--weight-layout sm90|sm90_row_pairs]

Each config's output is compared with the XLA reference first (a config
that is wrong is reported, never timed), then timed with the same timer and
rotating weight sets as `benchmarks.matmul`. The JSON lists every config;
the best per shape is what `config.heuristic` should pick.
"""

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp

import pallas_kernels
from benchmarks import matmul as matmul_bench
from benchmarks import timing
from pallas_kernels.nvfp4_matmul import config as config_lib

SHAPES = ((8192, 28672), (28672, 8192), (4096, 14336), (7168, 2048))
TOKENS = (1, 16, 64, 256, 2048, 8192)


def _variants(base: config_lib.Config, k: int, field_sets):
  """`base`, then `base` with each set of fields replaced, once each,
  skipping those the Config rejects or that do not tile K or fit SMEM."""
  seen = {base}
  yield base
  for fields in field_sets:
    try:
      cfg = dataclasses.replace(base, **fields)
    except ValueError:
      continue
    if (
      cfg in seen
      or -(-k // cfg.block_k) % cfg.splits
      or cfg.smem_bytes(float32_out=False) > config_lib.SMEM_LIMIT
    ):
      continue
    seen.add(cfg)
    yield cfg


# Config fields given as 0 or 1.
FLAGS = frozenset(
  f.name
  for f in dataclasses.fields(config_lib.Config)
  if f.type in (bool, "bool")
)


def parse_overrides(text: str) -> list[dict]:
  """ "a=1,b=2;c=3" -> [{"a": 1, "b": 2}, {"c": 3}] (flags: 0 or 1)."""
  overrides = []
  for group in filter(None, text.split(";")):
    fields = {}
    for item in group.split(","):
      key, value = (part.strip() for part in item.split("="))
      fields[key] = bool(int(value)) if key in FLAGS else int(value)
    overrides.append(fields)
  return overrides


def candidates(m: int, n: int, k: int, overrides: list[dict] | None = None):
  """The heuristic's config and variants of it: `overrides` when given,
  else a search over tiles, stages, splits and the persistent grid."""
  base = config_lib.heuristic(m, n, k)
  if overrides:
    yield from _variants(base, k, overrides)
    return
  block_ms = (base.block_m, 256, 64) if m >= 256 else (base.block_m,)
  yield from _variants(
    base,
    k,
    (
      dict(
        persistent=persistent,
        block_k=block_k,
        block_m=block_m,
        num_stages=stages,
        splits=splits,
      )
      for persistent, block_k, block_m, stages, splits in itertools.product(
        (not base.persistent, base.persistent),
        (base.block_k, 256, 128, 64),
        block_ms,
        (base.num_stages, 3, 6, 2),
        (base.splits, *sorted({1, 2, 4} - {base.splits})),
      )
    ),
  )


def cases(shapes, tokens, activation="bf16", weight_layout="sm90"):
  """Per layer shape and token count: (K, N, M, fresh activations, layer
  copies to rotate through, the layer's FP4 bytes, the XLA reference output
  in float32)."""
  for k, n in shapes:
    layers, layer_bytes = matmul_bench.rotating_layers(k, n, weight_layout)
    for m in tokens:
      x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
      want = pallas_kernels.nvfp4_matmul(
        x, layers[0], activation=activation, implementation="xla"
      )
      yield k, n, m, x, layers, layer_bytes, want.astype(jnp.float32)


def tune(
  shapes,
  tokens,
  max_configs: int,
  activation="bf16",
  overrides=None,
  kernels="",
  weight_layout="sm90",
) -> list[dict]:
  """Checks each candidate config against the reference, then times the
  correct ones with their trials in turn (`timing.interleaved_medians`),
  each weight set with its own activations (`benchmarks.matmul`)."""
  rows = []
  for k, n, m, x, layers, layer_bytes, want in cases(
    shapes, tokens, activation, weight_layout
  ):
    sets = len(layers)
    xs = [x, *timing.rotating_inputs(jax.random.key(-m), sets - 1, (m, k))]
    xs = [v.astype(jnp.bfloat16) for v in xs]
    timed_rows, to_time = [], {}
    for i, cfg in enumerate(candidates(m, n, k, overrides)):
      if i >= max_configs:
        break
      row = {
        "K": k,
        "N": n,
        "M": m,
        "activation": activation,
        "weight_layout": weight_layout,
        "config": dataclasses.asdict(cfg),
      }
      run = lambda xs, ws, cfg=cfg: [  # noqa: E731
        pallas_kernels.nvfp4_matmul(
          x, w, activation=activation, implementation="pallas", config=cfg
        )
        for x, w in zip(xs, ws, strict=True)
      ]
      try:
        got = run(xs[:1], layers[:1])[0].astype(jnp.float32)
      except Exception as e:  # a config that fails to build is recorded
        rows.append({**row, "status": f"failed: {type(e).__name__}: {e}"[:300]})
        print(k, n, m, cfg, "FAILED", str(e)[:200], flush=True)
        continue
      err = float(
        jnp.max(jnp.abs(got - want))
        / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30)
      )
      row["rel_err"] = err
      if not err < 2.0**-7:
        rows.append({**row, "status": "wrong"})
        print(k, n, m, cfg, "WRONG", err, flush=True)
        continue
      to_time[i] = (run, (xs, layers), sets)
      timed_rows.append((i, cfg, row))
    timed = timing.interleaved_medians(to_time, kernels=kernels)
    for i, cfg, row in timed_rows:
      got = timed[i]
      if isinstance(got, Exception):
        rows.append({**row, "status": timing.failure_status(got)})
        continue
      us, _, timer = got
      tb = layer_bytes / (us * 1e-6) / 1e12
      rows.append(
        {**row, "status": "ok", "us": us, "timer": timer, "fp4_tb_per_s": tb}
      )
      print(f"K={k} N={n} M={m} {cfg} {us:9.1f} us {tb:5.2f} TB/s", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None)
  parser.add_argument("--max-configs", type=int, default=6)
  parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
  parser.add_argument("--activation", default="bf16", choices=("bf16", "nvfp4"))
  parser.add_argument(
    "--weight-layout", default="sm90", choices=("sm90", "sm90_row_pairs")
  )
  parser.add_argument(
    "--shapes", default=None, help="K:N pairs, e.g. 8192:28672,7168:2048"
  )
  parser.add_argument(
    "--configs",
    default=None,
    help="overrides of the heuristic's config to time instead of the search,"
    " e.g. 'wg_pairs=2;block_k=128,wg_pairs=2'",
  )
  parser.add_argument(
    "--kernels",
    default="",
    help="count only GPU kernels whose name contains this (e.g. mosaic_gpu:"
    " the Pallas kernel without per-call XLA work such as split-K sums)",
  )
  args = parser.parse_args(argv)
  shapes = SHAPES
  if args.shapes:
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")]
  tokens = [int(t) for t in args.tokens.split(",")]
  overrides = parse_overrides(args.configs) if args.configs else None
  rows = tune(
    shapes,
    tokens,
    args.max_configs,
    args.activation,
    overrides,
    args.kernels,
    args.weight_layout,
  )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(
        {"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1
      )


if __name__ == "__main__":
  main()

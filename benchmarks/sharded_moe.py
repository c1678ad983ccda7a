"""Expert-parallel NVFP4 MoE on several devices: per-rank memory and speed.

  python -m benchmarks.sharded_moe [--ci] [--model deepseek-v3]
      [--devices 2] [--tokens 16,4096] [--out sharded_moe.json]

1. Memory: a source experts node (ModelOpt's leaves, random codes) is
   created already split over an `ep` mesh axis (no device ever holds the
   whole node), then prepared per shard with donation
   (`fp4jax.sharding.prepare_experts(donate=True)`, sm90 layout). Reported
   per device, before and after: the bytes of the node's arrays
   (`sharding.bytes_per_device`) and the allocator's bytes in use.
2. Speed: the layer on one device against the same prepared experts split
   over the mesh, with tokens replicated (outputs added by an all-reduce)
   and with tokens split (all-gather in, reduce-scatter out). The sharded
   outputs are checked against the one-device output.

Timer: the host's wall clock over back-to-back calls, device-synchronized,
median of 7 trials, the same for every row. CUPTI (the other benchmarks'
timer) adds up kernels of all devices, which is no wall time for work that
runs on several at once. At decode the active experts exceed L2 many times
over, so no weight sets rotate. Render: `python -m benchmarks.sharded_moe
--markdown result.json`.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from benchmarks import arg_specs
from benchmarks import timing
from fp4jax import sharding

AXIS = "ep"
TRIALS = 7


def source_shapes(n_experts: int, hidden: int, inter: int) -> dict:
  """ModelOpt's stacked experts leaves: `{name: (shape, dtype)}`."""
  f32, e4m3 = jnp.float32, jnp.float8_e4m3fn
  shapes = {}
  for prefix, (n, k) in (
    ("w13_", (2 * inter, hidden)),
    ("w2_", (hidden, inter)),
  ):
    per_tensor = (n_experts, 2) if prefix == "w13_" else (n_experts,)
    shapes[prefix + "weight"] = ((n_experts, n, k // 2), jnp.uint8)
    shapes[prefix + "weight_scale"] = ((n_experts, n, k // 16), e4m3)
    shapes[prefix + "weight_scale_2"] = (per_tensor, f32)
    shapes[prefix + "input_scale"] = (per_tensor, f32)
  return shapes


def random_source(key, mesh: Mesh, n_experts: int, hidden: int, inter: int):
  """A source experts node, each leaf created on its shards by a jitted
  generator (`out_shardings`), never whole on one device."""
  shapes = source_shapes(n_experts, hidden, inter)

  def make(key):
    node = {}
    for i, (name, (shape, dtype)) in enumerate(sorted(shapes.items())):
      k = jax.random.fold_in(key, i)
      if dtype == jnp.uint8:  # random bytes: random E2M1 codes
        node[name] = jax.random.bits(k, shape, jnp.uint8)
      elif dtype == jnp.float8_e4m3fn:  # bytes 0x30..0x3f: [0.5, 1)
        byte = 0x30 + jax.random.randint(k, shape, 0, 16, jnp.uint8)
        node[name] = jax.lax.bitcast_convert_type(byte, dtype)
      else:  # weight_scale_2 and input_scale
        node[name] = jnp.full(shape, 2e-3, dtype)
    return node

  out = {
    name: NamedSharding(mesh, spec)
    for name, spec in sharding.experts_specs(shapes, AXIS).items()
  }
  return jax.jit(make, out_shardings=out)(key)


def bytes_in_use(devices) -> dict[str, int | None]:
  """The allocator's bytes in use per device (None where not reported)."""
  stats = {}
  for device in devices:
    memory = device.memory_stats() or {}
    stats[str(device)] = memory.get("bytes_in_use")
  return stats


def wall_us(fn, *args, calls: int) -> tuple[float, list[float]]:
  """Median over trials of one call's wall time, µs (see module doc)."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  samples = []
  for _ in range(TRIALS):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e6 / calls)
  return statistics.median(samples), samples


def run(
  model: tuple,
  name: str,
  n_devices: int,
  tokens,
  implementation: str,
  platform: str | None = None,
):
  n_experts, top_k, hidden, inter = model
  devices = jax.devices(platform)[:n_devices]
  if len(devices) < n_devices:
    raise SystemExit(f"needs {n_devices} devices, found {len(devices)}")
  mesh = Mesh(np.array(devices), (AXIS,))
  key = jax.random.key(0)

  # 1. Per-rank memory around the sharded prepare.
  in_use_empty = bytes_in_use(devices)
  source = random_source(key, mesh, n_experts, hidden, inter)
  jax.block_until_ready(source)
  memory = {
    "source_bytes": sharding.bytes_per_device(source),
    "in_use_before": bytes_in_use(devices),
    "in_use_empty": in_use_empty,
  }
  experts = sharding.prepare_experts(
    source, mesh, axis=AXIS, donate=True, weight_layout="sm90"
  )
  jax.block_until_ready(experts)
  memory["prepared_bytes"] = sharding.bytes_per_device(experts)
  memory["in_use_after"] = bytes_in_use(devices)
  memory["freed_source_leaves"] = sorted(
    n for n, x in source.items() if x.is_deleted()
  )
  del source
  print(json.dumps(memory, indent=1), flush=True)

  # 2. One device against the mesh, same prepared leaves.
  one = {n: jax.device_put(x, devices[0]) for n, x in experts.items()}
  rows = []
  for t in tokens:
    x = jax.random.normal(jax.random.key(t), (t, hidden), jnp.bfloat16)
    logits = jax.random.normal(jax.random.key(t + 1), (t, n_experts))
    on_one = jax.device_put((x, logits), devices[0])
    on_mesh = jax.device_put((x, logits), NamedSharding(mesh, P()))
    single = jax.jit(
      lambda x, logits, e: pallas_kernels.nvfp4_moe(
        x, logits, e, top_k=top_k, implementation=implementation
      )
    )
    want = np.asarray(single(*on_one, one), np.float32)
    scale = float(np.abs(want).max())
    calls = 20 if t <= 64 else 3
    variants = {"one device": (single, on_one, one)}
    for tokens_sharded in (False, True):
      label = f"{n_devices} devices, tokens {'split' if tokens_sharded else 'replicated'}"
      variants[label] = (
        jax.jit(
          lambda x, logits, e, s=tokens_sharded: sharding.moe(
            x,
            logits,
            e,
            mesh,
            top_k=top_k,
            axis=AXIS,
            implementation=implementation,
            tokens_sharded=s,
          )
        ),
        on_mesh,
        experts,
      )
    for label, (fn, inputs, leaves) in variants.items():
      got = np.asarray(fn(*inputs, leaves), np.float32)
      rel_err = float(np.abs(got - want).max() / scale)
      us, samples = wall_us(fn, *inputs, leaves, calls=calls)
      rows.append(
        {
          "T": t,
          "layout": label,
          "us": us,
          "samples_us": samples,
          "tokens_per_s": t / (us * 1e-6),
          "rel_err_vs_one_device": rel_err,
        }
      )
      print(
        f"T={t:6d} {label:34s} {us:10.1f} us"
        f" {t / (us * 1e-6):12.0f} tokens/s  err {rel_err:.1e}",
        flush=True,
      )
  return {
    "meta": {
      **timing.run_meta("benchmarks.sharded_moe", devices[0]),
      "devices": n_devices,
      "timer": "host wall clock, device-synchronized",
      "model": {name: dict(zip(("E", "top_k", "H", "I"), model, strict=True))},
      "implementation": implementation,
    },
    "memory": memory,
    "rows": rows,
  }


def markdown(result: dict) -> str:
  """Tables for BENCHMARKS.md: per-rank memory, then speed."""
  meta, memory = result["meta"], result["memory"]
  mib = 2.0**20

  def fmt(b):
    return "n/a" if b is None else f"{b / mib:.1f}"

  def change(device):
    before = memory["in_use_before"][device]
    after = memory["in_use_after"][device]
    return None if before is None or after is None else after - before

  lines = [
    f"{meta['date']}, {meta['devices']} x {meta['device']}, jax"
    f" {meta['jax']}, `{meta['command']}`. Timer: {meta['timer']}."
    f" Source leaves freed by the prepare:"
    f" {', '.join(memory['freed_source_leaves']) or 'none'}.",
    "",
    "| device | source leaves MiB | prepared leaves MiB | in use before"
    " MiB | in use after MiB | change MiB |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for device, before in memory["source_bytes"].items():
    lines.append(
      f"| {device} | {fmt(before)} | {fmt(memory['prepared_bytes'][device])}"
      f" | {fmt(memory['in_use_before'][device])}"
      f" | {fmt(memory['in_use_after'][device])} | {fmt(change(device))} |"
    )
  lines += [
    "",
    "| T | layout | µs | tokens/s | x one device | error vs one device |",
    "|---:|---|---:|---:|---:|---:|",
  ]
  base = {
    r["T"]: r["us"] for r in result["rows"] if r["layout"] == "one device"
  }
  for r in result["rows"]:
    lines.append(
      f"| {r['T']} | {r['layout']} | {r['us']:.1f} | {r['tokens_per_s']:.0f}"
      f" | {base[r['T']] / r['us']:.2f} | {r['rel_err_vs_one_device']:.1e} |"
    )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ci", action="store_true", help="tiny shapes")
  parser.add_argument("--model", default="deepseek-v3")
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--tokens", default="16,4096")
  parser.add_argument("--out", default="sharded_moe.json")
  parser.add_argument(
    "--implementation",
    default=None,
    help="nvfp4_moe's implementation (default: pallas on GPU, else xla)",
  )
  parser.add_argument(
    "--platform", default=None, help="jax platform (default: JAX's default)"
  )
  parser.add_argument(
    "--markdown", metavar="JSON", help="print the tables of a result"
  )
  args = parser.parse_args(argv)
  if args.markdown:
    with open(args.markdown) as f:
      print(markdown(json.load(f)))
    return
  if args.ci:
    name, model = next(iter(arg_specs.CI_MOE_MODELS.items()))
  else:
    name, model = args.model, arg_specs.MOE_MODELS[args.model]
  platform = jax.devices(args.platform)[0].platform
  implementation = args.implementation or (
    "pallas" if platform == "gpu" else "xla"
  )
  tokens = tuple(int(t) for t in args.tokens.split(","))
  result = run(model, name, args.devices, tokens, implementation, platform)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(markdown(result))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

"""GPU diagnostic: what bounds the NVFP4 matmul's decode CTAs.

  PYTHONPATH=. python scripts/diag_decode_bound.py [K:N,...] [M,...]
      [variants] [configs] [--lower]

Times the Pallas kernel alone (CUPTI, kernels named mosaic_gpu, median of
7 over rotating layers larger than L2) with parts of its work switched off
(`pallas_mosaic_gpu_kernel_sm90.DIAGNOSTIC`; outputs are wrong then):
"full" (the kernel as it is), "no_decode" (code words go to wgmma as they
are: memory, pipeline and MMA only), "no_scales" (a constant block scale),
"one_scale_load" (one scale word loaded per row half and step, all still
converted), "raw_scales" (every word loaded, none converted), "no_mma"
(decode without wgmma); prefixes from `SWITCHES` (e.g. "copied_scales_",
"two_copies_"; alone: the full kernel) set the kernel's switches; the full
kernels are checked against the XLA reference.
Configs are `tune_matmul` overrides joined by ";", each timed after the
heuristic's own. `--lower` only lowers every variant for sm_90 (runs on
CPU).
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp

import pallas_kernels
from benchmarks import timing
from benchmarks import tune_matmul
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90

VARIANTS = (
  "full",
  "no_decode",
  "no_scales",
  "one_scale_load",
  "raw_scales",
  "no_mma",
)


# Variant prefixes that set one of the kernel module's switches (a prefix
# alone is the full kernel with it).
SWITCHES = {
  "half_scales": ("SCALE_HALF_OPERANDS", True),
  "copied_scales": ("SCALE_HALF_OPERANDS", False),
  "one_copy": ("ONE_ACTIVATION_COPY", True),
  "two_copies": ("ONE_ACTIVATION_COPY", False),
}
_DEFAULTS = {name: getattr(sm90, name) for name, _ in SWITCHES.values()}


def select(variant: str) -> bool:
  """Sets the kernel module's switches for `variant` (prefixes from
  `SWITCHES`, each followed by "_", then a `DIAGNOSTIC` or "full"); ->
  whether the outputs should be right (no diagnostic)."""
  for name, value in _DEFAULTS.items():
    setattr(sm90, name, value)
  found = True
  while found:
    found = False
    for prefix, (name, value) in SWITCHES.items():
      if variant.startswith(prefix):
        setattr(sm90, name, value)
        variant = variant.removeprefix(prefix).removeprefix("_")
        found = True
  variant = variant or "full"
  sm90.DIAGNOSTIC = "" if variant == "full" else variant
  return variant == "full"


def configs_for(m, n, k, text):
  """The heuristic's config, then each override of it (in the same run)."""
  base = config_lib.heuristic(m, n, k)
  return [base] + [
    dataclasses.replace(base, **fields)
    for fields in tune_matmul.parse_overrides(text)
  ]


def lower_all(shapes, tokens, variants, text):
  for k, n in shapes:
    layer = {
      "weight_sm90": jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
      "block_scale": jax.ShapeDtypeStruct(
        (-(-n // 128) * 128, -(-(k // 16) // 4) * 4), jnp.float8_e4m3fn
      ),
      "alpha": jax.ShapeDtypeStruct((), jnp.float32),
      "input_scale_inv": jax.ShapeDtypeStruct((), jnp.float32),
    }
    for m in tokens:
      for cfg in configs_for(m, n, k, text):
        for variant in variants:
          select(variant)
          jax.jit(
            lambda x, w, cfg=cfg: pallas_mosaic_gpu._run(
              x, w, activation="bf16", config=cfg, interpret=False
            )
          ).trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), layer).lower(
            lowering_platforms=("cuda",)
          )
          print("lowered", k, n, m, variant, cfg, flush=True)
  select("full")


def main(argv):
  lower = "--lower" in argv
  argv = [a for a in argv if a != "--lower"]
  shapes = [
    tuple(int(d) for d in s.split(":"))
    for s in (argv[0] if argv else "8192:28672,28672:8192").split(",")
  ]
  tokens = [int(t) for t in argv[1].split(",")] if len(argv) > 1 else [1, 16]
  variants = argv[2].split(",") if len(argv) > 2 else list(VARIANTS)
  text = argv[3] if len(argv) > 3 else ""
  if lower:
    return lower_all(shapes, tokens, variants, text)
  for k, n, m, x, layers, layer_bytes, want in tune_matmul.cases(
    shapes, tokens
  ):
    sets = len(layers)
    for cfg in configs_for(m, n, k, text):
      for variant in variants:
        correct = select(variant)
        jax.clear_caches()  # the switches are no jit keys

        def run(x, ws, cfg=cfg):
          return [
            pallas_kernels.nvfp4_matmul(
              x, w, implementation="pallas", config=cfg
            )
            for w in ws
          ]

        try:
          error = ""
          if correct:  # the diagnostics are wrong by design
            got = run(x, layers[:1])[0].astype(jnp.float32)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            error = f" rel.err {err:.1e}" + ("" if err < 2.0**-7 else " BAD")
          us, _, _ = timing.median_us(
            run, x, layers, calls_per_trial=sets, kernels="mosaic_gpu"
          )
        except Exception as e:  # noqa: BLE001 - a diagnostic reports all
          print(f"K={k} N={n} M={m} {variant:9s} FAILED {e}"[:300])
          continue
        tb = layer_bytes / (us * 1e-6) / 1e12
        print(
          f"K={k} N={n} M={m} {variant:10s} {us:8.1f} us {tb:5.2f} TB/s"
          f"{error}  {cfg}",
          flush=True,
        )
  select("full")


if __name__ == "__main__":
  main(sys.argv[1:])

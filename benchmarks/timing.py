"""One timer for every implementation: CUPTI kernel time on GPU.

`interleaved_medians` times several implementations of one case trial by
trial in turn, so that each sees the same mix of GPU clock states: under
long bf16-rate GEMMs the H200's clocks drop (8192x28672 at M = 8192: XLA's
dot took 4.63 ms in its first trials and 5.41 ms once hot, nineteenth
session), and timing one implementation after another gave the ones timed
first the cool GPU.

On a GPU, `jax.experimental.mosaic.gpu.profiler.measure` sums the device
time of every kernel a call launches (CUPTI), which excludes host dispatch;
host-timed loops understated XLA's bf16 dot by up to 17% on the H200. On CPU
the harness falls back to a synchronized host timer, only so that it can be
exercised without a GPU.
"""

import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def run_meta(module: str, device=None) -> dict:
  """What every results JSON records of its run: date, device kind (of
  `device`, default the first), jax version and the command line of
  `python -m <module>`."""
  device = device or jax.devices()[0]
  return {
    "date": datetime.date.today().isoformat(),
    "device": device.device_kind,
    "jax": jax.__version__,
    "command": f"python -m {module} " + " ".join(sys.argv[1:]),
  }


def rotating_inputs(key, sets: int, shape, dtype=jnp.float32) -> list:
  """`sets` standard-normal arrays, one for each rotating weight set: with
  one input shared by the sets, XLA does per-call work on it (the
  activation split, quantization, routing) once for all of them."""
  return [
    jax.random.normal(jax.random.fold_in(key, s), shape).astype(dtype)
    for s in range(sets)
  ]


def _samples_us(fn, args, calls_per_trial: int, trials: int, kernels: str):
  """`trials` back-to-back timed calls of a compiled `fn(*args)`: µs per
  op each (see `median_us`)."""
  if not on_gpu():
    samples = []
    for _ in range(trials):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples.append((time.perf_counter() - start) * 1e6 / calls_per_trial)
    return samples
  from jax.experimental.mosaic.gpu import profiler

  _, per_trial = profiler.measure(fn, iterations=trials, aggregate=not kernels)(
    *args
  )
  if per_trial is None:
    raise RuntimeError("CUPTI recorded no kernel")
  if trials == 1:  # the profiler unwraps a single iteration
    per_trial = [per_trial]
  if kernels:
    per_trial = [
      sum(ms for name, ms in launches if kernels in name)
      for launches in per_trial
    ]
  return [ms * 1e3 / calls_per_trial for ms in per_trial]


def _timer(kernels: str) -> str:
  if not on_gpu():
    return "host"
  return f"cupti:{kernels}" if kernels else "cupti"


def median_us(
  fn, *args, trials: int = 7, calls_per_trial: int = 1, kernels: str = ""
):
  """Median over `trials` of the time of one call of `fn(*args)`, in µs.

  `fn` is jitted here; one warm-up call compiles it. When `fn` runs the op
  `calls_per_trial` times (over rotating inputs), the time is divided by it.
  With `kernels`, only GPU kernels whose name contains it are counted (for
  diagnostics, e.g. "mosaic_gpu": the Pallas kernels without XLA's glue).

  Returns:
    `(median_us, samples_us, timer_name)`.
  """
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  samples = _samples_us(fn, args, calls_per_trial, trials, kernels)
  return statistics.median(samples), samples, _timer(kernels)


def interleaved_medians(
  cases: dict, trials: int = 7, kernels: str = ""
) -> dict:
  """`median_us` for several implementations at once, their trials taken
  in turn (module doc). On a GPU each trial is one profiler call, which
  runs one untimed call of its own first: wall time doubles, the measured
  kernels do not change.

  Args:
    cases: `{name: (fn, args, calls_per_trial)}`.

  Returns:
    `{name: (median_us, samples_us, timer_name)}`, or for a case that
    failed to compile or run its warm-up, `{name: the exception}`.
  """
  results, ready = {}, {}
  for name, (fn, args, calls) in cases.items():
    try:
      fn = jax.jit(fn)
      jax.block_until_ready(fn(*args))
    except Exception as e:  # recorded by the caller, the others still run
      results[name] = e
      continue
    ready[name] = (fn, args, calls)
  samples = {name: [] for name in ready}
  for _ in range(trials):
    for name, (fn, args, calls) in ready.items():
      samples[name] += _samples_us(fn, args, calls, 1, kernels)
  for name, got in samples.items():
    results[name] = (statistics.median(got), got, _timer(kernels))
  return results


def failure_status(error: Exception) -> str:
  """A results row's status for an implementation that could not be timed
  (`interleaved_medians`' exceptions)."""
  if isinstance(error, NotImplementedError):
    return f"not implemented: {error}"
  return f"failed: {type(error).__name__}: {error}"[:300]

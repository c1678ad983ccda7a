"""Renders benchmark JSON into BENCHMARKS.md and a plot.

  python -m benchmarks.report results.json [more.json ...]
      [--kind matmul|moe] [--markdown BENCHMARKS.md]
      [--plot benchmarks/results/<kind>.png]

The section between `<!-- KIND:begin -->` and `<!-- KIND:end -->` in the
markdown file is replaced; the rest of the file is kept. Several result
files (runs) merge group by group: all rows of one shape and token count
come from one run, the one that measured most of them (earlier files win
ties), so every number sits beside anchors timed in its own run; a column
names the run.
"""

import argparse
import collections
import json
import pathlib
import re

LABELS = {
  "xla_bf16": "XLA bf16 dot",
  "xla_dequant_dot": "XLA dequantize-then-dot",
  "scaled_dot_general": "jax.nn.scaled_dot_general nvfp4",
  "fp4jax_pallas_w4a16": "fp4jax Pallas W4A16",
  "fp4jax_pallas_w4a4": "fp4jax Pallas W4A4",
  "fp4jax_pallas_w4a16_row_pairs": "fp4jax Pallas W4A16, row pairs",
  "fp4jax_pallas_w4a4_row_pairs": "fp4jax Pallas W4A4, row pairs",
}


TIMERS = {
  "cupti": "CUPTI kernel time (jax's Mosaic GPU profiler)",
  "host": "host clock around synchronized calls (no GPU: harness check only)",
}


def _fmt(value, spec):
  return "" if value is None else format(value, spec)


GROUP_KEYS = {"matmul": ("K", "N", "M"), "moe": ("model", "T")}


def merge(results: list[dict], kind: str, prefer_first: bool = False) -> dict:
  """One result from several runs; see the module doc.

  `prefer_first`: runs are listed newest first, and a group comes from the
  first run that measured any of it (newer runs of a changed kernel that
  timed only some implementations), unless that run skipped part of it.
  """
  keys = GROUP_KEYS[kind]

  def group(row):
    return tuple(row[k] for k in keys)

  # Each group's run: the first that measured most of its rows (the first
  # that lists it, where no run measured any).
  source, measured, partial = {}, {}, {}
  for run, result in enumerate(results):
    # Only fp4jax rows count as skipped: a newer run that timed the
    # product but not an anchor keeps its group (the anchor shows as
    # skipped) rather than giving way to an older kernel's numbers.
    skipped = collections.Counter(
      group(r)
      for r in result["rows"]
      if r["status"].startswith("skipped") and r["impl"].startswith("fp4jax")
    )
    counts = collections.Counter(
      group(r) for r in result["rows"] if not r["status"].startswith("skipped")
    )
    for g in dict.fromkeys(group(r) for r in result["rows"]):
      # A newer run keeps what it measured, unless it skipped an fp4jax row
      # of the group (a time budget ran out): then a run that measured more
      # wins.
      preferred = prefer_first and measured.get(g, 0) > 0 and not partial[g]
      if g not in source or (counts[g] > measured[g] and not preferred):
        source[g], measured[g], partial[g] = run, counts[g], skipped[g] > 0
  order = list(source)
  # Shapes (or models) in order of appearance, token counts ascending.
  outer = list(dict.fromkeys(g[:-1] for g in order))
  order.sort(key=lambda g: (outer.index(g[:-1]), g[-1]))
  rows = []
  for g in order:
    run = source[g]
    rows += [
      {**r, "run": run + 1} for r in results[run]["rows"] if group(r) == g
    ]
  meta = dict(results[0]["meta"])
  meta["runs"] = [res["meta"] for res in results]
  if kind == "moe":
    meta["models"] = {}
    meta["pallas_vs_reference_rel_err"] = {}
    for res in results:
      meta["models"].update(res["meta"]["models"])
      for name, err in res["meta"]["pallas_vs_reference_rel_err"].items():
        if not isinstance(meta["pallas_vs_reference_rel_err"].get(name), float):
          meta["pallas_vs_reference_rel_err"][name] = err
  return {"meta": meta, "rows": rows}


def _merged(meta: dict) -> bool:
  return len(meta.get("runs", [meta])) > 1


def _provenance(meta: dict) -> str:
  if _merged(meta):
    return "Several runs, listed below with their commands."
  return (
    f"Date {meta['date']}, {meta['device']}, jax {meta['jax']}, command"
    f" `{meta['command']}`. {_inputs(meta)}"
  )


def _inputs(meta: dict) -> str:
  """How a run's rotating sets got their activations (and MoE logits):
  runs before the eighteenth session shared one `x` between the sets, so
  XLA did the per-call work on it once per trial), and whether the
  implementations took their trials in turn (`timing.interleaved_medians`,
  matmul runs from the nineteenth session)."""
  turns = (
    " Implementations took their trials in turn."
    if meta.get("interleaved_trials")
    else ""
  )
  if meta.get("inputs_per_set"):
    return "Each weight set had its own inputs." + turns
  return "One x served every weight set (older harness)." + turns


def _runs(meta: dict) -> list[str]:
  """The run list (with notes) when results come from several runs."""
  if not _merged(meta):
    return []
  lines = ["Runs (the `run` column):", ""]
  for i, run in enumerate(meta["runs"], 1):
    note = f" {run['note']}" if run.get("note") else ""
    lines.append(
      f"{i}. {run['date']}, {run['device']}, jax {run['jax']},"
      f" `{run['command']}`. {_inputs(run)}{note}"
    )
  return [*lines, ""]


def _run_cell(row: dict) -> str:
  return f" {row['run']} |" if "run" in row else ""


def _table_head(meta: dict, head: str, rule: str) -> list[str]:
  """A table's header rows, with a `run` column for merged results."""
  if _merged(meta):
    return [head + " run |", rule + "---:|"]
  return [head, rule]


def markdown(result: dict, plot_path: str | None = None) -> str:
  meta = result["meta"]
  lines = [
    f"{_provenance(meta)} Timer: {TIMERS[meta['timer']]}, median of 7"
    " trials, each over rotating weight sets larger than L2. Ceilings"
    " measured in the (first) run: copy"
    f" {meta['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 dot"
    f" {meta['bf16_ceiling_size']}^3"
    f" {meta['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s. TB/s counts"
    " the FP4 bytes (packed weight + swizzled block scales); the roofline is"
    " max(bytes / 4.8 TB/s (datasheet HBM), flops / the measured bf16"
    " rate).",
    "",
    *_runs(meta),
  ]
  if plot_path:
    lines += [f"![matmul]({plot_path})", ""]
  shapes = list(dict.fromkeys((r["K"], r["N"]) for r in result["rows"]))
  for k, n in shapes:
    lines += [
      f"**K={k}, N={n}**",
      "",
      *_table_head(
        meta,
        "| M | implementation | µs | TB/s (FP4) | TFLOP/s | x XLA bf16 |"
        " of roofline |",
        "|---:|---|---:|---:|---:|---:|---:|",
      ),
    ]
    for r in result["rows"]:
      if (r["K"], r["N"]) != (k, n):
        continue
      name = LABELS.get(r["impl"], r["impl"])
      if r["status"] != "ok":
        lines.append(
          f"| {r['M']} | {name} | {r['status']} | | | | |" + _run_cell(r)
        )
        continue
      lines.append(
        f"| {r['M']} | {name} | {r['us']:.1f} | {r['fp4_tb_per_s']:.2f} |"
        f" {r['tflop_per_s']:.1f} | {_fmt(r['speedup_vs_xla_bf16'], '.2f')} |"
        f" {r['fraction_of_roofline']:.0%} |" + _run_cell(r)
      )
    lines.append("")
  return "\n".join(lines)


def _loglog_panels(result, panels, labels, x_key, path) -> None:
  """One log-log panel of µs against tokens per `panels` entry.

  panels: `(title, row filter)` pairs; one line per implementation.
  """
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, axes = plt.subplots(
    1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False
  )
  for ax, (title, keep) in zip(axes[0], panels, strict=True):
    for impl, label in labels.items():
      pts = [
        (r[x_key], r["us"])
        for r in result["rows"]
        if keep(r) and r["impl"] == impl and r["status"] == "ok"
      ]
      if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel=f"tokens {x_key}", ylabel="µs")
    ax.set_title(title)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)


def plot(result: dict, path: pathlib.Path) -> None:
  shapes = list(dict.fromkeys((r["K"], r["N"]) for r in result["rows"]))
  panels = [
    (f"K={k} N={n}", lambda r, s=(k, n): (r["K"], r["N"]) == s)
    for k, n in shapes
  ]
  _loglog_panels(result, panels, LABELS, "M", path)


MOE_LABELS = {
  "ragged_dot_bf16": "jax.lax.ragged_dot bf16",
  "fp4jax_xla": "fp4jax XLA reference",
  "fp4jax_pallas_w4a16": "fp4jax Pallas W4A16",
}


def moe_markdown(result: dict, plot_path: str | None = None) -> str:
  meta = result["meta"]
  lines = [
    f"{_provenance(meta)} Timer: {TIMERS[meta['timer']]}, median of 7"
    " trials over rotating expert sets. One MoE layer: routing, both expert"
    " GEMMs, SwiGLU, combine. TB/s counts the FP4 bytes of the experts the"
    " tokens use; TFLOP/s counts 6 T top_k H I. Pallas output against the"
    " reference (max error / max |reference|, 16 tokens): "
    + ", ".join(
      f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v[:90]}"
      for k, v in meta["pallas_vs_reference_rel_err"].items()
    )
    + ".",
    "",
    *_runs(meta),
  ]
  if plot_path:
    lines += [f"![moe]({plot_path})", ""]
  for name, dims in meta["models"].items():
    lines += [
      f"**{name}** (E={dims['E']}, top-{dims['top_k']}, H={dims['H']},"
      f" I={dims['I']})",
      "",
      *_table_head(
        meta,
        "| T | implementation | µs | active experts | TB/s (FP4) | TFLOP/s |"
        " x ragged_dot |",
        "|---:|---|---:|---:|---:|---:|---:|",
      ),
    ]
    anchor = {
      r["T"]: r["us"]
      for r in result["rows"]
      if r["model"] == name
      and r["impl"] == "ragged_dot_bf16"
      and r["status"] == "ok"
    }
    for r in result["rows"]:
      if r["model"] != name:
        continue
      label = MOE_LABELS.get(r["impl"], r["impl"])
      if r["status"] != "ok":
        lines.append(
          f"| {r['T']} | {label} | {r['status'][:90]} | | | | |" + _run_cell(r)
        )
        continue
      ratio = anchor.get(r["T"])
      lines.append(
        f"| {r['T']} | {label} | {r['us']:.1f} | {r['active_experts']:g} |"
        f" {r['fp4_tb_per_s']:.2f} | {r['tflop_per_s']:.1f} |"
        f" {_fmt(None if ratio is None else ratio / r['us'], '.2f')} |"
        + _run_cell(r)
      )
    lines.append("")
  return "\n".join(lines)


def moe_plot(result: dict, path: pathlib.Path) -> None:
  panels = [
    (name, lambda r, name=name: r["model"] == name)
    for name in result["meta"]["models"]
  ]
  _loglog_panels(result, panels, MOE_LABELS, "T", path)


RENDERERS = {"matmul": (markdown, plot), "moe": (moe_markdown, moe_plot)}


def update_section(text: str, name: str, body: str) -> str:
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  block = f"{begin}\n{body}\n{end}"
  if begin in text:
    pattern = re.escape(begin) + r".*?" + re.escape(end)
    return re.sub(pattern, lambda _: block, text, flags=re.S)
  return text.rstrip() + "\n\n" + block + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", nargs="+")
  parser.add_argument("--kind", choices=tuple(RENDERERS), default="matmul")
  parser.add_argument("--markdown", default="BENCHMARKS.md")
  parser.add_argument("--plot", default=None)
  parser.add_argument(
    "--prefer-first",
    action="store_true",
    help="runs newest first: a row group comes from the first run that"
    " measured any of it",
  )
  args = parser.parse_args(argv)
  args.plot = args.plot or f"benchmarks/results/{args.kind}.png"
  results = [json.loads(pathlib.Path(p).read_text()) for p in args.results]
  result = (
    results[0]
    if len(results) == 1
    else merge(results, args.kind, args.prefer_first)
  )
  render_markdown, render_plot = RENDERERS[args.kind]
  render_plot(result, pathlib.Path(args.plot))
  md = pathlib.Path(args.markdown)
  text = md.read_text() if md.exists() else "# Benchmarks\n"
  md.write_text(
    update_section(text, args.kind, render_markdown(result, args.plot))
  )
  print(f"updated {md} and {args.plot}")


if __name__ == "__main__":
  main()

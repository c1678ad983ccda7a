"""The MoE benchmark with the library tiled and switched as `profile_moe.py`'s
variant prefixes say, so that a variant's rows are timed as the benchmark
times them (interleaved trials, anchors) before it becomes the default:

  python scripts/bench_moe_variant.py PREFIXES --out PATH [benchmarks.moe
    arguments]

PREFIXES: `profile_moe.py` prefixes joined by "-" (e.g. "g2pair-g2x2"), or
"none" for the library's defaults. The JSON's meta records them as
"variant".
"""

import json
import sys

from benchmarks import moe
from scripts import profile_moe


def prefixes_of(arg: str) -> set[str]:
  """The prefixes named by `arg`, each checked ("none": no prefix)."""
  if arg == "none":
    return set()
  profile_moe.parse_args(["qwen3-30b-a3b", "1", f"{arg}-autofused"])
  return set(arg.split("-"))


def out_path(argv) -> str:
  """Where `benchmarks.moe` writes its JSON: this wrapper needs `--out`."""
  for i, arg in enumerate(argv):
    if arg == "--out" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--out="):
      return arg.split("=", 1)[1]
  raise SystemExit("bench_moe_variant.py needs --out PATH")


def main(argv):
  if not argv:
    raise SystemExit(__doc__)
  prefixes = prefixes_of(argv[0])
  path = out_path(argv[1:])
  profile_moe.use_prefixes(prefixes)
  moe.main(argv[1:])
  with open(path) as f:
    results = json.load(f)
  results["meta"]["variant"] = argv[0]
  with open(path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])

#!/usr/bin/env bash
# One device call that does a GPU session's checks, in priority order:
#   bash scripts/gpu_session.sh [time budget for the benchmark, s]
# Run from the repo root on the GPU machine (PYTHONPATH=. is set here).
# Writes logs and results under $OUT (or ./gpu_out): gpu_tier.log,
# matmul_h200.json. (The whole suite, interpreter tests included, takes over
# 400 s there; CI runs it on CPU.) Render the JSON here with
#   python -m benchmarks.report <matmul_h200.json>
# The MoE benchmark is slower (anchors of seconds per call); run it in its
# own call, one or two models at a time (4096 and 16384 tokens with
# `--impls fp4jax_pallas_w4a16,ragged_dot_bf16`: the reference is slow),
# then merge the runs with `python -m benchmarks.report a.json b.json
# --kind moe`, e.g.
#   python3 -m benchmarks.moe --models mixtral-8x7b --time-budget 400 \
#     --out $OUT/moe_mixtral.json
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
budget="${1:-130}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "== gpu tier"
timeout 250 python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests \
  --ignore=tests/notebooks_test.py > "$out/gpu_tier.log" 2>&1
tail -n 5 "$out/gpu_tier.log"
echo "== split-K heuristic (first row of each shape) against older splits"
timeout 80 python3 -m benchmarks.tune_matmul --shapes 4096:14336,2048:5120 \
  --tokens 1,64,256 --configs "splits=8;splits=2" \
  --out "$out/tune_splits.json" 2>&1 | grep -E "TB/s|WRONG|FAILED"
echo "== benchmark (budget ${budget}s)"
timeout $((budget + 120)) python3 -m benchmarks.matmul \
  --time-budget "$budget" --out "$out/matmul_h200.json" 2>&1 \
  | grep -v -i warning | grep -E "fp4jax|wrote" | tail -n 40

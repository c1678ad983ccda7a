#!/usr/bin/env bash
# One device call that does a GPU session's checks, in priority order:
#   bash scripts/gpu_session.sh [time budget for the benchmark, s]
# Run from the repo root on the GPU machine (PYTHONPATH=. is set here).
# Writes logs and results under $OUT (or ./gpu_out): gpu_tier.log,
# full_suite.log, matmul_h200.json. Render the JSON here with
#   python -m benchmarks.report <matmul_h200.json>
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
budget="${1:-150}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "== gpu tier"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests \
  > "$out/gpu_tier.log" 2>&1
tail -n 5 "$out/gpu_tier.log"
echo "== benchmark (budget ${budget}s)"
timeout $((budget + 120)) python3 -m benchmarks.matmul \
  --time-budget "$budget" --out "$out/matmul_h200.json" 2>&1 \
  | grep -v -i warning | grep -E "fp4jax|wrote" | tail -n 40
echo "== full suite"
timeout 400 python3 -m pytest -q -p no:cacheprovider -x tests \
  > "$out/full_suite.log" 2>&1
tail -n 3 "$out/full_suite.log"

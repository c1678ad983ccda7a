#!/usr/bin/env bash
# One device call: 64-row one-warpgroup CTAs (Config.cta_rows) against the
# two-warpgroup kernel, matmul and MoE decode, plus ptxas register counts.
#   bash scripts/gpu_rows64.sh   (repo root, GPU machine; writes under $OUT)
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
echo "== transform GPU tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/transform_gpu_test.py 2>&1 | tail -n 2
echo "== ptxas (8192x28672, M=1: heuristic, then cta_rows=64)"
MOSAIC_GPU_DUMP_TO="$out/dump" MOSAIC_GPU_DUMP_PTXAS=1 timeout 60 \
  python3 -m benchmarks.tune_matmul --shapes 8192:28672 --tokens 1 \
  --configs "cta_rows=64" > "$out/ptxas.log" 2>&1
grep -i -E "registers|TB/s" "$out/ptxas.log" | head -n 12
echo "== matmul decode"
timeout 300 python3 -m benchmarks.tune_matmul \
  --shapes 8192:28672,28672:8192,4096:14336,7168:2048,2048:5120 \
  --tokens 1,16,64 \
  --configs "cta_rows=64;cta_rows=64,splits=2;cta_rows=64,num_stages=6" \
  --out "$out/tune_rows64.json" 2>&1 | grep -E "TB/s|WRONG|FAILED"
echo "== MoE decode"
for model in qwen3-30b-a3b deepseek-v3; do
  timeout 100 python3 scripts/profile_moe.py "$model" 1,16 fused,rows64fused \
    2>&1 | grep -E "^==|mosaic|Error"
done

#!/usr/bin/env bash
# One device call: the sm90_layout (twiddled) decoder against natural order,
# Pallas kernel time only (CUPTI, kernels named mosaic_gpu; the per-call
# twiddle copy and split-K sums are XLA kernels and not counted).
#   bash scripts/gpu_twiddle.sh   (repo root, GPU machine; writes under $OUT)
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
tune() {
  timeout "$1" python3 -m benchmarks.tune_matmul --kernels mosaic_gpu \
    --shapes "$2" --tokens "$3" --configs "$4" --out "$out/$5" 2>&1 \
    | grep -E "TB/s|WRONG|FAILED"
}
tune 240 8192:28672,28672:8192 1,16,64,2048 \
  "twiddled=1;twiddled=1,cta_rows=64;twiddled=1,cta_rows=64,splits=2" \
  tune_twiddle_large.json
tune 150 4096:14336,7168:2048,2048:5120 1,16,64 \
  "twiddled=1;twiddled=1,cta_rows=64" tune_twiddle_small.json

#!/usr/bin/env bash
# One device call after the sm90 weight layout and 64-row decode CTAs:
# the kernels' GPU tier, the matmul benchmark (decode rows first) and the
# MoE decode rows. Writes under $OUT.
#   bash scripts/gpu_final.sh
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
echo "== kernels GPU tier"
timeout 170 python3 -m pytest -v -p no:cacheprovider -m gpu tests/pallas_kernels \
  > "$out/gpu_kernels.log" 2>&1
grep -c PASSED "$out/gpu_kernels.log"; grep -E "FAILED|ERROR" "$out/gpu_kernels.log" | head
tail -n 2 "$out/gpu_kernels.log"
echo "== matmul benchmark"
timeout 190 python3 -m benchmarks.matmul --time-budget 110 \
  --out "$out/matmul_h200.json" 2>&1 | grep -E "fp4jax|wrote" | tail -n 30
echo "== MoE decode"
timeout 130 python3 -m benchmarks.moe --models qwen3-30b-a3b,deepseek-v3 \
  --tokens 1,16 --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget 80 \
  --out "$out/moe_decode.json" 2>&1 | grep -E "TB/s|wrote|rel|failed"

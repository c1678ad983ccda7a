#!/usr/bin/env bash
# Thirteenth session's last device call (nvidia-h200-x2): the MoE GPU tests
# on GPU 0 while GPU 1 runs the matmul GPU tests, then the decode rows of
# benchmarks.matmul and benchmarks.moe (integer block-scale conversion),
# and Qwen3-30B-A3B's decode with SwiGLU fused and not (profile_moe.py).
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
CUDA_VISIBLE_DEVICES=0 timeout 540 python3 -m pytest -v -p no:cacheprovider \
  -m gpu tests/pallas_kernels/nvfp4_moe > "$out/gpu_tier_moe.log" 2>&1 &
export CUDA_VISIBLE_DEVICES=1
timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu \
  tests/pallas_kernels/nvfp4_matmul tests/pallas_kernels/activation_quant_test.py \
  > "$out/gpu_tier_matmul.log" 2>&1
timeout 190 python3 -m benchmarks.matmul --tokens 1,16 --time-budget 150 \
  --out "$out/matmul_h200_s13_decode.json" > "$out/matmul_bench.log" 2>&1
timeout 200 python3 -m benchmarks.moe --models qwen3-30b-a3b,deepseek-v3,mixtral-8x7b,gpt-oss-120b \
  --tokens 1,16 --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget 170 \
  --out "$out/moe_h200_s13_decode.json" > "$out/moe_bench.log" 2>&1
timeout 70 python3 scripts/profile_moe.py qwen3-30b-a3b 1,16 autofused,auto \
  > "$out/profile_qwen3_decode.log" 2>&1
wait
for part in moe matmul; do
  echo "== $part: $(grep -c PASSED "$out/gpu_tier_$part.log") passed"
  grep -E "FAILED|ERROR" "$out/gpu_tier_$part.log" | head -n 10
  tail -n 1 "$out/gpu_tier_$part.log"
done
grep -E "K=" "$out/matmul_bench.log" | tail -n 60
grep -E "TB/s|failed" "$out/moe_bench.log" | tail -n 20
grep -E "^==" "$out/profile_qwen3_decode.log"

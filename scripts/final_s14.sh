#!/usr/bin/env bash
# Fourteenth session's GPU tier and decode benchmarks in one device call
# (nvidia-h200-x2): the MoE GPU tests on GPU 0; on GPU 1 the matmul GPU
# tests, then the rest of the tier (it sees both GPUs, for the two-GPU
# tests), then the tuner on dense K = 2880 layers (K steps of 256 with a
# partial last step against the old 64) and the MoE decode rows of
# benchmarks.moe, alone on GPU 1.
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export NCCL_NVLS_ENABLE=0
CUDA_VISIBLE_DEVICES=0 timeout 560 python3 -m pytest -v -p no:cacheprovider \
  -m gpu tests/pallas_kernels/nvfp4_moe > "$out/gpu_tier_moe.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu \
  tests/pallas_kernels/nvfp4_matmul tests/pallas_kernels/activation_quant_test.py \
  > "$out/gpu_tier_matmul.log" 2>&1
CUDA_VISIBLE_DEVICES=0,1 timeout 200 python3 -m pytest -v -p no:cacheprovider -m gpu \
  tests --ignore=tests/pallas_kernels --ignore=tests/notebooks_test.py \
  > "$out/gpu_tier_rest.log" 2>&1
export CUDA_VISIBLE_DEVICES=1
timeout 90 python3 -m benchmarks.tune_matmul --max-configs 2 \
  --shapes 2880:5120,2880:4096 --tokens 1,16,64 \
  --configs "block_k=64,splits=3,num_stages=4" \
  --out "$out/tune_ragged_k_h200.json" > "$out/tune_ragged.log" 2>&1
timeout 200 python3 -m benchmarks.moe --models qwen3-30b-a3b,deepseek-v3,mixtral-8x7b,gpt-oss-120b \
  --tokens 1,16 --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget 170 \
  --out "$out/moe_h200_s14_decode.json" > "$out/moe_bench.log" 2>&1
wait
status=0
for part in moe matmul rest; do
  echo "== $part: $(grep -c PASSED "$out/gpu_tier_$part.log") passed"
  grep -E "FAILED|ERROR" "$out/gpu_tier_$part.log" | head -n 10
  tail -n 1 "$out/gpu_tier_$part.log"
  if grep -qE "FAILED|ERROR" "$out/gpu_tier_$part.log"; then status=1; fi
done
grep -E "TB/s|WRONG|FAILED" "$out/tune_ragged.log"
grep -E "TB/s|failed" "$out/moe_bench.log" | tail -n 20
exit $status

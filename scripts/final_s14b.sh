#!/usr/bin/env bash
# Fourteenth session's last device call (nvidia-h200-x2), for the MoE
# combine as a product and a sum (no einsum): on GPU 0 the MoE GPU tests of
# the fused and unfused dense-loop, Qwen3-sized, one-expert and sigmoid
# cases; on GPU 1 one-call profiles of Qwen3-30B-A3B and DeepSeek-V3 at 1
# and 16 tokens, then the MoE decode rows of benchmarks.moe.
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
CUDA_VISIBLE_DEVICES=0 timeout 380 python3 -m pytest -v -p no:cacheprovider \
  -m gpu tests/pallas_kernels/nvfp4_moe \
  -k "TestOnGPU and (matches_dense_loop or qwen3_sized or all_tokens or sigmoid)" \
  > "$out/gpu_tier_moe.log" 2>&1 &
export CUDA_VISIBLE_DEVICES=1
for model in qwen3-30b-a3b deepseek-v3; do
  timeout 80 python3 scripts/profile_moe.py "$model" 1,16 autofused \
    > "$out/profile_$model.log" 2>&1
done
timeout 200 python3 -m benchmarks.moe --models qwen3-30b-a3b,deepseek-v3,mixtral-8x7b,gpt-oss-120b \
  --tokens 1,16 --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget 170 \
  --out "$out/moe_h200_s14_combine.json" > "$out/moe_bench.log" 2>&1
wait
echo "== moe: $(grep -c PASSED "$out/gpu_tier_moe.log") passed"
grep -E "FAILED|ERROR" "$out/gpu_tier_moe.log" | head -n 10
tail -n 1 "$out/gpu_tier_moe.log"
grep -hE "^==|fusion|mosaic" "$out"/profile_*.log | head -n 60
grep -E "TB/s|failed" "$out/moe_bench.log" | tail -n 20
grep -qE "FAILED|ERROR" "$out/gpu_tier_moe.log" && exit 1
exit 0

#!/usr/bin/env bash
# Fourteenth session's last device call (nvidia-h200-x2), for renormalized
# softmax routing as the softmax of the top-k logits: MoE GPU tests of the
# routing on GPU 0; on GPU 1 one-call profiles with and without it.
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -v -p no:cacheprovider \
  -m gpu tests/pallas_kernels/nvfp4_moe \
  -k "counting or (TestOnGPU and (matches_dense_loop or all_tokens or sigmoid))" \
  > "$out/gpu_tier_moe.log" 2>&1 &
export CUDA_VISIBLE_DEVICES=1
for model in qwen3-30b-a3b deepseek-v3; do
  timeout 80 python3 scripts/profile_moe.py "$model" 1,16 \
    autofused,fullsoftmax-autofused > "$out/profile_$model.log" 2>&1
done
wait
echo "== moe: $(grep -c PASSED "$out/gpu_tier_moe.log") passed"
grep -E "FAILED|ERROR" "$out/gpu_tier_moe.log" | head -n 10
tail -n 1 "$out/gpu_tier_moe.log"
grep -hE "^==|fusion" "$out"/profile_*.log | head -n 80
grep -qE "FAILED|ERROR" "$out/gpu_tier_moe.log" && exit 1
exit 0

#!/usr/bin/env bash
# A GPU session's checks, one device call each (600 s per call):
#   bash scripts/gpu_session.sh tier [kernels|matmul|moe|rest]
#                                         # the whole GPU tier (~150 tests;
#                                         # notebooks excluded), or
#                                         # tests/pallas_kernels only, or
#                                         # one op's kernel tests, or all
#                                         # but the kernels' (the kernels'
#                                         # tests took ~500 s and MoE + nn
#                                         # + models over 570 s: split the
#                                         # tier into matmul, moe and rest
#                                         # to stay within 600 s a call)
#   bash scripts/gpu_session.sh tier_parallel ["PART ..."]
#                                         # the whole GPU tier in one call:
#                                         # moe_a to moe_e (the MoE
#                                         # tests in five parts), matmul
#                                         # and rest as
#                                         # pytest processes at once, over
#                                         # the GPUs there are (two on
#                                         # nvidia-h200-x2; one H200 ran
#                                         # it all in 482 s at c854d0b);
#                                         # each part's
#                                         # log comes back as
#                                         # gpu_tier_PART.log
#   bash scripts/gpu_session.sh warp_mma  # on nvidia-h200-x2, ~6 min: the
#                                         # warp-level MMA decode
#                                         # (Config.warp_mma): its GPU
#                                         # tests and MoE profiles on GPU 0,
#                                         # kernel-time diagnostics and the
#                                         # tuner against wgmma on GPU 1
#   bash scripts/gpu_session.sh scales    # on nvidia-h200-x2, ~6 min: what
#                                         # the block scales cost, loads or
#                                         # conversion (diag_decode_bound's
#                                         # one_scale_load, raw_scales) on
#                                         # GPU 0; the MoE prefill rows
#                                         # (4096 tokens, after the
#                                         # fourteenth session's routing)
#                                         # on GPU 1
#   bash scripts/gpu_session.sh planes    # on nvidia-h200-x2, ~4 min: the
#                                         # one-pass W4A4 quantize-and-split
#                                         # kernel (quantize_planes_sm90,
#                                         # on from 1M elements): its GPU
#                                         # tests on GPU 0,
#                                         # profile_matmul.py W4A4 with and
#                                         # without it on GPU 1
#   bash scripts/gpu_session.sh routing   # on nvidia-h200-x2, ~4 min: decode
#                                         # routing and placement in one
#                                         # kernel (route_decode_sm90,
#                                         # on): its GPU tests on GPU 0,
#                                         # MoE profiles with and without
#                                         # it (Qwen3, gpt-oss, Mixtral at
#                                         # 1 and 16 tokens) on GPU 1
#   bash scripts/gpu_session.sh placement # on nvidia-h200-x2, ~6 min: a
#                                         # prefill's placement from the
#                                         # routing kernel's ranks
#                                         # (place_prefill_sm90): its tests
#                                         # on GPU 0, MoE profiles with and
#                                         # without it on GPU 1
#   bash scripts/gpu_session.sh two_block # on nvidia-h200, ~9 min: GEMMs
#                                         # in 64-row CTAs of both halves
#                                         # of a 128-row tile (row_tiles=2;
#                                         # the MoE's decode GEMM 2,
#                                         # TWO_BLOCK_DECODE_GEMM2) and one
#                                         # token's shared activation tile:
#                                         # their GPU tests, then one-call
#                                         # decode profiles of the four
#                                         # models with and without it
#   bash scripts/gpu_session.sh two_block_tune # on nvidia-h200, ~9 min:
#                                         # the two-block MoE GPU tests,
#                                         # Mixtral-8x7B's 16-token profile
#                                         # with and without them, and the
#                                         # tuner's two-block dense decode
#                                         # CTAs on the three large layers
#   bash scripts/gpu_session.sh short_k   # on nvidia-h200, ~5 min: one-call
#                                         # decode profiles of gpt-oss-120b
#                                         # and Qwen3-30B-A3B with GEMM 2 in
#                                         # twice the splits and GEMM 1
#                                         # unfused and split
#   bash scripts/gpu_session.sh decode_rows # on nvidia-h200, ~9 min: the
#                                         # MoE benchmark's decode rows
#                                         # (T = 1 and 16, every model),
#                                         # then the MoE's TestOnGPU suite
#                                         # for what time is left
#   bash scripts/gpu_session.sh row_planes # on nvidia-h200, ~7 min: one
#                                         # token's activation planes
#                                         # written by the routing kernel
#                                         # (SPLIT_IN_DECODE_ROUTING): its
#                                         # GPU tests, one-call profiles
#                                         # with and without, the MoE
#                                         # benchmark's one-token rows
#   bash scripts/gpu_session.sh one_token_rows # on nvidia-h200, ~4 min:
#                                         # the row-plane GPU tests, then
#                                         # the MoE benchmark's one-token
#                                         # rows
#   bash scripts/gpu_session.sh redux_routing # on nvidia-h200, ~8 min:
#                                         # the routing kernel's top-k by
#                                         # warp reductions
#                                         # (route_decode_sm90.REDUX_TOP_K,
#                                         # now on): the routing GPU tests
#                                         # both ways, one-call profiles
#                                         # with and without it, and
#                                         # DeepSeek-V3's one-token row
#   bash scripts/gpu_session.sh g2_splits # on nvidia-h200, ~6 min: decode's
#                                         # GEMM 2 in twice the K splits
#                                         # (profile_moe.py "g2x2"), one- and
#                                         # two-block: one-call profiles
#                                         # at one token (Mixtral-8x7B
#                                         # twice, DeepSeek-V3 once) and
#                                         # Mixtral-8x7B's one-token
#                                         # benchmark row under each
#   bash scripts/gpu_session.sh more_splits # on nvidia-h200, ~3 min:
#                                         # decode's split GEMM 2 in
#                                         # two-block CTAs of twice the
#                                         # splits (TWO_BLOCK_MORE_SPLITS):
#                                         # its GPU tests and the two-block
#                                         # ones, then Mixtral-8x7B's
#                                         # one-token benchmark row
#   bash scripts/gpu_session.sh balance   # on nvidia-h200, ~6 min: decode's
#                                         # GEMM 2 split to spread few CTAs
#                                         # over the SMs (SPLIT_FOR_BALANCE):
#                                         # gpt-oss-120b's one-token profiles
#                                         # with and without, its decode rows
#   bash scripts/gpu_session.sh async_wide # on nvidia-h200, ~5 min: the
#                                         # tuner's 128-row CTAs at 64 and
#                                         # 256 tokens with async_mma, and
#                                         # one-token MoE profiles of GEMM 1
#                                         # in 3 and 2 stages
#   bash scripts/gpu_session.sh m64_tiles # on nvidia-h200, ~4 min: other
#                                         # tiles at 64 tokens (deeper
#                                         # pipelines, 64-row CTAs)
#   bash scripts/gpu_session.sh stages4   # on nvidia-h200, ~9 min: the
#                                         # dense heuristic's 4 stages for
#                                         # 64- and 128-token tiles: tuner,
#                                         # GPU tests, M = 64 and 256 rows
#   bash scripts/gpu_session.sh placement_rows # on nvidia-h200-x2, ~9
#                                         # min: the placement tests, then
#                                         # the prefill rows of the
#                                         # softmax-routed models
#                                         # (benchmarks.moe, 4096 and 16384
#                                         # tokens) over both GPUs
#   bash scripts/gpu_session.sh two_tile  # on nvidia-h200-x2, ~7 min: GEMM
#                                         # 2 in two-tile outputs
#                                         # (config.TWO_TILE_GEMM2, on)
#                                         # and the placement kernel's used
#                                         # tiles: their GPU tests on GPU 0,
#                                         # MoE profiles with and without
#                                         # it at 4096 and 16384 tokens on
#                                         # GPU 1 (and at 16 tokens in
#                                         # 128-row CTAs on GPU 0)
#   bash scripts/gpu_session.sh row_pairs # on nvidia-h200-x2, ~8 min: the
#                                         # row-pair layout (Config.row_pairs,
#                                         # natural activations, no split):
#                                         # its GPU tests and one-call
#                                         # profiles against the default on
#                                         # GPU 0, decode kernel time on GPU 1
#   bash scripts/gpu_session.sh moe_check PYTEST_K VARIANTS [bench]
#                                         # on nvidia-h200-x2, after an MoE
#                                         # change: the MoE GPU tests that
#                                         # match PYTEST_K on GPU 0; on GPU
#                                         # 1 profile_moe.py of Qwen3 and
#                                         # DeepSeek-V3 at 1 and 16 tokens
#                                         # (VARIANTS), with "bench" then
#                                         # benchmarks.moe's decode rows
#   bash scripts/gpu_session.sh matmul [M,...] [budget s]
#                                         # benchmarks.matmul rows, e.g.
#                                         # 2048,8192 (default: all M)
#   bash scripts/gpu_session.sh moe MODELS TOKENS [budget s]
#                                         # benchmarks.moe, Pallas W4A16
#                                         # and ragged_dot only
#   bash scripts/gpu_session.sh repeat_rows MODELS TOKENS [N]
#                                         # benchmarks.moe rows N times
#                                         # (default 3) on GPU 0, clocks
#                                         # sampled alongside (clocks.csv)
#   bash scripts/gpu_session.sh tune SHAPES TOKENS CONFIGS [name] [layout]
#                                         # benchmarks.tune_matmul: the
#                                         # heuristic's config against
#                                         # overrides, e.g. 8192:28672 1,16
#                                         # "async_mma=1;num_stages=6"
#                                         # (layout: sm90 or sm90_row_pairs)
#   bash scripts/gpu_session.sh profile MODEL TOKENS VARIANTS
#                                         # scripts/profile_moe.py: time
#                                         # per kernel of one MoE call,
#                                         # e.g. deepseek-v3 4096,16384
#                                         # autofused,wide
#   bash scripts/gpu_session.sh profiles MODELS TOKENS VARIANTS
#                                         # profile_moe.py for several
#                                         # models, spread over the GPUs
#                                         # (one after another on each);
#                                         # logs profile_MODEL.log
#   bash scripts/gpu_session.sh profile_matmul SHAPES TOKENS [ACTS [FORMS]]
#                                         # scripts/profile_matmul.py: time
#                                         # per kernel of one matmul call
#                                         # (W4A16 and W4A4), e.g.
#                                         # 8192:28672,7168:2048 1,16
#                                         # bf16,nvfp4 operands,table
#   bash scripts/gpu_session.sh ncu "K:N:M:VARIANT[:OVERRIDES] ..."
#                                         # Nsight Compute on the matmul
#                                         # kernel (scripts/ncu_matmul.py),
#                                         # one case per GPU at a time:
#                                         # ncu_CASE.txt (speed of light,
#                                         # occupancy, scheduler and warp
#                                         # stall statistics, memory) and
#                                         # ncu_CASE_sass.csv (stall samples
#                                         # per SASS instruction)
#   bash scripts/gpu_session.sh sharded [MODEL [TOKENS]]
#                                         # on nvidia-h200-x2: the two-GPU
#                                         # tests (tests/sharding_gpu_test.py)
#                                         # and benchmarks.sharded_moe
#                                         # (per-rank memory, speed against
#                                         # one GPU), ~5 min
#   bash scripts/gpu_session.sh async64 | split_partials | split_final
#                                         # ~5-8 min each: the thirty-
#                                         # second session's calls (the
#                                         # 64-token async_mma rule; split
#                                         # layers' float32 partials from
#                                         # registers), each tuner run
#                                         # against the rule off, the
#                                         # matmul GPU tests and the M = 64
#                                         # benchmark rows
# Run from the repo root on the GPU machine; writes under $OUT (or
# ./gpu_out). Render results here with `python -m benchmarks.report
# a.json b.json ... --kind matmul|moe` (`--prefer-first` puts a newer,
# partial run first).
set -u
# NVLink multicast stays off (device KINDS.md): it can take a shared host's
# GPUs out of service.
export NCCL_NVLS_ENABLE=0
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1

# A pytest -v log's passes, failures (first ten) and last line.
test_summary() {
  echo "== tests: $(grep -c PASSED "$1") passed"
  grep -E "FAILED|ERROR" "$1" | head -n 10
  tail -n 1 "$1"
}
# GPU tests under a time limit, their log and its summary:
#   gpu_tests SECONDS LOG PYTEST_ARGS...
gpu_tests() {
  local limit=$1 log=$2
  shift 2
  timeout "$limit" python3 -m pytest -v -p no:cacheprovider -m gpu "$@" \
    > "$log" 2>&1
  test_summary "$log"
}
# The tuner in both weight layouts, each to tune_NAME_LAYOUT_h200.json:
#   tune_layouts SECONDS NAME SHAPES TOKENS CONFIGS
tune_layouts() {
  local limit=$1 name=$2 shapes=$3 tokens=$4 configs=$5 layout
  for layout in sm90 sm90_row_pairs; do
    timeout "$limit" python3 -m benchmarks.tune_matmul \
      --shapes "$shapes" --tokens "$tokens" --configs "$configs" \
      --weight-layout "$layout" \
      --out "$out/tune_${name}_${layout}_h200.json" 2>&1 \
      | grep -E "TB/s|WRONG|FAILED"
  done
}
# The matmul GPU tests (pytest -k EXPR, or all), then the benchmark's
# M = 64 rows to JSON:
#   matmul_tests_m64 SECONDS JSON [EXPR]
matmul_tests_m64() {
  local limit=$1 json=$2
  shift 2
  gpu_tests "$limit" "$out/matmul_tests.log" \
    tests/pallas_kernels/nvfp4_matmul/pallas_mosaic_gpu_test.py \
    ${1:+-k "$1"}
  timeout 150 python3 -m benchmarks.matmul --tokens 64 \
    --time-budget 120 --out "$out/$json" 2>&1 \
    | grep -E "xla_bf16 |fp4jax_pallas_w4a16 " | head -20
}
# The MoE benchmark's rows, Pallas W4A16 and ragged_dot:
#   moe_rows SECONDS JSON BENCHMARK_ARGS...
moe_rows() {
  local limit=$1 json=$2
  shift 2
  timeout "$limit" python3 -m benchmarks.moe \
    --impls fp4jax_pallas_w4a16,ragged_dot_bf16 "$@" --out "$json" 2>&1 \
    | grep -E "fp4jax|failed"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "${1:-tier}" in
  tier)
    case "${2:-all}" in
      kernels) paths=(tests/pallas_kernels) ;;
      matmul) paths=(tests/pallas_kernels/nvfp4_matmul tests/pallas_kernels/activation_quant_test.py) ;;
      moe) paths=(tests/pallas_kernels/nvfp4_moe) ;;
      rest) paths=(tests --ignore=tests/pallas_kernels) ;;
      *) paths=(tests) ;;
    esac
    timeout 560 python3 -m pytest -v -p no:cacheprovider -m gpu "${paths[@]}" \
      --ignore=tests/notebooks_test.py > "$out/gpu_tier.log" 2>&1
    grep -c PASSED "$out/gpu_tier.log"
    grep -E "FAILED|ERROR" "$out/gpu_tier.log" | head -n 20
    tail -n 2 "$out/gpu_tier.log"
    ;;
  tier_parallel)
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
    # The MoE tests in five parts (all of them took 557 s of the 570 s
    # timeout at 79e98b3, moe_b of two parts 481 s at 7a02150, and moe_c,
    # then every kernel test outside the two classes, 565 s with every
    # part on one H200 at d1b988c; the longest part 475 s once it was
    # split and took the 72 lowerings): parts go to the GPUs in turn; the
    # rest sees all of them.
    parts="${2:-moe_a moe_b moe_c moe_d moe_e matmul rest}"
    # Processes that share a GPU must not each preallocate most of it.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    declare -A part_paths=(
      [moe]="tests/pallas_kernels/nvfp4_moe"
      [moe_a]="tests/pallas_kernels/nvfp4_moe"
      [moe_b]="tests/pallas_kernels/nvfp4_moe"
      [moe_c]="tests/pallas_kernels/nvfp4_moe/pallas_mosaic_gpu_test.py"
      [moe_e]="tests/pallas_kernels/nvfp4_moe/pallas_mosaic_gpu_test.py tests/pallas_kernels/nvfp4_moe/placement_test.py tests/pallas_kernels/nvfp4_moe/config_test.py tests/pallas_kernels/nvfp4_moe/base_test.py"
      [moe_d]="tests/pallas_kernels/nvfp4_moe/route_decode_sm90_test.py tests/pallas_kernels/nvfp4_moe/place_prefill_sm90_test.py tests/pallas_kernels/nvfp4_moe/gather_rows_sm90_test.py"
      [matmul]="tests/pallas_kernels/nvfp4_matmul tests/pallas_kernels/activation_quant_test.py"
      [rest]="tests --ignore=tests/pallas_kernels --ignore=tests/notebooks_test.py"
    )
    # moe_c's share of the kernel tests outside the two classes; moe_e
    # takes the rest of them.
    moe_c_tests="mid_tile or padded_intermediate or 256_token or group_sized or lowers_for_sm90"
    declare -A part_k=(
      [moe_a]="TestOnGPU and not TestOnGPUUnfusedSwiGLU"
      [moe_b]="TestOnGPUUnfusedSwiGLU"
      # Class names match as substrings: this leaves out both classes.
      [moe_c]="not TestOnGPU and ($moe_c_tests)"
      [moe_d]="not TestOnGPU"
      [moe_e]="not TestOnGPU and not ($moe_c_tests)"
    )
    # The kernels' parts take one GPU each; the rest sees every GPU, so
    # that the two-GPU tests run where there are two.
    status=0
    i=0
    for part in $parts; do
      visible=$((i % gpus))
      if [ "$part" = rest ]; then visible=$(seq -s, 0 $((gpus - 1))); fi
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$visible timeout 570 python3 -m pytest -v \
        -p no:cacheprovider -m gpu -k "${part_k[$part]:-}" ${part_paths[$part]} \
        > "$out/gpu_tier_$part.log" 2>&1 &
      i=$((i + 1))
    done
    wait
    for part in $parts; do
      echo "== $part: $(grep -c PASSED "$out/gpu_tier_$part.log") passed"
      grep -E "FAILED|ERROR" "$out/gpu_tier_$part.log" | head -n 10
      tail -n 1 "$out/gpu_tier_$part.log"
      if grep -qE "FAILED|ERROR" "$out/gpu_tier_$part.log"; then status=1; fi
    done
    exit $status
    ;;
  warp_mma)
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout 300 python3 -m pytest -v -p no:cacheprovider -m gpu \
        -k warp_mma tests/pallas_kernels > "$out/warp_mma_tests.log" 2>&1
      for model in qwen3-30b-a3b deepseek-v3; do
        timeout 120 python3 scripts/profile_moe.py "$model" 1,16 \
          autofused,warpmma-autofused,split2-auto,warpmma-split2-auto \
          > "$out/profile_warp_$model.log" 2>&1
      done
    ) &
    export CUDA_VISIBLE_DEVICES=1
    timeout 200 python3 scripts/diag_decode_bound.py 8192:28672,28672:8192 \
      1,16 full,no_decode,no_mma "warp_mma=1,async_mma=0" \
      > "$out/diag_warp.log" 2>&1
    timeout 240 python3 -m benchmarks.tune_matmul --max-configs 3 \
      --shapes 8192:28672,28672:8192,4096:14336,7168:2048,2048:5120 \
      --tokens 1,16 --configs "warp_mma=1,async_mma=0;warp_mma=1,async_mma=0,num_stages=3" \
      --out "$out/tune_warp_mma_h200.json" > "$out/tune_warp.log" 2>&1
    wait
    test_summary "$out/warp_mma_tests.log"
    grep -E "K=" "$out/diag_warp.log"
    grep -E "TB/s|WRONG|FAILED" "$out/tune_warp.log"
    grep -hE "^==" "$out"/profile_warp_*.log
    ;;
  scales)
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 scripts/diag_decode_bound.py \
      8192:28672,28672:8192 1,16 full,no_scales,one_scale_load,raw_scales \
      > "$out/diag_scales.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 560 python3 -m benchmarks.moe \
      --models qwen3-30b-a3b,deepseek-v3,mixtral-8x7b,gpt-oss-120b --tokens 4096 \
      --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget 400 \
      --out "$out/moe_h200_prefill.json" > "$out/moe_prefill.log" 2>&1
    wait
    grep -E "K=" "$out/diag_scales.log"
    grep -E "TFLOP/s|failed" "$out/moe_prefill.log" | tail -n 12
    ;;
  planes)
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -v -p no:cacheprovider \
      -m gpu tests/pallas_kernels/nvfp4_matmul/quantize_planes_sm90_test.py \
      > "$out/planes_tests.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 300 python3 scripts/profile_matmul.py \
      7168:2048,2048:5120,28672:8192 16,64,256,2048,8192 nvfp4 operands,planes \
      > "$out/profile_planes.log" 2>&1 &
    wait
    test_summary "$out/planes_tests.log"
    grep -E "^==" "$out/profile_planes.log"
    ;;
  routing)
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -v -p no:cacheprovider \
      -m gpu tests/pallas_kernels/nvfp4_moe/route_decode_sm90_test.py \
      > "$out/routing_tests.log" 2>&1 &
    (
      for model in qwen3-30b-a3b gpt-oss-120b mixtral-8x7b; do
        CUDA_VISIBLE_DEVICES=1 timeout 100 python3 scripts/profile_moe.py \
          "$model" 1,16 xlarouting-autofused,autofused \
          > "$out/profile_routing_$model.log" 2>&1
      done
    ) &
    wait
    test_summary "$out/routing_tests.log"
    grep -hE "^==|Error" "$out"/profile_routing_*.log
    ;;
  placement)
    # The prefill placement kernels (place_prefill_sm90): their tests and
    # the routing kernel's on GPU 0; MoE profiles with XLA's placement
    # and with the kernels on GPU 1 (every kernel listed at 4096 tokens).
    CUDA_VISIBLE_DEVICES=0 timeout 400 python3 -m pytest -v -p no:cacheprovider \
      -m gpu tests/pallas_kernels/nvfp4_moe/place_prefill_sm90_test.py \
      tests/pallas_kernels/nvfp4_moe/route_decode_sm90_test.py \
      > "$out/placement_tests.log" 2>&1 &
    (
      export CUDA_VISIBLE_DEVICES=1
      PROFILE_ALL_KERNELS=1 timeout 150 python3 scripts/profile_moe.py \
        qwen3-30b-a3b 4096 xlaplace-autofused,autofused,xlaplace-autofused \
        > "$out/profile_place_qwen3.log" 2>&1
      for model in gpt-oss-120b mixtral-8x7b; do
        timeout 100 python3 scripts/profile_moe.py "$model" 4096 \
          xlaplace-autofused,autofused > "$out/profile_place_$model.log" 2>&1
      done
      timeout 120 python3 scripts/profile_moe.py qwen3-30b-a3b 16384 \
        xlaplace-autofused,autofused >> "$out/profile_place_qwen3.log" 2>&1
    ) &
    wait
    test_summary "$out/placement_tests.log"
    grep -hE "^==|Error|mosaic" "$out"/profile_place_*.log
    ;;
  two_tile)
    # GEMM 2 in output tiles of two 128-row weight tiles: its tests, the
    # placement tests (the placement kernel also counts the used tiles)
    # and the routing tests on GPU 0; one-call profiles, one-tile GEMM 2
    # first and last, on GPU 1 (every kernel listed at 4096 tokens).
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout 420 python3 -m pytest -v -p no:cacheprovider -m gpu \
        tests/pallas_kernels/nvfp4_moe/place_prefill_sm90_test.py \
        tests/pallas_kernels/nvfp4_moe/route_decode_sm90_test.py \
        tests/pallas_kernels/nvfp4_moe/pallas_mosaic_gpu_test.py \
        -k "place or route or two_tile or qwen3_sized or group_sized" \
        > "$out/two_tile_tests.log" 2>&1
      timeout 90 python3 scripts/profile_moe.py qwen3-30b-a3b 16 \
        autofused,g2wide-autofused,g2wide-g2two-autofused \
        > "$out/profile_two_tile_decode.log" 2>&1
    ) &
    (
      export CUDA_VISIBLE_DEVICES=1
      PROFILE_ALL_KERNELS=1 timeout 150 python3 scripts/profile_moe.py \
        qwen3-30b-a3b 4096 g2one-autofused,autofused,g2one-autofused \
        > "$out/profile_two_tile_qwen3.log" 2>&1
      timeout 110 python3 scripts/profile_moe.py mixtral-8x7b 4096 \
        g2one-autofused,autofused > "$out/profile_two_tile_mixtral.log" 2>&1
      timeout 150 python3 scripts/profile_moe.py deepseek-v3 4096 \
        g2one-autofused,autofused > "$out/profile_two_tile_deepseek.log" 2>&1
      timeout 120 python3 scripts/profile_moe.py qwen3-30b-a3b 16384 \
        g2one-autofused,autofused >> "$out/profile_two_tile_qwen3.log" 2>&1
    ) &
    wait
    test_summary "$out/two_tile_tests.log"
    grep -hE "^==|Error|mosaic" "$out"/profile_two_tile_*.log
    ;;
  two_block)
    # One GPU, one step after another (each under its own timeout).
    gpu_tests 200 "$out/two_block_tests.log" \
      tests/pallas_kernels/nvfp4_matmul/pallas_mosaic_gpu_test.py \
      tests/pallas_kernels/nvfp4_moe/pallas_mosaic_gpu_test.py \
      -k "two_row_tiles_in_64 or two_block or qwen3_sized"
    variants=autofused,g2pair-autofused,s3-g2pair-autofused,autofused,g2pair-autofused
    for model in deepseek-v3:130 mixtral-8x7b:100 qwen3-30b-a3b:60 \
      gpt-oss-120b:70; do
      timeout "${model#*:}" python3 scripts/profile_moe.py "${model%:*}" \
        1,16 "$variants" > "$out/profile_${model%:*}.log" 2>&1
      grep -hE "^==|Error" "$out/profile_${model%:*}.log"
    done
    ;;
  two_block_tune)
    gpu_tests 220 "$out/two_block_tests.log" \
      tests/pallas_kernels/nvfp4_moe/pallas_mosaic_gpu_test.py -k two_block
    timeout 70 python3 scripts/profile_moe.py mixtral-8x7b 16 \
      autofused,g2block-autofused,autofused,g2block-autofused \
      > "$out/profile_mixtral-8x7b.log" 2>&1
    grep -hE "^==|Error" "$out/profile_mixtral-8x7b.log"
    pair="row_tiles=2,block_k=256,num_stages=4"
    timeout 270 python3 -m benchmarks.tune_matmul \
      --shapes 8192:28672,28672:8192,4096:14336 --tokens 1,16 \
      --configs "row_tiles=2;$pair;$pair,splits=2;$pair,splits=4;$pair,splits=8;$pair,num_stages=3,splits=4" \
      --out "$out/tune_two_block_h200.json" 2>&1 | grep -E "TB/s|WRONG|FAILED"
    ;;
  decode_rows)
    moe_rows 330 "$out/moe_h200_decode.json" \
      --models qwen3-30b-a3b,deepseek-v3,mixtral-8x7b,gpt-oss-120b \
      --tokens 1,16 --time-budget 200
    gpu_tests 230 "$out/moe_gpu_tests.log" \
      "tests/pallas_kernels/nvfp4_moe/pallas_mosaic_gpu_test.py::TestOnGPU"
    ;;
  row_planes)
    gpu_tests 160 "$out/row_planes_tests.log" \
      tests/pallas_kernels/nvfp4_moe/route_decode_sm90_test.py \
      -k "row_planes or one_token_moe or moe_through_it"
    for model in deepseek-v3:55 qwen3-30b-a3b:35; do
      timeout "${model#*:}" python3 scripts/profile_moe.py "${model%:*}" 1 \
        xlasplit-autofused,autofused > "$out/profile_${model%:*}.log" 2>&1
      grep -hE "^==|Error" "$out/profile_${model%:*}.log"
    done
    moe_rows 200 "$out/moe_h200_one_token.json" \
      --models qwen3-30b-a3b,deepseek-v3,mixtral-8x7b,gpt-oss-120b \
      --tokens 1 --time-budget 100
    ;;
  one_token_rows)
    gpu_tests 90 "$out/row_planes_tests.log" \
      tests/pallas_kernels/nvfp4_moe/route_decode_sm90_test.py \
      -k "row_planes or one_token_moe"
    moe_rows 130 "$out/moe_h200_one_token.json" \
      --models deepseek-v3,mixtral-8x7b,qwen3-30b-a3b,gpt-oss-120b \
      --tokens 1 --time-budget 60
    ;;
  redux_routing)
    gpu_tests 200 "$out/redux_tests.log" \
      tests/pallas_kernels/nvfp4_moe/route_decode_sm90_test.py
    moe_rows 120 "$out/moe_h200_deepseek_one_token.json" \
      --models deepseek-v3 --tokens 1 --time-budget 60
    for model in deepseek-v3:90 qwen3-30b-a3b:90; do
      timeout "${model#*:}" python3 scripts/profile_moe.py "${model%:*}" \
        1,16,4096 shuffletopk-autofused,autofused,shuffletopk-autofused,autofused \
        > "$out/profile_${model%:*}.log" 2>&1
      grep -hE "^==|Error" "$out/profile_${model%:*}.log"
    done
    ;;
  g2_splits)
    timeout 100 python3 scripts/profile_moe.py mixtral-8x7b 1 \
      autofused,g2x2-autofused,g2pair-g2x2-autofused,autofused,g2x2-autofused,g2pair-g2x2-autofused \
      > "$out/profile_mixtral-8x7b.log" 2>&1
    timeout 90 python3 scripts/profile_moe.py deepseek-v3 1 \
      autofused,g2x2-autofused,g2pair-g2x2-autofused \
      > "$out/profile_deepseek-v3.log" 2>&1
    grep -hE "^==|Error" "$out"/profile_*.log
    # The wrapper checks its prefixes before any GPU work.
    for variant in none g2x2 g2pair-g2x2; do
      timeout 50 python3 scripts/bench_moe_variant.py "$variant" \
        --models mixtral-8x7b --tokens 1 --time-budget 25 \
        --impls fp4jax_pallas_w4a16,ragged_dot_bf16 \
        --out "$out/moe_mixtral_one_token_$variant.json" 2>&1 \
        | grep -E "fp4jax|failed|Error"
    done
    ;;
  more_splits)
    gpu_tests 110 "$out/more_splits_tests.log" \
      tests/pallas_kernels/nvfp4_moe/pallas_mosaic_gpu_test.py \
      -k "more_splits or two_block_decode_gemm2_on_gpu"
    moe_rows 60 "$out/moe_h200_mixtral_one_token.json" \
      --models mixtral-8x7b --tokens 1 --time-budget 25
    ;;
  short_k)
    # The two models far from the decode target, whose one-token GEMMs have
    # about one CTA a SM or fewer (64-row CTAs, K steps of 256; gpt-oss-120b
    # padded to I = 2944: GEMM 1 fused 184 CTAs of 12 steps, GEMM 2 180 of
    # 12; Qwen3-30B-A3B: GEMM 1 fused 96 of 8, GEMM 2 256 of 3): GEMM 2 in
    # twice the splits, GEMM 1 unfused (twice the CTAs) and then split in
    # two; one profile each at 1 and 16 tokens.
    variants="autofused,g2x2-autofused,auto,g2x2-auto,split2-g2x2-auto"
    for run in gpt-oss-120b:200 qwen3-30b-a3b:150; do
      timeout "${run#*:}" python3 -u scripts/profile_moe.py "${run%:*}" 1,16 \
        "$variants" > "$out/profile_${run%:*}.log" 2>&1
      grep -hE "^==|Error" "$out/profile_${run%:*}.log"
    done
    ;;
  balance)
    # Decode's GEMM 2 in twice the splits where its CTAs leave SMs idle
    # (config.SPLIT_FOR_BALANCE; gpt-oss-120b at one token): one-call
    # profiles with and without, then gpt-oss-120b's decode rows.
    timeout 120 python3 -u scripts/profile_moe.py gpt-oss-120b 1 \
      unbalanced-autofused,autofused,unbalanced-autofused,autofused \
      > "$out/profile_gpt-oss-120b.log" 2>&1
    grep -hE "^==|Error" "$out/profile_gpt-oss-120b.log"
    moe_rows 260 "$out/moe_h200_gptoss_decode.json" \
      --models gpt-oss-120b --tokens 1,16 --time-budget 180
    ;;
  async_wide)
    # 128-row CTAs at 64 and 256 tokens with wgmmas in flight across K
    # parts (Config.async_mma, off there), then one-token profiles of the
    # MoE's fused GEMM 1 in fewer stages (more CTAs a SM: Mixtral-8x7B's
    # 448 CTAs make 1.7 waves of two a SM).
    timeout 200 python3 -m benchmarks.tune_matmul \
      --shapes 8192:28672,28672:8192,4096:14336,7168:2048,2048:5120 \
      --tokens 64 --configs "async_mma=1;async_mma=1,mma_parts=4" \
      --out "$out/tune_async_wide_h200.json" 2>&1 | grep -E "TB/s|WRONG|FAILED"
    timeout 80 python3 -m benchmarks.tune_matmul \
      --shapes 8192:28672,28672:8192 --tokens 256 \
      --configs "async_mma=1;async_mma=1,mma_parts=4" \
      --out "$out/tune_async_wide256_h200.json" 2>&1 \
      | grep -E "TB/s|WRONG|FAILED"
    for model in mixtral-8x7b:80 deepseek-v3:110; do
      timeout "${model#*:}" python3 -u scripts/profile_moe.py "${model%:*}" 1 \
        autofused,g1s3-autofused,g1s2-autofused,autofused,g1s3-autofused,g1s2-autofused \
        > "$out/profile_${model%:*}.log" 2>&1
      grep -hE "^==|Error" "$out/profile_${model%:*}.log"
    done
    ;;
  m64_tiles)
    # 64 tokens: deeper pipelines for the 128-row CTAs, and 64-row CTAs in
    # K steps of 128 or 64 (three or more a SM, each loading its own
    # activation tile) against the heuristic.
    timeout 400 python3 -m benchmarks.tune_matmul --max-configs 8 \
      --shapes 8192:28672,28672:8192,4096:14336 --tokens 64 \
      --configs "num_stages=4;block_k=128,num_stages=4;block_k=128,num_stages=6;cta_rows=64,block_k=128,num_stages=3;cta_rows=64,block_k=128,num_stages=4;cta_rows=64,block_k=64,num_stages=6" \
      --out "$out/tune_m64_tiles_h200.json" 2>&1 | grep -E "TB/s|WRONG|FAILED"
    ;;
  stages4)
    # 64- and 128-token tiles in four stages where their bf16 epilogue
    # leaves room (the dense heuristic had counted a float32 one): the
    # tuner against three stages at 256 and 1024 tokens, the matmul GPU
    # tests on the heuristic's configs, then the M = 64 and 256 rows.
    timeout 120 python3 -m benchmarks.tune_matmul \
      --shapes 8192:28672,28672:8192,4096:14336,2048:5120 --tokens 256 \
      --configs "num_stages=3" --out "$out/tune_stages4_h200.json" 2>&1 \
      | grep -E "TB/s|WRONG|FAILED"
    timeout 40 python3 -m benchmarks.tune_matmul \
      --shapes 8192:28672 --tokens 1024 --configs "num_stages=3" \
      --out "$out/tune_stages4_1024_h200.json" 2>&1 \
      | grep -E "TB/s|WRONG|FAILED"
    gpu_tests 150 "$out/matmul_tests.log" \
      tests/pallas_kernels/nvfp4_matmul/pallas_mosaic_gpu_test.py \
      -k "matches_numpy_oracle or row_pairs or repeated"
    timeout 260 python3 -m benchmarks.matmul --tokens 64,256 \
      --time-budget 200 --out "$out/matmul_h200_s30_mid.json" 2>&1 \
      | grep -E "xla_bf16 |fp4jax_pallas_w4a16 " | head -30
    ;;
  async64)
    # Unsplit four-stage 128-row tiles of <= 64 tokens with wgmmas in
    # flight across K parts (config.WIDE_ASYNC_*): the tuner against them
    # off, both layouts, then the matmul GPU tests on the heuristic's
    # configs and the M = 64 benchmark rows.
    tune_layouts 150 async64 8192:28672,4096:14336 24,40,64 "async_mma=0"
    matmul_tests_m64 150 matmul_h200_s32_m64.json \
      "matches_numpy_oracle or row_pairs or repeated or configs"
    ;;
  split_partials)
    # Split-K 128-row tiles store float32 partial sums from registers
    # (Config.direct_partials), so 64- and 128-token tiles of split layers
    # take four stages: the tuner against three (the old fit) and with
    # wgmmas in flight, then the matmul GPU tests and the M = 64 rows.
    tune_layouts 170 split_partials 28672:8192,7168:2048,2048:5120 \
      24,64,128 "num_stages=3;async_mma=1"
    matmul_tests_m64 150 matmul_h200_s32_split.json \
      "matches_numpy_oracle or row_pairs or repeated or configs"
    ;;
  split_final)
    # The split_partials rule's final tree (split 128-row tiles of <= 64
    # tokens in four stages with wgmmas in flight): the matmul GPU tests
    # whole, then the M = 64 benchmark rows.
    matmul_tests_m64 300 matmul_h200_s32_split.json
    ;;
  placement_rows)
    # The placement tests then the benchmark's prefill rows of the
    # softmax-routed models on GPU 0 (Qwen3-30B-A3B, Mixtral-8x7B), a
    # profile and gpt-oss-120b's rows on GPU 1.
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu \
        tests/pallas_kernels/nvfp4_moe/place_prefill_sm90_test.py \
        > "$out/placement_tests.log" 2>&1
      timeout 420 python3 -m benchmarks.moe \
        --models qwen3-30b-a3b,mixtral-8x7b --tokens 4096,16384 \
        --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget 360 \
        --out "$out/moe_h200_a.json" > "$out/bench_a.log" 2>&1
    ) &
    (
      export CUDA_VISIBLE_DEVICES=1
      timeout 100 python3 scripts/profile_moe.py qwen3-30b-a3b 4096,16384 \
        xlaplace-autofused,autofused > "$out/profile_place_qwen3.log" 2>&1
      timeout 440 python3 -m benchmarks.moe --models gpt-oss-120b \
        --tokens 4096,16384 --impls fp4jax_pallas_w4a16,ragged_dot_bf16 \
        --time-budget 380 --out "$out/moe_h200_b.json" > "$out/bench_b.log" 2>&1
    ) &
    wait
    test_summary "$out/placement_tests.log"
    grep -hE "^==|Error|mosaic" "$out"/profile_place_qwen3.log
    grep -hE "TB/s|wrote|rel|failed" "$out"/bench_*.log
    ;;
  moe_check)
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    CUDA_VISIBLE_DEVICES=0 timeout 380 python3 -m pytest -v -p no:cacheprovider \
      -m gpu tests/pallas_kernels/nvfp4_moe -k "$2" \
      > "$out/gpu_tier_moe.log" 2>&1 &
    export CUDA_VISIBLE_DEVICES=1
    for model in qwen3-30b-a3b deepseek-v3; do
      timeout 80 python3 scripts/profile_moe.py "$model" 1,16 "$3" \
        > "$out/profile_$model.log" 2>&1
    done
    if [ "${4:-}" = bench ]; then
      timeout 200 python3 -m benchmarks.moe \
        --models qwen3-30b-a3b,deepseek-v3,mixtral-8x7b,gpt-oss-120b \
        --tokens 1,16 --impls fp4jax_pallas_w4a16,ragged_dot_bf16 \
        --time-budget 170 --out "$out/moe_h200.json" > "$out/moe_bench.log" 2>&1
    fi
    wait
    echo "== moe: $(grep -c PASSED "$out/gpu_tier_moe.log") passed"
    grep -E "FAILED|ERROR" "$out/gpu_tier_moe.log" | head -n 10
    tail -n 1 "$out/gpu_tier_moe.log"
    grep -hE "^==|fusion|mosaic" "$out"/profile_*.log | head -n 80
    if [ -f "$out/moe_bench.log" ]; then
      grep -E "TB/s|failed" "$out/moe_bench.log" | tail -n 20
    fi
    ! grep -qE "FAILED|ERROR" "$out/gpu_tier_moe.log"
    ;;
  matmul)
    tokens=()
    if [ -n "${2:-}" ]; then tokens=(--tokens "$2"); fi
    timeout 580 python3 -m benchmarks.matmul "${tokens[@]}" \
      --time-budget "${3:-400}" --out "$out/matmul_h200.json" 2>&1 \
      | grep -E "fp4jax|wrote" | tail -n 40
    ;;
  row_pairs)
    # The row-pair experiment (Config.row_pairs): its GPU tests, then
    # one-call profiles against the default layout (split included) on GPU
    # 0; kernel time of the decode CTAs with and without it on GPU 1.
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout 200 python3 -m pytest -v -p no:cacheprovider -m gpu \
        tests/pallas_kernels/nvfp4_matmul/pallas_mosaic_gpu_test.py \
        -k row_pairs > "$out/row_pairs_tests.log" 2>&1
      timeout 300 python3 scripts/profile_matmul.py \
        7168:2048,2048:5120,4096:14336,28672:8192,8192:28672 1,16,256,2048,8192 \
        bf16 operands,rowpairs > "$out/profile_row_pairs.log" 2>&1
    ) &
    CUDA_VISIBLE_DEVICES=1 timeout 500 python3 scripts/diag_decode_bound.py \
      8192:28672,28672:8192,7168:2048 1,16 full,no_mma "row_pairs=1" \
      > "$out/diag_row_pairs.log" 2>&1 &
    wait
    test_summary "$out/row_pairs_tests.log"
    grep -E "^==" "$out/profile_row_pairs.log"
    cat "$out/diag_row_pairs.log" | tail -n 30
    ;;
  moe)
    timeout 580 python3 -m benchmarks.moe --models "$2" --tokens "$3" \
      --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget "${4:-400}" \
      --out "$out/moe_h200.json" 2>&1 | grep -E "TB/s|wrote|rel|failed"
    ;;
  repeat_rows)
    # One benchmark row N times over, alone on one GPU, with the GPU's
    # clocks, power and throttle reasons sampled every 100 ms (clocks.csv):
    # is a row's spread between runs the kernels' or the clocks'?
    # (Newer drivers name the throttle reasons "clocks event reasons".)
    reasons=clocks_event_reasons.active
    nvidia-smi --query-gpu=$reasons --format=csv > /dev/null 2>&1 \
      || reasons=clocks_throttle_reasons.active
    nvidia-smi -i 0 --format=csv -lms 100 \
      --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,$reasons \
      > "$out/clocks.csv" &
    smi=$!
    for run in $(seq "${4:-3}"); do
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m benchmarks.moe \
        --models "$2" --tokens "$3" \
        --impls fp4jax_pallas_w4a16,ragged_dot_bf16 --time-budget 150 \
        --out "$out/moe_h200_run$run.json" 2>&1 | grep -E "fp4jax|failed"
    done
    kill $smi
    # Distinct SM clocks (MHz) and throttle reasons, with sample counts.
    cut -d, -f2 "$out/clocks.csv" | sort | uniq -c | sort -rn | head -n 8
    cut -d, -f6 "$out/clocks.csv" | sort | uniq -c | sort -rn | head -n 5
    ;;
  tune)
    timeout 580 python3 -m benchmarks.tune_matmul --shapes "$2" \
      --tokens "$3" --configs "$4" --out "$out/tune_${5:-h200}.json" \
      --weight-layout "${6:-sm90}" 2>&1 | grep -E "TB/s|WRONG|FAILED"
    ;;
  profile)
    timeout 580 python3 scripts/profile_moe.py "$2" "$3" "$4" 2>&1 \
      | tee "$out/profile_${2}.log" | grep -E "^==|mosaic"
    ;;
  profiles)
    # One queue per GPU, its models one after another (processes sharing a
    # GPU would time-slice each other's kernels).
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
    read -r -a models <<< "${2//,/ }"
    for ((gpu = 0; gpu < gpus; gpu++)); do
      (
        for ((i = gpu; i < ${#models[@]}; i += gpus)); do
          CUDA_VISIBLE_DEVICES=$gpu timeout 560 python3 scripts/profile_moe.py \
            "${models[$i]}" "$3" "$4" > "$out/profile_${models[$i]}.log" 2>&1
        done
      ) &
    done
    wait
    for model in "${models[@]}"; do
      grep -E "^==|Error" "$out/profile_$model.log"
    done
    ;;
  profile_matmul)
    timeout 580 python3 scripts/profile_matmul.py "$2" "$3" ${4:+"$4"} \
      ${5:+"$5"} 2>&1 \
      | tee "$out/profile_matmul.log" | grep -E "^==|us "
    ;;
  ncu)
    ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    echo "ncu: ${ncu_bin:-none}"
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
    read -r -a cases <<< "$2"
    for ((gpu = 0; gpu < gpus; gpu++)); do
      (
        for ((i = gpu; i < ${#cases[@]}; i += gpus)); do
          IFS=: read -r k n m variant fields <<< "${cases[$i]}"
          tag="${k}x${n}_m${m}_${variant}${fields:+_${fields//[=,]/}}"
          # The clocks stay as the driver sets them (device METHOD.md); the
          # fourth launch streams a layer the first three did not touch.
          CUDA_VISIBLE_DEVICES=$gpu timeout 280 "$ncu_bin" \
            --clock-control none --kernel-name regex:mosaic_gpu \
            --launch-skip 3 --launch-count 1 \
            --section SpeedOfLight --section LaunchStats \
            --section Occupancy --section SchedulerStats \
            --section WarpStateStats --section MemoryWorkloadAnalysis \
            --section ComputeWorkloadAnalysis --section InstructionStats \
            --section SourceCounters -f -o "$out/ncu_$tag" \
            python3 scripts/ncu_matmul.py "$k:$n" "$m" "$variant" 6 \
            "$fields" > "$out/ncu_${tag}_run.log" 2>&1
          "$ncu_bin" -i "$out/ncu_$tag.ncu-rep" --page details \
            > "$out/ncu_$tag.txt" 2>&1
          "$ncu_bin" -i "$out/ncu_$tag.ncu-rep" --page source \
            --print-source sass --csv > "$out/ncu_${tag}_sass.csv" 2>&1
          rm -f "$out/ncu_$tag.ncu-rep"
        done
      ) &
    done
    wait
    for f in "$out"/ncu_*_run.log; do echo "== $f"; tail -n 3 "$f"; done
    ;;
  sharded)
    timeout 280 python3 -m pytest -v -p no:cacheprovider \
      tests/sharding_gpu_test.py > "$out/sharding_gpu.log" 2>&1
    grep -c PASSED "$out/sharding_gpu.log"
    grep -E "FAILED|ERROR|SKIPPED" "$out/sharding_gpu.log" | head -n 20
    tail -n 2 "$out/sharding_gpu.log"
    timeout 280 python3 -m benchmarks.sharded_moe --model "${2:-deepseek-v3}" \
      --tokens "${3:-16,4096}" --out "$out/sharded_moe_h200x2.json" 2>&1 \
      | grep -vE "^ |^[{}]" | tail -n 30
    ;;
esac

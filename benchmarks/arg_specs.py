"""Named benchmark shapes. (K, N) are a weight's input and output features."""

# Llama-70B MLP up/down, Llama-8B MLP, DeepSeek-V3 expert-sized, Qwen3 MoE.
MATMUL_SHAPES = (
  (8192, 28672),
  (28672, 8192),
  (4096, 14336),
  (7168, 2048),
  (2048, 5120),
)
MATMUL_TOKENS = (1, 16, 64, 256, 2048, 8192)

# MoE layers: (experts, top_k, hidden H, intermediate I).
MOE_MODELS = {
  "qwen3-30b-a3b": (128, 8, 2048, 768),
  "deepseek-v3": (256, 8, 7168, 2048),
  "mixtral-8x7b": (8, 2, 4096, 14336),
  "gpt-oss-120b": (128, 4, 2880, 2880),
}
MOE_TOKENS = (1, 16, 64, 256, 4096, 16384)

# Small enough for a CPU run of the harness itself (tests and CI).
CI_MATMUL_SHAPES = ((256, 512),)
CI_MATMUL_TOKENS = (1, 16)
CI_MOE_MODELS = {"tiny": (8, 2, 128, 64)}
CI_MOE_TOKENS = (1, 16)

# H200 L2 is 60 MB (50 MB usable per partition pair); rotating weight sets
# must together exceed it so no timed call reads weights from L2.
L2_BYTES = 60 * 2**20

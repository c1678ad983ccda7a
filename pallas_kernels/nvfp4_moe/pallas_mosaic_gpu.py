"""The Pallas Mosaic GPU backend of `nvfp4_moe`: grouped NVFP4 GEMMs.

Data flow (one jitted function):
1. route (softmax top-k, `base.route`), then place the (token, expert)
   pairs by expert in a buffer where each expert's rows start on a tile of
   `block_m` rows (padding rows are zero), with one expert id per tile
   (`placement`; `config` holds the tiles); the sorted rows of a prefill
   are copied by `gather_rows_sm90`, those of the used tiles only;
2. GEMM 1 over `w13` with the matmul kernel's sm90 body in grouped mode:
   each token tile reads only its own expert's weights, tiles past the used
   rows exit at once, so a decode step streams only the active experts;
3. `silu(gate) * up` in GEMM 1's epilogue (W4A16, tiles of <= 128
   tokens, I % 128 == 0, or 128-row CTAs, `config.FUSED_SWIGLU_MID_TILE`;
   else in XLA), GEMM 2 over `w2` the same way. GEMM 2 reads its
   activations as two K planes (`sm90.split_activations`); with w13 in the
   "sm90_planes" layout GEMM 1's epilogue writes them so, else an XLA pass
   reorders the intermediate;
4. the router-weighted combine gathers each token's top-k rows.
(`config.REMAINDER_TILES`, off: steps 2-3 once more over 64-row remainder
tiles.)

Routing (softmax or sigmoid scores, grouped top-k) is `base.route`, shared
with the reference; with DECODE_ROUTING_KERNEL (on) decode steps of
softmax-routed models route and place their pairs in one kernel instead
(`route_decode_sm90`; at one token it also splits the token's row into
GEMM 1's activation planes, SPLIT_IN_DECODE_ROUTING), and with PREFILL_ROUTING_KERNEL (on) larger calls
take their routing from it, and with PREFILL_PLACEMENT_KERNEL (on) their
placement from it and `place_prefill_sm90`.

W4A4 (activation="nvfp4") takes GEMM 1's output in float32 and SwiGLU in
XLA, so that the intermediate's FP4 codes are those of the reference (the
fused epilogue rounds silu(gate) * up to bf16 before GEMM 2 quantizes it).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fp4jax.format import sm90_layout
from pallas_kernels import activation_quant
from pallas_kernels import common
from pallas_kernels.nvfp4_matmul import config as config_lib
from pallas_kernels.nvfp4_matmul import pallas_mosaic_gpu_kernel_sm90 as sm90
from pallas_kernels.nvfp4_moe import base
from pallas_kernels.nvfp4_moe import config as moe_config
from pallas_kernels.nvfp4_moe import gather_rows_sm90
from pallas_kernels.nvfp4_moe import place_prefill_sm90
from pallas_kernels.nvfp4_moe import placement
from pallas_kernels.nvfp4_moe import route_decode_sm90

FACTOR_ROWS = sm90.WG_ROWS  # the kernel applies one scale per 64 rows
# One token (decode): tile i holds pair i, no sort (its top-k experts are
# distinct, so no expert's weights are read twice).
DIRECT_DECODE = True
# XLA's row gather moves bf16 rows as 32-bit words (see `_gather_rows`).
GATHER_WORDS = True
# From this many sorted rows, the row gather is a kernel that copies only
# the used tiles' rows (`gather_rows_sm90`), not XLA's gather of all rows.
# H200, one call each (CUPTI, twenty-second session): the gather of
# Qwen3-30B-A3B at 4096 tokens 61.6 -> 49.7 us, DeepSeek-V3's 326 -> 238
# (first version); alone at 16384 Qwen3 tokens (HBM-bound) 261 -> 255.
GATHER_KERNEL = True
GATHER_KERNEL_MIN_ROWS = 4096
# Up to this many (token, expert) pairs, `placement.count_by_expert` places
# them with a few comparison counts instead of `placement.sort_by_expert`'s
# argsort, cumsum and scatters (~11 small XLA kernels). H200, one call
# each (CUPTI): Qwen3-30B-A3B 110.2 -> 105.3 us at 16 tokens, 155.0 ->
# 149.5 at 64, 273.7 -> 261.1 at 256 (2048 pairs); DeepSeek-V3 802 -> 793
# at 16, 1744 -> 1731 at 64. Larger counts are unmeasured (the work grows
# as pairs x rows).
COUNTING_MAX_PAIRS = 2048
# Routing's top-k by comparison counts (`counting_top_k`) up to this many
# tokens x experts^2 comparisons, instead of XLA's sort (3.3-3.9 us a call
# on the H200 at one token; DeepSeek-V3's grouped routing runs three).
# H200, one call each (CUPTI, tenth session): Qwen3-30B-A3B 22.5 -> 21.0 us
# at 1 token, 102.4 -> 102.0 at 16; DeepSeek-V3 79.2 -> 78.3 at 1, 800.6 ->
# 800.4 at 16 (1M comparisons). Larger counts are unmeasured.
COUNTING_TOP_K_MAX = 1 << 20
# Decode steps route and place their pairs in one kernel
# (`route_decode_sm90`: softmax routing renormalized over the chosen
# experts, no bias or groups, <= 16 tokens) instead of ~12 XLA kernels.
# H200, one call each (`profile_moe.py ... xlarouting-autofused,autofused`,
# eighteenth session): Qwen3-30B-A3B 96.1 -> 85.3 us at 16 tokens (the
# kernel 3.9 us), 18.9 -> 18.5 at 1; gpt-oss-120b 272.4 -> 262.3 and 37.3
# -> 36.8; Mixtral-8x7B 246.2 -> 239.6 at 16 (first version).
DECODE_ROUTING_KERNEL = True
# Larger calls of such routing take their weights and experts from the same
# kernel's routing alone (a CTA per 16 tokens; XLA places the pairs)
# instead of XLA's top-k. H200, one call each (CUPTI, twenty-second
# session): Qwen3-30B-A3B 690.6 -> 674.3 us at 4096 tokens (XLA's top-k
# sort 15.3 us, the kernel 5.9), 2486.9 -> 2435.5 at 16384, 245.1 -> 243.4
# at 256; gpt-oss-120b 1533.7 -> 1523.7 at 4096.
PREFILL_ROUTING_KERNEL = True
# Such calls also rank their pairs in that kernel and take their placement
# from `place_prefill_sm90` (a scan kernel and one kernel of writes)
# instead of `placement.sort_by_expert`'s ~14 XLA kernels. H200, one call each
# (CUPTI, twenty-third session): Qwen3-30B-A3B 679.0 -> 653.7 us at 4096
# tokens, 2454.0 -> 2407.9 at 16384; gpt-oss-120b 1521.0 -> 1513.6 at
# 4096; Mixtral-8x7B 4182.7 -> 4175.2.
PREFILL_PLACEMENT_KERNEL = True
# One token's routing kernel also splits its row into GEMM 1's activation
# planes (`route_decode_sm90`'s `x`), in place of an XLA kernel between
# routing and GEMM 1 (W4A16, bf16 x).
SPLIT_IN_DECODE_ROUTING = True


def nvfp4_moe(
  x: jax.Array,
  router_logits: jax.Array,
  experts,
  *,
  top_k: int,
  correction_bias: jax.Array | None = None,
  activation: str = "bf16",
  block_m: int | None = None,
  persistent: bool = moe_config.PERSISTENT,
  cta_rows: int | None = None,
  fused_swiglu: bool = moe_config.FUSED_SWIGLU,
  interpret: bool = False,
  **routing,
) -> jax.Array:
  """See `api.nvfp4_moe`; `block_m`, `persistent`, `cta_rows` and
  `fused_swiglu` override the tiles (`config.Config`; `fused_swiglu`
  applies where I % 128 == 0);
  `routing` takes `base.route`'s other options.

  Raises:
    NotImplementedError: no suitable GPU (and not `interpret`), or expert
      shapes this version does not tile (H or I not a multiple of 64).
  """
  base.check_inputs(x, router_logits, experts, top_k, activation)
  tiles = moe_config.Tiles(block_m, persistent, cta_rows, fused_swiglu)
  forward = _forward_fn(x, top_k, experts, activation, tiles, interpret)
  routing = dict(top_k=top_k, **routing)
  return _routed(
    x,
    router_logits,
    correction_bias,
    dict(experts),
    forward=forward,
    routing=tuple(sorted(routing.items())),  # static: one order
  )


def experts_forward(
  x: jax.Array,
  weights: jax.Array,
  ids: jax.Array,
  experts,
  *,
  activation: str = "bf16",
  routed_experts: int | None = None,
  block_m: int | None = None,
  persistent: bool = moe_config.PERSISTENT,
  cta_rows: int | None = None,
  fused_swiglu: bool = moe_config.FUSED_SWIGLU,
  interpret: bool = False,
) -> jax.Array:
  """The experts of a routed MoE on the kernels; see `api.nvfp4_moe_experts`.

  Pairs whose id is outside `[0, E)` are dropped: sorted into a last group
  whose tiles no kernel visits.
  """
  base.check_routing(x, weights, ids, experts, activation, routed_experts)
  tiles = moe_config.Tiles(block_m, persistent, cta_rows, fused_swiglu)
  forward = _forward_fn(
    x, ids.shape[1], experts, activation, tiles, interpret, routed_experts
  )
  return forward(x, weights, ids.astype(jnp.int32), dict(experts))


def _forward_fn(
  x,
  top_k,
  experts,
  activation,
  tiles: moe_config.Tiles,
  interpret,
  routed_experts=None,
):
  """Checks the GPU and shapes; -> jitted `(x, weights, ids, experts)`.
  `routed_experts`: the router's expert count, for the tile heuristic (None:
  the node's)."""
  common.check_sm90("the Mosaic GPU NVFP4 MoE", interpret)
  n_experts, two_i, hidden = base.StackedLinear.from_mapping(
    experts, "w13_"
  ).shape
  if hidden % 64 or (two_i // 2) % 64:
    raise NotImplementedError(
      f"hidden={hidden} and intermediate={two_i // 2} must be multiples of"
      " 64 (expert stacks are not padded per call)"
    )
  plan = moe_config.Plan(
    tokens=x.shape[0],
    top_k=top_k,
    experts=n_experts,
    block_m=tiles.block_m
    or moe_config.block_m_for(x.shape[0], top_k, routed_experts or n_experts),
  )
  direct = DIRECT_DECODE and plan.tokens == 1
  counted = plan.pairs <= COUNTING_MAX_PAIRS
  if (
    moe_config.REMAINDER_TILES
    and not (direct or counted)
    and plan.block_m == config_lib.TILE_ROWS
  ):
    plan = dataclasses.replace(plan, remainder_m=moe_config.REMAINDER_ROWS)
  tiling = functools.partial(
    moe_config.configs_for,
    hidden=hidden,
    inter=two_i // 2,
    num_sms=common.num_sms(interpret),
    persistent=tiles.persistent,
    cta_rows=tiles.cta_rows,
  )
  configs = tiling(plan)
  remainder_configs = None
  if plan.remainder_m:
    remainder_configs = tiling(
      dataclasses.replace(plan, block_m=plan.remainder_m, remainder_m=0)
    )
  swiglu = (
    tiles.fused_swiglu
    and activation == "bf16"
    # I is a multiple of 64 (checked above); mid-tile up rows when not 128.
    and (
      (two_i // 2) % config_lib.TILE_ROWS == 0
      or (
        moe_config.FUSED_SWIGLU_MID_TILE
        and configs[0].cta_rows >= moe_config.MID_TILE_MIN_CTA_ROWS
      )
    )
    # Gate and up float32 accumulators take block_m registers per thread:
    # wider tiles run SwiGLU unfused.
    and plan.block_m <= moe_config.FUSED_SWIGLU_MAX_TOKENS
  )
  if swiglu:  # the epilogue is not linear: no split-K partial sums
    configs = _one_split_gemm1(configs)
    if remainder_configs:
      remainder_configs = _one_split_gemm1(remainder_configs)
  # Persistent CTAs walk the first `used_tiles` tiles and need the unused
  # ones last; the direct tiles leave a dropped pair's tile where it is.
  direct = direct and not any(c.persistent for c in configs)
  return functools.partial(
    _forward,
    plan=plan,
    configs=configs,
    remainder_configs=remainder_configs,
    activation=activation,
    swiglu=swiglu,
    direct=direct,
    counted=not direct and counted,
    interpret=interpret,
  )


def _one_split_gemm1(configs):
  return (dataclasses.replace(configs[0], splits=1), configs[1])


def _gather_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
  """`rows[index]` for bf16 `[R, K/2]` planes, moved as 32-bit words (XLA's
  gather for DeepSeek-V3 at 4096 tokens on the H200: 364 -> 315 us)."""
  if not GATHER_WORDS or rows.shape[-1] % 2:
    return rows[index]
  r, k = rows.shape
  words = jax.lax.bitcast_convert_type(rows.reshape(r, k // 2, 2), jnp.uint32)
  picked = words.at[index].get(mode="promise_in_bounds")
  return jax.lax.bitcast_convert_type(picked, rows.dtype).reshape(-1, k)


def _gather_planes(planes, index, count_used, block_m, interpret):
  """`plane[index]` of each bf16 `[R, K/2]` plane for the used token tiles,
  as two arrays (XLA gathers into two faster than into one stacked array), by
  `gather_rows_sm90` from `GATHER_KERNEL_MIN_ROWS` rows (rows past the used
  tiles undefined), else by XLA. `count_used()`: the used tiles."""
  rows = index.shape[0]
  if (
    GATHER_KERNEL
    and rows >= GATHER_KERNEL_MIN_ROWS
    and gather_rows_sm90.supports(planes, rows, block_m)
  ):
    return gather_rows_sm90.gather_planes(
      planes,
      index,
      count_used() * block_m,
      block_m=block_m,
      num_sms=common.num_sms(interpret),
      interpret=interpret,
    )
  return tuple(_gather_rows(plane, index) for plane in planes)


def _factors(
  proj: base.StackedLinear, activation: str
) -> jax.Array | tuple[jax.Array, ...]:
  """The kernel's epilogue scales: the per-expert leaves whose product
  scales each expert's rows (no XLA pass), or, where w13's up rows have
  their own scale, f32 `[E, ceil128(N) / 64]` per 64-row block."""
  if config_lib.SCALES_AS_OPERANDS and proj.alpha_up is None:
    return common.epilogue_scale_operands(
      proj.alpha, proj.input_scale_inv, activation
    )
  _, n, _ = proj.shape
  first, second = proj.epilogue_scales(activation)
  blocks = -(-n // config_lib.TILE_ROWS) * config_lib.TILE_ROWS // FACTOR_ROWS
  in_second_half = jnp.arange(blocks) * FACTOR_ROWS >= n // 2
  return jnp.where(in_second_half[None], second[:, None], first[:, None])


def _grouped_gemm(
  row_expert,
  tile_expert,
  count_used,
  proj,
  *,
  rows,
  activation,
  config,
  interpret,
  float32_out=False,
  swiglu=False,
  planes_out=False,
  gather=None,
  shared_rows=False,
):
  """`[R, N]` (or with `planes_out` the planes `[2, R, N/2]`): each token
  tile of `rows` times its expert's weights.

  `rows`: `[R, K]`, or bf16 planes `[2, R, K/2]` as `split_activations`
  makes them (W4A16 only). `gather`: row indices into `rows` (the token of
  each sorted row); the K reorder of `split_activations` then runs on the
  fewer unsorted rows. `shared_rows`: `rows` is one token tile that every
  tile multiplies (`sm90.matmul`'s). `count_used()`: the tiles with an
  expert, asked for only by the kernels that read it.
  """
  n_experts, n, k = proj.shape
  if rows.ndim == 3:
    x_planes = rows
  else:
    if activation == "nvfp4":
      if gather is not None:  # quantized with each row's expert's scale
        rows, gather = rows[gather], None
      if shared_rows:  # each tile's copy takes its own expert's scale
        rows = jnp.tile(rows, (tile_expert.shape[0], 1))
        shared_rows = False
      rows = activation_quant.fake_quantize_rows(
        rows, proj.input_scale_inv[row_expert]
      )
    # Two arrays, which XLA slices out of the split in one pass.
    x_planes = tuple(sm90.split_activations(rows.astype(jnp.bfloat16)))
  if gather is not None:
    x_planes = _gather_planes(
      x_planes, gather, count_used, config.block_m, interpret
    )
  scale_rows, padded_blocks = proj.block_scale.shape[1:]
  weight, config = sm90.kernel_weight(proj.weight, proj.weight_layout, config)
  out = sm90.matmul(
    weight,
    x_planes,
    proj.block_scale.reshape(
      n_experts, scale_rows // 128, padded_blocks // 4, 2, 256
    ),
    _factors(proj, activation),
    tile_expert,
    # Persistent CTAs walk the used tiles; others never read the count.
    count_used() if config.persistent else None,
    config=config,
    shared_rows=shared_rows,
    num_sms=common.num_sms(interpret),
    float32_out=float32_out,
    swiglu=swiglu,
    planes_out=planes_out,
    interpret=interpret,
  )
  if swiglu or planes_out:
    return out
  if config.splits > 1 or float32_out:
    out = out.sum(axis=0).T
    if not float32_out:
      out = out.astype(jnp.bfloat16)
  return out[:, :n]


def _expert_gemms(
  rows_in,
  gather,
  tile_expert,
  block_m,
  configs,
  *,
  w13,
  w2,
  activation,
  swiglu,
  interpret,
  used_tiles=None,
  shared_rows=False,
):
  """bf16 `[tiles * block_m, H]`: GEMM 1 (+ SwiGLU) and GEMM 2 over token
  tiles of `block_m` rows, row r being `rows_in[gather[r]]` (or `rows_in`
  itself when `gather` is None; with `shared_rows`, `rows_in` is one tile
  that GEMM 1 multiplies in every tile). `used_tiles`: the tiles with an
  expert, if the placement counted them already (else XLA counts them
  once, if a kernel reads them: decode calls do not)."""
  inter = w13.shape[1] // 2
  row_expert = jnp.maximum(jnp.repeat(tile_expert, block_m), 0)

  @functools.cache  # one XLA count however many kernels read it
  def count_used():
    if used_tiles is not None:
      return used_tiles
    return jnp.sum(tile_expert >= 0, dtype=jnp.int32)

  gemm = functools.partial(
    _grouped_gemm,
    row_expert,
    tile_expert,
    count_used,
    activation=activation,
    interpret=interpret,
  )
  if swiglu:
    # silu(gate) * up from the float32 accumulators, rounded to bf16 once;
    # with plane-ordered w13 rows, as GEMM 2's activation planes.
    act = gemm(
      w13,
      rows=rows_in,
      config=configs[0],
      swiglu=True,
      planes_out=w13.plane_rows,
      gather=gather,
      shared_rows=shared_rows,
    )
    if not w13.plane_rows:  # [R, ceil128(I)]: the columns past I are zeros
      act = act[:, :inter]
  else:
    # W4A4 quantizes the intermediate; from float32 gate and up (as the
    # reference) a bf16 rounding cannot move its FP4 codes.
    h = gemm(
      w13,
      rows=rows_in,
      config=configs[0],
      float32_out=activation == "nvfp4",
      gather=gather,
      shared_rows=shared_rows,
    )
    if w13.plane_rows:  # back to natural feature order (fused with SwiGLU)
      h = sm90_layout.from_plane_rows(h, axis=-1)
    gate = h[:, :inter].astype(jnp.float32)
    up = h[:, inter:].astype(jnp.float32)
    act = (base.silu(gate) * up).astype(jnp.bfloat16)
  return gemm(w2, rows=act, config=configs[1])


@functools.partial(jax.jit, static_argnames=("forward", "routing"))
def _routed(x, router_logits, correction_bias, experts, *, forward, routing):
  tokens, n_experts = router_logits.shape
  options = dict(routing)
  mode = _kernel_routing(router_logits, correction_bias, options, forward)
  if mode is not None:
    plan = forward.keywords["plan"]
    split = (
      SPLIT_IN_DECODE_ROUTING
      and forward.keywords["direct"]
      and forward.keywords["activation"] == "bf16"
      and x.dtype == jnp.bfloat16
      and x.shape[1] % 32 == 0
    )
    weights, ids, *placed = route_decode_sm90.route_and_place(
      router_logits,
      plan.top_k,
      block_m=plan.block_m,
      max_tiles=plan.max_tiles,
      place=mode == "decode",
      rank=mode == "prefill",
      routed_scaling=options.get("routed_scaling", 1.0),
      x=x if split else None,
      plane_rows=plan.block_m,
    )
    x_planes = placed.pop() if split else None
    if mode == "prefill":
      placed = place_prefill_sm90.place_pairs(
        ids, *placed, block_m=plan.block_m, max_tiles=plan.max_tiles
      )
    out = forward(
      x,
      weights,
      ids,
      experts,
      placed=tuple(placed) or None,
      ids_in_range=True,
      x_planes=x_planes,
    )
    return out.astype(x.dtype)
  counted = tokens * n_experts**2 <= COUNTING_TOP_K_MAX
  weights, ids = base.route(
    router_logits,
    correction_bias=correction_bias,
    top_k_fn=placement.counting_top_k if counted else jax.lax.top_k,
    **options,
  )
  return forward(x, weights, ids, experts).astype(x.dtype)


def _kernel_routing(router_logits, correction_bias, routing, forward):
  """How `route_decode_sm90` takes this call: "decode" (it routes and
  places the pairs of a decode step in one CTA), "prefill" (it routes and
  ranks the pairs, `place_prefill_sm90` places them), "route" (it routes,
  XLA places), or None (XLA routes).

  It takes the softmax of the chosen experts' logits (as `base.route`
  does for these options); it places a decode step's counted pairs
  (DECODE_ROUTING_KERNEL; one token's direct tiles need no placing) and
  routes larger calls (PREFILL_ROUTING_KERNEL), placing them too
  (PREFILL_PLACEMENT_KERNEL) unless the plan has remainder tiles or more
  tokens than `place_prefill_sm90` takes. (Its experts are all in range:
  expert-parallel calls, which drop other devices' pairs, come through
  `experts_forward`, not here.)
  """
  options = forward.keywords
  plan = options["plan"]
  sizes = (plan.tokens, plan.experts, plan.top_k)
  if (
    options["interpret"]
    or not base.routes_by_chosen_softmax(
      correction_bias=correction_bias, **routing
    )
    or router_logits.dtype not in (jnp.float32, jnp.bfloat16)
  ):
    return None
  decode = options["direct"] or options["counted"]
  if DECODE_ROUTING_KERNEL and decode and route_decode_sm90.supports(*sizes):
    return "route" if options["direct"] else "decode"
  if PREFILL_ROUTING_KERNEL and route_decode_sm90.supports(*sizes, place=False):
    places = (
      PREFILL_PLACEMENT_KERNEL
      and not decode
      and not plan.remainder_m
      and place_prefill_sm90.supports(plan.tokens, plan.top_k)
    )
    return "prefill" if places else "route"
  return None


@functools.partial(
  jax.jit,
  static_argnames=(
    "plan",
    "configs",
    "remainder_configs",
    "activation",
    "swiglu",
    "direct",
    "counted",
    "interpret",
    "ids_in_range",
  ),
)
def _forward(
  x,
  weights,
  ids,
  experts,
  *,
  plan,
  configs,
  activation,
  swiglu,
  direct,
  interpret,
  counted=False,
  remainder_configs=None,
  placed=None,
  ids_in_range=False,
  x_planes=None,
):
  """float32 `[T, H]`: sort, GEMM 1 (+ SwiGLU), GEMM 2, weighted combine
  (the two GEMMs once more over the remainder tiles, if the plan has
  them). `placed`: the sort's (position, token, tile_expert), and maybe the
  used tiles, made already (`route_decode_sm90`, `place_prefill_sm90`).
  `ids_in_range`: every id names an expert (the routing kernel made them),
  so no pair is dropped and no select marks dropped ones. `x_planes`: one
  token's activation planes, `[2, block_m, H/2]` with rows past the first
  undefined (`route_decode_sm90`'s), for its direct tiles."""
  w13 = base.StackedLinear.from_mapping(experts, "w13_")
  w2 = base.StackedLinear.from_mapping(experts, "w2_")
  if direct:
    place = functools.partial(placement.direct_tiles, in_range=ids_in_range)
  else:
    place = placement.count_by_expert if counted else placement.sort_by_expert
  position, token, tile_expert, *counted_tiles = placed or place(ids, plan)
  # The placement kernel's count of used tiles, if it made `placed` (it
  # places no remainder tiles: its count is the bulk tiles').
  used_tiles = counted_tiles[0] if counted_tiles else None
  gemms = functools.partial(
    _expert_gemms,
    w13=w13,
    w2=w2,
    activation=activation,
    swiglu=swiglu,
    interpret=interpret,
  )
  if direct:  # every tile multiplies x (row 0) and zero (or unread) rows
    rows_in = x_planes
    if rows_in is None:
      rows_in = jnp.pad(x, ((0, plan.block_m - 1), (0, 0)))
    y = gemms(
      rows_in, None, tile_expert, plan.block_m, configs, shared_rows=True
    )
    # Each tile's first row, a strided slice.
    picked = y.reshape(plan.max_tiles, plan.block_m, -1)[None, : plan.top_k, 0]
  else:
    rows_in = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    bulk = plan.bulk_rows
    y = gemms(
      rows_in,
      token[:bulk],
      tile_expert[: plan.max_tiles],
      plan.block_m,
      configs,
      used_tiles=used_tiles,
    )
    if plan.remainder_m:
      y_remainder = gemms(
        rows_in,
        token[bulk:],
        tile_expert[plan.max_tiles :],
        plan.remainder_m,
        remainder_configs,
      )
      # One gather over both (XLA can fuse the concatenation into it).
      y = jnp.concatenate([y, y_remainder])
    picked = y[position]
  picked = picked.astype(jnp.float32)  # [T, top_k, H]
  if placed is None and not ids_in_range:
    # Dropped pairs' rows were never written (they may hold NaN): select.
    # (The routing kernel, which made `placed`, drops none.)
    valid = (ids >= 0) & (ids < plan.experts)
    picked = jnp.where(valid[..., None], picked, 0.0)
  # A product and a sum, not an einsum: at one token XLA lowers the einsum
  # to a dot, and float32 dots may round their inputs to TF32 on the GPU;
  # the sum stays float32 (as the reference) at the same speed on the H200
  # (DeepSeek-V3 T = 1 combine 2.3 -> 2.0 us, one call each).
  return jnp.sum(picked * weights[..., None], axis=1)

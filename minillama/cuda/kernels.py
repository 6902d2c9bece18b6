"""The checked entry points to kernels/*.cu, and how each picks its variant.

    sgemm(a, w)          a @ w.T, four versions (matmul.cu); v4 in the tile shape that fits
    gemv(x, w)           a @ w.T for a few rows, with an RMSNorm or SwiGLU prologue if asked
                         (8+ rows of x: gemv_batch.cu's gemv_v3, see gemv_version)
    bmm(a, b)            batched a @ b on strided views (the KV cache, read in place)
    softmax(x, ...)      over the last axis, causal mask built in (softmax.cu)
  weights as stored (w a formats.Packed with CuPy planes: f16, bf16, q8_0, q4_0, q4_1, and the
  k-quants q2_k .. q6_k):
    greedy_pick(last)    each row's argmax and a not-finite flag, the next token of greedy
                         decoding in one launch (decode.cu)
    qgemv(x, w)          gemv's job on packed weights, the same prologues (qgemv.cu: v4, v4s
                         or v2 for one row of x, v1 for 2 or 3, qgemv_mma from 4; the k-quants:
                         qgemv_k, qgemv_k.cu)
    qgemv_mma(x, w)      the same on the tensor cores, x in exact 16-bit parts, or in one
                         float16 part where the caller asks (x16: FusedDecoder's batch steps
                         by default) (qgemv_mma.cu)
    to_16bit(x)          float32 -> float16 (or bfloat16 bits), round to nearest (matmul.cu)
    gemm_v5(a, w)        a @ w.T on the tensor cores, a 16-bit (matmul.cu)
    gemm_v6(a, w)        the same, the next version
    gemm_v7(a, w)        the same on Hopper's wgmma (sm_90a); tensor_core_gemm picks v7 or v6:
                         what CudaOps runs prompts through

Each takes float32 CuPy arrays (C-contiguous where the kernel indexes by row length; gemm_v5,
v6 and v7 16-bit ones) and raises DeviceError, naming the argument, on anything else,
instead of failing inside CUDA. Each writes into `out` when given one, so a caller can reuse
its buffers (FusedDecoder does).

The tables below are the template instantiations that are compiled (KERNELS): every tile shape,
row count, format and prologue a launch may name. docs/kernels.md explains each kernel.
"""
import functools

import numpy as np

from ..errors import DeviceError
from ..formats import FORMATS, Packed
from .runtime import KernelModule, cdiv, i32, require_cupy, sm_count

# sgemm_v4 tile shapes: name -> (BM, BN, BK, TM, TN, MIN_BLOCKS), see matmul.cu. MIN_BLOCKS
# blocks fit on an SM at once (registers and shared memory allow it).
SGEMM_CONFIGS = {
    "128x128x16": (128, 128, 16, 8, 8, 2),
    "128x128x8": (128, 128, 8, 8, 8, 2),
    "128x64x8": (128, 64, 8, 8, 4, 2),
    "64x64x16": (64, 64, 16, 4, 4, 3),
}
# TFLOP/s of each when the GPU is full: `python -m minillama.bench gpu` at 4096^3, H100 80GB
# HBM3, 2026-11-24 (docs/benchmarks.md). Only their ratios matter, to pick a tile shape.
SGEMM_RATES = {"128x128x16": 41.8, "128x128x8": 37.3, "128x64x8": 31.6, "64x64x16": 29.5}
GEMV_ROWS = (1, 2, 4, 8)           # rows of x per warp in gemv<ROWS, VEC, PRO, PREFETCH>
# gemv's PREFETCH: float4s of W each lane loads before its grid_dependency_wait. Compiled for
# one row of x with float4 loads (the launches of a graph that overlap, fused.py's
# PROGRAMMATIC_ROWS), taken only where they hold the lane's whole share of the row and the
# grid is one wave of at most GEMV_PREFETCH_BLOCKS blocks an SM (gemv_prefetch), with the
# fewest warps a row of W that allow it (gemv_split); every other launch has PREFETCH 0, no
# early loads.
GEMV_PREFETCH = 4
GEMV_PREFETCH_BLOCKS = 5
# gemv's grid: a block per group of 8 / ksplit rows of W, or, for a launch without early loads
# that has more groups than GEMV_WALK_BLOCKS[rows] blocks an SM, that many blocks, each walking
# the groups a grid apart (gemv<..., WALK>, gemv_grid). Measured on the float32 steps (H200,
# 2026-11-30, benchmarks.md's twenty-fourth run): at one row 8 (stories15M's classifier) where
# 5 lost on stories110M (its w13 too), at 4 rows 5; 2 and 8 rows take 4 rows', unmeasured.
GEMV_WALK_BLOCKS = {1: 8, 2: 5, 4: 5, 8: 5}
GEMV_PROLOGUES = {None: 0, "rmsnorm": 1, "swiglu": 2}     # GEMV_PLAIN, _RMSNORM, _SWIGLU
# gemv's RMSNorm with inv_rms after the sums (GEMV_RMSNORM_LATE, matmul.cu): one row of x,
# float4 loads, where gemv_late_norm takes it (GEMV_LATE_NORM: "early", the launches with
# early loads of W; "all"; "none")
GEMV_RMSNORM_LATE = 3
GEMV_LATE_NORM = "early"
# softmax_block<V, THREADS>: one block of THREADS threads holds V values each, so rows of up to
# V * THREADS floats. The smallest that fits is used; longer rows go to softmax_warp.
SOFTMAX_BLOCKS = ((1, 1024), (2, 1024), (4, 1024), (8, 1024), (16, 1024), (32, 1024))
SOFTMAX_WARP_MAX = 1024            # rows up to this long: one warp per row (softmax_warp)
# attention_decode<WIDTH, T> (decode.cu, launched by FusedDecoder): float4 or scalar loads
ATTENTION_WIDTHS = (1, 4)
# attention_decode's block (attention_threads): 16 warps at up to ATTENTION_WIDE_ROWS rows of
# float4 pieces in models of up to ATTENTION_WIDE_HEADS query heads, else 8
ATTENTION_WIDE_ROWS = 8
ATTENTION_WIDE_HEADS = 16
# attention_decode's splits of the keys (attention_splits): at one row a split per chunk of
# positions of the cache (attention_chunk: the keys a block takes in one round trip), up to
# ATTENTION_SPLITS, where that makes at least ATTENTION_SPLIT_CHUNKS (decode.cu's
# ATTN_SPLIT_CHUNKS: from as many chunks of cached keys the kernel splits them, below it keeps
# one split). ATTENTION_LANE_FLOATS: decode.cu's ATTN_LANE_FLOATS, the floats of keys a lane
# holds at once, which make a chunk.
ATTENTION_SPLITS = 8
ATTENTION_SPLIT_CHUNKS = 3
ATTENTION_LANE_FLOATS = 32
# attention_decode<WIDTH, T>: the KV cache's element type, by its NumPy dtype
CACHE_TYPES = {"float32": "float", "float16": "unsigned short"}
# halves.cu, a one-row layer of float32 weights in two launches (FusedDecoder.run_halves,
# halves_plan): attention_half<P, HALVES_WARPS, R> (clusters of R blocks, R of HALVES_CLUSTERS)
# and feed_forward_half<J, P>, P float4s a lane of a row of dim (dim <= 128 HALVES_MAX_P), J
# hidden units a block: the first of HALVES_J that divides hidden_dim, or feed_forward_wide<P>
# (J HALVES_WIDE_J, its rows in shared memory), as halves_plan chooses to put both launches'
# blocks on the GPU at once. Measured on an H200 (2026-12-01, kernels/dev/ab_halves.py, the
# one-row step's graph against five launches a layer, at positions 3 / 60 / 200): stories15M
# 1.30x / 1.28x / 1.32x (clusters of 8, J 16), stories110M 1.26x / 1.25x / 1.27x (clusters of
# 4, wide; 1.21x / 1.16x / 1.21x with clusters of 8 and J 16). Only P 3 and 6 were measured;
# at P 8 (dim 1024) ptxas spills 84 bytes a thread in feed_forward_half at J 16 (4 at P 7),
# none in attention_half or feed_forward_wide (NVRTC, sm_90, 2026-12-01). Their instances are
# groups of their own by P, compiled on their first launch.
HALVES_CLUSTER = 8                 # halves.cu's HALVES_CLUSTER
HALVES_CLUSTERS = (HALVES_CLUSTER, 4)   # attention_half's R (a head's cluster), in plan order
HALVES_WARPS = 16                  # halves.cu's HALVES_WARPS
HALVES_MAX_P = 8
HALVES_J = (16, 8, 4)
HALVES_WIDE_J = 32                 # feed_forward_wide's hidden units a block
HALVES_MAX_HEAD_DIM = 128          # a float4 piece of a head a lane
HALVES_STATIC_SMEM = 4 * (2 * 16 + 16 * 256)     # attention_half's WarpSoftmax (decode.cu)
# decode_persistent<B> (persistent.cu, launched by PersistentDecoder): batch rows per warp
PERSISTENT_ROWS = (1, 2, 4, 8)
# qgemv<Fmt, ROWS, PRO>: weights per 16-byte load of each format (Fmt = "Fmt" + Packed.kernel)
QGEMV_WEIGHTS = {"f16": 8, "bf16": 8, "q8_0": 16, "q4_0": 32, "q4_1": 32}
QGEMV_ROWS = (1, 2, 4, 8)          # rows of x per pass
QGEMV_SMEM = 96 * 1024             # shared memory per block for x (over 48 KiB: an opt-in)
QGEMV_BLOCKS_PER_SM = 2            # blocks of the grid per SM; each stages x once
# ... except for the block formats from 8 rows of x on (v1 runs one block per SM there anyway,
# by its launch bounds): one block per SM with up to 200 KiB of x, K whole in one pass; 1.03 to
# 1.30x faster at 8 and 32 rows on the 7B shapes (H200), not for f16/bf16 (0.87 to 1.13x)
QGEMV_BATCH_SMEM = 200 * 1024
QGEMV_BATCH_FORMATS = ("q8_0", "q4_0", "q4_1")
# qgemv_v2<Fmt, ROWS, PRO, NR, U> (qgemv.cu), where it measured faster than qgemv and gemv (H200,
# 2026-11-29, docs/kernels.md "qgemv v2 and the batches"): one row of x on packed weights, with
# NR, U = 2, 4; float32 weights from 8 rows of x on, ROWS at a time, with NR, U = 4, 1 (now
# gemv(version=2): the rule takes gemv_v3 there).
QGEMV_V2_PACKED = (1, 2, 4)        # ROWS, NR, U
# qgemv_v4<Fmt, PRO, NR, U, B> (qgemv.cu): one row of x on q4_0 and q8_0 with the products in
# integers (dp4a) over 8-bit digits of x; 1.16x (q4_0) and 1.04x (q8_0) v2's speed on the
# Llama-2-7B matrices (H200, 2026-11-30, docs/kernels.md "One row in integers"). (NR, U, B):
# B blocks an SM, its launch bounds and the grid's (min(tiles, B SMs), each block walking tiles).
# B 3 and 4 measured slower on the whole 7B one-row step, 0.74 to 0.96x (H200, 2026-11-30,
# kernels/dev/ab_v4_blocks.py; docs/benchmarks.md, fourteenth run)
QGEMV_V4 = {"q4_0": (2, 2, 2), "q8_0": (2, 4, 2)}
# qgemv_v4s<Fmt, PRO, NR, U> (qgemv.cu): v4 split over k, for one row of x on a long row of few
# weight rows (qgemv_v4s_wins says where). (NR, U, slices of k asked for), the fastest of
# bench_variants.py's splitk family on the 7B w2 (H200, 2026-11-30): 1.38x (q4_0) and 1.14x
# (q8_0) v4's speed there.
QGEMV_V4S = {"q4_0": (4, 1, 8), "q8_0": (8, 1, 8)}
QGEMV_V4S_MIN_K = 8192             # K from which the split is taken (the 7B w2: 11008; wo: 4096)
QGEMV_V4S_BLOCKS_PER_SM = 2        # its launch bounds: tiles x slices within one wave of these
QGEMV_V2_F32_ROWS = (8, 16, 32)
QGEMV_V2_F32 = (4, 1)              # NR, U
# gemv_v3<ROWS, NR, PRO> (gemv_batch.cu), float32 weights from GEMV_V3_MIN_ROWS rows of x on:
# ROWS rows of x -> NR rows of W per warp; split-K over up to GEMV_V3_MAX_SPLIT blocks where N
# leaves SMs idle; x staged GEMV_V3_SMEM bytes at a time. {rows: NR}, the plan takes the fewest
# rows that hold M, else the most (more rows of x take more blocks, blockIdx.y). One tile: 8 rows
# of x by 4 of W, 32 accumulators a thread and three blocks an SM. Measured against 64
# accumulators ({8: 8, 16: 4, 32: 2}, two blocks an SM at 32 rows, one else) and two other sets
# (kernels/dev/ab_f32tiles.py, H200, 2026-11-30): the whole float32 step's graph 1.27x as fast
# for stories110M at 32 rows, 1.33x at 8, stories15M 1.51x and 1.11x; on the 7B products at 8
# rows even with 8 x 8 (547 against 557 us for the five), at 16 rows 1.2x as fast as 16 x 4.
GEMV_V3_TILES = {8: 4}
GEMV_V3_MIN_ROWS = 8
GEMV_V3_MAX_SPLIT = 16
GEMV_V3_SMEM = 96 * 1024
SMEM_PER_SM = 228 * 1024           # an H100/H200 SM's shared memory (1 KiB of it per block is the driver's)
# gemm_v5<BM, BN, STAGES, WF>: WF numbers the weight format (V5_F16 ... in matmul.cu). One
# tile shape, BM, BN, STAGES = 128, 128, 4: the fastest at 4096^3 in float16 (H200, 2026-11-29;
# the kernel also takes 128 x 256 x 3), and the more blocks of the two for a prompt's products.
GEMM_V5_FORMATS = {"f16": 0, "bf16": 1, "q8_0": 2, "q4_0": 3, "q4_1": 4}
GEMM_V5_CONFIGS = {"128x128x4": (128, 128, 4)}
GEMM_V5_DEFAULT = "128x128x4"
# qgemv_mma<Fmt, NR, PRO, U, B, W> (qgemv_mma.cu): batches on the tensor cores, x in 16-bit
# parts (so the 1e-5 bound of the float32 GEMV holds; OnePart<Fmt>, x16: one float16 part, as
# prompts take it). Blocks of W = MMA_WARPS warps, tiles of 16 W NR weight rows
# (mma_tile_rows); k split into slices, a slice at most MMA_MAX_SLICE positions (its x, 1, 2
# or 3 parts of 8 rows, sits in shared memory: 32, 64 or 96 KiB at 2048 positions); NR and the
# slices by qgemv_mma_plan, in waves of
# MMA_BLOCKS_PER_SM blocks an SM (B, its launch bounds); MMA_U[fmt][NR] steps of loads in
# flight. At B 3 the q8_0 and q4_0 instances spill 108 to 232 bytes a thread at U 4 / 2 (NR 1 /
# 2), 0 to 32 at 2 / 1 (f16, bf16: 20 to 132, none; ptxas -v, NVRTC 13.0 sm_90), and bf16's 96
# KiB slices fit only two blocks an SM. Measured at 2 / 1, B 3 lost: the 7B batch-8 step 0.93x
# (q4_0) and 0.90x (q8_0) as fast (H200, 2026-11-30, kernels/dev/ab_mma_plan.py), so B stayed 2
# with 8 warps a block. Since, one block of 16 warps an SM (the same warps, registers and plans
# with tiles twice as tall, so x staged by half as many blocks): 1.03x (q4_0) and 1.02x (q8_0)
# on the 7B batch-8 step, the same bits (H200, 2026-11-30, MMA_WARPS).
# U was 4 / 2 for every format until the loads fetched whole 128-byte lines (qgemv.cu's
# q_load16<128>); since, fewer steps in flight measured faster for the block formats, on the 7B
# step at 4, 8 and 16 rows: q4_0 at 1 / 1 1.05x, 1.04x, 1.03x, q8_0 at 2 / 2 1.03x, 1.04x, 1.04x;
# float16 lost at every other U tried (0.90 to 0.98x at 8 rows; H200, 2026-11-30, docs/kernels.md
# "Asking L2 ahead"). bfloat16 keeps float16's, unmeasured.
MMA_FORMATS = {"f16": "MmaF16", "bf16": "MmaBF16", "q8_0": "MmaQ8_0", "q4_0": "MmaQ4_0"}
# the formats whose mma's take x in float16 parts, which may take it in one (qgemv_mma's x16)
MMA_X16_FORMATS = ("f16", "q8_0", "q4_0")
MMA_SPAN = {"f16": 32, "bf16": 32, "q8_0": 64, "q4_0": 128}     # positions of k per step
MMA_NR = (1, 2)
MMA_BLOCKS_PER_SM = 1
MMA_WARPS = 16                  # warps a block: a tile of 16 MMA_WARPS NR weight rows
MMA_U = {"f16": {1: 4, 2: 2}, "bf16": {1: 4, 2: 2}, "q8_0": {1: 2, 2: 2}, "q4_0": {1: 1, 2: 1}}
MMA_MAX_SLICE = 2048
# rows of x from which qgemv's rule takes qgemv_mma: at 2 rows qgemv v1 was faster in every
# format, at 4 qgemv_mma in every one (float16 level), at 8 by 1.3 to 1.6x (H200, 2026-11-29,
# per-token sums over the 7B matrices, kernels/dev/bench_mma.py)
MMA_MIN_ROWS = 4
# gemm_v6<BM, BN, STAGES, WF>: v5 with 64 x 64 warp tiles (matmul.cu). Its instances are a group
# of their own, compiled on the first gemm_v6 launch: the default tile shape for every format,
# the other shapes for float16 only (kernels/dev/bench_gemm.py times them against each other).
GEMM_V6_CONFIGS = {"128x256x3": (128, 256, 3), "128x256x4": (128, 256, 4),
                   "256x128x3": (256, 128, 3), "256x128x4": (256, 128, 4),
                   "128x128x4": (128, 128, 4)}
GEMM_V6_DEFAULT = "128x256x4"
GEMM_V6_LDC = 72                   # matmul.cu's V6_LDC: floats per row of the epilogue's staging
# gemm_v7<BN, STAGES, WF>: Hopper's wgmma (matmul.cu), 128 x BN tiles, v5's weight formats. A
# group of its own, compiled for sm_90a (its instructions exist on compute capability 9.0 only):
# the default tile shape in every format, the others for the 16-bit ones
GEMM_V7_CONFIGS = {"128x256x4": (256, 4), "128x256x3": (256, 3), "128x128x6": (128, 6)}
GEMM_V7_DEFAULT = "128x128x6"      # 0.786 of cuBLAS, 128x256x4 0.762 (bench_gemm, 2026-11-30)
GROUP_ARCH = {"gemm_v7": "sm_90a"}
# qgemv_k<Fmt, ROWS, PRO> and kquant_to_f16<Fmt> (qgemv_k.cu): the k-quants with kernels of
# their own, and the planes each reads: (codes, high bits, integer scales, d, dmin)
QGEMV_K_PLANES = {"q2_k": ("qs", "qs", "scales", "d", "dmin"),
                  "q3_k": ("qs", "hmask", "scales", "d", "d"),
                  "q4_k": ("qs", "qs", "scales", "d", "dmin"),
                  "q5_k": ("qs", "qh", "scales", "d", "dmin"),
                  "q6_k": ("ql", "qh", "scales", "d", "d")}
PACKED_KERNEL_FORMATS = tuple(QGEMV_WEIGHTS) + tuple(QGEMV_K_PLANES)   # what qgemv reads as stored


def _cpp_bool(flag):
    return "true" if flag else "false"


def _templates():
    """Every template instantiation a launch may name, in groups compiled apart (see
    runtime.KernelModule): "common", what every model launches (float32 weights, the decode
    kernels, the 16-bit conversion), and one group per stored format, its qgemv and gemm_v5."""
    common = [f"sgemm_v4<{','.join(map(str, c))},{_cpp_bool(vec)}>"
              for c in SGEMM_CONFIGS.values() for vec in (True, False)]
    common += [f"gemv<{rows},{_cpp_bool(vec)},{pro},0>" for rows in GEMV_ROWS
               for vec in (True, False) for pro in GEMV_PROLOGUES.values()]
    common += [f"gemv<1,true,{pro},{GEMV_PREFETCH}>" for pro in GEMV_PROLOGUES.values()]
    common += [f"gemv<1,true,{GEMV_RMSNORM_LATE},{p}>" for p in (0, GEMV_PREFETCH)]
    common += [f"gemv<{rows},{_cpp_bool(vec)},{pro},0,true>" for rows in GEMV_ROWS
               for vec in (True, False) for pro in GEMV_PROLOGUES.values()]   # WALK
    common += [f"gemv<1,true,{GEMV_RMSNORM_LATE},0,true>"]
    common += [f"attention_decode<{width},{t}>" for width in ATTENTION_WIDTHS
               for t in CACHE_TYPES.values()]
    common += [f"decode_persistent<{b}>" for b in PERSISTENT_ROWS]
    common += [f"softmax_block<{v},{t}>" for v, t in SOFTMAX_BLOCKS]
    common += [f"f32_to_16bit<{_cpp_bool(bf16)},{_cpp_bool(vec)}>" for bf16 in (False, True)
               for vec in (False, True)]
    groups = {"common": common}
    for fmt in QGEMV_WEIGHTS:
        groups[fmt] = [f"qgemv<{_qgemv_format(fmt)},{rows},{pro}>" for rows in QGEMV_ROWS
                       for pro in GEMV_PROLOGUES.values()]
        groups[fmt] += [f"gemm_v5<{bm},{bn},{stages},{GEMM_V5_FORMATS[fmt]}>"
                        for bm, bn, stages in GEMM_V5_CONFIGS.values()]
        groups[fmt] += [_qgemv_v2_name(fmt, *QGEMV_V2_PACKED[:1], pro, *QGEMV_V2_PACKED[1:])
                        for pro in GEMV_PROLOGUES.values()]
    for fmt in QGEMV_V4:
        groups[fmt] += [_qgemv_v4_name(fmt, pro) for pro in GEMV_PROLOGUES.values()]
    for fmt in QGEMV_V4S:                  # no RMSNorm: a slice of k does not see the row's
        groups[fmt] += [_qgemv_v4s_name(fmt, GEMV_PROLOGUES[p]) for p in (None, "swiglu")]
    for fmt in MMA_FORMATS:
        groups[fmt] += [_qgemv_mma_name(fmt, nr, pro) for nr in MMA_NR
                        for pro in GEMV_PROLOGUES.values()]
    for fmt in MMA_X16_FORMATS:            # apart: compiled on the first launch that takes x16
        groups[f"{fmt} x16"] = [_qgemv_mma_name(fmt, nr, pro, x16=True) for nr in MMA_NR
                                for pro in GEMV_PROLOGUES.values()]
    groups["gemm_v6"] = [_gemm_v6_name(fmt, GEMM_V6_DEFAULT) for fmt in GEMM_V5_FORMATS]
    groups["gemm_v6"] += [_gemm_v6_name("f16", config) for config in GEMM_V6_CONFIGS
                          if config != GEMM_V6_DEFAULT]
    groups["gemm_v7"] = [_gemm_v7_name(fmt, config) for fmt in GEMM_V5_FORMATS
                         for config in GEMM_V7_CONFIGS
                         if config == GEMM_V7_DEFAULT or fmt in ("f16", "bf16")]
    for P in range(1, HALVES_MAX_P + 1):   # apart: attention_half needs sm_90 (clusters)
        groups[f"attention_half{P}"] = [f"attention_half<{P},{HALVES_WARPS},{R}>"
                                        for R in HALVES_CLUSTERS]
        groups[f"feed_forward_half{P}"] = [f"feed_forward_half<{j},{P}>" for j in HALVES_J] \
            + [f"feed_forward_wide<{P}>"]
    groups["f32"] = [_qgemv_v2_name("f32", rows, pro, *QGEMV_V2_F32) for rows in QGEMV_V2_F32_ROWS
                     for pro in GEMV_PROLOGUES.values()]      # compiled once a batch needs it
    groups["f32batch"] = [f"gemv_v3<{rows},{nr},{pro}>" for rows, nr in GEMV_V3_TILES.items()
                          for pro in GEMV_PROLOGUES.values()]            # likewise
    for fmt in QGEMV_K_PLANES:
        groups[fmt] = [f"qgemv_k<{_qgemv_format(fmt)},{rows},{pro}>" for rows in QGEMV_ROWS
                       for pro in GEMV_PROLOGUES.values()] + [f"kquant_to_f16<{_qgemv_format(fmt)}>"]
    return groups


def _qgemv_format(fmt):
    """qgemv.cu's traits struct of a format: "q4_0" -> "FmtQ4_0" (the format module's KERNEL)."""
    return "Fmt" + FORMATS[fmt].KERNEL[fmt]


def _gemm_v6_name(fmt, config):
    """gemm_v6's instance for a format and a tile shape of GEMM_V6_CONFIGS."""
    bm, bn, stages = GEMM_V6_CONFIGS[config]
    return f"gemm_v6<{bm},{bn},{stages},{GEMM_V5_FORMATS[fmt]}>"


def _gemm_v7_name(fmt, config):
    """gemm_v7's instance for a format and a tile shape of GEMM_V7_CONFIGS."""
    bn, stages = GEMM_V7_CONFIGS[config]
    return f"gemm_v7<{bn},{stages},{GEMM_V5_FORMATS[fmt]}>"


def _qgemv_v2_name(fmt, rows, pro, nr, u):
    """qgemv_v2's instance: its formats are "V2" + the format module's KERNEL ("V2Q4_0", "V2F32")."""
    return f"qgemv_v2<V2{FORMATS[fmt].KERNEL[fmt]},{rows},{pro},{nr},{u}>"


def _qgemv_v4_name(fmt, pro):
    """qgemv_v4's instance: "V4" + the format module's KERNEL ("V4Q4_0"), (NR, U, B) of
    QGEMV_V4."""
    return f"qgemv_v4<V4{FORMATS[fmt].KERNEL[fmt]},{pro},{','.join(map(str, QGEMV_V4[fmt]))}>"


def _qgemv_mma_name(fmt, nr, pro, x16=False):
    """qgemv_mma's instance: its traits ("MmaQ4_0", or "OnePart<MmaQ4_0>" with x in one
    float16 part), NR, the prologue, MMA_U[fmt][NR], MMA_BLOCKS_PER_SM and MMA_WARPS."""
    traits = f"OnePart<{MMA_FORMATS[fmt]}>" if x16 else MMA_FORMATS[fmt]
    return (f"qgemv_mma<{traits},{nr},{pro},{MMA_U[fmt][nr]},{MMA_BLOCKS_PER_SM},"
            f"{MMA_WARPS}>")


def _qgemv_v4s_name(fmt, pro):
    """qgemv_v4s's instance: v4's traits ("V4Q4_0"), (NR, U) of QGEMV_V4S."""
    nr, u, _ = QGEMV_V4S[fmt]
    return f"qgemv_v4s<V4{FORMATS[fmt].KERNEL[fmt]},{pro},{nr},{u}>"


KERNELS = KernelModule(_templates(), GROUP_ARCH)   # each group compiled on its first launch


# ----------------------------------------------------------------------------
# checks

def _check(name, a, ndim=None, contiguous=True, dtype=np.float32, aligned=False):
    """a: a CuPy array of `dtype` (and `ndim` dimensions, C-contiguous, 16-byte aligned where
    asked), or a DeviceError naming it."""
    cupy = require_cupy()
    if not isinstance(a, cupy.ndarray):
        raise DeviceError(f"{name}: expected a CuPy array on the GPU, got {type(a).__name__} "
                          f"(move it with ops.asarray)")
    if a.dtype != dtype:
        raise DeviceError(f"{name}: expected {np.dtype(dtype)}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise DeviceError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        raise DeviceError(f"{name}: expected a C-contiguous array (cupy.ascontiguousarray), "
                          f"got strides {a.strides} for shape {a.shape}")
    if aligned and not _aligned(a):
        raise DeviceError(f"{name}: expected 16-byte aligned data (the kernel loads 16 bytes at "
                          f"a time); copy it (a.copy())")


def _output(out, shape, aligned=False):
    """`out` checked against the result's shape, or a new array for it."""
    if out is None:
        return require_cupy().empty(shape, dtype=np.float32)
    _check("out", out, aligned=aligned)
    if out.shape != tuple(shape):
        raise DeviceError(f"out: expected shape {tuple(shape)}, got {out.shape}")
    return out


def _aligned(*arrays):
    """16-byte aligned data pointers, so float4 loads are legal."""
    return all(a.data.ptr % 16 == 0 for a in arrays)


# ----------------------------------------------------------------------------
# matmul.cu

def pick_sgemm_config(M, N):
    """The tile shape with the least estimated time. Big tiles reuse more (SGEMM_RATES), but the
    blocks run in waves of (SMs x blocks per SM), and a partial last wave costs a whole one:
    a 1024 x 1024 product has only 64 tiles of 128 x 128 for 132 SMs."""
    sms = sm_count()

    def cost(name):
        bm, bn, *_, per_sm = SGEMM_CONFIGS[name]
        slots = sms * per_sm
        waves = cdiv(cdiv(M, bm) * cdiv(N, bn), slots)
        return waves * slots * bm * bn / SGEMM_RATES[name]
    return min(SGEMM_CONFIGS, key=cost)


def sgemm(a, w, out=None, version=4, config=None):
    """a @ w.T for a (M, K) and w (N, K), float32 and C-contiguous -> (M, N).
    version 1..4 picks the kernel of matmul.cu (4 is the fast one); config names a tile shape
    of SGEMM_CONFIGS for version 4, chosen from the sizes when None."""
    _check("a", a, 2)
    _check("w", w, 2)
    (M, K), (N, K_w) = a.shape, w.shape
    if K != K_w:
        raise DeviceError(f"sgemm: a is (M, K) = {a.shape} but w is (N, K) = {w.shape}")
    c = _output(out, (M, N))
    if M == 0 or N == 0:
        return c
    args = (a, w, c, i32(M), i32(N), i32(K))
    if version == 1:
        KERNELS.launch("sgemm_v1_naive", (cdiv(N, 16), cdiv(M, 16)), (16, 16), args)
    elif version == 2:
        KERNELS.launch("sgemm_v2_tiled", (cdiv(N, 32), cdiv(M, 32)), (32, 32), args)
    elif version == 3:
        KERNELS.launch("sgemm_v3_regblock", (cdiv(N, 128), cdiv(M, 128)), (256,), args)
    elif version == 4:
        config = config or pick_sgemm_config(M, N)
        if config not in SGEMM_CONFIGS:
            raise DeviceError(f"config: expected one of {', '.join(SGEMM_CONFIGS)}, got {config!r}")
        bm, bn, bk, tm, tn, min_blocks = SGEMM_CONFIGS[config]
        vec = K % 4 == 0 and N % 4 == 0 and _aligned(a, w, c)
        name = f"sgemm_v4<{bm},{bn},{bk},{tm},{tn},{min_blocks},{_cpp_bool(vec)}>"
        KERNELS.launch(name, (cdiv(N, bn), cdiv(M, bm)), ((bm // tm) * (bn // tn),), args)
    else:
        raise DeviceError(f"version: expected 1, 2, 3 or 4, got {version!r}")
    return c


def gemv(x, w, out=None, accumulate=False, norm=None, eps=1e-5, swiglu=False, version=None):
    """x @ w.T for a few rows: x (M, K), w (N, K) -> (M, N), one warp per output column.

    accumulate: add into `out` (which must then be given) instead of overwriting it.
    norm: an RMSNorm weight (K,): multiply rms_norm(x, norm, eps) instead of x.
    swiglu: x is (M, 2K) = [h1 | h3]: multiply silu(h1) * h3 instead of x.
    (The last two are the prologues of matmul.cu: the step before the matmul, fused into it.)
    version: 1 gemv (matmul.cu), 2 qgemv_v2 on float32 weights (qgemv.cu: each weight read
    once per 32 rows of x instead of 8), 3 gemv_v3 (gemv_batch.cu: x in shared memory, the grid
    sized to the GPU, split-K), None the rule, gemv_version. 2 and 3 need K % 4 == 0 and
    16-byte aligned x, w and norm."""
    if norm is not None and swiglu:
        raise DeviceError("gemv: norm and swiglu are two prologues; give one")
    if version not in (None, 1, 2, 3):
        raise DeviceError(f"gemv: version must be 1, 2, 3 or None (the rule), got {version!r}")
    _check("x", x, 2)
    _check("w", w, 2)
    (M, K_x), (N, K) = x.shape, w.shape
    if K_x != (2 * K if swiglu else K):
        raise DeviceError(f"gemv: x is (M, K) = {x.shape} but w is (N, K) = {w.shape}"
                          + (" (swiglu: x must be (M, 2K))" if swiglu else ""))
    if norm is not None:
        _check("norm", norm, 1)
        if norm.shape != (K,):
            raise DeviceError(f"norm: expected shape ({K},), got {norm.shape}")
    if accumulate and out is None:
        raise DeviceError("gemv: accumulate=True needs the array to add into as out")
    y = _output(out, (M, N))
    if M == 0 or N == 0:
        return y
    vec = K % 4 == 0 and _aligned(x, w, *([norm] if norm is not None else []))
    prologue = GEMV_PROLOGUES["rmsnorm" if norm is not None else "swiglu" if swiglu else None]
    if version in (2, 3) and not vec:
        raise DeviceError(f"gemv: version {version} loads 16 bytes at a time: needs K % 4 == 0 "
                          f"(got w {w.shape}) and 16-byte aligned x, w and norm")
    version = version or gemv_version(M, vec)
    if version == 2:
        rows = next((r for r in QGEMV_V2_F32_ROWS if r >= M), QGEMV_V2_F32_ROWS[-1])
        _qgemv_v2(x, (w, w, w), y, "f32", rows, *QGEMV_V2_F32, prologue, accumulate, norm, eps)
        return y
    if version == 3:
        _gemv_v3(x, w, y, prologue, accumulate, norm, eps)
        return y
    rows = next(r for r in GEMV_ROWS if r >= min(M, GEMV_ROWS[-1]))
    ksplit, prefetch = gemv_split(rows, vec, N, K)
    if prologue == GEMV_PROLOGUES["rmsnorm"] and gemv_late_norm(rows, vec, prefetch):
        prologue = GEMV_RMSNORM_LATE
    blocks, walk = gemv_grid(rows, N, ksplit, prefetch)
    KERNELS.launch(f"gemv<{rows},{_cpp_bool(vec)},{prologue},{prefetch}{',true' if walk else ''}>",
                   (blocks, cdiv(M, rows)), (256,),
                   (x, w, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
                    w if norm is None else norm, np.float32(eps), i32(ksplit)))
    return y


def attention_threads(width, bsz, n_heads):
    """attention_decode's threads a block for bsz rows of `width`-float pieces and n_heads query
    heads (decode.cu). Its warps take the cached keys a chunk of 8 each at a time, one round
    trip a chunk: 16 warps hold 128 keys in flight, 8 warps 64. More warps pay where the grid
    (a block a head and row) leaves most SMs idle. Measured on the float32 steps (H200,
    2026-11-30, docs/kernels.md, "Keys in flight"): one row at position 200 1.12x (stories15M,
    6 heads) and 1.10x (stories110M, 12) as fast with 16, at position 100 1.08x and 1.05x, at
    position 3 0.99x; 8 rows 1.01x and 1.00x; 32 rows 0.95x and 0.97x (more blocks than the SMs
    hold at once). On the Llama-2-7B shape (32 heads, 4 splits of the keys at max_seq_len 512)
    16 lost at one row at every position (q4_0 0.98x at positions 3 to 31, 0.99x at 300; int8
    0.99x to 1.00x), so it keeps 8 there. Scalar pieces keep 8 (their registers: decode.cu)."""
    wide = width == 4 and bsz <= ATTENTION_WIDE_ROWS and n_heads <= ATTENTION_WIDE_HEADS
    return 512 if wide else 256


def attention_chunk(width, head_dim, threads):
    """Cached keys a block of attention_decode takes in one round trip, as decode.cu's
    attention_by_warps does: each warp ATTN_LANE_FLOATS / (width * pieces a lane) keys, a lane
    holding the fewest pieces, a power of two, that spread head_dim / width pieces over 32
    lanes. So 8 keys a warp for float4 rows of up to 128 floats: 128 keys at 16 warps (the
    stories shapes' block), 64 at 8 (the Llama-2-7B shape's)."""
    per_lane = 1
    while 32 * per_lane * width < head_dim:
        per_lane *= 2
    return threads // 32 * (ATTENTION_LANE_FLOATS // (width * per_lane))


def attention_splits(bsz, max_seq_len, chunk):
    """attention_decode's gridDim.z for bsz rows: at one row, one split per `chunk` positions
    the cache holds (attention_chunk), up to ATTENTION_SPLITS, where that is
    ATTENTION_SPLIT_CHUNKS or more; else 1. The kernel splits only from that many chunks of
    cached keys on, as many splits as chunks, so a shorter context runs as one block a head
    and the other blocks end at once. At more rows 1: their blocks already outnumber the heads.
    Measured on the one-row float32 steps (H200, 2026-11-30, docs/kernels.md, "Splits of the
    keys"): stories110M 1.17x at position 600 and 1.34x at 1000; two chunks in two splits lost
    (0.97x), hence the threshold."""
    splits = min(ATTENTION_SPLITS, cdiv(max_seq_len, chunk))
    return splits if bsz == 1 and splits >= ATTENTION_SPLIT_CHUNKS else 1


class HalvesPlan:
    """halves.cu's launches for a one-row layer (halves_plan): attention None or (P, bytes of
    shared memory, R: blocks a head's cluster), feed_forward None or (J, P, bytes of shared
    memory: 0 for feed_forward_half<J, P>, the rest for feed_forward_wide<P>, whose J is 32);
    None where halves.cu does not take that half."""

    def __init__(self, attention, feed_forward):
        self.attention, self.feed_forward = attention, feed_forward

    def blocks(self, n_heads, hidden_dim):
        """The two launches' blocks. Each counts as an SM: at the shapes where the rule matters
        a block fills one (its registers, or its shared memory); at small dims two may share
        one, and the count is then on the safe side."""
        return (self.attention[2] * n_heads if self.attention else 0) + \
            (hidden_dim // self.feed_forward[0] if self.feed_forward else 0)


def halves_plan(dim, head_dim, hidden_dim, n_heads=None, clusters=True, optin=None, sms=None,
                choose=None):
    """Which halves of a one-row float32 layer halves.cu's kernels take, and their launches
    (HalvesPlan), or None for neither.

    attention_half: a GPU with clusters (compute capability 9.0 on), head_dim a multiple of
    HALVES_CLUSTER (each block S = head_dim / R of its rows) up to 128, dim a multiple of
    HALVES_CLUSTER up to 128 HALVES_MAX_P, and its shared memory within optin (the GPU's, by
    default) beside its static arrays. Clusters of 4 take only the shapes clusters of 8 take
    (the shapes the GPU tests run). feed_forward_half: dim a multiple of 4 up to the same, and a
    J of HALVES_J that divides hidden_dim; feed_forward_wide: the same, hidden_dim a multiple
    of 32, its rows of w13 within optin.

    Of the pairs both halves take (in order: clusters of 8, then 4, with the registers'
    feed-forward; then the same with the wide one), the first whose blocks all fit on the
    GPU's sms at once (n_heads needed): every block of a launch then finds an SM while the
    launch before it runs, and loads its weights there before its wait. Where none fits, or
    sms is not given, the first pair, clusters of 8 and the registers' feed-forward, each half
    where it takes the shape (either takes every shape the other pairs would). choose = (R,
    wide) asks for one pair (a tool's or a test's)."""
    P = -(-dim // 128)
    if dim % 4 or P > HALVES_MAX_P:
        return None
    if sms is not None and n_heads is None:
        raise ValueError("halves_plan: sms given without n_heads: the blocks cannot be counted")
    limit = optin or (_shared_optin() if clusters or hidden_dim % HALVES_WIDE_J == 0 else 0)
    attention = {R: _attention_half_launch(dim, head_dim, P, R, clusters, limit)
                 for R in HALVES_CLUSTERS}
    J = next((j for j in HALVES_J if hidden_dim % j == 0), None)
    wide_smem = 4 * 2 * HALVES_WIDE_J * dim
    wide_static = 4 * (2 * 128 * P + 2 * HALVES_WIDE_J)         # its xs, xg, sq and gate
    fits_wide = hidden_dim % HALVES_WIDE_J == 0 and wide_smem + wide_static <= limit
    feed_forward = {False: None if J is None else (J, P, 0),
                    True: (HALVES_WIDE_J, P, wide_smem) if fits_wide else None}
    if choose is None:
        pairs = [HalvesPlan(attention[R], feed_forward[wide])
                 for wide in (False, True) for R in HALVES_CLUSTERS]
        plan = next((plan for plan in pairs if sms and plan.attention and plan.feed_forward
                     and plan.blocks(n_heads, hidden_dim) <= sms), pairs[0])
    else:
        plan = HalvesPlan(attention[choose[0]], feed_forward[choose[1]])
    return None if plan.attention is None and plan.feed_forward is None else plan


def _attention_half_launch(dim, head_dim, P, R, clusters, optin):
    """attention_half's (P, bytes of dynamic shared memory, R) for clusters of R, or None
    where it cannot take the shape."""
    if not (clusters and head_dim % HALVES_CLUSTER == 0 and head_dim <= HALVES_MAX_HEAD_DIM
            and dim % HALVES_CLUSTER == 0):
        return None
    floats = 3 * head_dim // R * dim + dim // R * head_dim + dim + 5 * head_dim + 2
    return (P, 4 * floats, R) if 4 * floats + HALVES_STATIC_SMEM <= optin else None


def gemv_version(M, vec):
    """The gemv kernel for M rows of x (vec: float4 loads are legal): gemv_v3 from
    GEMV_V3_MIN_ROWS rows on, any shape, else v1. Below 8 rows v1 reads each weight once for
    all of them already (8 rows per warp) and needs no staging of x; from 8 rows on v3 keeps
    x in shared memory, its SMs full by split-K and three blocks an SM, where v1 reads each
    weight through a warp's whole chain of loads and v2 (qgemv_v2) leaves most SMs idle on the
    stories matrices (docs/kernels.md, "gemv v3").
    The threshold is the design's; kernels/dev/bench_f32batch.py times the three at 8, 32
    and 64 rows."""
    return 3 if vec and M >= GEMV_V3_MIN_ROWS else 1


def gemv_v3_plan(M, N, K, sms=None, tiles_of=None):
    """gemv_v3's launch for x (M, K), w (N, K): (ROWS, NR, S, floats of k staged per chunk,
    gridDim.x). ROWS: of tiles_of ({rows: NR}, GEMV_V3_TILES by default), the fewest rows of
    x that hold all M, else the most (more rows take more blocks, blockIdx.y); a block covers
    tiles of 8 NR rows of W. S doubles while the tiles do not cover the SMs (sms: the current
    GPU's by default) and each slice of k keeps a warp's 32 lanes busy (32 float4s); with S > 1
    a block takes one tile, else the grid is what fits on the GPU at once
    (gemv_v3_blocks_per_sm), each block walking tiles, so a tall matrix stages x once per
    block, not once per tile."""
    sms, tiles_of = sms or sm_count(), tiles_of or GEMV_V3_TILES
    rows = next((r for r in tiles_of if r >= M), max(tiles_of))
    nr = tiles_of[rows]
    tiles = cdiv(N, 8 * nr) * cdiv(M, rows)
    split = 1
    while (split < GEMV_V3_MAX_SPLIT and tiles * split < sms
           and 2 * split * 32 <= K // 4):
        split *= 2
    slice4 = cdiv(K // 4, split)
    chunk4 = max(32, GEMV_V3_SMEM // (16 * rows) // 32 * 32)      # whole lanes' steps
    tiles_x = cdiv(N, 8 * nr)
    kc = 4 * min(slice4, chunk4)
    blocks_x = tiles_x if split > 1 else min(tiles_x, max(
        1, gemv_v3_blocks_per_sm(rows, nr, rows * kc * 4) * sms // cdiv(M, rows)))
    return rows, nr, split, kc, blocks_x


def gemv_v3_blocks_per_sm(rows, nr, smem):
    """Blocks of gemv_v3<rows, nr> an SM holds at once: its launch bounds' (registers: 3 with
    32 accumulators a thread, 2 with 64 and 32 rows, else 1; gemv_v3_min_blocks in
    gemv_batch.cu), and no more than shared memory holds: `smem` bytes of x a block, its
    static arrays (inv_rms_s, last_block: at most 4 rows + 16 bytes) and the driver's 1 KiB,
    in the 128-byte units the SM allocates (at 8 rows, 2400 floats of x fit two blocks, not
    three: 75 KiB + 1 KiB is a third of 228 KiB, with the static arrays over it)."""
    by_registers = 3 if rows * nr == 32 else 2 if rows == 32 else 1
    block = 128 * cdiv(smem + 4 * rows + 16 + 1024, 128)
    return max(1, min(by_registers, SMEM_PER_SM // block))


def _gemv_v3(x, w, y, prologue, accumulate, norm, eps, plan=None):
    """Launch gemv_v3 (checked by the caller). plan: gemv_v3_plan's tuple, or that rule."""
    (M, N), K = y.shape, w.shape[1]
    rows, nr, split, kc, blocks_x = plan or gemv_v3_plan(M, N, K)
    grid = (blocks_x, cdiv(M, rows), split)
    partial, counters = (_split_workspace(split * M * N, grid[0] * grid[1]) if split > 1
                         else (y, y))
    KERNELS.launch(f"gemv_v3<{rows},{nr},{prologue}>", grid, (256,),
                   (x, w, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
                    w if norm is None else norm, np.float32(eps), i32(kc), partial, counters),
                   shared_mem=rows * kc * 4)


NULL = np.uint64(0)          # a null pointer, as a kernel argument
_SPLIT_BUFFERS = {}          # (device, what, size) -> a CuPy array, kept for the process


def _split_workspace(floats, tiles):
    """The workspace of the kernels that split k over blocks (gemv_v3, qgemv_mma, qgemv_v4s):
    at least `floats` float32 for the slices' partial sums, and at least `tiles` counters, zeros
    (the last block of each tile resets its counter, so every launch leaves them as it found
    them). Kept per device and power-of-two size for the life of the process: a CUDA graph that
    captured a launch keeps their addresses. Made on a first, eager launch, never during a
    capture (FusedDecoder runs each batch size eagerly first). One stream runs the kernels in
    turn, so they share it."""
    cupy = require_cupy()
    dev = cupy.cuda.Device().id

    def kept(what, n, make):
        key = (dev, what, 1 << max(int(n) - 1, 1).bit_length())   # the power of two >= n
        if key not in _SPLIT_BUFFERS:
            _SPLIT_BUFFERS[key] = make(key[2])
        return _SPLIT_BUFFERS[key]
    return (kept("partial", floats, lambda n: cupy.empty(n, dtype=np.float32)),
            kept("counters", max(tiles, 4096), lambda n: cupy.zeros(n, dtype=np.int32)))


def gemv_prefetch(rows, vec, N, K, ksplit, sms=None):
    """gemv's PREFETCH for a launch: GEMV_PREFETCH where one row of x is read by float4s, the
    float4s loaded before the wait are each lane's whole share of its row of W (lane l of slice
    s reads float4s s * 32 + l, + 32 ksplit, ..: K / 4 <= GEMV_PREFETCH * 32 * ksplit, K <=
    512 ksplit floats), and the grid is one wave of the early-load instances: at most
    GEMV_PREFETCH_BLOCKS blocks an SM (the RMSNorm and SwiGLU instances' 41 and 48 registers
    fit 5 blocks of 256 threads an SM, the plain one's 40 fit 6, where the others' 26 to 40 fit
    6 to 8; the rule takes 5 for all three: on a larger grid the blocks that wait for a second
    wave cost more than the early loads save). Else 0. Measured on an H200 (2026-11-30,
    the graph of one step, the rules' graphs replayed in turn over 9 rounds, medians):
    stories15M 0.0973 ms without early loads, 0.0854 with them wherever they are a lane's
    whole row, 0.0838 with this rule (all but the classifier); stories110M 0.2647, 0.2889 and
    0.2532 (only wo: wqkv, w13 and w2 take 6 to 9 blocks an SM, and the classifier's row does
    not fit)."""
    fits = K // 4 <= GEMV_PREFETCH * 32 * ksplit
    one_wave = cdiv(N * ksplit, 8) <= GEMV_PREFETCH_BLOCKS * (sms or sm_count())
    return GEMV_PREFETCH if rows == 1 and vec and fits and one_wave else 0


def gemv_split(rows, vec, N, K, sms=None):
    """gemv's (ksplit, PREFETCH) for a launch. One row of float4s: the fewest warps a row of W
    (1, 2, 4 or 8) whose launch loads W before its wait (gemv_prefetch: each lane's whole share
    of its row, a grid of one wave), else, and for every other launch, gemv_ksplit's count with
    no early loads. gemv_ksplit alone fills the SMs with warps (~48 each), and on stories110M
    that left wqkv, w13 and w2 at 6 to 9 blocks an SM, more than a wave, with no early loads:
    this rule takes 2 warps a row for its wqkv and wo and 4 for its w2, early loads and the late
    norm on each (w13 and the classifier keep theirs), and the step's graph went from 0.2535 to
    0.2393 ms (1.06x; stories15M 0.0808 -> 0.0799; H200, 2026-11-30, benchmarks.md's
    twenty-fourth run)."""
    if rows == 1 and vec:
        for ksplit in (1, 2, 4, 8):
            if gemv_prefetch(rows, vec, N, K, ksplit, sms):
                return ksplit, GEMV_PREFETCH
    return gemv_ksplit(N, K, sms), 0


def gemv_grid(rows, N, ksplit, prefetch, sms=None):
    """gemv's blocks along N and whether they walk: a block per group of 8 / ksplit rows of W,
    or, without early loads (prefetch) and where the groups are more than GEMV_WALK_BLOCKS[rows]
    blocks an SM (sms: the current GPU's by default), that many blocks, each taking the groups
    a grid apart (WALK). 4000 blocks of stories15M's short classifier rows each ended as soon as
    it began; walking, 1056 blocks made its one-row step 1.05x as fast."""
    groups, cap = cdiv(N, 8 // ksplit), GEMV_WALK_BLOCKS[rows] * (sms or sm_count())
    return (groups, False) if prefetch or groups <= cap else (cap, True)


def gemv_late_norm(rows, vec, prefetch):
    """Whether gemv applies RMSNorm after its sums (GEMV_RMSNORM_LATE) on a launch of `rows`
    rows of x a warp, float4 loads or not (vec), `prefetch` float4s of W before the wait: one
    row with float4 loads, and as GEMV_LATE_NORM says."""
    if rows != 1 or not vec or GEMV_LATE_NORM == "none":
        return False
    return GEMV_LATE_NORM == "all" or prefetch > 0


def gemv_ksplit(N, K, sms=None):
    """Warps per output row in gemv (1, 2, 4 or 8): split k while there are fewer warps than
    an H100 keeps in flight (~48 per SM; sms: the current GPU's by default) and each still
    gets a 128-float slice of k."""
    ksplit, enough = 1, 48 * (sms or sm_count())
    while ksplit < 8 and N * ksplit < enough and K >= 128 * (2 * ksplit):
        ksplit *= 2
    return ksplit


def bmm(a, b, out=None):
    """a @ b over matching leading dims: a (..., M, K), b (..., K, N) -> (..., M, N), at most two
    leading dims, any strides (transposed views of the KV cache are read in place)."""
    _check("a", a, contiguous=False)
    _check("b", b, contiguous=False)
    if not 2 <= a.ndim <= 4 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] \
            or a.shape[-1] != b.shape[-2]:
        raise DeviceError(f"bmm: cannot multiply shapes {a.shape} and {b.shape} (expected "
                          f"(..., M, K) and (..., K, N) with the same 0-2 leading dims)")
    batch, (M, K), N = a.shape[:-2], a.shape[-2:], b.shape[-1]
    c = _output(out, batch + (M, N))
    z0, z1 = ((1, 1) + batch)[-2:]
    if c.size == 0:
        return c
    if z0 * z1 > 65535:
        raise DeviceError(f"bmm: {z0 * z1} matrices in one batch, at most 65535")
    sa = (0, 0) + tuple(s // 4 for s in a.strides)     # element strides, missing dims as 0
    sb = (0, 0) + tuple(s // 4 for s in b.strides)
    KERNELS.launch("bmm_strided", (cdiv(N, 16), cdiv(M, 16), z0 * z1), (16, 16),
                   (a, b, c, i32(M), i32(N), i32(K), i32(z1))
                   + tuple(np.int64(s) for s in sa[-4:] + sb[-4:]))
    return c


# ----------------------------------------------------------------------------
# softmax.cu

def softmax(x, out=None, start_pos=None, kernel=None):
    """Softmax over the last axis of x (float32, C-contiguous).

    With start_pos, x holds causal attention scores (..., seqlen, start_pos + seqlen): query i
    sees keys 0 .. start_pos + i and the rest come out as exact zeros, as if a -inf mask had been
    added (like NumpyOps.softmax, which masks only when seqlen > 1).
    kernel: 'warp' or 'block' to force one (see softmax.cu); by row length when None."""
    _check("x", x)
    if x.ndim == 0:
        raise DeviceError("x: expected at least one dimension, got a scalar")
    n_cols = x.shape[-1]
    n_rows = x.size // n_cols if n_cols else 0
    seqlen = x.shape[-2] if start_pos is not None and x.ndim >= 2 else 1
    if seqlen > 1:
        if start_pos < 0 or start_pos + seqlen != n_cols:
            raise DeviceError(f"softmax: causal scores for start_pos {start_pos} and seqlen "
                              f"{seqlen} need {start_pos + seqlen} columns, got {n_cols}")
        first = start_pos
    else:
        first = n_cols - 1                        # row 0 of 1 sees every column
    y = _output(out, x.shape)
    if x.size == 0:
        return y
    args = (x, y, i32(n_rows), i32(n_cols), i32(first), i32(seqlen))
    fits = [(v, t) for v, t in SOFTMAX_BLOCKS if v * t >= n_cols]
    kernel = kernel or ("block" if n_cols > SOFTMAX_WARP_MAX and fits else "warp")
    if kernel == "warp":
        KERNELS.launch("softmax_warp", (cdiv(n_rows, 8),), (256,), args)
    elif kernel == "block" and fits:
        v, t = fits[0]
        KERNELS.launch(f"softmax_block<{v},{t}>", (n_rows,), (t,), args)
    else:
        raise DeviceError(f"kernel: expected 'warp' or 'block' (rows up to "
                          f"{max(v * t for v, t in SOFTMAX_BLOCKS)}), got {kernel!r} "
                          f"for rows of {n_cols}")
    return y


# ----------------------------------------------------------------------------
# decode.cu (the rest of it runs inside FusedDecoder)

GREEDY_THREADS = 1024       # a block per row of logits; 32000 of them: 8 float4s a thread
NO_STEP = np.uint64(0)      # greedy_pick's next_step where no step follows: a null pointer


def greedy_pick(last):
    """The next token of greedy decoding: for last (bsz, vocab) float32 logits (rows may lie
    apart, as logits[:, -1] of (bsz, seqlen, vocab) does), one (2 bsz,) int32 array: each
    row's argmax (the first of equal maxima, as numpy.argmax), then a flag per row, 1 where a
    logit is not finite (its id is then meaningless, but a valid one: 0 where the row has no
    maximum, all NaN). One launch; one copy to the host. Rows more than 2^31 floats apart (the
    last position of a very long prompt's logits) are made contiguous first."""
    cp = require_cupy()
    if not isinstance(last, cp.ndarray) or last.ndim != 2 or last.dtype != np.float32 \
            or last.strides[1] != 4 or last.strides[0] % 4:
        raise DeviceError(f"greedy_pick: expected a (bsz, vocab) float32 CuPy array with "
                          f"contiguous rows, got {getattr(last, 'shape', type(last).__name__)}")
    if last.strides[0] // 4 > np.iinfo(np.int32).max:     # a long prompt's logits[:, -1]
        last = cp.ascontiguousarray(last)
    bsz, vocab = last.shape
    out = cp.empty(2 * bsz, dtype=np.int32)
    if bsz:
        KERNELS.launch("greedy_pick", (bsz,), (GREEDY_THREADS,),
                       (last, i32(vocab), i32(last.strides[0] // 4), out, i32(bsz), NO_STEP))
    return out


# ----------------------------------------------------------------------------
# weights as stored: qgemv.cu, and gemm_v5 with f32_to_16bit (matmul.cu)

def _check_packed(w):
    """w: a formats.Packed on the GPU in a format the kernels read. Returns its planes as the
    kernels take them: (codes or values, scales, mins), the unused ones standing in any plane."""
    if not isinstance(w, Packed) or w.format not in QGEMV_WEIGHTS:
        raise DeviceError(f"w: expected a formats.Packed weight in one of "
                          f"{', '.join(QGEMV_WEIGHTS)}, got {type(w).__name__} "
                          f"{getattr(w, 'format', '')!r}")
    if w.shape[1] % 8:                   # block formats are whole blocks of 32 already
        raise DeviceError(f"w: a {w.format} weight needs rows of a multiple of 8 values (16-byte "
                          f"loads), got shape {w.shape}")
    main = w.planes.get("data", w.planes.get("qs"))
    for name, plane in w.planes.items():         # Packed checked their shapes and dtypes
        _check(f"w.{name}", plane, dtype=plane.dtype, aligned=plane is main)
    return main, w.planes.get("d", main), w.planes.get("m", main)


def _qgemv_operands(x, w, out, accumulate, norm, swiglu, name="qgemv"):
    """The checks qgemv, qgemv_k and qgemv_mma share: one prologue at most, x (M, K) (M, 2K
    with swiglu), norm (K,), out to add into with accumulate. -> (M, N, K, the output array).
    name: the function the messages name."""
    if norm is not None and swiglu:
        raise DeviceError(f"{name}: norm and swiglu are two prologues; give one")
    _check("x", x, 2, aligned=True)
    (M, K_x), (N, K) = x.shape, w.shape
    if K_x != (2 * K if swiglu else K):
        raise DeviceError(f"{name}: x is (M, K) = {x.shape} but w is (N, K) = {w.shape}"
                          + (" (swiglu: x must be (M, 2K))" if swiglu else ""))
    if norm is not None:
        _check("norm", norm, 1, aligned=True)
        if norm.shape != (K,):
            raise DeviceError(f"norm: expected shape ({K},), got {norm.shape}")
    if accumulate and out is None:
        raise DeviceError(f"{name}: accumulate=True needs the array to add into as out")
    return M, N, K, _output(out, (M, N), aligned=True)


def qgemv(x, w, out=None, accumulate=False, norm=None, eps=1e-5, swiglu=False,
          smem=None, blocks_per_sm=None, version=None, any_order=False, x16=False):
    """x @ W.T with W as stored: x (M, K) float32, w a formats.Packed (N, K) with CuPy planes
    (f16, bf16, q8_0, q4_0, q4_1) -> (M, N) float32, every weight read once per 8 rows of x and
    dequantized in registers.

    accumulate, norm, eps, swiglu: as gemv (add into out; RMSNorm of x; x = [h1 | h3]).
    smem: bytes of shared memory a block may use for x; blocks_per_sm: blocks of the grid per
    SM (each block stages x once, then walks many weight rows); None: QGEMV_SMEM and
    QGEMV_BLOCKS_PER_SM, or for the block formats at 8+ rows of x one block per SM with
    QGEMV_BATCH_SMEM (what the GPU allows). x, norm and out are read and
    written 16 bytes at a time: C-contiguous and 16-byte aligned.
    version: 1 qgemv, 2 qgemv_v2 (one row of x per pass, as many passes as rows), 3 qgemv_mma
    (the tensor cores, f16, bf16, q8_0 and q4_0), 4 qgemv_v4 (one row of x, q4_0 and q8_0,
    the products in integers), None: v4 for one row of x where it reads the format (split
    over k, qgemv_v4s, where qgemv_v4s_wins), else v2;
    v3 from MMA_MIN_ROWS rows where it reads the format, else v1 (measured, docs/kernels.md;
    blocks_per_sm is v1's). The k-quants have one version (qgemv_k).
    any_order: the caller does not ask for the same bits every run, so v3 may add its slices'
    sums into out by atomics (qgemv_mma). x16: v3 takes x in one float16 part where the format
    allows (qgemv_mma's x16); the other versions keep float32's bits of x whatever it says."""
    if getattr(w, "format", None) in QGEMV_K_PLANES:            # super-blocks: qgemv_k.cu
        return qgemv_k(x, w, out, accumulate, norm, eps, swiglu, smem or QGEMV_SMEM,
                       blocks_per_sm or QGEMV_BLOCKS_PER_SM)
    if version not in (None, 1, 2, 3, 4):
        raise DeviceError(f"qgemv: version must be 1, 2, 3, 4 or None (the rule), got {version!r}")
    if version == 4 and (getattr(w, "format", None) not in QGEMV_V4 or x.shape[0] != 1):
        raise DeviceError(f"qgemv: version 4 takes one row of x and {' or '.join(QGEMV_V4)} "
                          f"weights, got {x.shape[0]} rows of {getattr(w, 'format', 'float32')}")
    if version == 3 or (version is None and x.shape[0] >= MMA_MIN_ROWS
                        and getattr(w, "format", None) in MMA_FORMATS):
        return qgemv_mma(x, w, out, accumulate, norm, eps, swiglu, any_order=any_order,
                         x16=takes_x16(w, x16))
    qs, d, m = _check_packed(w)
    M, N, K, y = _qgemv_operands(x, w, out, accumulate, norm, swiglu)
    if M == 0 or N == 0:
        return y
    prologue = GEMV_PROLOGUES["rmsnorm" if norm is not None else "swiglu" if swiglu else None]
    if version is None and qgemv_v4s_wins(M, N, K, w.format, prologue):
        _qgemv_v4s(x, (qs, d), y, w.format, prologue, accumulate, any_order)
        return y
    if version == 4 or (version is None and M == 1 and w.format in QGEMV_V4):
        _qgemv_v4(x, (qs, d), y, w.format, prologue, accumulate, norm, eps, smem or QGEMV_SMEM)
        return y
    if version == 2 or (version is None and M == 1):
        _qgemv_v2(x, (qs, d, m), y, w.format, *QGEMV_V2_PACKED, prologue, accumulate, norm, eps,
                  smem or QGEMV_SMEM)
        return y
    rows = next(r for r in QGEMV_ROWS if r >= min(M, QGEMV_ROWS[-1]))
    batch = rows >= 8 and w.format in QGEMV_BATCH_FORMATS
    if smem is None:
        smem = min(QGEMV_BATCH_SMEM, _shared_optin() - 1024) if batch else QGEMV_SMEM
    if blocks_per_sm is None:
        blocks_per_sm = 1 if batch else QGEMV_BLOCKS_PER_SM
    nr = 4 if rows >= 4 else 2                   # weight rows per warp (qgemv.cu's NR)
    kc = _qgemv_chunk(K, rows, w.format, smem)
    grid = min(cdiv(N, 8 * nr), blocks_per_sm * sm_count())
    KERNELS.launch(f"qgemv<{_qgemv_format(w.format)},{rows},{prologue}>", (grid,), (256,),
                   (x, qs, d, m, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
                    x if norm is None else norm, np.float32(eps), i32(kc)),
                   shared_mem=rows * kc * 4)
    return y


def qgemv_mma(x, w, out=None, accumulate=False, norm=None, eps=1e-5, swiglu=False, nr=None,
              ks=None, any_order=False, rms_out=None, x_ss=None, clear=None, x16=False):
    """x @ W.T on the tensor cores for a few rows of x (qgemv_mma.cu): x (M, K) float32, w a
    formats.Packed (N, K) in f16, bf16, q8_0 or q4_0 -> (M, N) float32, 8 rows of x per pass.
    x enters in 16-bit parts (two float16, scaled per span; three bfloat16 for bf16 weights),
    so the products keep 22 to 24 bits of x and the sums are float32: the same 1e-5 bound as
    qgemv. x16 (f16, q8_0, q4_0 weights: MMA_X16_FORMATS): x in one float16 part, 11 bits a
    value, as the prompts' tensor-core GEMM rounds it (the 7B q4_0 batch-8 step 1.10x as
    fast): the products of the rounded x are exact, the sums float32, and the result within
    ~2e-4 of float64 instead of 1e-5. accumulate, norm, eps, swiglu: as qgemv. nr: weight
    rows per warp in 16s (1 or 2); ks: slices of k (the grid's second side); None: the rule of
    MMA_*.
    any_order: with accumulate and no norm, each slice adds its sums into out by atomics as it
    ends, where otherwise the last block of a tile adds the slices' up in slice order: no block
    waits for the others (wo and w2 so, the 7B batch-8 step 1.08x as fast in q4_0, 1.05x in
    int8; H200, 2026-12-01), and the last bits of out depend on the order the slices end in
    (FusedDecoder's steps unless deterministic).

    The batches' deferred norm (qgemv_mma.cu, FusedDecoder's batch steps unless deterministic):
    rms_out, with norm, an (M,) float32 array of zeros: RMSNorm's 1 / rms is left to the kernel
    after this one; out (zeros, or what to add to) gets the products of x * norm without it,
    and rms_out each row's sum of squares of x, both added by atomics, with no block waiting
    for another whatever the slices. x_ss: (sums, K_norm), such an array from the launch that
    wrote x and that launch's K (w13's, dim, for w2's SwiGLU): x's rows scaled by 1 / sqrt(
    sums / K_norm + eps) before the prologue. clear: a float32 array this launch zeroes after
    its wait (the next deferred product's out and rms_out)."""
    if getattr(w, "format", None) not in MMA_FORMATS:
        raise DeviceError(f"w: qgemv_mma reads {', '.join(MMA_FORMATS)} weights, got "
                          f"{type(w).__name__} {getattr(w, 'format', '')!r}")
    if x16 and w.format not in MMA_X16_FORMATS:
        raise DeviceError(f"qgemv_mma: x16 takes {', '.join(MMA_X16_FORMATS)} weights (their "
                          f"mma's take float16), got {w.format}")
    qs, d, _ = _check_packed(w)
    M, N, K, y = _qgemv_operands(x, w, out, accumulate, norm, swiglu, "qgemv_mma")
    deferred = _check_deferred(M, K, out, norm, rms_out, x_ss, clear)
    if M == 0 or N == 0:
        if clear is not None:
            clear.fill(0)                              # what the launch would have zeroed
        return y
    if nr is not None and nr not in MMA_NR:
        raise DeviceError(f"qgemv_mma: nr must be one of {MMA_NR}, got {nr!r}")
    span = MMA_SPAN[w.format]
    nr, ks, per_slice = qgemv_mma_plan(N, K, w.format, nr=nr, ks=ks)
    tiles = cdiv(N, mma_tile_rows(nr))
    units = per_slice * span // 32
    parts = 1 if x16 else 3 if w.format == "bf16" else 2   # x's float16 or bfloat16 parts
    smem = parts * 8 * 4 * (16 * units + (0 if units % 2 else 16)) + 2 * 8 * 4 * per_slice
    scratch, counters = _split_workspace(ks * M * N + tiles * ks * M, tiles)
    prologue = GEMV_PROLOGUES["rmsnorm" if norm is not None else "swiglu" if swiglu else None]
    KERNELS.launch(_qgemv_mma_name(w.format, nr, prologue, x16), (tiles, ks), (32 * MMA_WARPS,),
                   (x, qs, d, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
                    x if norm is None else norm, np.float32(eps), scratch, counters,
                    i32(bool(any_order and accumulate and norm is None)), *deferred),
                   shared_mem=smem)
    return y


def _check_deferred(M, K, out, norm, rms_out, x_ss, clear):
    """qgemv_mma's deferred norm arguments, checked: (rms_out, x_ss, x_ss's K, clear, its
    floats) as the kernel takes them, NULL for those not given."""
    if rms_out is not None:
        if norm is None or out is None:
            raise DeviceError("qgemv_mma: rms_out defers a norm: give norm, and out (zeros) "
                              "to add the products into")
        _check("rms_out", rms_out, 1)
        if rms_out.shape != (M,):
            raise DeviceError(f"rms_out: expected shape ({M},), got {rms_out.shape}")
    sums, k_norm = (NULL, 0) if x_ss is None else x_ss
    if x_ss is not None:
        if norm is not None:
            raise DeviceError("qgemv_mma: x_ss (the launch before's norm) and norm are two "
                              "norms of x; give one")
        _check("x_ss", sums, 1)
        if sums.shape != (M,) or int(k_norm) < 1:
            raise DeviceError(f"x_ss: expected (sums of shape ({M},), K >= 1), got "
                              f"({sums.shape}, {k_norm!r})")
    if clear is not None:
        _check("clear", clear)
    return (NULL if rms_out is None else rms_out, sums, i32(k_norm),
            NULL if clear is None else clear, i32(0 if clear is None else clear.size))


def qgemv_mma_plan(N, K, fmt, sms=None, nr=None, ks=None):
    """qgemv_mma's launch for W (N, K) in `fmt`: (NR, slices of k, spans of k a slice). Of every
    NR (tiles of mma_tile_rows(NR) rows a block) and every count of slices from the fewest that
    keep a slice's x within MMA_MAX_SLICE positions (shared memory) up to a wave's worth, the
    plan whose waves
    (of MMA_BLOCKS_PER_SM blocks an SM; sms: the current GPU's by default) times a block's
    work (spans a slice x NR) is least, then the fewest blocks; no slice empty. The rule before
    it (NR 2 only where N fills the SMs with 256-row tiles, ~2 blocks an SM by slices) left the
    7B wqkv and w13 at 1.1 and 1.3 waves: the whole batch-8 step 1.17x (q4_0) and 1.20x (int8)
    as fast with this one (H200, 2026-11-30). nr, ks: given instead (ks still at least x's
    minimum)."""
    return _mma_plan(N, K, MMA_SPAN[fmt], MMA_MAX_SLICE, (nr,) if nr else tuple(MMA_NR),
                     MMA_BLOCKS_PER_SM * (sms or sm_count()), ks and int(ks), mma_tile_rows(1))


def takes_x16(w, asked):
    """Whether qgemv_mma takes x in one float16 part for w: where the caller asked for it and
    w's mma's take float16 (not bfloat16's three parts, which one part would cut to 8 bits)."""
    return bool(asked) and getattr(w, "format", None) in MMA_X16_FORMATS


def mma_tile_rows(nr):
    """Weight rows of a qgemv_mma tile: 16 a warp for each NR, MMA_WARPS warps (as it is when
    called, so that a dev tool's patch takes)."""
    return 16 * MMA_WARPS * nr


@functools.lru_cache(maxsize=1024)
def _mma_plan(N, K, span, max_slice, nrs, slots, ks, tile_rows):
    """qgemv_mma_plan's search over the NR of `nrs` for `slots` blocks at once, spans of `span`
    positions and slices of at most `max_slice`, kept per shape: up to a wave's worth of slice
    counts for each NR (264 on an H200), too many to try again at every eager launch of a short
    matrix. Every setting it reads is an argument, so the cache's key: a dev tool that patches
    MMA_SPAN, MMA_MAX_SLICE, MMA_NR, MMA_BLOCKS_PER_SM or MMA_WARPS (tile_rows: a tile's rows
    at NR 1) gets the plan of the patched values."""
    spans = cdiv(K, span)
    fewest = max(cdiv(spans * span, max_slice), 1)                 # x's slice fits shared memory
    best = None
    for n in nrs:
        tiles = cdiv(N, tile_rows * n)
        for k in (max(ks, fewest),) if ks else range(fewest, max(fewest, slots // tiles) + 1):
            per_slice = cdiv(spans, min(k, spans))
            k = cdiv(spans, per_slice)                                 # no empty slice
            plan = ((cdiv(tiles * k, slots) * per_slice * n, tiles * k), n, k, per_slice)
            best = plan if best is None else min(best, plan)          # (cost, NR, ks, spans)
    return best[1:]


def has_clusters():
    """Whether the current GPU runs thread-block clusters (compute capability 9.0 and later)."""
    return int(require_cupy().cuda.Device().compute_capability) >= 90      # "90", "100", ..


def _shared_optin():
    """Bytes of shared memory one block may have on the current GPU, asking for it (227 KiB on
    an H100 or H200, 163 KiB on an A100; 1 KiB of it is left to the static arrays)."""
    return _optin(require_cupy().cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _optin(device_id):
    return require_cupy().cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"]


def _qgemv_chunk(K, rows, fmt, smem, load_bytes=None):
    """Values of each row of x staged at once: all of K if they fit `smem` bytes, else a
    multiple of one warp's sweep along a row of W (32 loads of 16 bytes). load_bytes: the shared
    memory x takes for one 16-byte load of W (default `rows` rows of float32; qgemv_v4's digits
    take less)."""
    weights = 4 if fmt == "f32" else QGEMV_WEIGHTS[fmt]
    load_bytes = load_bytes or rows * 4 * weights
    step = 32 * weights
    if K // weights * load_bytes <= smem:
        return K
    return max(step, smem // load_bytes * weights // step * step)


def _qgemv_v2(x, planes, y, fmt, rows, nr, u, prologue, accumulate, norm, eps, smem=QGEMV_SMEM):
    """Launch qgemv_v2 (checked by the caller): the grid as many blocks as fit on the GPU at
    once, by the kernel's launch bounds (2 per SM, or 1 with 8+ rows of x or NR * U >= 16)."""
    (M, N), K = y.shape, x.shape[1] // (2 if prologue == GEMV_PROLOGUES["swiglu"] else 1)
    kc = _qgemv_chunk(K, rows, fmt, smem)
    per_sm = 1 if rows >= 8 or nr * u >= 16 else 2
    grid = min(cdiv(N, 8 * nr), per_sm * sm_count())
    KERNELS.launch(_qgemv_v2_name(fmt, rows, prologue, nr, u), (grid,), (256,),
                   (x, *planes, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
                    x if norm is None else norm, np.float32(eps), i32(kc)),
                   shared_mem=rows * kc * 4)


def _qgemv_v4(x, planes, y, fmt, prologue, accumulate, norm, eps, smem=QGEMV_SMEM):
    """Launch qgemv_v4 on one row of x (checked by the caller). x is staged in units of the
    values one 16-byte load of W meets (32 for q4_0, 16 for q8_0), 3 x 16 bytes of digits and
    16 of sums and scale per unit per plane of 16 values, 4 more for the unit's sum of squares
    (with RMSNorm), and for q4_0 the pairs' scratch (_v4_chunk): K at once where `smem` allows
    (then the kernel applies RMSNorm after the sums, V4Step's late norm), else in chunks of a
    warp's sweep (32 loads). B blocks an SM (QGEMV_V4: its launch bounds)."""
    (_, N), K = y.shape, x.shape[1] // (2 if prologue == GEMV_PROLOGUES["swiglu"] else 1)
    nr, _, blocks = QGEMV_V4[fmt]
    kc, shared = _v4_chunk(K, fmt, smem)
    KERNELS.launch(_qgemv_v4_name(fmt, prologue), (min(cdiv(N, 8 * nr), blocks * sm_count()),),
                   (256,),
                   (x, planes[0], planes[1], y, i32(N), i32(K), i32(bool(accumulate)),
                    x if norm is None else norm, np.float32(eps), i32(kc)),
                   shared_mem=shared)


def _v4_chunk(K, fmt, smem):
    """qgemv_v4's values of x staged at a time (kc) and its dynamic shared memory, for a row of K
    and `smem` bytes: the staged units (_v4_staged_bytes, a float of x^2 each) and, for q4_0,
    the pairs' scratch (v4_pair_scratch; qgemv.cu's V4_PAIRS) out of `smem`."""
    weights = QGEMV_WEIGHTS[fmt]
    scratch = v4_pair_scratch(weights) if weights == 32 else 0
    kc = _qgemv_chunk(K, 1, fmt, smem - scratch, _v4_unit_bytes(weights) + 4)
    return kc, _v4_staged_bytes(weights, min(kc, K) // weights) + scratch


def _v4_unit_bytes(weights):
    """Shared memory a unit of v4's staged x takes: 3 planes of digits per 16 values, then the
    unit's (T, 2^-s)."""
    return (3 * weights // 16 + 1) * 16


def _v4_staged_bytes(weights, units):
    """Shared memory of `units` staged units and their sums of squares (a float each, in whole
    16 bytes): qgemv.cu's v4_staged_end."""
    return units * _v4_unit_bytes(weights) + 16 * cdiv(units, 4)


def v4_pair_scratch(weights, warps=8):
    """Bytes of v4_stage_pairs's scratch (qgemv.cu): each warp's 16 units, after the prologue,
    as float4s and a float of x^2 each."""
    return warps * 16 * (weights // 4) * 20


def qgemv_v4s_wins(M, N, K, fmt, prologue, sms=None):
    """Whether kernels.qgemv's rule takes qgemv_v4s (v4 split over k) for x (M, K) @ W.T, W
    (N, K) in `fmt`, with a prologue of GEMV_PROLOGUES: one row of x on q4_0 or q8_0, no
    RMSNorm (a slice of k does not see the row's sum of squares), a long row (K >=
    QGEMV_V4S_MIN_K) and few weight rows, so few that v4's grid is under one wave (each of its
    warps one tile of NR rows: N <= 8 NR x B blocks x sms). There each of v4's blocks stages
    all of x for 16 rows; the split's stage a slice of it for 96 (q4_0) or 128 (q8_0) rows
    (qgemv_v4s_plan). Measured on an H200
    (kernels/dev/bench_variants.py --prologues, 2026-11-30), us a launch, with the decode
    step's prologue and accumulate, (fraction of the copy bandwidth):

        7B w2 (4096 x 11008, SwiGLU)  q4_0  v4 16.93 (0.36)  v4s 12.26 (0.50)  nr4 u1 ks8
                                      q8_0  v4 18.28 (0.63)  v4s 16.04 (0.71)  nr8 u1 ks8
        7B wo (4096 x 4096, plain)    q4_0  v4  6.69 (0.34)  v4s  6.53 (0.35)  nr4 u1 ks1
                                      q8_0  v4  7.39 (0.58)  v4s  7.74 (0.55)  nr2 u4 ks1

    so w2 splits, and wo stays on v4 (split, q4_0 gains 2%, q8_0 loses 5%). QGEMV_V4S_MIN_K
    lies between the two rows measured (4096 and 11008)."""
    if M != 1 or fmt not in QGEMV_V4S or prologue == GEMV_PROLOGUES["rmsnorm"]:
        return False
    nr, _, blocks_per_sm = QGEMV_V4[fmt]
    return K >= QGEMV_V4S_MIN_K and cdiv(N, 8 * nr) <= blocks_per_sm * (sms or sm_count())


def qgemv_v4s_plan(N, K, fmt, nr, ks, sms=None):
    """qgemv_v4s's launch: (slices, 16-byte loads per slice, rows per block, tiles). A slice is
    whole 32-load sweeps of a warp (all of the row when it is shorter), `ks` asked for, no slice
    empty; the rows per block R, a multiple of 8 NR, the fewest that keep tiles x slices within
    QGEMV_V4S_BLOCKS_PER_SM blocks per SM (the launch bounds), so that more slices give each
    block more rows, not more blocks. The 7B w2 at the rule's (NR, ks) on 132 SMs: q4_0 6
    slices of 64 loads, tiles of 96 rows, a grid of 43 x 6; q8_0 8 slices of 96, 128 rows,
    32 x 8."""
    loads = K // QGEMV_WEIGHTS[fmt]
    per = min(loads, 32 * cdiv(cdiv(loads, ks), 32))
    slices = cdiv(loads, per)
    tiles_max = max(1, QGEMV_V4S_BLOCKS_PER_SM * (sms or sm_count()) // slices)
    rows = 8 * nr * cdiv(cdiv(N, tiles_max), 8 * nr)       # the fewest for tiles <= tiles_max
    return slices, per, rows, cdiv(N, rows)


def _qgemv_v4s(x, planes, y, fmt, prologue, accumulate, any_order=False):
    """Launch qgemv_v4s on one row of x (checked by the caller) by qgemv_v4s_plan at QGEMV_V4S:
    grid (tiles, slices), each block's slice of x staged as v4's units ((3 WEIGHTS / 16 + 1) x 16
    bytes each), the slices' partial sums in _split_workspace (graph-safe: kept buffers, the
    counters reset by the kernel), or, with any_order and accumulate, added into y by atomics
    (qgemv_mma's any_order)."""
    (_, N), K = y.shape, x.shape[1] // (2 if prologue == GEMV_PROLOGUES["swiglu"] else 1)
    weights, (nr, _, ks) = QGEMV_WEIGHTS[fmt], QGEMV_V4S[fmt]
    slices, per, rows, tiles = qgemv_v4s_plan(N, K, fmt, nr, ks)
    partial, counters = _split_workspace(slices * N, tiles)
    KERNELS.launch(_qgemv_v4s_name(fmt, prologue), (tiles, slices), (256,),
                   (x, planes[0], planes[1], y, i32(N), i32(K), i32(bool(accumulate)),
                    i32(rows), i32(per), partial, counters, i32(bool(any_order and accumulate))),
                   shared_mem=_v4_staged_bytes(weights, per) + v4_pair_scratch(weights))


def to_16bit(x, bf16=False, out=None):
    """float32 x -> float16 (or bfloat16 bits, uint16), rounded to nearest even: the
    activations' way into gemm_v5."""
    cupy = require_cupy()
    _check("x", x)
    dtype = np.uint16 if bf16 else np.float16
    if out is None:
        out = cupy.empty(x.shape, dtype=dtype)
    else:
        _check("out", out, dtype=dtype)
        if out.shape != x.shape:
            raise DeviceError(f"out: expected shape {x.shape}, got {out.shape}")
    n = x.size
    if n:
        vec = n % 4 == 0 and _aligned(x, out)
        KERNELS.launch(f"f32_to_16bit<{_cpp_bool(bf16)},{_cpp_bool(vec)}>",
                       (cdiv(n, 4 * 256),), (256,), (x, out, np.int64(n)))
    return out


def _gemm_operands(name, a, w, out):
    """The checks gemm_v5 and gemm_v6 share: a (M, K) 16-bit, w a Packed (N, K) (a k-quant made
    a float16 copy, kquant_to_f16), out (M, N). -> (w, its planes, the output array)."""
    if getattr(w, "format", None) in QGEMV_K_PLANES:
        w = kquant_to_f16(w)                    # the k-quants: through a float16 copy of W
    planes = _check_packed(w)
    _check("a", a, 2, dtype=np.uint16 if w.format == "bf16" else np.float16, aligned=True)
    (M, K), (N, K_w) = a.shape, w.shape
    if K != K_w:
        raise DeviceError(f"{name}: a is (M, K) = {a.shape} but w is (N, K) = {w.shape}")
    return w, planes, _output(out, (M, N), aligned=True)


def gemm_v5(a, w, out=None, config=GEMM_V5_DEFAULT):
    """a @ W.T on the tensor cores: a (M, K) float16 (bfloat16 bits as uint16 when W is bf16;
    to_16bit makes either), w a formats.Packed (N, K) in f16, bf16, q8_0, q4_0 or q4_1 (or a
    k-quant, multiplied through a float16 copy: kquant_to_f16) -> (M, N) float32, float32
    accumulation. config: a tile shape of GEMM_V5_CONFIGS."""
    if config not in GEMM_V5_CONFIGS:
        raise DeviceError(f"config: expected one of {', '.join(GEMM_V5_CONFIGS)}, got {config!r}")
    w, (main, d, m), c = _gemm_operands("gemm_v5", a, w, out)
    (M, N), K = c.shape, a.shape[1]
    if M == 0 or N == 0:
        return c
    bm, bn, stages = GEMM_V5_CONFIGS[config]
    KERNELS.launch(f"gemm_v5<{bm},{bn},{stages},{GEMM_V5_FORMATS[w.format]}>",
                   (cdiv(N, bn), cdiv(M, bm)), (256,), (a, main, d, m, c, i32(M), i32(N), i32(K)),
                   shared_mem=stages * (bm + bn) * 64)
    return c


def gemm_v6(a, w, out=None, config=GEMM_V6_DEFAULT):
    """gemm_v5's product, operands and result, by gemm_v6 (matmul.cu: 64 x 64 warp tiles,
    fragments double-buffered, tiles in L2-friendly order, C stored through shared memory).
    config: a tile shape of GEMM_V6_CONFIGS; shapes other than GEMM_V6_DEFAULT are compiled
    for f16 weights only."""
    if config not in GEMM_V6_CONFIGS:
        raise DeviceError(f"config: expected one of {', '.join(GEMM_V6_CONFIGS)}, got {config!r}")
    w, (main, d, m), c = _gemm_operands("gemm_v6", a, w, out)
    if config != GEMM_V6_DEFAULT and w.format != "f16":
        raise DeviceError(f"config: {config!r} is compiled for f16 weights only, got "
                          f"{w.format}; use {GEMM_V6_DEFAULT!r}")
    (M, N), K = c.shape, a.shape[1]
    if M == 0 or N == 0:
        return c
    bm, bn, stages = GEMM_V6_CONFIGS[config]
    KERNELS.launch(_gemm_v6_name(w.format, config), (cdiv(M, bm) * cdiv(N, bn),),
                   (bm * bn // 128,), (a, main, d, m, c, i32(M), i32(N), i32(K)),
                   shared_mem=gemm_v6_smem(config))
    return c


def gemm_v6_smem(config):
    """Dynamic shared memory of a gemm_v6 launch: the pipeline's buffers (STAGES x (BM + BN)
    rows of 64 bytes), or the epilogue's staging (a warp per 64 x 64 tile of C, each 32 rows
    of V6_LDC floats) if larger."""
    bm, bn, stages = GEMM_V6_CONFIGS[config]
    return max(stages * (bm + bn) * 64, bm * bn // (64 * 64) * 32 * GEMM_V6_LDC * 4)


def gemm_v7(a, w, out=None, config=GEMM_V7_DEFAULT):
    """gemm_v5's product, operands and result, by gemm_v7 (matmul.cu: Hopper's wgmma, straight
    from shared memory). config: a tile shape of GEMM_V7_CONFIGS; shapes other than
    GEMM_V7_DEFAULT are compiled for f16 and bf16 weights only. Needs a GPU of compute
    capability 9.0 (DeviceError otherwise)."""
    if config not in GEMM_V7_CONFIGS:
        raise DeviceError(f"config: expected one of {', '.join(GEMM_V7_CONFIGS)}, got {config!r}")
    w, (main, d, m), c = _gemm_operands("gemm_v7", a, w, out)
    if config != GEMM_V7_DEFAULT and w.format not in ("f16", "bf16"):
        raise DeviceError(f"config: {config!r} is compiled for f16 and bf16 weights only, got "
                          f"{w.format}; use {GEMM_V7_DEFAULT!r}")
    (M, N), K = c.shape, a.shape[1]
    if M == 0 or N == 0:
        return c
    bn, stages = GEMM_V7_CONFIGS[config]
    KERNELS.launch(_gemm_v7_name(w.format, config), (cdiv(M, 128) * cdiv(N, bn),), (256,),
                   (a, main, d, m, c, i32(M), i32(N), i32(K)), shared_mem=gemm_v7_smem(config))
    return c


def tensor_core_gemm(a, w, out=None):
    """The tensor-core product that prompts go through: gemm_v7 on a GPU that has wgmma
    (compute capability 9.0), gemm_v6 elsewhere; each in its default tile shape."""
    return gemm_v7(a, w, out) if has_wgmma() else gemm_v6(a, w, out)


def has_wgmma():
    """Whether this GPU runs gemm_v7: the compute capability its group is compiled for
    (GROUP_ARCH's "sm_90a": 9.0 only)."""
    return require_cupy().cuda.Device().compute_capability == GROUP_ARCH["gemm_v7"][3:-1]


def gemm_v7_smem(config):
    """Dynamic shared memory of a gemm_v7 launch: STAGES x (128 + BN) rows of 128 bytes, and
    1 KiB to put the first at a 1024-byte boundary (the swizzle's)."""
    bn, stages = GEMM_V7_CONFIGS[config]
    return stages * (128 + bn) * 128 + 1024


# ----------------------------------------------------------------------------
# the k-quants: qgemv_k.cu

def _check_kquant(w):
    """w: a formats.Packed k-quant on the GPU; its planes as qgemv_k takes them."""
    if not isinstance(w, Packed) or w.format not in QGEMV_K_PLANES:
        raise DeviceError(f"w: expected a formats.Packed weight in one of "
                          f"{', '.join(QGEMV_K_PLANES)}, got {type(w).__name__} "
                          f"{getattr(w, 'format', '')!r}")
    for name, plane in w.planes.items():         # Packed checked their shapes and dtypes
        _check(f"w.{name}", plane, dtype=plane.dtype,
               aligned=name in ("qs", "ql", "qh", "hmask"))
    return tuple(w.planes[name] for name in QGEMV_K_PLANES[w.format])


def qgemv_k(x, w, out=None, accumulate=False, norm=None, eps=1e-5, swiglu=False,
            smem=QGEMV_SMEM, blocks_per_sm=QGEMV_BLOCKS_PER_SM):
    """qgemv for a k-quant w (q2_k .. q6_k: a formats.Packed (N, K) with CuPy planes):
    x (M, K) float32 -> (M, N) float32, the weights dequantized in registers as the NumPy
    reference does, float32 sums. The arguments are qgemv's (qgemv sends k-quants here)."""
    planes = _check_kquant(w)
    M, N, K, y = _qgemv_operands(x, w, out, accumulate, norm, swiglu)
    if M == 0 or N == 0:
        return y
    rows = next(r for r in QGEMV_ROWS if r >= min(M, QGEMV_ROWS[-1]))
    nr = 4 if rows >= 4 else 2                   # weight rows per warp (qgemv_k.cu's NR)
    # x chunk: all of K if ROWS rows of it fit `smem`, else whole super-blocks of 256
    kc = K if rows * K * 4 <= smem else max(256, smem // (rows * 4) // 256 * 256)
    prologue = GEMV_PROLOGUES["rmsnorm" if norm is not None else "swiglu" if swiglu else None]
    grid = min(cdiv(N, 8 * nr), blocks_per_sm * sm_count())
    KERNELS.launch(f"qgemv_k<{_qgemv_format(w.format)},{rows},{prologue}>", (grid,), (256,),
                   (x, *planes, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
                    x if norm is None else norm, np.float32(eps), i32(kc)),
                   shared_mem=rows * kc * 4)
    return y


def kquant_to_f16(w, out=None):
    """A k-quant w (N, K) as a formats.Packed f16 on the GPU (for gemm_v5): each weight as the
    NumPy reference dequantizes it, rounded to float16 (beyond 65504: inf, as NumPy's cast).
    A copy of 2 bytes a weight, made for the one product that needs it."""
    cupy = require_cupy()
    planes = _check_kquant(w)
    N, K = w.shape
    if out is None:
        out = cupy.empty((N, K), dtype=np.float16)
    else:
        _check("out", out, dtype=np.float16)
        if out.shape != (N, K):
            raise DeviceError(f"out: expected shape {(N, K)}, got {out.shape}")
    if N:
        # one thread a piece of 32 (or 64) weights: N * K / 32 threads at most
        KERNELS.launch(f"kquant_to_f16<{_qgemv_format(w.format)}>", (cdiv(N * K // 32, 256),),
                       (256,), (*planes, out, i32(N), i32(K)))
    return Packed("f16", (N, K), {"data": out})

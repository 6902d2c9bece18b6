"""The GPU backend (minillama/cuda/, kernels/*.cu) against float64 NumPy and the CPU path.

Tests marked `gpu` need CuPy and an NVIDIA GPU and skip cleanly without them (the `cp` fixture).
Inputs are fresh random numbers each run, at odd sizes; outputs are poisoned with NaN first so
an element a kernel forgets to write cannot pass. Errors are relative, in the norm:
|got - ref| / |ref| against a float64 reference.

Decoding goes through what the backend's decoder(model) returns, as the generation loops do, so
the fused one-token step (FusedDecoder, its CUDA graphs) is what those tests exercise.

The last tests need no GPU: minillama.cuda imports without CuPy, and asking for cuda where there
is no CuPy must be a DeviceError, and exit status 2 on the command line; KernelModule's groups of
an architecture of their own (gemm_v7's sm_90a) run against a stand-in CuPy and NVRTC.
"""
import itertools
import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import GOLDEN, MODELS, ODD, require_shared
from minillama.checkpoints.random import random_weights
from minillama.cuda import runtime
from minillama.devices import get_ops
from minillama.errors import DeviceError, MiniLlamaError
from minillama.generation import AHEAD
from minillama.model import ModelArgs, Transformer
from minillama.ops import CPU

gpu = pytest.mark.gpu
rng = np.random.default_rng()           # fresh inputs every run


@pytest.fixture(scope="module")
def cuda(cp):
    import minillama.cuda
    return minillama.cuda


def rand(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def rel_err(got, ref):
    got = np.asarray(got.get() if hasattr(got, "get") else got, dtype=np.float64)
    assert np.isfinite(got).all(), "non-finite output: an element was not written"
    return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def product_err(got, x64, w64, unit=None):
    """rel_err of a product x @ w.T, where a product of one or a few elements may cancel to
    near zero (one row of x, one row of w, K = 32: about one draw in a thousand): the error of a
    float32 sum scales with its terms, so the norm it is divided by is at least the size of a
    sum of K terms of random sign, ||(|x| @ |w|.T)|| / sqrt(K). Where nothing cancels, that is
    below ||x @ w.T|| and this is rel_err itself.

    unit: qgemv_v4's x, integers in a fixed point per unit of `unit` values, whose error scales
    with the unit's largest |x| (2^-22 of it at most), not with each value: the floor takes each
    |x| as its unit's largest. (With |x| itself, an x over 80 binades at K = 32 failed one draw
    in a hundred in a NumPy replay of v4's rounding, at 6e-2 worst; so, 4e-7.)"""
    ref = x64 @ w64.T
    got = np.asarray(got.get() if hasattr(got, "get") else got, dtype=np.float64)
    assert np.isfinite(got).all(), "non-finite output: an element was not written"
    scale = np.abs(x64)
    if unit is not None:
        largest = scale.reshape(*scale.shape[:-1], -1, unit).max(-1, keepdims=True)
        scale = np.broadcast_to(largest, largest.shape[:-1] + (unit,)).reshape(scale.shape)
    floor = np.linalg.norm(scale @ np.abs(w64).T) / np.sqrt(x64.shape[-1])
    return np.linalg.norm(got - ref) / max(np.linalg.norm(ref), floor)


def poison(cp, shape):
    return cp.full(shape, np.nan, dtype=np.float32)


def ref_linear(x, w):
    return x.astype(np.float64) @ w.astype(np.float64).T


# ----------------------------------------------------------------------------
# matmul.cu

# (M, N, K): batch rows 1..64 and beyond, K off the tiles (8, 16, 32, 128), odd everything
SGEMM_SHAPES = [(1, 1, 1), (3, 17, 5), (17, 127, 33), (64, 3, 1000), (1, 4097, 127),
                (127, 1000, 17), (9, 33, 4097), (128, 128, 8), (129, 257, 12), (200, 64, 129)]


@gpu
@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("M,N,K", SGEMM_SHAPES)
def test_sgemm_versions_match_float64(cuda, cp, version, M, N, K):
    a, w = rand(M, K), rand(N, K)
    out = poison(cp, (M, N))
    c = cuda.sgemm(cp.asarray(a), cp.asarray(w), out=out, version=version)
    assert c is out
    assert rel_err(c, ref_linear(a, w)) < 1e-5


@gpu
@pytest.mark.parametrize("config", ["128x128x8", "128x128x16", "128x64x8", "64x64x16"])
@pytest.mark.parametrize("M,N,K", [(300, 260, 132), (300, 259, 131), (5, 7, 3)])
def test_sgemm_v4_tile_shapes_vector_and_scalar_paths(cuda, cp, config, M, N, K):
    # K, N multiples of 4: float4 loads and stores; otherwise element by element
    a, w = rand(M, K), rand(N, K)
    c = cuda.sgemm(cp.asarray(a), cp.asarray(w), out=poison(cp, (M, N)), config=config)
    assert rel_err(c, ref_linear(a, w)) < 1e-5


@gpu
def test_sgemm_v4_unaligned_operands_take_the_scalar_path(cuda, cp):
    M, N, K = 70, 36, 64                     # would be vectorized if the pointers were aligned
    a, w = rand(M, K), rand(N, K)
    flat = cp.zeros(M * K + 1, dtype=np.float32)
    flat[1:] = cp.asarray(a.ravel())
    a_off = flat[1:].reshape(M, K)           # 4 bytes past an aligned address
    assert a_off.data.ptr % 16 and a_off.flags.c_contiguous
    c = cuda.sgemm(a_off, cp.asarray(w), out=poison(cp, (M, N)))
    assert rel_err(c, ref_linear(a, w)) < 1e-5


@gpu
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, 17, 32, 64])
@pytest.mark.parametrize("N,K", [(1, 1), (127, 1000), (1000, 4097), (33, 4096), (4097, 3)])
def test_gemv_matches_float64_for_batches(cuda, cp, M, N, K):
    x, w = rand(M, K), rand(N, K)
    y = cuda.gemv(cp.asarray(x), cp.asarray(w), out=poison(cp, (M, N)))
    assert rel_err(y, ref_linear(x, w)) < 1e-5


@gpu
@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 17, 32, 33, 64, 65])
@pytest.mark.parametrize("N,K", [(1, 4), (127, 1000), (4097, 12), (33, 4096), (300, 4104)])
def test_gemv_versions_match_float64(cuda, cp, version, M, N, K):
    # version 2: qgemv_v2 on float32 weights (8, 16 or 32 rows of x per pass), K % 4 == 0;
    # version 3: gemv_v3 (8 rows of x per block, more rows in more blocks; split-K where N is
    # small)
    x, w = rand(M, K), rand(N, K)
    y = cuda.gemv(cp.asarray(x), cp.asarray(w), out=poison(cp, (M, N)), version=version)
    assert rel_err(y, ref_linear(x, w)) < 1e-5


# the stories15M and stories110M products (wqkv, wo, w13, w2, the classifier)
STORIES = [(864, 288), (288, 288), (1536, 288), (288, 768), (32000, 288),
           (2304, 768), (768, 768), (4096, 768), (768, 2048), (32000, 768)]


def test_gemv_rule_takes_v3_from_8_rows_where_float4_loads_are_legal():
    from minillama.cuda.kernels import gemv_version
    assert [gemv_version(M, True) for M in (1, 7, 8, 32, 64, 65)] == [1, 1, 3, 3, 3, 3]
    assert gemv_version(32, False) == 1


V3_TILE_SETS = [None, {8: 8, 16: 4, 32: 2}, {8: 4, 16: 2, 32: 1}, {8: 8}]   # None: the rule's


@pytest.mark.parametrize("tiles_of", V3_TILE_SETS)
@pytest.mark.parametrize("M", [8, 13, 32, 64])
def test_gemv_v3_plan_covers_the_sms_with_split_k_where_n_is_small(M, tiles_of):
    from minillama.cuda.kernels import (GEMV_V3_SMEM, GEMV_V3_TILES, cdiv, gemv_v3_blocks_per_sm,
                                        gemv_v3_plan)
    tiles_of = tiles_of or GEMV_V3_TILES
    for N, K in STORIES:
        rows, nr, split, kc, blocks_x = gemv_v3_plan(M, N, K, sms=132, tiles_of=tiles_of)
        assert tiles_of[rows] == nr
        # the fewest rows that hold M, else the most
        assert rows == min([r for r in tiles_of if r >= M] or [max(tiles_of)])
        tiles = cdiv(N, 8 * nr) * cdiv(M, rows)
        # enough tiles for the 132 SMs, or as many slices of k as keep a warp's lanes busy
        assert tiles * split >= 132 or 2 * split * 32 > K // 4 or split == 16, (M, N, K, split)
        assert rows * kc * 4 <= GEMV_V3_SMEM and kc % 4 == 0
        # one tile per block with split-K; else no more blocks than fit on the GPU at once
        per_sm = gemv_v3_blocks_per_sm(rows, nr, rows * kc * 4)
        assert blocks_x == cdiv(N, 8 * nr) if split > 1 else \
            blocks_x * cdiv(M, rows) <= max(per_sm * 132, cdiv(M, rows))
    assert gemv_v3_plan(32, 768, 2048, sms=132, tiles_of=tiles_of)[2] > 1   # 110M's w2 splits k
    # the classifier walks tiles: as many blocks as the SMs hold
    rows, nr, split, kc, blocks_x = gemv_v3_plan(32, 32000, 288, sms=132, tiles_of=tiles_of)
    assert split == 1 and blocks_x * cdiv(32, rows) == \
        132 * gemv_v3_blocks_per_sm(rows, nr, rows * kc * 4) // cdiv(32, rows) * cdiv(32, rows)


def test_gemv_v3_blocks_per_sm_follow_its_launch_bounds_and_shared_memory():
    from minillama.cuda.kernels import gemv_v3_blocks_per_sm, gemv_v3_plan
    assert gemv_v3_blocks_per_sm(8, 4, 24 << 10) == 3           # 32 accumulators: 3 by registers
    assert gemv_v3_blocks_per_sm(32, 1, 96 << 10) == 2          # ... unless x fills shared memory
    assert gemv_v3_blocks_per_sm(32, 2, 96 << 10) == 2          # 64 accumulators, 32 rows: 2
    assert gemv_v3_blocks_per_sm(8, 8, 24 << 10) == 1           # 64 with 8 rows of W a warp: 1
    assert gemv_v3_blocks_per_sm(8, 4, 200 << 10) == 1
    # shared memory counts the static arrays and the 1 KiB a block the driver keeps: at 8 rows
    # x of 2400 floats (75 KiB) leaves room for two blocks, 2396 floats for three
    assert gemv_v3_blocks_per_sm(8, 4, 8 * 2400 * 4) == 2
    assert gemv_v3_blocks_per_sm(8, 4, 8 * 2396 * 4) == 3
    assert gemv_v3_plan(8, 16384, 2400, sms=132)[4] == 264        # a walking grid of 2 x 132


@gpu
@pytest.mark.parametrize("K", [288, 768, 2048, 2396, 2400, 3072, 4096])
def test_gemv_v3_blocks_per_sm_are_the_drivers(cuda, cp, K):
    # the walking grid is gemv_v3_blocks_per_sm blocks an SM: as many as the driver's occupancy
    # calculator puts there (registers by the launch bounds; shared memory with the static
    # arrays and the 1 KiB a block), for every prologue; 2400: two, not three
    k = cuda.kernels
    if cp.cuda.Device().attributes["MaxSharedMemoryPerMultiprocessor"] != k.SMEM_PER_SM:
        pytest.skip("SMEM_PER_SM is an H100/H200 SM's shared memory")
    M, N = 8, 8192
    x, h, w, g = (cp.asarray(rand(*s)) for s in ((M, K), (M, 2 * K), (N, K), (K,)))
    rows, nr, split, kc, _ = k.gemv_v3_plan(M, N, K)
    for pro, call in ((0, lambda: k.gemv(x, w)), (1, lambda: k.gemv(x, w, norm=g)),
                      (2, lambda: k.gemv(h, w, swiglu=True))):
        call()                                      # compiles it, allows its shared memory
        fn = k.KERNELS._functions[f"gemv_v3<{rows},{nr},{pro}>"]
        held = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, 256,
                                                                        rows * kc * 4)
        assert held == k.gemv_v3_blocks_per_sm(rows, nr, rows * kc * 4), (K, pro, held)


@gpu
@pytest.mark.parametrize("plan", [(8, 4, 1, 64, 1), (8, 4, 1, 128, 2), (8, 4, 2, 64, 0),
                                  (8, 4, 3, 36, 0)])
@pytest.mark.parametrize("M,N,K", [(13, 70, 300), (9, 33, 3104), (64, 100, 772)])
def test_gemv_v3_stages_x_chunk_by_chunk_on_any_plan(cuda, cp, M, N, K, plan):
    # plans no rule takes on these shapes (kernels/dev/emulate.py replays the same): x staged
    # chunk by chunk and again for each tile a block walks, slices of several chunks, the last
    # chunk or slice cut short; every prologue and accumulate. (The rule's plans stage x in
    # one chunk up to K = 3072 at 8 rows, so the other tests seldom take this path.)
    from minillama.model import rms_norm, silu
    k = cuda.kernels
    rows, nr, split, kc, blocks_x = plan
    plan = (rows, nr, split, kc, blocks_x or k.cdiv(N, 8 * nr))     # 0: a tile a block (split)
    x, w, g, y0 = rand(M, K), rand(N, K), 1.0 + rand(K, scale=0.1), rand(M, N)
    h = rand(M, 2 * K, scale=2.0).astype(np.float64)
    for xin, pro, norm, acc, ref in (
            (x, 0, None, False, ref_linear(x, w)),
            (x, 1, g, False, ref_linear(rms_norm(x.astype(np.float64), g.astype(np.float64),
                                                 1e-5), w)),
            (h, 2, None, False, ref_linear(silu(h[:, :K]) * h[:, K:], w)),
            (x, 0, None, True, y0 + ref_linear(x, w))):
        y = cp.asarray(y0) if acc else poison(cp, (M, N))
        k._gemv_v3(cp.asarray(xin, dtype=np.float32), cp.asarray(w), y, pro, acc,
                   None if norm is None else cp.asarray(norm), 1e-5, plan=plan)
        assert rel_err(y, ref) < 1e-5, (plan, pro, acc)


@gpu
@pytest.mark.parametrize("M", [8, 13, 40, 64])
@pytest.mark.parametrize("N,K", [(4100, 772), (300, 2052)])      # split-K on the second
def test_gemv_rule_path_prologues_and_accumulate(cuda, cp, M, N, K):
    from minillama.model import rms_norm, silu
    assert cuda.kernels.gemv_version(M, True) == 3
    x, w, g = rand(M, K), rand(N, K), 1.0 + rand(K, scale=0.1)
    ref = ref_linear(rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5), w)
    y = cuda.gemv(cp.asarray(x), cp.asarray(w), out=poison(cp, (M, N)), norm=cp.asarray(g))
    assert rel_err(y, ref) < 1e-5
    h = rand(M, 2 * K, scale=2.0).astype(np.float64)        # [h1 | h3]
    y = cuda.gemv(cp.asarray(h, dtype=np.float32), cp.asarray(w), out=poison(cp, (M, N)),
                  swiglu=True)
    assert rel_err(y, ref_linear(silu(h[:, :K]) * h[:, K:], w)) < 1e-5
    y0 = rand(M, N)
    y = cp.asarray(y0)
    cuda.gemv(cp.asarray(x), cp.asarray(w), out=y, accumulate=True)
    assert rel_err(y, y0 + ref_linear(x, w)) < 1e-5


@gpu
@pytest.mark.parametrize("M", [8, 32, 64])
@pytest.mark.parametrize("N,K", STORIES)
def test_gemv_v3_is_deterministic_and_exact_on_the_stories_shapes(cuda, cp, M, N, K):
    # split-K adds its slices in a fixed order: the same bits every launch (and the counters
    # are back at zero after each, or the second launch would add a stale slice)
    x, w = rand(M, K), rand(N, K)
    xg, wg = cp.asarray(x), cp.asarray(w)
    first = cuda.gemv(xg, wg, out=poison(cp, (M, N)), version=3).get()
    assert rel_err(first, ref_linear(x, w)) < 1e-5
    for _ in range(3):
        assert np.array_equal(cuda.gemv(xg, wg, out=poison(cp, (M, N)), version=3).get(), first)


@gpu
def test_gemv_accumulate_adds_into_out(cuda, cp):
    x, w, y0 = rand(3, 300), rand(77, 300), rand(3, 77)
    y = cp.asarray(y0)
    cuda.gemv(cp.asarray(x), cp.asarray(w), out=y, accumulate=True)
    assert rel_err(y, y0 + ref_linear(x, w)) < 1e-5


@gpu
@pytest.mark.parametrize("M", [1, 3, 8, 13])
@pytest.mark.parametrize("K", [36, 70, 768])              # 70: not float4-sized, scalar path
def test_gemv_prologues_compute_rmsnorm_and_swiglu_like_the_model(cuda, cp, M, K):
    from minillama.model import rms_norm, silu
    x, w, g = rand(M, K), rand(50, K), 1.0 + rand(K, scale=0.1)
    ref = ref_linear(rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5), w)
    y = cuda.gemv(cp.asarray(x), cp.asarray(w), out=poison(cp, (M, 50)), norm=cp.asarray(g),
                  eps=1e-5)
    assert rel_err(y, ref) < 1e-5
    h = rand(M, 2 * K, scale=2.0).astype(np.float64)        # [h1 | h3]
    ref = ref_linear(silu(h[:, :K]) * h[:, K:], w)
    y = cuda.gemv(cp.asarray(h, dtype=np.float32), cp.asarray(w), out=poison(cp, (M, 50)),
                  swiglu=True)
    assert rel_err(y, ref) < 1e-5


@gpu
@pytest.mark.parametrize("M", [1, 8])
def test_gpu_silu_stays_within_2e_6_of_float64_out_to_its_limits(cuda, cp, M):
    """matmul.cu's silu (x / (1 + e^-x) from __expf and __fdividef, where model.py writes x
    sigmoid(x) with tanh), value by value against float64's x / (1 + e^-x): gemv's SwiGLU
    prologue through an identity matrix gives silu(h1) * 1 exactly. Within 2e-6 of each value,
    or 1e-12 where silu is that small (x below -20); where e^-x overflows (x below -88) 0, not
    NaN; a huge x itself."""
    h1 = np.array([-1e30, -100, -88.9, -88.5, -87.5, -50, -20, -5, -1, -1e-3, -1e-30, 0,
                   1e-30, 1e-3, 0.5, 1, 5, 20, 50, 88.5, 100, 1e30, -2.5, 2.5], dtype=np.float32)
    K = h1.size
    h = np.concatenate([np.tile(h1, (M, 1)), np.ones((M, K), np.float32)], axis=1)
    y = cuda.gemv(cp.asarray(h), cp.asarray(np.eye(K, dtype=np.float32)),
                  out=poison(cp, (M, K)), swiglu=True).get()
    x = h1.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = x / (1 + np.exp(-x))                          # e^1e30: inf, and x / inf: -0
    assert np.all(np.abs(y - ref) <= 2e-6 * np.abs(ref) + 1e-12), (y[0], ref)


def test_gemv_loads_w_before_its_wait_only_where_that_is_each_lanes_whole_row():
    """kernels.gemv_prefetch: one row of x, float4 loads, K / 4 <= 4 float4s x 32 lanes x
    ksplit warps, and a grid of one wave (at most 5 blocks an SM). kernels.gemv_split takes the
    fewest warps a row that give a launch those early loads: on an H200 (132 SMs) every
    stories15M product but the classifier, and of stories110M's wqkv, wo and w2. Three
    instances have early loads, no more."""
    from minillama.cuda.kernels import GEMV_PREFETCH, KERNELS, gemv_prefetch, gemv_split

    def early(N, K, rows=1, vec=True, sms=132):
        return gemv_split(rows, vec, N, K, sms=sms)[1]
    assert [early(N, K) > 0 for N, K in STORIES] == \
        [True] * 4 + [False] + [True, True, False, True, False]   # 15M but its classifier
    assert early(5280, 288) == GEMV_PREFETCH and early(5288, 288) == 0   # 660 blocks, 661
    assert early(2640, 768) == GEMV_PREFETCH and early(2648, 768) == 0   # two warps a row
    assert early(33, 4096) == GEMV_PREFETCH and early(300, 4104) == 0    # eight warps
    assert early(864, 288, rows=2) == early(864, 288, vec=False) == 0
    assert early(32000, 288, sms=6400) == GEMV_PREFETCH                  # a larger GPU
    assert gemv_prefetch(1, True, 2648, 288, 2, sms=132) == 0           # 662 blocks at two warps
    assert sorted(n for n in KERNELS.templates if n.startswith("gemv<")
                  and not n.endswith((",0>", ",0,true>"))) \
        == [f"gemv<1,true,{pro},{GEMV_PREFETCH}>" for pro in (0, 1, 2, 3)]     # 3: late norm


def test_gemv_split_takes_the_fewest_warps_a_row_with_early_loads_else_gemv_ksplits():
    """kernels.gemv_split at one row of float4s: the fewest of 1, 2, 4, 8 warps a row whose
    launch has early loads (gemv_prefetch), where gemv_ksplit alone would fill the SMs with
    warps and leave stories110M's wqkv (2304 x 768) at 4 a row, 1152 blocks, no early loads;
    where no count has them, and for several rows of x or unaligned rows, gemv_ksplit's."""
    from minillama.cuda.kernels import GEMV_PREFETCH, gemv_ksplit, gemv_prefetch, gemv_split
    for N, K in STORIES + [(33, 4096), (300, 4104), (5, 12), (7000, 100)]:
        for rows, vec in ((1, True), (2, True), (1, False), (8, True)):
            ksplit, prefetch = gemv_split(rows, vec, N, K, sms=132)
            fewest = next((s for s in (1, 2, 4, 8)
                           if gemv_prefetch(rows, vec, N, K, s, sms=132)), None)
            if fewest is None:
                assert (ksplit, prefetch) == (gemv_ksplit(N, K, sms=132), 0), (N, K, rows, vec)
            else:
                assert (ksplit, prefetch) == (fewest, GEMV_PREFETCH), (N, K, rows, vec)
                assert rows == 1 and vec
    assert gemv_ksplit(2304, 768, sms=132) == 4 and gemv_split(1, True, 2304, 768, sms=132) == \
        (2, GEMV_PREFETCH)


def test_attention_threads_are_sixteen_warps_for_a_few_rows_of_float4_pieces():
    """kernels.attention_threads: 16 warps (more keys in flight) up to ATTENTION_WIDE_ROWS rows
    of float4 pieces in models of up to ATTENTION_WIDE_HEADS heads (the stories' 6 and 12),
    else 8: more rows, more heads (the 7B shape's 32), or scalar pieces."""
    from minillama.cuda.kernels import ATTENTION_WIDE_HEADS, ATTENTION_WIDE_ROWS, attention_threads
    assert [attention_threads(4, b, 6) for b in (1, 2, ATTENTION_WIDE_ROWS)] == [512] * 3
    assert [attention_threads(4, 1, h) for h in (12, ATTENTION_WIDE_HEADS)] == [512] * 2
    assert [attention_threads(4, b, 6) for b in (ATTENTION_WIDE_ROWS + 1, 32, 64)] == [256] * 3
    assert [attention_threads(4, b, 32) for b in (1, 8)] == [256] * 2
    assert attention_threads(4, 1, ATTENTION_WIDE_HEADS + 1) == 256
    assert [attention_threads(1, b, 6) for b in (1, 8, 32)] == [256] * 3


def test_attention_splits_are_one_per_chunk_at_one_row():
    """kernels.attention_splits: one row gets a split per chunk of positions of the cache, at
    most ATTENTION_SPLITS, where that makes 3 or more (stories15M's 256 positions in chunks
    of 128: 1); more rows, 1."""
    from minillama.cuda.kernels import ATTENTION_SPLITS, attention_splits
    assert [attention_splits(1, s, 128) for s in (1, 128, 256, 257, 384, 1024, 4096)] == \
        [1, 1, 1, 3, 3, 8, ATTENTION_SPLITS]
    assert [attention_splits(1, s, 64) for s in (128, 129, 256, 512)] == [1, 3, 4, 8]
    assert [attention_splits(b, 4096, 64) for b in (2, 8, 32)] == [1, 1, 1]


@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("head_dim", [4, 8, 48, 64, 100, 128, 132, 200, 256])
@pytest.mark.parametrize("threads", [256, 512])
def test_attention_chunk_is_the_keys_attention_by_warps_takes(width, head_dim, threads):
    """kernels.attention_chunk against decode.cu's choice, replayed: attention_decode picks
    PER_LANE (1, 2, MOST / 2 or MOST pieces a lane) by the pieces of a row, and each warp
    takes ATTN_LANE_FLOATS / (WIDTH * PER_LANE) keys a round trip."""
    from minillama.cuda.kernels import attention_chunk
    if head_dim % width:
        pytest.skip("float4 rows need head_dim a multiple of 4")
    most, pieces = 256 // (32 * width), head_dim // width
    per_lane = (1 if pieces <= 32 else 2 if pieces <= 64 or most == 2
                else most // 2 if pieces <= 128 else most)
    assert 32 * per_lane >= pieces                          # the slice holds the row
    assert attention_chunk(width, head_dim, threads) == threads // 32 * (32 // (width * per_lane))


def test_attention_constants_are_the_kernels():
    """kernels.ATTENTION_SPLIT_CHUNKS, the rule's threshold, is decode.cu's ATTN_SPLIT_CHUNKS,
    below which the kernel keeps one split: were they to differ, the rule would launch splits
    the kernel leaves idle, or none where it would split. The same for the floats of keys a
    lane holds, which size a chunk (attention_chunk), and for the branches that pick the
    pieces a lane (replayed by the test above)."""
    from minillama.cuda.kernels import ATTENTION_LANE_FLOATS, ATTENTION_SPLIT_CHUNKS
    source = (runtime.kernel_dir() / "decode.cu").read_text()
    assert f"constexpr int ATTN_SPLIT_CHUNKS = {ATTENTION_SPLIT_CHUNKS};" in source
    assert f"constexpr int ATTN_LANE_FLOATS = {ATTENTION_LANE_FLOATS};" in source
    assert "constexpr int MOST = ATTN_HEAD_DIM / (32 * WIDTH);" in source
    assert "constexpr int ATTN_HEAD_DIM = 256;" in source
    branches = ["if (pieces <= 32)", "attention_by_warps<WIDTH, 1>",
                "else if (pieces <= 64 || MOST == 2)", "attention_by_warps<WIDTH, 2>",
                "else if (pieces <= 128)", "attention_by_warps<WIDTH, MOST / 2>",
                "attention_by_warps<WIDTH, MOST>"]
    at = [source.index(b) for b in branches]
    assert at == sorted(at)
    assert "constexpr int KEYS = ATTN_LANE_FLOATS / (WIDTH * PER_LANE);" in source


def test_gemv_grid_walks_only_where_groups_outnumber_the_cap_and_no_early_loads():
    """kernels.gemv_grid: a block per group of 8 / ksplit rows of W, or GEMV_WALK_BLOCKS[rows]
    blocks an SM that walk the groups, only for launches without early loads; on an H200 at one
    row, of the stories shapes only the 32000-row classifiers walk (1056 blocks), at 4 rows
    stories110M's wqkv, w13 and w2 too (660)."""
    from minillama.cuda.kernels import GEMV_WALK_BLOCKS, gemv_grid, gemv_split

    def grid(rows, N, K, sms=132):
        ksplit, prefetch = gemv_split(rows, True, N, K, sms=sms)
        return gemv_grid(rows, N, ksplit, prefetch, sms=sms)
    assert [grid(1, N, K)[1] for N, K in STORIES] == [False] * 4 + [True] + [False] * 4 + [True]
    assert grid(1, 32000, 288) == (8 * 132, True) and grid(4, 32000, 288) == (5 * 132, True)
    assert [grid(4, N, K)[1] for N, K in STORIES[5:]] == [True, False, True, True, True]
    assert grid(1, 864, 288) == (108, False)                  # one group of 8 rows a block
    assert gemv_grid(1, 32000, 1, 4, sms=132) == (4000, False)          # early loads: never
    for rows, cap in GEMV_WALK_BLOCKS.items():
        for N in (8 * cap * 132, 8 * cap * 132 + 1):
            blocks, walk = gemv_grid(rows, N, 1, 0, sms=132)
            assert walk == (N > 8 * cap * 132) and blocks == min(-(-N // 8), cap * 132)


@gpu
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N,K", [(1001, 288), (37, 4104), (333, 100), (2049, 7)])
def test_gemv_blocks_walking_groups_match_float64(cuda, cp, monkeypatch, M, N, K):
    """gemv's WALK instances: a grid of 3 blocks, each taking groups of rows a grid apart (the
    rule takes them for tall matrices without early loads; here forced on small ones, and v1
    at 8 rows too), at 1 to 8 rows of x, k split as gemv_ksplit says (1 to 8 warps a row),
    float4 rows and not (K 100, 7), each prologue and accumulate, within 1e-5 of float64."""
    from minillama.model import rms_norm, silu
    k = cuda.kernels
    monkeypatch.setattr(k, "gemv_split", lambda rows, vec, N, K, sms=None: (k.gemv_ksplit(N, K), 0))
    monkeypatch.setattr(k, "gemv_grid", lambda rows, N, ksplit, prefetch, sms=None: (3, True))
    launched = launched_names(k, monkeypatch)
    x, w, g = rand(M, K), rand(N, K), 1.0 + rand(K, scale=0.1)
    xg, wg = cp.asarray(x), cp.asarray(w)
    y = cuda.gemv(xg, wg, out=poison(cp, (M, N)), version=1)
    assert rel_err(y, ref_linear(x, w)) < 1e-5
    ref = ref_linear(rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5), w)
    y = cuda.gemv(xg, wg, out=poison(cp, (M, N)), norm=cp.asarray(g), eps=1e-5, version=1)
    assert rel_err(y, ref) < 1e-5
    h = rand(M, 2 * K, scale=2.0).astype(np.float64)        # [h1 | h3]
    y = cuda.gemv(cp.asarray(h, dtype=np.float32), wg, out=poison(cp, (M, N)), swiglu=True,
                  version=1)
    assert rel_err(y, ref_linear(silu(h[:, :K]) * h[:, K:], w)) < 1e-5
    y0 = rand(M, N)
    y = cp.asarray(y0)
    cuda.gemv(xg, wg, out=y, accumulate=True, version=1)
    assert rel_err(y, y0 + ref_linear(x, w)) < 1e-5
    assert len(launched) == 4 and all(name.endswith(",0,true>") for name in launched), launched


def test_gemv_late_norm_rule_takes_one_row_of_float4s_as_gemv_late_norm_says(monkeypatch):
    """kernels.gemv_late_norm: RMSNorm after the sums (GEMV_RMSNORM_LATE) only at one row with
    float4 loads; there on the launches with early loads ("early", the package's), on all, or
    on none, by GEMV_LATE_NORM."""
    from minillama.cuda import kernels as k
    cases = [(1, True, 4), (1, True, 0), (2, True, 4), (1, False, 0)]
    assert k.GEMV_LATE_NORM == "early"
    assert [k.gemv_late_norm(*c) for c in cases] == [True, False, False, False]
    monkeypatch.setattr(k, "GEMV_LATE_NORM", "all")
    assert [k.gemv_late_norm(*c) for c in cases] == [True, True, False, False]
    monkeypatch.setattr(k, "GEMV_LATE_NORM", "none")
    assert [k.gemv_late_norm(*c) for c in cases] == [False] * 4


def gemv_prologue(k, pro, prefetch):
    """The prologue gemv launches for `pro` (GEMV_PROLOGUES) at one row of float4s: RMSNorm
    after the sums where gemv_late_norm takes it."""
    return k.GEMV_RMSNORM_LATE if pro == 1 and k.gemv_late_norm(1, True, prefetch) else pro


def one_row_gemv(k, N, K, pro):
    """The gemv instance the rule launches for one row of float4s, W (N, K) and prologue `pro`:
    its early loads (gemv_split), RMSNorm after the sums where they are, its blocks walking where
    gemv_grid says."""
    ksplit, prefetch = k.gemv_split(1, True, N, K)
    walk = k.gemv_grid(1, N, ksplit, prefetch)[1]
    return f"gemv<1,true,{gemv_prologue(k, pro, prefetch)},{prefetch}{',true' if walk else ''}>"


def launched_names(k, monkeypatch):
    """The names of the kernels launched through k.KERNELS from now on (the list fills)."""
    launched, launch = [], k.KERNELS.launch
    monkeypatch.setattr(k.KERNELS, "launch", lambda name, *a, **kw: (launched.append(name),
                                                                       launch(name, *a, **kw)))
    return launched


def decode_one_row_in_a_graph(k, ops, gpu_model, ref_model, steps, monkeypatch):
    """`steps` random tokens of one row through ops.decoder (the first step eager, then its
    graph), each step's logits within 1e-4 of ref_model's, the decoder a FusedDecoder that
    captured the one-row graph; returns the names of the kernels launched."""
    forward = ops.decoder(gpu_model)
    launched = launched_names(k, monkeypatch)
    for pos in range(steps):
        tok = rng.integers(0, gpu_model.params.vocab_size, size=(1, 1))
        assert rel_err(forward(tok, pos), ref_model.forward(tok, pos)) < 1e-4, f"position {pos}"
    decoder = ops._decoders[gpu_model]
    assert type(decoder).__name__ == "FusedDecoder" and decoder.graphs[1] is not None
    return launched


@gpu
@pytest.mark.parametrize("late", ["early", "all", "none"])
@pytest.mark.parametrize("N,K,early", [(864, 288, True), (288, 768, True), (32000, 288, False),
                                       (33, 4096, True), (32000, 768, False), (300, 4104, False),
                                       (288, 4104, False), (2304, 768, True)])
def test_gemv_one_row_with_and_without_early_loads_matches_float64(cuda, cp, monkeypatch,
                                                                   N, K, early, late):
    """One row of x, each prologue and accumulate, on both gemv instances: with W's float4s
    loaded before the wait (the whole row of each lane: stories15M's products, stories110M's
    wqkv at two warps a row, and exactly 4 float4s a lane at (33, 4096)), and without (longer
    rows, as stories110M's classifier, or grids of more than one wave, as stories15M's).
    `early`: which one an H200 takes (gemv_split). RMSNorm first or after the sums (`late`:
    GEMV_LATE_NORM), each on both."""
    from minillama.model import rms_norm, silu
    k = cuda.kernels
    monkeypatch.setattr(k, "GEMV_LATE_NORM", late)
    launched = launched_names(k, monkeypatch)
    prefetch = k.gemv_split(1, True, N, K)[1]
    if k.sm_count() == 132:
        assert (prefetch > 0) == early
    x, w, g = rand(1, K), rand(N, K), 1.0 + rand(K, scale=0.1)
    xg, wg = cp.asarray(x), cp.asarray(w)
    y = cuda.gemv(xg, wg, out=poison(cp, (1, N)))
    assert rel_err(y, ref_linear(x, w)) < 1e-5
    ref = ref_linear(rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5), w)
    y = cuda.gemv(xg, wg, out=poison(cp, (1, N)), norm=cp.asarray(g), eps=1e-5)
    assert rel_err(y, ref) < 1e-5
    h = rand(1, 2 * K, scale=2.0).astype(np.float64)        # [h1 | h3]
    y = cuda.gemv(cp.asarray(h, dtype=np.float32), wg, out=poison(cp, (1, N)), swiglu=True)
    assert rel_err(y, ref_linear(silu(h[:, :K]) * h[:, K:], w)) < 1e-5
    y0 = rand(1, N)
    y = cp.asarray(y0)
    cuda.gemv(xg, wg, out=y, accumulate=True)
    assert rel_err(y, y0 + ref_linear(x, w)) < 1e-5
    assert launched == [one_row_gemv(k, N, K, pro) for pro in (0, 1, 2, 0)]


@gpu
@pytest.mark.parametrize("N,K", [(32000, 768), (300, 4104), (17, 8192), (5, 12)])
def test_gemv_early_loads_are_exact_where_the_row_is_longer_or_shorter(cuda, cp, monkeypatch,
                                                                      N, K):
    """The instances with early loads are correct for any K (the k loop takes the rest, and
    lanes past the row load nothing), though the rule takes them only where the row fits."""
    from minillama.model import rms_norm
    k = cuda.kernels
    monkeypatch.setattr(k, "gemv_split", lambda rows, vec, N, K, sms=None: (
        k.gemv_ksplit(N, K), k.GEMV_PREFETCH if rows == 1 and vec else 0))
    launched = launched_names(k, monkeypatch)
    x, w, g = rand(1, K), rand(N, K), 1.0 + rand(K, scale=0.1)
    y = cuda.gemv(cp.asarray(x), cp.asarray(w), out=poison(cp, (1, N)))
    assert rel_err(y, ref_linear(x, w)) < 1e-5
    ref = ref_linear(rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5), w)
    y = cuda.gemv(cp.asarray(x), cp.asarray(w), out=poison(cp, (1, N)), norm=cp.asarray(g))
    assert rel_err(y, ref) < 1e-5
    assert launched == [f"gemv<1,true,{gemv_prologue(k, pro, k.GEMV_PREFETCH)},{k.GEMV_PREFETCH}>"
                        for pro in (0, 1)]


@gpu
@pytest.mark.parametrize("bsz,n_kv,rep,seqlen,hd,end", [(1, 1, 1, 1, 1, 1), (2, 3, 2, 5, 17, 9),
                                                         (3, 2, 3, 1, 64, 127), (1, 4, 2, 7, 48, 40)])
def test_bmm_reads_the_kv_cache_views_in_place(cuda, cp, bsz, n_kv, rep, seqlen, hd, end):
    # the two products of Attention: q @ keys and probs @ values, keys/values strided views
    cache = cp.asarray(rand(bsz + 1, end + 3, n_kv, hd))       # (max_bsz, max_seq, n_kv, hd)
    q = cp.asarray(rand(bsz, n_kv, rep * seqlen, hd))
    keys = cache[:bsz, :end].transpose(0, 2, 3, 1)              # (bsz, n_kv, hd, end)
    values = cache[:bsz, :end].transpose(0, 2, 1, 3)            # (bsz, n_kv, end, hd)
    assert not keys.flags.c_contiguous or hd == end == 1
    k64 = keys.get().astype(np.float64)
    v64 = values.get().astype(np.float64)
    scores = cuda.bmm(q, keys, out=poison(cp, (bsz, n_kv, rep * seqlen, end)))
    assert rel_err(scores, q.get().astype(np.float64) @ k64) < 1e-5
    p = cp.asarray(rand(bsz, n_kv, rep * seqlen, end))
    out = cuda.bmm(p, values, out=poison(cp, (bsz, n_kv, rep * seqlen, hd)))
    assert rel_err(out, p.get().astype(np.float64) @ v64) < 1e-5


@gpu
@pytest.mark.parametrize("shape_a,shape_b", [((5, 7), (7, 3)), ((4, 17, 9), (4, 9, 127))])
def test_bmm_plain_and_one_batch_dim(cuda, cp, shape_a, shape_b):
    a, b = rand(*shape_a), rand(*shape_b)
    c = cuda.bmm(cp.asarray(a), cp.asarray(b))
    assert rel_err(c, a.astype(np.float64) @ b.astype(np.float64)) < 1e-5


# ----------------------------------------------------------------------------
# softmax.cu

def ref_softmax(x, start_pos=None):
    x = x.astype(np.float64)
    if start_pos is not None and x.shape[-2] > 1:
        seqlen, n = x.shape[-2:]
        visible = np.arange(n)[None, :] <= start_pos + np.arange(seqlen)[:, None]
        x = np.where(visible, x, -np.inf)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@gpu
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 17), (17, 127), (5, 1000), (2, 1025),
                                       (3, 4097), (2, 32000), (1, 32768), (2, 40000)])
@pytest.mark.parametrize("kernel", [None, "warp", "block"])
def test_softmax_matches_float64(cuda, cp, rows, cols, kernel):
    if kernel == "block" and cols > 32768:
        pytest.skip("no block variant holds rows this long (the warp kernel takes them)")
    x = rand(rows, cols, scale=3.0) + 1000.0      # large values: exp(x) alone would overflow
    y = cuda.softmax(cp.asarray(x), out=poison(cp, (rows, cols)), kernel=kernel)
    assert rel_err(y, ref_softmax(x)) < 1e-5
    assert np.allclose(y.get().sum(axis=-1), 1.0, atol=1e-5)


@gpu
@pytest.mark.parametrize("kernel", ["warp", "block"])
@pytest.mark.parametrize("start_pos,seqlen", [(0, 1), (0, 7), (5, 3), (30, 2), (0, 1500)])
def test_softmax_causal_mask_is_built_in(cuda, cp, kernel, start_pos, seqlen):
    x = rand(2, 3, seqlen, start_pos + seqlen, scale=4.0)      # (bsz, heads, seqlen, keys)
    y = cuda.softmax(cp.asarray(x), out=poison(cp, x.shape), start_pos=start_pos, kernel=kernel)
    ref = ref_softmax(x, start_pos)
    assert rel_err(y, ref) < 1e-5
    assert (y.get()[ref == 0] == 0).all()         # masked keys are exact zeros
    assert rel_err(CPU.softmax(x, start_pos), ref) < 1e-5       # the CPU agrees on the contract


# ----------------------------------------------------------------------------
# decode.cu's attention_decode: RoPE, the KV-cache write and attention in one kernel

ATTENTION_SHAPES = [(1, 4, 4, 16, 0), (3, 6, 2, 6, 0), (3, 6, 2, 6, 9), (2, 8, 2, 64, 37),
                    (1, 12, 3, 128, 300), (2, 8, 2, 256, 70), (2, 4, 2, 70, 45),
                    (1, 2, 1, 250, 20), (1, 6, 2, 48, 5000), (1, 6, 6, 48, 200)]


@gpu
@pytest.mark.parametrize("cache", ["float32", "float16"])
@pytest.mark.parametrize("bsz,nh,nkv,hd,pos,block,splits", [
    (*shape, block, splits) for shape in ATTENTION_SHAPES   # float4 pieces: 8 warps and 16
    for block in ((256, 512) if shape[3] % 4 == 0 else (256,)) for splits in (1, 3)])
def test_attention_decode_rotates_writes_the_cache_and_attends(cuda, cp, cache, bsz, nh, nkv,
                                                               hd, pos, block, splits):
    """Against NumPy: q and the new k rotated (model.apply_rotary_emb), k and v written into the
    cache at pos (rounded to float16 for a float16 cache), softmax(q . k / sqrt(hd)) v over the
    keys 0 .. pos. Cache rows pos and beyond start as NaN: a block that read row pos (which
    another block writes) instead of its own copy of the new key and value could turn NaN.
    The shapes take each of the kernel's layouts: a lane holding 1 or 2 float4 pieces of a row
    (head_dim 256: 2), or 1, 4 or 8 single values (head_dim 6, 70, 250); one chunk of keys
    per warp or many (pos 300; 5000, beyond 4096; 200: stories15M's heads, one chunk of 16
    warps and a part), grouped-query heads, batch rows; blocks of 8 and 16 warps; the keys in
    one split or three (a context of fewer than 3 chunks uses one: the other blocks end at
    once; from 3, the last split combines the records: pos 300 and 5000, and pos 200 with 8
    warps). The launch runs twice on the same inputs: the splits' counters must be back at 0
    for the second to agree."""
    from minillama.cuda.kernels import CACHE_TYPES, KERNELS
    from minillama.cuda.runtime import i32
    from minillama.model import apply_rotary_emb, precompute_freqs
    max_seq = pos + 5
    qkv = rand(bsz, (nh + 2 * nkv) * hd)                 # [q heads | k heads | v heads]
    cos, sin = precompute_freqs(hd, max_seq)
    start_k, start_v = (rand(bsz, max_seq, nkv, hd).astype(cache) for _ in range(2))
    start_k[:, pos:], start_v[:, pos:] = np.nan, np.nan
    cache_k, cache_v = cp.asarray(start_k), cp.asarray(start_v)
    step = cp.asarray(np.array([pos] + [0] * bsz, dtype=np.int32))
    out = poison(cp, (bsz, nh * hd))
    width, scale = 4 if hd % 4 == 0 else 1, np.float32(1.0 / np.sqrt(hd))
    split_parts = poison(cp, (bsz, nh, splits, hd + 2))
    arrivals = cp.zeros((bsz, nh), dtype=np.int32)
    # the third launch: qkv's rows divided by c_b, and row_ss (a deferred norm's sums of
    # squares) such that 1 / sqrt(row_ss / K + eps) = c_b, which the kernel multiplies back
    K, eps = 77, np.float32(1e-5)
    c = rng.uniform(0.5, 2.0, bsz)
    row_ss = cp.asarray((K * (1 / c ** 2 - eps)).astype(np.float32))
    none = (np.uint64(0), i32(K), eps)
    outs = []
    for x, norm in ((qkv, none), (qkv, none), (qkv / c[:, None].astype(np.float32),
                                               (row_ss, i32(K), eps))):
        KERNELS.launch(f"attention_decode<{width},{CACHE_TYPES[cache]}>", (nh, bsz, splits),
                       (block,), (cp.asarray(x.astype(np.float32)), step, cp.asarray(cos),
                                  cp.asarray(sin), cache_k, cache_v, out, i32(nh), i32(nkv),
                                  i32(hd), i32(max_seq), scale, split_parts, arrivals, *norm))
        outs.append(out.get())
    assert not arrivals.get().any()                      # every counter back at 0
    assert np.array_equal(outs[0], outs[1])
    assert rel_err(outs[2], outs[0].astype(np.float64)) < (1e-5 if cache == "float32" else 2e-3)

    heads = qkv.reshape(bsz, 1, nh + 2 * nkv, hd)
    qk = apply_rotary_emb(heads[:, :, :nh + nkv], cos[pos:pos + 1], sin[pos:pos + 1])[:, 0]
    got_k, got_v = cache_k.get(), cache_v.get()          # (bsz, max_seq, nkv, hd)
    step_bound = 1e-6 if cache == "float32" else 1e-3    # float16: one rounding step at most
    assert rel_err(got_k[:, pos], qk[:, nh:].astype(np.float64)) < step_bound
    assert rel_err(got_v[:, pos], heads[:, 0, nh + nkv:].astype(np.float64)) < step_bound
    for got, start in ((got_k, start_k), (got_v, start_v)):
        assert np.array_equal(got[:, :pos], start[:, :pos])          # earlier rows untouched
        assert np.isnan(got[:, pos + 1:].astype(np.float32)).all()   # later rows too

    keys = got_k[:, :pos + 1].astype(np.float64)          # as the cache holds them
    values = got_v[:, :pos + 1].astype(np.float64)
    ref = np.empty((bsz, nh, hd))
    for b in range(bsz):
        for h in range(nh):
            g = h // (nh // nkv)
            scores = keys[b, :, g] @ (qk[b, h].astype(np.float64) * scale)
            p = np.exp(scores - scores.max())
            ref[b, h] = p / p.sum() @ values[b, :, g]
    assert rel_err(out, ref.reshape(bsz, nh * hd)) < 1e-5


@gpu
@pytest.mark.parametrize("bsz,seqlen,vocab", [(1, 1, 32000), (8, 4, 97), (4, 2, 1), (3, 1, 128256)])
def test_greedy_pick_is_numpys_argmax_and_flags_rows_not_finite(cuda, cp, bsz, seqlen, vocab):
    """decode.cu's greedy_pick on the last position of (bsz, seqlen, vocab) logits (rows
    seqlen * vocab floats apart): numpy.argmax's ids on every finite row, the first of equal
    maxima too, and a flag on exactly the rows holding a NaN or an infinity, whose ids stay
    valid (0 for a row of NaN)."""
    logits = rng.standard_normal((bsz, seqlen, vocab)).astype(np.float32)
    last = logits[:, -1]
    for row in range(0, bsz, 2):                            # even rows: finite, with a tie
        tie = rng.choice(vocab, size=min(2, vocab), replace=False)
        last[row, tie] = last[row].max() + 1
    for row, bad in zip(range(1, bsz, 2), (np.inf, np.nan, -np.inf)):
        last[row, rng.integers(vocab)] = bad                # odd rows: one value not finite
    if bsz == 8:
        last[7] = np.nan                                    # a row with no maximum at all
    got = cuda.kernels.greedy_pick(cp.asarray(logits)[:, -1]).get()
    flags = ~np.isfinite(last).all(axis=1)
    assert (got[bsz:] == flags).all()
    assert (got[:bsz][~flags] == np.argmax(last, axis=-1)[~flags]).all()
    assert ((0 <= got[:bsz]) & (got[:bsz] < vocab)).all()


@gpu
def test_greedy_pick_float4_rows_with_a_tail(cuda, cp):
    """Rows of 1001 logits: row 0 starts on 16 bytes (float4s, then a tail of one value), the
    others do not (one value at a time). Ties across the float4 part and the tail take the
    first; a maximum in the tail is found; a row of -inf is id 0 and flagged."""
    last = rng.standard_normal((4, 1001)).astype(np.float32)
    last[0, [7, 1000]] = 50.0                               # a tie: float4 part and tail
    last[1, 1000] = 60.0                                    # the maximum, last of a row
    last[2, [3, 998]] = 70.0
    last[3] = -np.inf
    got = cuda.kernels.greedy_pick(cp.asarray(last)).get()
    assert got[:4].tolist() == [7, 1000, 3, 0] and got[4:].tolist() == [0, 0, 0, 1]
    rows = cp.zeros((2, 1004), dtype=np.float32)            # row 1 at 4016 bytes: aligned too
    rows[:, :1001] = cp.asarray(last[:2])
    rows[:, 1001:] = -1e30
    got = cuda.kernels.greedy_pick(rows[:, :1001]).get()
    assert got[:2].tolist() == [7, 1000] and got[2:].tolist() == [0, 0]


@gpu
def test_greedy_pick_takes_zeros_of_either_sign_as_equal(cuda, cp):
    """-0.0 and 0.0 are equal maxima for numpy.argmax, so the first of them wins whatever its
    sign: within one thread's values (indices 5, 6: one float4) and across threads (9 and 40;
    4100, the second round of thread 1, and 30). greedy_pick's keys take -0.0 as 0.0."""
    last = (-1 - np.abs(rng.standard_normal((4, 32000)))).astype(np.float32)
    for row, (a, b) in enumerate([(5, 6), (6, 5), (9, 40), (30, 4100)]):
        last[row, a], last[row, b] = -0.0, 0.0
    got = cuda.kernels.greedy_pick(cp.asarray(last)).get()
    assert got[:4].tolist() == np.argmax(last, axis=-1).tolist() == [5, 5, 9, 30]
    assert got[4:].tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------
# misuse: a DeviceError naming the argument, never garbage or a crash

@gpu
def test_kernels_reject_misuse(cuda, cp):
    f32 = cp.ones((4, 8), dtype=np.float32)
    cases = [
        (lambda: cuda.sgemm(f32.astype(np.float64), f32), "float32"),
        (lambda: cuda.sgemm(np.ones((4, 8), np.float32), f32), "CuPy array"),
        (lambda: cuda.sgemm(f32.T, f32.T), "C-contiguous"),
        (lambda: cuda.sgemm(f32, cp.ones((4, 7), np.float32)), "(N, K)"),
        (lambda: cuda.sgemm(f32, f32, version=5), "version"),
        (lambda: cuda.sgemm(f32, f32, config="1x1x1"), "config"),
        (lambda: cuda.sgemm(f32, f32, out=cp.empty((4, 5), np.float32)), "out"),
        (lambda: cuda.gemv(f32, f32, accumulate=True), "accumulate"),
        (lambda: cuda.gemv(f32, f32, norm=f32[0], swiglu=True), "one"),
        (lambda: cuda.gemv(f32, f32, norm=f32[0, :5]), "norm"),
        (lambda: cuda.gemv(f32, f32[:, :5].copy(), swiglu=True), "swiglu"),
        (lambda: cuda.gemv(f32, f32, version=4), "version"),
        (lambda: cuda.gemv(f32[:, :3].copy(), f32[:, :3].copy(), version=2), "K % 4"),
        (lambda: cuda.gemv(f32[:, :3].copy(), f32[:, :3].copy(), version=3), "K % 4"),
        (lambda: cuda.bmm(f32, f32), "cannot multiply"),
        (lambda: cuda.softmax(cp.ones((2, 3, 5), np.float32), start_pos=1), "columns"),
        (lambda: cuda.softmax(f32, kernel="shared"), "kernel"),
        (lambda: cuda.kernels.greedy_pick(cp.ones((2, 3, 4), np.float32)), "greedy_pick"),
        (lambda: cuda.kernels.greedy_pick(f32[:, ::2]), "contiguous rows"),
        (lambda: cuda.kernels.greedy_pick(f32.astype(np.float64)), "float32"),
    ]
    for call, words in cases:
        with pytest.raises(DeviceError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert issubclass(DeviceError, MiniLlamaError)


@gpu
def test_kernel_sources_are_found_in_the_package(cuda):
    root = runtime.kernel_dir()
    for name in runtime.KERNEL_FILES:
        assert root.joinpath(name).is_file()
    source = runtime.kernel_source()
    for kernel in ("sgemm_v4", "gemv", "gemv_v3", "bmm_strided", "softmax_warp", "softmax_block",
                   "attention_decode"):
        assert f" {kernel}(" in source or f"\n{kernel}(" in source


# ----------------------------------------------------------------------------
# the backend: same answers as NumpyOps, host arrays moved at the boundary

@gpu
@pytest.mark.parametrize("lead", [(1, 1), (3, 1), (2, 5), (5, 13)])      # gemv and sgemm paths
def test_cuda_ops_agree_with_numpy_ops(cuda, cp, lead):
    ops = cuda.CudaOps()
    x, w = rand(*lead, 67), rand(45, 67)
    got = ops.linear(x, ops.weight(w))                          # x is a host array
    assert isinstance(got, cp.ndarray) and got.shape == lead + (45,)
    assert rel_err(got, CPU.linear(x.astype(np.float64), w.astype(np.float64))) < 1e-5
    a, b = rand(2, 3, 4, 9), rand(2, 3, 9, 6)
    assert rel_err(ops.matmul(a, cp.asarray(b)), a.astype(np.float64) @ b) < 1e-5
    s = rand(2, 2, 3, 7, scale=5.0)
    assert rel_err(ops.softmax(s, start_pos=4), ref_softmax(s, 4)) < 1e-5


@gpu
def test_float16_weights_compute_in_float32(cuda, cp):
    ops = cuda.CudaOps()
    x, w = rand(3, 40), rand(20, 40).astype(np.float16)
    got = ops.linear(cp.asarray(x), ops.weight(w))
    assert rel_err(got, ref_linear(x, w.astype(np.float32))) < 1e-5


def small_model(ops, bsz=3, seed=None, tied=False):
    p = ModelArgs(**{**ODD, "max_batch_size": bsz})
    w = random_weights(p, seed=rng.integers(1 << 30) if seed is None else seed, tied=tied)
    return Transformer(p, w, ops), Transformer(p, w, CPU)


@gpu
def test_host_tokens_go_to_the_device_at_the_boundary(cuda, cp):
    for fused in (False, True):
        gpu_model, cpu_model = small_model(cuda.CudaOps(fused_decode=fused), bsz=2)
        forward = gpu_model.ops.decoder(gpu_model)
        for tokens in (np.array([[5, 6, 7], [1, 2, 3]]), [[4], [9]]):
            start = 0 if len(tokens[0]) == 3 else 3
            ref = cpu_model.forward(np.asarray(tokens), start)
            got = forward(tokens, start)                              # NumPy / list input
            assert isinstance(got, cp.ndarray) and gpu_model.device == "cuda"
            assert rel_err(got, ref) < 1e-4
        got = forward(cp.asarray([[11], [12]]), 4)                    # CuPy input works too
        assert rel_err(got, cpu_model.forward(np.array([[11], [12]]), 4)) < 1e-4


@gpu
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_decode_matches_the_cpu_after_a_prefill(cuda, cp, graphs, tied):
    ops = cuda.CudaOps(fused_decode=True, graphs=graphs)
    gpu_model, cpu_model = small_model(ops, bsz=3, tied=tied)
    forward = ops.decoder(gpu_model)
    prompt = rng.integers(0, ODD["vocab_size"], size=(3, 5))
    assert rel_err(forward(prompt, 0), cpu_model.forward(prompt, 0)) < 1e-4
    for pos in range(5, 17):                   # bsz 3, then 2, then 3 again: one graph each
        bsz = 2 if pos in (9, 10) else 3
        tok = rng.integers(0, ODD["vocab_size"], size=(bsz, 1))
        got = forward(tok, pos)
        assert got.shape == (bsz, 1, ODD["vocab_size"])
        assert rel_err(got, cpu_model.forward(tok, pos)) < 1e-4
    decoder = ops._decoders[gpu_model]
    assert decoder is not None and decoder.launches_per_step[3] == 5 * ODD["n_layers"] + 2
    assert (3 in decoder.graphs) == graphs


@gpu
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_a_fused_step_is_five_launches_a_layer_from_position_0(cuda, cp, kv_dtype):
    """No prompt: decoding starts at position 0 on the fused path, 3 rows of a GQA model (6
    query heads on 2 kv heads), then 1 row; every step equals the CPU's (float16 cache: 1e-3,
    as test_cuda_formats' float16 cache test explains), and a step is embed_tokens, 5
    launches a layer (gemv, attention_decode, gemv, gemv, gemv) and the classifier's gemv."""
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=int(rng.integers(1 << 30)))
    ops = cuda.CudaOps(fused_decode=True, graphs=True)
    gpu_model = Transformer(p, w, ops, kv_dtype=kv_dtype)
    cpu_model = Transformer(p, w, CPU, kv_dtype=kv_dtype)
    forward = ops.decoder(gpu_model)
    bound = 1e-4 if kv_dtype == "float32" else 1e-3
    for pos in range(0, 8):
        bsz = 1 if pos >= 6 else 3
        tok = rng.integers(0, p.vocab_size, size=(bsz, 1))
        assert rel_err(forward(tok, pos), cpu_model.forward(tok, pos)) < bound, f"position {pos}"
    decoder = ops._decoders[gpu_model]
    assert decoder.launches_per_step == {3: 5 * p.n_layers + 2, 1: 5 * p.n_layers + 2}
    assert decoder.graphs[3] is not None and decoder.graphs[1] is not None


# one-row graphs, programmatic launches: stories15M's widths (every product's rows fit gemv's
# early loads), and wider rows whose classifier's do not (K = 576 on one warp a row)
ONE_ROW = {
    "15M": dict(dim=288, n_layers=2, n_heads=6, n_kv_heads=6, vocab_size=32000, hidden_dim=768,
                max_seq_len=24, max_batch_size=1),
    "wide": dict(dim=576, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=16384, hidden_dim=1536,
                 max_seq_len=24, max_batch_size=1),
}


@gpu
@pytest.mark.parametrize("shape", ONE_ROW)
def test_one_row_graph_with_gemvs_early_loads_matches_float64(cuda, cp, monkeypatch, shape):
    """FusedDecoder at one row: the step eager, then its graph, captured with programmatic
    launches (PROGRAMMATIC_ROWS), where gemv loads W before its wait while the kernel ahead
    finishes. Every step's logits within 1e-4 of the float64 model (its cache float32, as the
    GPU's), and each product launched as gemv_split and gemv_grid say for its shape on this
    GPU, with early loads for some of them (on an H200: stories15M's but the classifier, and
    the wide shape's wqkv, wo and w2) and the classifier's blocks walking. Deterministic, so
    that the step is the five launches a layer (halves.cu's two launch no gemv but the
    classifier's; tests/test_cuda_halves.py tests them)."""
    k = cuda.kernels
    p = ModelArgs(**ONE_ROW[shape])
    w = random_weights(p, seed=int(rng.integers(1 << 30)))
    ops = cuda.CudaOps(persistent=False, deterministic=True)
    gpu_model = Transformer(p, w, ops)
    f64_model = Transformer(p, {name: a.astype(np.float64) for name, a in w.items()}, CPU)
    launched = decode_one_row_in_a_graph(k, ops, gpu_model, f64_model, 8, monkeypatch)
    hd, qkv = p.dim // p.n_heads, (p.n_heads + 2 * p.n_kv_heads) * (p.dim // p.n_heads)
    products = [(qkv, p.dim, 1), (p.dim, p.n_heads * hd, 0), (2 * p.hidden_dim, p.dim, 1),
                (p.dim, p.hidden_dim, 2), (p.vocab_size, p.dim, 1)]    # (N, K, prologue)
    want = {one_row_gemv(k, N, K, pro) for N, K, pro in products}
    gemvs = {name for name in launched if name.startswith("gemv<")}
    assert gemvs == want and any(not name.endswith((",0>", ",true>")) for name in gemvs), gemvs


@gpu
def test_fused_decode_survives_rounds_of_step_slots(cuda, cp):
    """Several rounds of FusedDecoder.STEP_SLOTS (the page-locked rows the step is copied from,
    used in turn), with no synchronisation by the caller between steps: each step's logits,
    kept, equal the CPU's."""
    gpu_model, cpu_model = small_model(cuda.CudaOps(), bsz=1)
    forward = gpu_model.ops.decoder(gpu_model)
    decoder = gpu_model.ops._decoders[gpu_model]
    decoder.STEP_SLOTS = 4              # of its rows, use 4: 22 steps are 5 rounds and a part
    tokens = rng.integers(0, ODD["vocab_size"], size=22)
    kept = [forward([[int(t)]], pos) for pos, t in enumerate(tokens)]   # never read in between
    for pos, t in enumerate(tokens):
        ref = cpu_model.forward(np.array([[t]]), pos)
        assert rel_err(kept[pos], ref) < 1e-4, f"position {pos}"


@gpu
def test_generate_greedy_on_the_gpu_equals_the_cpu(cuda, cp):
    """Llama.generate at temperature 0 takes the argmax on the GPU, inside the step's graph
    (FusedDecoder.greedy_steps) once every row decodes, AHEAD steps a graph once no row has
    prompt left, and copies back only the ids: the same tokens as on the CPU, for padded
    prompts of 3 rows."""
    from conftest import StubTokenizer
    from minillama.generation import Llama
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), scale=0.5)   # far from ties
    prompts = [list(rng.integers(3, 97, n)) for n in (1, 7, 4)]
    gpu_ops = cuda.CudaOps()
    gpu_model = Transformer(p, w, gpu_ops)
    got, want = (Llama(model, StubTokenizer(eos_id=-7)).generate(
        prompts, max_gen_len=20, temperature=0)[0] for model in (gpu_model, Transformer(p, w, CPU)))
    assert got == want
    fused = gpu_ops._decoders[gpu_model]
    graphs = fused.greedy_graphs                                         # (greedy_steps')
    assert graphs.get((3, 1)) is not None and graphs.get((3, AHEAD)) is not None
    # total_len 27: AHEAD steps from position 6, eagerly (recording their graph, and the
    # graphs of AHEAD steps queued, for both halves of picks_host: nothing queued yet), AHEAD
    # more through it with the last 4 queued behind, which the last call takes
    assert set(fused.queued_graphs) == {(3, AHEAD, 0), (3, AHEAD, 1), (3, 4, 0), (3, 4, 1)}
    assert fused.queued is None and None not in fused.queued_graphs.values()


@gpu
def test_generate_greedy_after_steps_queued_past_the_eos(cuda, cp):
    """A generate that stops at eos leaves steps queued behind its last call, running on past
    the eos and writing the KV cache there: nobody takes them, and the next generates (another
    prompt, then the first again) give the CPU's tokens."""
    from conftest import StubTokenizer
    from minillama.generation import Llama
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), scale=0.5)   # far from ties
    gpu_ops = cuda.CudaOps()
    models = Transformer(p, w, gpu_ops), Transformer(p, w, CPU)
    first, other = [3, 5, 7], [11, 13]
    free, on_gpu = (Llama(m, StubTokenizer(eos_id=-7)).generate([first], 30, temperature=0)[0][0]
                    for m in reversed(models))       # (on the GPU, the graphs are recorded)
    assert on_gpu == free
    # total_len 33: calls for positions 3 .. 10, 11 .. 18, 19 .. 26 (each with the next call's
    # steps queued behind), 27 .. 32; the eos at position 15 or before (where it comes first)
    eos = free[12]
    for k, prompt in enumerate((first, other, first)):
        got, want = (Llama(m, StubTokenizer(eos_id=eos)).generate([prompt], 30, temperature=0)[0]
                     for m in models)
        assert got == want
        if k == 0:
            assert got == [free[:free.index(eos)]]
            assert gpu_ops._decoders[models[0]].queued is not None     # left behind the eos


@gpu
def test_generate_greedy_from_equal_prompts_chains_the_prompt_step(cuda, cp):
    """Prompts of one length: generate's first call is the prompt's step (model.forward and
    greedy_pick) and AHEAD - 1 steps chained after it in one graph (CudaDecoder.greedy_steps),
    the same tokens as on the CPU."""
    from conftest import StubTokenizer
    from minillama.generation import Llama
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), scale=0.5)
    prompts = [list(rng.integers(3, 97, 5)) for _ in range(3)]
    gpu_ops = cuda.CudaOps()
    gpu_model = Transformer(p, w, gpu_ops)
    for _ in range(2):                     # eagerly, then through the graph it recorded
        got, want = (Llama(model, StubTokenizer(eos_id=-7)).generate(
            prompts, max_gen_len=12, temperature=0)[0]
            for model in (gpu_model, Transformer(p, w, CPU)))
        assert got == want
    assert gpu_ops._decoders[gpu_model].greedy_graphs.get((3, AHEAD - 1)) is not None


@gpu
def test_greedy_steps_launch_each_steps_first_kernel_the_ordinary_way(cuda, cp, monkeypatch):
    """In the graph of several one-row steps (programmatic launches), embed_tokens, which
    starts each step after the greedy_pick that wrote its input, is launched the ordinary way
    every time, and every other kernel of the steps programmatically: a programmatic
    embed_tokens would let attention_decode read the position before it is written, a race
    that comparing tokens would almost never catch."""
    from minillama.cuda import pdl
    model, _ = small_model(cuda.CudaOps(persistent=False), bsz=1)
    forward = model.ops.decoder(model)
    forward.greedy_steps([[3]], 0, 3)                     # eagerly: compiles, records nothing
    ways, launch = [], pdl.launch
    monkeypatch.setattr(pdl, "launch", lambda *a: (ways.append("programmatic"), launch(*a)))
    kernels, klaunch = [], cuda.kernels.KERNELS.launch
    monkeypatch.setattr(cuda.kernels.KERNELS, "launch", lambda name, *a, **kw: (
        kernels.append((name, kw.get("ordinary", False))), klaunch(name, *a, **kw)))
    model.ops._decoders[model].greedy_graphs.clear()
    forward.greedy_steps([[3]], 3, 3)                     # eagerly again, then the capture
    # (the eager steps replay __call__'s graph, so only their greedy_pick launches come first)
    captured = kernels[[name for name, _ in kernels].index("embed_tokens"):]
    assert len(captured) == 3 * (5 * model.params.n_layers + 3)
    assert [o for name, o in captured if name == "embed_tokens"] == [True] * 3
    assert all(not o for name, o in captured if name != "embed_tokens")
    if pdl.supported(cp.cuda.Device().id):
        assert len(ways) == len(captured) - 3


def twin_decoders(cuda, mode):
    """Two decoders of one small random model for the greedy-step tests, by mode ("fused":
    no graphs; "fused+graphs"; "persistent": the one kernel, at any width): (params, the
    reference's forward, the stepped decoder's forward, its FusedDecoder). Widths that are
    multiples of 4 and grouped heads: a shape the persistent kernel covers; 48 positions of 3
    rows. Deterministic, so that the twins' steps are the same bits (one row would otherwise
    take halves.cu's launches, whose atomics add in any order; tests/test_cuda_halves.py runs
    greedy steps through them)."""
    p = ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=1001, hidden_dim=172,
                  max_seq_len=48, max_batch_size=3)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), scale=0.5)

    def decoder():
        ops = cuda.CudaOps(graphs=mode != "fused", persistent=mode == "persistent",
                           deterministic=True)
        model = Transformer(p, w, ops)
        forward = ops.decoder(model)
        if mode == "persistent":            # 3 rows through the one kernel, at any width
            ops._decoders[model].min_dim = 0
        return forward, ops._decoders[model]
    (forward, _), (stepped, fused) = decoder(), decoder()
    return p, forward, stepped, fused


@gpu
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("mode", ["persistent", "fused+graphs", "fused"])
def test_greedy_steps_pick_what_forward_and_greedy_pick_pick(cuda, cp, mode, rows):
    """FusedDecoder.greedy_steps (the token copied from page-locked memory by the graph's first
    node, each step's ids copied to the next step's input on the GPU, the ids back in
    page-locked memory) against forward + greedy_pick on a twin model: the same ids every
    step, and the same last logits, for 1 or 3 rows over 48 positions, in calls of 1, 5 and
    3 steps (the first of each eager, then through its own graph, where graphs are on). One
    row is the graph captured with programmatic launches (PROGRAMMATIC_ROWS, on sm_90 and
    later), where a kernel may start before the one ahead of it ends: the step's position and
    tokens must reach every kernel all the same (attention_decode reads the position before
    its wait; a kernel in place of the copy node was a race)."""
    from minillama.cuda.kernels import greedy_pick
    p, forward, stepped, fused = twin_decoders(cuda, mode)
    tokens, pos = rng.integers(0, p.vocab_size, size=(rows, 1)), 0
    for n in [1, 5, 3, 5, 1, 3] * 2 + [5, 1, 5, 1]:
        backs, last = stepped.greedy_steps(tokens, pos, n)
        assert backs.shape == (n, 2 * rows)
        for j, back in enumerate(backs):
            logits = forward(tokens, pos)[:, -1]
            want = greedy_pick(logits).get()
            assert back.tolist() == want.tolist(), f"position {pos}, step {j} of {n}"
            tokens, pos = back[:rows].astype(np.int64).reshape(rows, 1), pos + 1
        assert rel_err(cp.asnumpy(last), cp.asnumpy(logits)) < 1e-6, f"position {pos - 1}"
    assert pos == p.max_seq_len                 # every position, the last one included
    assert type(fused).__name__ == ("PersistentDecoder" if mode == "persistent" else "FusedDecoder")
    assert all((fused.greedy_graphs.get((rows, n)) is not None) == (mode != "fused")
               for n in (1, 3, 5))


@gpu
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("mode", ["persistent", "fused+graphs"])
def test_greedy_steps_queued_pick_what_forward_and_greedy_pick_pick(cuda, cp, mode, rows):
    """greedy_steps with `then`: each call queues the next one's steps behind its own (fed
    on the GPU by its last greedy_pick, their ids into the other half of picks_host), and the
    next call takes them: the same ids as forward + greedy_pick on a twin model, over 48
    positions, twice. Calls that do not take what was queued drop it and still pick right: one
    for another count, one fed other tokens, one at another position (a step through __call__
    first). Eager calls (the first for a count) queue nothing; while steps are queued, last is
    None."""
    from minillama.cuda.kernels import greedy_pick
    p, forward, stepped, fused = twin_decoders(cuda, mode)
    take, taken = fused._take_queued, []           # per call: whether it took the queued steps

    def counted_take(*args):
        q = take(*args)
        taken.append(q is not None)
        return q
    fused._take_queued = counted_take
    for _ in range(2):
        # 48 positions: calls of n steps, each asking for the next call's n to be queued
        counts = [2, 5, 3, 5, 5, 4, 3, 3, 2, 4, 4, 1, 2, 4]
        tokens, pos = rng.integers(0, p.vocab_size, size=(rows, 1)), 0
        del taken[:]
        for i, n in enumerate(counts):
            then = counts[i + 1] if i + 1 < len(counts) else 0
            if i == 6:                             # 2 steps where 3 were queued
                n, then, counts[i + 1] = 2, 4, 4
            if i == 8:                             # other tokens than the ids picked
                tokens = (tokens + 1) % p.vocab_size
            if i == 10:                            # a step through __call__ first
                want = greedy_pick(forward(tokens, pos)[:, -1]).get()
                got = greedy_pick(stepped(tokens, pos)[:, -1]).get()
                assert got.tolist() == want.tolist(), f"position {pos}, __call__"
                tokens, pos = got[:rows].astype(np.int64).reshape(rows, 1), pos + 1
            backs, last = stepped.greedy_steps(tokens, pos, n, then)
            assert (last is None) == (fused.queued is not None)
            for j, back in enumerate(backs):
                want = greedy_pick(forward(tokens, pos)[:, -1]).get()
                assert back.tolist() == want.tolist(), f"position {pos}, step {j} of {n}"
                tokens, pos = back[:rows].astype(np.int64).reshape(rows, 1), pos + 1
        assert pos == p.max_seq_len and fused.queued is None
    # the second time every count's graph is there, so every call queues the next; taken by
    # all but the three that differ from what was queued (6, 8, 10) and the first
    assert [i for i, t in enumerate(taken) if t] == [1, 2, 3, 4, 5, 7, 9, 11, 12, 13]
    assert None not in fused.queued_graphs.values()          # (the driver refused none)


class QueueOnTheCpu:
    """FusedDecoder's greedy_steps bookkeeping with a stand-in GPU (no CuPy): a step's id is
    (7 token + 3 position) mod 1000, and a graph writes its steps' ids into picks_host the
    moment it is launched, as the fastest GPU could: so steps queued into the half the host is
    about to read would show as wrong ids. `launched` lists (fed, start position) a launch."""
    VOCAB = 1000

    @classmethod
    def make(cls, monkeypatch):
        from minillama.cuda import fused
        monkeypatch.setattr(fused, "greedy_pick", lambda last: SimpleNamespace(
            get=lambda: np.concatenate([last.argmax(-1), 0 * last.argmax(-1)]).astype(np.int32)))
        gpu = cls()

        class Decoder(fused.FusedDecoder):
            def __init__(self):                       # what greedy_steps reads, and no more
                self.greedy_graphs, self.queued_graphs, self.queued = {}, {}, None
                self.picks_host = np.zeros((2, self.MAX_STEPS, 2), dtype=np.int32)
                self.row_host = np.zeros(2, dtype=np.int32)
                self.logits = np.zeros((1, cls.VOCAB), dtype=np.float32)
                self.cp = SimpleNamespace(cuda=SimpleNamespace(get_current_stream=lambda: None))
                self.picked_events = [SimpleNamespace(record=lambda s: None,
                                                      synchronize=lambda: None)] * 2
                self.refuse = set()               # counts whose queued graphs the driver refuses

            def __call__(self, tokens, start_pos, use_graphs=True):     # an eager step
                self.drop_queued()
                gpu.launched.append(("eager", start_pos))
                logits = np.zeros((1, 1, cls.VOCAB), dtype=np.float32)
                logits[0, 0, gpu.pick(int(tokens[0, 0]), start_pos)] = 1
                return logits

            def _capture(self, bsz, launches, refused=""):
                return launches()

            def _greedy_launches(self, bsz, n, fed=False, half=0):
                return None if fed and n in self.refuse else gpu.graph(self, n, fed, half)
        return Decoder(), gpu

    def __init__(self):
        self.launched, self.state = [], None          # state: the next step's (token, position)

    def pick(self, token, pos):
        return (7 * token + 3 * pos) % self.VOCAB

    def chain(self, token, pos, n):
        ids = []
        for _ in range(n):
            token = self.pick(token, pos)
            ids.append(token)
            pos += 1
        return ids

    def graph(self, decoder, n, fed, half):
        def launch(stream):
            token, pos = self.state if fed else (int(decoder.row_host[1]), int(decoder.row_host[0]))
            self.launched.append(("fed" if fed else "graph", pos))
            for j, i in enumerate(self.chain(token, pos, n)):
                decoder.picks_host[half, j] = i, 0
            self.state = (i, pos + n)                 # the last pick writes the next input
        return SimpleNamespace(launch=launch)


def test_greedy_steps_queue_bookkeeping_on_the_cpu(monkeypatch):
    """greedy_steps' `then` with a stand-in GPU (QueueOnTheCpu): an eager call records the
    graphs to queue with; each call after it queues the next call's steps into the other half
    of picks_host (the ids stay right though the queued steps write at once) and returns last
    None; the next call takes them only for the same position, count and fed ids (a call at
    another position, with other tokens, for another count, or after __call__ launches its
    own); where the driver refuses the queued graph, nothing is queued and last comes back."""
    decoder, gpu = QueueOnTheCpu.make(monkeypatch)

    def call(token, pos, n, then, launched):
        gpu.launched.clear()
        backs, last = decoder.greedy_steps(np.array([[token]]), pos, n, then=then)
        assert backs[:, 0].tolist() == gpu.chain(token, pos, n), (pos, n, then)
        assert gpu.launched == launched, (pos, n, then)
        assert (last is None) == (decoder.queued is not None)
        return int(backs[-1, 0])
    t = call(5, 0, 8, 8, [("eager", p) for p in range(8)])         # records (1, 8) and queued
    assert set(decoder.queued_graphs) == {(1, 8, 0), (1, 8, 1)} and decoder.queued is None
    t = call(t, 8, 8, 8, [("graph", 8), ("fed", 16)])              # half 0, queued into 1
    t = call(t, 16, 8, 4, [("fed", 24)])                           # taken; 4 queued into 0
    assert (decoder.queued.half, decoder.queued.start_pos, decoder.queued.n) == (0, 24, 4)
    t2 = call(t, 25, 4, 0, [("eager", p) for p in range(25, 29)])  # another position
    t = call(t, 24, 4, 0, [("graph", 24)])                         # dropped by the call before
    call(t, 28, 8, 8, [("graph", 28), ("fed", 36)])
    call(t2, 36, 8, 8, [("graph", 36), ("fed", 44)])               # other tokens than fed
    t = call(t, 44, 8, 4, [("graph", 44), ("fed", 52)])
    t = call(t, 52, 8, 8, [("graph", 52), ("fed", 60)])            # another count than queued
    decoder(np.array([[t]]), 60)                                   # __call__ drops the queue
    assert decoder.queued is None
    decoder.refuse.add(5)
    assert call(t, 60, 8, 5, [("graph", 60)]) is not None and decoder.queued is None
    assert decoder.queued_graphs[1, 5, 0] is None and decoder.queued_graphs[1, 5, 1] is None


def test_greedy_steps_name_a_bad_count_on_the_cpu():
    """CudaDecoder.greedy_steps' checks come before any GPU work, so they run here: n and then
    out of range, or not counts, named with the accepted range, a long value cut short; steps
    that do not fit max_seq_len named by the argument that pushes them past it."""
    from minillama.cuda.backend import CudaDecoder
    from minillama.errors import ArgumentError, GenerationError
    model, _ = small_model(CPU, bsz=1)
    forward = CudaDecoder(model, SimpleNamespace(MAX_STEPS=16), graphs=True)
    for n, then, says in ((0, 0, "n: expected 1 to 16 steps, got 0"),
                          (True, 0, "n: expected 1 to 16 steps, got True"),
                          (1, 17, "then: expected 0 to 16 steps, got 17"),
                          (1, 2.0, "then: expected 0 to 16 steps, got 2.0")):
        with pytest.raises(ArgumentError, match=f"^{says}$"):
            forward.greedy_steps([[3]], 0, n, then)
    with pytest.raises(ArgumentError, match=r"got 'x+\.\.\.x+' \(5,000 characters\)"):
        forward.greedy_steps([[3]], 0, 1, "x" * 5000)
    last = model.params.max_seq_len - 1
    with pytest.raises(GenerationError, match=f"^n: 4 steps from position {last - 2} do not"):
        forward.greedy_steps([[3]], last - 2, 4)
    with pytest.raises(GenerationError, match=f"^then: 1 steps queued behind 3 from position "
                                              f"{last - 2} do not fit max_seq_len"):
        forward.greedy_steps([[3]], last - 2, 3, 1)


@gpu
def test_greedy_steps_refuse_a_count_or_positions_out_of_range(cuda, cp):
    from minillama.errors import ArgumentError, GenerationError
    model, _ = small_model(cuda.CudaOps(), bsz=1)
    forward = model.ops.decoder(model)
    for n in (0, 17, 2.0, True):
        with pytest.raises(ArgumentError, match="n: expected 1 to 16 steps"):
            forward.greedy_steps([[3]], 0, n)
    for then in (-1, 17, 1.0, False):
        with pytest.raises(ArgumentError, match="then: expected 0 to 16 steps"):
            forward.greedy_steps([[3]], 0, 1, then)
    last = model.params.max_seq_len - 1
    forward.greedy_steps([[3]], last - 2, 3)                      # positions up to the last
    with pytest.raises(GenerationError, match="n: 4 steps from position"):
        forward.greedy_steps([[3]], last - 2, 4)
    forward.greedy_steps([[3]], last - 4, 3, 2)                   # and queued up to the last
    with pytest.raises(GenerationError, match="then: 3 steps queued behind 3 from position"):
        forward.greedy_steps([[3]], last - 4, 3, 3)


@gpu
@pytest.mark.parametrize("max_gen_len", [6, 20])
def test_generate_greedy_on_the_gpu_refuses_a_nan_picked_in_the_graph(cuda, cp, max_gen_len):
    """A NaN that reaches the logits inside greedy_steps' graph raises generate's one clear
    error (greedy_pick's flag, then check_finite on the step's logits), as on the CPU: in a
    graph of one step (max_gen_len 6), and in one of AHEAD steps (20), where the flagged step
    is not the last and is made again to say where. The first generate records the graphs;
    then one classifier weight turns NaN on the GPU, in place, where the graph reads it."""
    from conftest import StubTokenizer
    from minillama.errors import GenerationError
    from minillama.generation import Llama
    p = ModelArgs(**ODD)
    ops = cuda.CudaOps()
    model = Transformer(p, random_weights(p, seed=int(rng.integers(1 << 30))), ops)
    llama = Llama(model, StubTokenizer(eos_id=-7))
    llama.generate([[3]], max_gen_len=max_gen_len, temperature=0)
    assert ops._decoders[model].greedy_graphs.get((1, min(AHEAD, max_gen_len))) is not None
    model.output[5, 3] = cp.nan                            # logit 5 is NaN at every step
    with pytest.raises(GenerationError, match="NaN.*classifier"):
        llama.generate([[3]], max_gen_len=max_gen_len, temperature=0)


@gpu
def test_fused_decode_returns_fresh_logits_each_step(cuda, cp):
    gpu_model, _ = small_model(cuda.CudaOps(), bsz=1)
    forward = gpu_model.ops.decoder(gpu_model)
    first = forward([[3]], 0)
    kept = first.copy()
    forward([[4]], 1)
    assert (first == kept).all()


# ----------------------------------------------------------------------------
# end to end: stories260K, greedy, against the CPU and llama2.c's golden ids

def greedy(model, steps):
    """Greedy decoding from BOS, one token per call of the backend's decoder (llama2.c's run)."""
    ids, all_logits, token = [], [], 1
    forward = model.ops.decoder(model)
    for pos in range(steps):
        logits = forward(np.array([[token]]), pos)
        logits = logits.get() if hasattr(logits, "get") else logits
        all_logits.append(logits[0, -1])
        token = int(logits[0, -1].argmax())
        ids.append(token)
    return ids, np.array(all_logits)


@gpu
@pytest.mark.parametrize("mode", ["persistent", "fused+graphs", "fused", "generic"])
def test_stories260k_greedy_on_the_gpu_matches_cpu_and_golden(cuda, cp, mode):
    require_shared()
    from minillama.loading import open_checkpoint
    golden = json.loads(GOLDEN.read_text())["generation"][0]
    assert golden["model"] == "stories260K.bin" and golden["temperature"] == 0.0
    ckpt = open_checkpoint(MODELS / "stories260K.bin")
    ops = cuda.CudaOps(fused_decode=mode != "generic", graphs=mode != "fused",
                       persistent=mode == "persistent")
    gpu_model = Transformer(ckpt.params, ckpt.weights, ops)
    if mode == "persistent":              # one row through the one kernel (by default, the graph)
        ops.decoder(gpu_model)
        ops._decoders[gpu_model].min_rows, ops._decoders[gpu_model].min_dim = 1, 0
    gpu_ids, gpu_logits = greedy(gpu_model, 256)
    decoder = ops._decoders.get(gpu_model)
    assert type(decoder).__name__ == {"persistent": "PersistentDecoder", "generic": "NoneType"
                                      }.get(mode, "FusedDecoder")
    cpu_ids, cpu_logits = greedy(Transformer(ckpt.params, ckpt.weights, CPU), 256)
    assert gpu_ids == cpu_ids == golden["generated_ids"]
    for step, (g, c) in enumerate(zip(gpu_logits, cpu_logits)):
        err = np.linalg.norm(g - c) / np.linalg.norm(c)
        assert err < 1e-4, f"step {step}: logits differ by {err:.2e}"


@gpu
def test_load_model_on_cuda_and_prefill_matches_cpu(cuda, cp):
    require_shared()
    from minillama.loading import load_model
    gpu_model = load_model(MODELS / "stories260K.bin", device="cuda")
    cpu_model = load_model(MODELS / "stories260K.bin", device="cpu")
    assert isinstance(gpu_model.ops, cuda.CudaOps)
    forward = gpu_model.ops.decoder(gpu_model)
    prompt = rng.integers(0, 512, size=(1, 100))              # sgemm path (100 rows)
    assert rel_err(forward(prompt, 0), cpu_model.forward(prompt, 0)) < 1e-4
    assert rel_err(forward([[7]], 100), cpu_model.forward([[7]], 100)) < 1e-4


@gpu
def test_q8_checkpoint_runs_on_the_generic_gpu_path(cuda, cp):
    require_shared()
    from minillama.loading import open_checkpoint
    ckpt = open_checkpoint(MODELS / "stories260K-q8.bin")
    ops = cuda.CudaOps()
    gpu_model = Transformer(ckpt.params, ckpt.weights, ops)
    cpu_model = Transformer(ckpt.params, ckpt.weights, CPU)
    forward = ops.decoder(gpu_model)
    assert forward == gpu_model.forward                      # Q8 is not fused: generic path
    for pos, token in enumerate([1, 403, 407, 261]):
        got = forward([[token]], pos)
        assert rel_err(got, cpu_model.forward(np.array([[token]]), pos)) < 1e-4
    assert ops._decoders[gpu_model] is None


# ----------------------------------------------------------------------------
# no CuPy: a clear DeviceError, exit status 2 (these run everywhere, GPU or not)

@pytest.fixture
def no_cupy(monkeypatch):
    """Make `import cupy` fail, as on a machine without it, and forget any earlier success."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    runtime.require_cupy.cache_clear()
    yield
    runtime.require_cupy.cache_clear()


def test_the_cuda_package_imports_without_cupy():
    # CuPy is imported when a GPU is first needed (require_cupy), never by an import
    code = ("import sys; import minillama.cuda, minillama.devices, minillama.loading; "
            "assert 'cupy' not in sys.modules, 'imported cupy'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_cuda_without_cupy_is_a_device_error(no_cupy):
    with pytest.raises(DeviceError, match=r"needs CuPy: pip install 'minillama\[cuda12\]'"):
        get_ops("cuda")


def test_cli_device_cuda_without_cupy_exits_2(no_cupy, capsys):
    require_shared()
    from minillama.cli import main
    status = main(["run", str(MODELS / "stories260K.bin"), "-z", str(MODELS / "tok512.bin"),
                   "--device", "cuda", "-n", "5"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("minillama: error: device 'cuda' needs CuPy") and err.count("\n") == 1


def test_a_template_instance_no_group_names_is_refused_in_one_line():
    # (before any CuPy call: a patched setting such as QGEMV_V4's B without its instances in a
    # group would otherwise reach CuPy's lookup in the first group's module)
    from minillama.cuda.kernels import KERNELS
    with pytest.raises(DeviceError, match=r"'qgemv_v4<V4Q4_0,1,2,2,7>' is not among"):
        KERNELS.launch("qgemv_v4<V4Q4_0,1,2,2,7>", (1,), (1,), ())
    assert "qgemv_v4<V4Q4_0,1,2,2,2>" in KERNELS.templates        # the package's own


# ----------------------------------------------------------------------------
# a group compiled for an architecture of its own (ArchModule: gemm_v7's sm_90a), against a
# stand-in CuPy and NVRTC that record what KernelModule asks of them (these run everywhere)

HANDLES = itertools.count(1)


class FakeFunction:
    """A CUDA function: its handle, and the dynamic shared memory of each launch of it."""

    def __init__(self):
        self.ptr, self.launches = next(HANDLES), []

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches.append(shared_mem)


class FakeModule:
    """cupy.cuda.function.Module: the cubin loaded, its functions by (lowered) name."""

    def __init__(self):
        self.cubin, self.functions = None, {}

    def load(self, cubin):
        self.cubin = cubin

    def get_function(self, name):
        return self.functions.setdefault(name, FakeFunction())


class FakeRawModule(FakeModule):
    """A module as KernelModule.use takes one: its functions called as RawModule's are."""

    def get_function(self, name):
        return runtime._Launchable(super().get_function(name))


class FakeDriver:
    """The driver's function attributes: no static shared memory; the dynamic shared memory
    granted, by function handle."""

    def __init__(self):
        self.granted = {}

    def funcGetAttribute(self, attribute, ptr):
        return 0

    def funcSetAttribute(self, ptr, attribute, value):
        self.granted[ptr] = value


class FakeNvrtc:
    """cupy_backends' NVRTC bindings as ArchModule calls them: the options of the compilation
    (which fails when asked to), and the programs not yet destroyed."""

    class NVRTCError(Exception):
        pass

    def __init__(self, fail):
        self.fail, self.options, self.live = fail, None, 0

    def createProgram(self, source, name, headers, include_names):
        self.live += 1
        return self.live

    def addNameExpression(self, prog, name):
        pass

    def compileProgram(self, prog, options):
        self.options = options
        if self.fail:
            raise self.NVRTCError("NVRTC_ERROR_COMPILATION (6)")

    def getProgramLog(self, prog):
        return 'matmul.cu(1000): error: "wgmma" is undefined'

    def getLoweredName(self, prog, name):
        return "lowered " + name

    def getCUBIN(self, prog):
        return b"sm_90a cubin"

    def destroyProgram(self, prog):
        self.live -= 1


@pytest.fixture
def fake_gpu(monkeypatch):
    """make(compute_capability, fail=False) -> (cupy, nvrtc), the stand-ins installed."""
    def make(cc, fail=False):
        cupy = SimpleNamespace(cuda=SimpleNamespace(
            Device=lambda: SimpleNamespace(compute_capability=cc, id=0), driver=FakeDriver(),
            function=SimpleNamespace(Module=FakeModule)))
        nvrtc = FakeNvrtc(fail)
        libs = types.ModuleType("cupy_backends.cuda.libs")
        libs.nvrtc = nvrtc
        monkeypatch.setattr(runtime, "require_cupy", lambda: cupy)
        monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", libs)
        return cupy, nvrtc
    return make


def v7_like():
    """A KernelModule of an ordinary group and one compiled for sm_90a, as gemm_v7's."""
    return runtime.KernelModule({"plain": ["a<1>"], "v7": ["k<1>", "k<2>"]}, {"v7": "sm_90a"})


@pytest.mark.parametrize("cc,words", [("80", "8.0"), ("120", "12.0")])
def test_an_arch_group_on_another_gpu_is_refused_in_one_line(fake_gpu, cc, words):
    # sm_90a code runs on compute capability 9.0 only: elsewhere the group is refused before
    # NVRTC is asked anything
    _, nvrtc = fake_gpu(cc)
    with pytest.raises(DeviceError, match=rf"^kernels k<1>, k<2> need a GPU of compute "
                                          rf"capability 9\.0; this one is {words}$"):
        v7_like().launch("k<2>", (1,), (256,), ())
    assert nvrtc.options is None


def test_an_arch_group_compiles_for_its_arch_and_gets_its_shared_memory(fake_gpu):
    cupy, nvrtc = fake_gpu("90")
    kernels, harness = v7_like(), FakeRawModule()
    kernels.use(harness)                # a dev harness's module: the sm_90a group is not in it
    kernels.launch("k<2>", (4,), (256,), (), shared_mem=197632)
    assert "-arch=sm_90a" in nvrtc.options and nvrtc.live == 0
    module = kernels.module("v7")._module
    assert module.cubin == b"sm_90a cubin" and list(module.functions) == ["lowered k<2>"]
    function = module.functions["lowered k<2>"]
    assert cupy.cuda.driver.granted == {function.ptr: 197632}   # the function's own handle
    assert function.launches == [197632]
    kernels.launch("a<1>", (1,), (32,), ())
    assert list(harness.functions) == ["a<1>"]                  # the others from the harness's


def test_an_arch_group_that_fails_to_compile_says_so(fake_gpu):
    _, nvrtc = fake_gpu("90", fail=True)
    with pytest.raises(DeviceError, match=r"failed to compile for sm_90a: matmul\.cu\(1000\)"):
        v7_like().launch("k<1>", (1,), (256,), ())
    assert nvrtc.live == 0                                      # the program destroyed


def test_use_grants_shared_memory_again_to_the_new_modules_functions(fake_gpu):
    # dynamic shared memory over 48 KiB is an attribute of each function: a module taken by
    # use() after launches from another needs it granted again
    cupy, _ = fake_gpu("90")
    kernels, first, second = v7_like(), FakeRawModule(), FakeRawModule()
    for module in (first, second):
        kernels.use(module)
        kernels.launch("a<1>", (1,), (32,), (), shared_mem=100_000)
    assert cupy.cuda.driver.granted == {first.functions["a<1>"].ptr: 100_000,
                                        second.functions["a<1>"].ptr: 100_000}


def test_the_bounds_edits_still_find_their_lines():
    """kernels/dev/ab_bounds.py measures bounds and candidates on kernels compiled from edited
    sources; an edit whose line a later change rewrote would fail only on the GPU, at the
    variant's first launch. Each must find its line in kernels/*.cu as they are now."""
    import importlib.util
    from minillama.cuda import runtime
    path = Path(__file__).resolve().parents[1] / "kernels" / "dev" / "ab_bounds.py"
    spec = importlib.util.spec_from_file_location("ab_bounds", path)
    sys.path.insert(0, str(path.parent))
    try:
        ab_bounds = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ab_bounds)
    finally:
        sys.path.remove(str(path.parent))
    source = runtime.kernel_source()
    assert "loads after the wait" in ab_bounds.SOURCE_BOUNDS
    for name, edits in ab_bounds.SOURCE_BOUNDS.items():
        for old, new in edits:
            assert old in source, f"{name}: {old.strip()[:80]!r}"
            assert old != new


def test_the_dev_harnesses_parse():
    """kernels/dev's harnesses run only on a GPU machine, so no other test imports them; each
    must at least parse (a bracket lost in bench_variants.py was found only by reading)."""
    dev = Path(__file__).resolve().parents[1] / "kernels" / "dev"
    scripts = sorted(dev.glob("*.py"))
    assert len(scripts) > 10, dev
    for path in scripts:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")

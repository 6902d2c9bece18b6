"""Replay qgemv_v4s's division of the work and its arithmetic on the CPU (no GPU): the launch plan
(kernels.qgemv_v4s_plan), each block's slice of k and rows, each warp's tiles and each lane's
16-byte loads in the order the kernel issues and consumes them (QBatch's prefetch across a tile's
end), the staging of x by pairs of lanes into v4's shared-memory layout, and the numbers: v4's
digits, the int32 sums, the per-lane float32 accumulation, the slices added in slice order.

    python kernels/dev/emulate_splitk.py              # the 7B short matrices and odd sizes

Checked: every (weight row, 16-byte load) is read by exactly one lane of one block, and every
load a lane consumes is the one it fetched the step before; every word of x's digit planes and
every unit's (T, 2^-s) is written exactly once, by lanes of one warp, within the dynamic shared
memory the host grants, holding the values V4Step::multiply expects there; the product is within
1e-5 of float64 (the GPU check's bound) and every integer sum fits int32. It checks our reading of
the kernel, not the hardware: the GPU runs (tests/test_cuda_formats.py, bench_variants.py --only
splitk) are the test.
"""
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_variants as bv          # noqa: E402  (v4_digits, V4S_*; imports no CuPy)
import check_formats as cf           # noqa: E402
from minillama import formats        # noqa: E402
from minillama.cuda import kernels as mk    # noqa: E402  (imports no CuPy)

THREADS, WARPS = 256, 8
SMS = 132                            # an H200's SMs, for the plan
KS = sorted(set(bv.V4S_KS) | {3, 10})   # the slices asked for: the timed ones and check_v4s's


def cdiv(a, b):
    return -(-a // b)


def lane_loads(CH, U):
    """(32, steps, U) load numbers c of each lane's loop `for c0 = lane; c0 < CH; c0 += 32 U`, u
    inner (-1: not read, past CH), in the order the lane consumes them."""
    c0 = np.arange(32)[:, None] + 32 * U * np.arange(max(1, cdiv(CH, 32 * U)))[None, :]
    c = c0[:, :, None] + 32 * np.arange(U)[None, None, :]
    return np.where((c0[:, :, None] < CH) & (c < CH), c, -1)


def check_block(seen, N, nr, U, row0, row_end, first, CH):
    """One block's loads: counted into seen (N, loads), and the prefetch order checked lane by
    lane (what `next` holds when an iteration takes it is what that iteration reads)."""
    per_lane = lane_loads(CH, U)                              # the same on every tile
    steps = per_lane.shape[1]
    for warp in range(WARPS):
        tiles = list(range(row0 + warp * nr, row_end, WARPS * nr))
        for n0 in tiles:
            rows = np.arange(n0, min(n0 + nr, N))
            c = per_lane[per_lane >= 0]
            np.add.at(seen, (np.repeat(rows, c.size), np.tile(first + c, rows.size)), 1)
        for lane in range(32):
            if lane >= CH or not tiles:
                continue                                       # never iterates
            consumed = [(n0, lane + 32 * U * i) for n0 in tiles for i in range(steps)
                        if lane + 32 * U * i < CH]
            fetched = [(tiles[0], lane)]                       # before the wait
            for n0, c0 in consumed:
                same = c0 + 32 * U < CH
                n_next = n0 if same else n0 + WARPS * nr
                if n_next < row_end:
                    fetched.append((n_next, c0 + 32 * U if same else lane))
            assert fetched[:len(consumed)] == consumed, (row0, warp, lane)
            assert len(fetched) == len(consumed), "a fetch that is never consumed"


def swizzle(g, N4):
    """qgemv.cu's v4_swizzle: where float4 g of a warp's chunk sits in the scratch."""
    return g ^ ((g >> 3) & (N4 // 2 - 1))


def check_stage(fmt, CH):
    """v4_stage_pairs's writes for a slice of CH units: each word of the digit planes and each
    unit's (T, 2^-s) written once, by the two lanes of one warp that hold the unit (the shuffles'
    pair), holding the digits multiply expects there; and its scratch: the swizzle a permutation
    of each warp's chunk, no two lanes of a quarter-warp in one bank (the 16-byte accesses are
    served 8 lanes at a time) when the chunk is stored in the row's order or read by the pairs,
    and the chunk within the bytes the host grants after the staged units."""
    W = bv.WEIGHTS[fmt]
    N4, XU, HALF = W // 4, bv.V4_XU[fmt], W // 8
    chunk = 16 * N4                                            # a warp's float4s, 16 units
    g = np.arange(chunk)
    assert sorted(swizzle(g, N4)) == list(g), "the swizzle is not a permutation"
    for j in range(HALF):                                      # stores: lane t, float4 32 j + t
        slots = swizzle(32 * j + np.arange(32), N4).reshape(4, 8)
        assert all(len(set(q % 8)) == 8 for q in slots), "a bank conflict storing"
    lanes = np.arange(32)
    for j in range(HALF):                                      # reads: lane 2c + h, its float4 j
        slots = swizzle((lanes // 2) * N4 + (lanes % 2) * HALF + j, N4).reshape(4, 8)
        assert all(len(set(q % 8)) == 8 for q in slots), "a bank conflict reading"
    words = np.full((3 * XU * CH + CH) * 4, -1, np.int64)     # which float4 of x wrote it
    meta = np.full(CH, -1, np.int64)
    n4 = CH * N4
    for base in range(0, 2 * CH, THREADS):
        t = np.arange(THREADS)
        c, h = base // 2 + t // 2, t % 2                      # unit c, half h: lanes 2c', 2c' + 1
        assert ((t - h) // 32 == t // 32).all()               # the pair in one warp
        mine = c < CH
        for j in range(HALF):
            q = h * HALF + j
            for k in range(3):
                at = ((k * XU + q // 4) * CH + c) * 4 + q % 4
                assert (words[at[mine]] == -1).all(), "a word written twice"
                words[at[mine]] = c[mine] * N4 + q[mine] + k * n4
        lead = mine & (h == 0)
        assert (meta[c[lead]] == -1).all()
        meta[c[lead]] = c[lead]
    assert (words[:3 * XU * CH * 4] >= 0).all() and (meta >= 0).all(), "a word never written"
    # what multiply reads: plane k XU + u, word w of unit c = digit k of values 16 u + 4 w ..
    k, u, c, w = np.meshgrid(range(3), range(XU), range(CH), range(4), indexing="ij")
    at = ((k * XU + u) * CH + c) * 4 + w
    assert (words[at] == k * n4 + c * N4 + 4 * u + w).all()
    staged = (3 * XU + 1) * CH * 16 + 16 * cdiv(CH, 4)        # qgemv.cu's v4_staged_end
    assert staged == mk._v4_staged_bytes(W, CH)
    scratch = WARPS * chunk * 20                               # float4s and a float each
    assert scratch == mk.v4_pair_scratch(W)
    return staged + scratch                                    # bytes used


def product(fmt, codes, scales, x, plan, U):
    """y (N,) as the kernel computes it: per load the int32 sums of the digits, v4's float32
    value, each lane's FFMA chain over its loads in order, the warp's sum (NumPy's order, not
    the butterfly's), the slices added in slice order in float32."""
    W = bv.WEIGHTS[fmt]
    off = 8 if fmt == "q4_0" else 0
    slices, per, _, _ = plan
    digits, T, inv = bv.v4_digits(x, W)                      # (3, K), (loads, 3), (loads,)
    N, loads = codes.shape[0], codes.shape[1] // W
    S = np.einsum("nlw,klw->knl", codes.reshape(N, loads, W).astype(np.int64),
                  digits.reshape(3, loads, W)) - off * T.T[:, None, :]
    assert np.abs(S).max() < 2 ** 31
    f32 = np.float32
    inner = (S[1] * 256 + S[0]).astype(f32)                  # fmaf(S1, 256, S0): one rounding
    v = (S[2].astype(np.float64) * 65536 + inner).astype(f32)
    d = np.repeat(scales, 32 // W, axis=1)                   # each load's block scale
    ds = (d * inv[None, :]).astype(f32)                      # d 2^-s
    y = np.zeros(N, f32)
    for s in range(slices):
        first = s * per
        CH = min(per, loads - first)
        acc = np.zeros((N, 32), f32)
        for c0 in range(0, CH, 32):                          # lane l's loads l, l + 32, ...
            c = first + c0 + np.arange(min(32, CH - c0))
            lanes = np.arange(c.size)
            acc[:, lanes] = (ds[:, c].astype(np.float64) * v[:, c] + acc[:, lanes]).astype(f32)
        y = (y + acc.sum(axis=1, dtype=f32)).astype(f32)    # slice order
    return y


def run(fmt, N, K, rng, numbers=True):
    W = bv.WEIGHTS[fmt]
    w_host = cf.random_packed(fmt, N, K, rng)
    w64 = formats.dequantize(w_host).astype(np.float64)
    scales = w_host.planes["d"].view(np.float16).astype(np.float32).reshape(N, -1)
    off = 8 if fmt == "q4_0" else 0
    codes = (np.rint(w64 / np.repeat(scales.astype(np.float64), 32, axis=1)) + off).astype(np.int64)
    x = rng.standard_normal(K).astype(np.float32)
    ref = w64 @ x.astype(np.float64)
    seen_plans = {}
    for nr, U in bv.V4S_SHAPES:
        for ks in KS:
            plan = slices, per, rows, tiles = mk.qgemv_v4s_plan(N, K, fmt, nr, ks, SMS)
            loads = K // W
            assert rows % (WARPS * nr) == 0 and tiles * rows >= N and slices * per >= loads
            assert (slices - 1) * per < loads, "an empty slice"
            seen = np.zeros((N, loads), np.int32)
            for tile in range(tiles):
                row0 = tile * rows
                for s in range(slices):
                    first = s * per
                    check_block(seen, N, nr, U, row0, min(N, row0 + rows), first,
                                min(per, loads - first))
            assert (seen == 1).all(), f"loads read {seen.min()} to {seen.max()} times"
            for s in range(slices):
                check_stage(fmt, min(per, loads - s * per))
            seen_plans.setdefault((slices, per), plan)
    for plan in seen_plans.values() if numbers else ():
        y = product(fmt, codes, scales, x, plan, 1)
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert err < 1e-5, (fmt, N, K, plan, err)
    return sorted(seen_plans)


def main():
    rng = np.random.default_rng(5)
    t0 = time.perf_counter()
    for fmt in ("q4_0", "q8_0"):
        W = bv.WEIGHTS[fmt]
        for N, K in ((4096, 4096), (4096, 11008), (1001, 9 * 32 * W + 32), (17, 4128), (3, 96)):
            plans = run(fmt, N, K, rng)
            print(f"{fmt} N={N:5d} K={K:5d}: loads, staging and prefetch order of "
                  f"{len(bv.V4S_SHAPES) * len(KS)} launches ok; slices x loads "
                  f"{', '.join(f'{s} x {p}' for s, p in plans)}: product within 1e-5")
    print(f"all ok in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

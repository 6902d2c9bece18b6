"""The loads alone of qgemv_mma's grid: its pattern against a row-contiguous one (development
harness, needs a GPU and CuPy).

    python kernels/dev/bench_loadpattern.py [--shapes wqkv,wo,w13,w2,output] [--u 2,4,8]

qgemv_mma's lanes load 16 bytes each, a quad 4 consecutive chunks of one weight row, so one
warp-wide load touches 8 rows (g and, in the other half, g + 8): the mma's fragments want a quad
on one row. Is that pattern what holds its loop at a fraction of the copy bandwidth? This runs
the same grid (tiles of 128 NR rows x slices of k, as qgemv_mma_plan gives them), the same
loads per lane, the same batches in flight (U steps, the next fetched while the current is
used), and nothing else: each lane folds its loads into one word by XOR. Two patterns:

    mma    lane (g, t), step s, tile j, half h: row 16 j + 8 h + g, chunk 4 s + t (qgemv_mma's)
    rows   the warp's 16 NR rows x the slice's chunks read row by row, 32 consecutive chunks
           (512 bytes) a warp-wide load

over q4_0-sized codes (16 bytes per 32 weights; the scales are left out) of the 7B matrices,
rotating over enough copies to leave L2 behind. Prints us a launch (eager, back to back:
launch gaps included) and the fraction of the copy bandwidth measured first.

Measured on an H200 (2026-11-30, docs/kernels.md "qgemv_mma's loop: three candidates"): the two
patterns within a few percent of each other at the plans' slices, 0.6 to 0.8 of the copy
bandwidth for the large matrices, where qgemv_mma itself takes 2.2 to 2.7 times as long.
"""
import argparse

import numpy as np

from bench_mma import SHAPES, copy_gbs        # (kernels/dev, the script's own folder)

SOURCE = r'''
__device__ __forceinline__ uint4 ld16(const uint4* p) {            // qgemv.cu's q_load16
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// grid (tiles, slices), 256 threads; a warp's rows 16 NR from row0; its slice steps sb .. se
// (4 chunks a step); L = U NR 2 loads a lane a batch, as qgemv_mma's MmaLoads.
template <int NR, int U, int ROWWISE>
__global__ void __launch_bounds__(256, 2)
loads(const uint4* __restrict__ qs, int N, int chunks, int steps_per_slice, unsigned int* out) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int row0 = blockIdx.x * 128 * NR + warp * 16 * NR;
    const int sb = blockIdx.y * steps_per_slice, se = min(chunks / 4, sb + steps_per_slice);
    const int slice_chunks = (se - sb) * 4;
    constexpr int L = U * NR * 2;
    uint4 next[L];
    auto fetch = [&](int s0) {
#pragma unroll
        for (int i = 0; i < L; ++i) {
            next[i] = make_uint4(0, 0, 0, 0);
            int n, c;
            if (ROWWISE) {                       // the warp's rows, 512 bytes a warp-wide load
                const int f = ((s0 - sb) / U * L + i) * 32 + lane;
                if (f >= 16 * NR * slice_chunks) continue;
                n = row0 + f / slice_chunks;
                c = 4 * sb + f % slice_chunks;
            } else {                             // qgemv_mma's: step s, tile j, half h
                const int s = i / (NR * 2), j = (i / 2) % NR, h = i % 2;
                if (s0 + s >= se) continue;
                n = row0 + 16 * j + 8 * h + g;
                c = 4 * (s0 + s) + t;
            }
            next[i] = ld16(qs + (size_t)min(n, N - 1) * chunks + c);
        }
    };
    unsigned int acc = 0;
    fetch(sb);
    for (int s0 = sb; s0 < se; s0 += U) {
        uint4 cur[L];
#pragma unroll
        for (int i = 0; i < L; ++i) cur[i] = next[i];
        if (s0 + U < se) fetch(s0 + U);
#pragma unroll
        for (int i = 0; i < L; ++i) acc ^= cur[i].x ^ cur[i].y ^ cur[i].z ^ cur[i].w;
    }
    if (acc == 0x9E3779B9u) out[0] = acc;      // keeps the loads; (almost) never stores
}
'''
NRS, US = (1, 2), (2, 4, 8)


def time_us(cp, kernel, grid, args, launches=20, rounds=5):
    for i in range(3):
        kernel(grid, (256,), args(i))
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(rounds):
        start.record()
        for i in range(launches):
            kernel(grid, (256,), args(i))
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / launches * 1e3)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--u", default=",".join(map(str, US)))
    a = ap.parse_args()
    import cupy as cp
    from minillama.cuda.kernels import cdiv, qgemv_mma_plan
    us = [int(u) for u in a.u.split(",")]
    names = [f"loads<{nr},{u},{rw}>" for nr in NRS for u in us for rw in (0, 1)]
    module = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=names)
    bandwidth = copy_gbs(cp)
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    out = cp.zeros(1, dtype=cp.uint32)
    for shape in a.shapes.split(","):
        N, K = SHAPES[shape]
        chunks = K // 32                                   # q4_0: 16 bytes per 32 weights
        nbytes = N * chunks * 16
        copies = max(2, int(np.ceil(200e6 / nbytes)))
        ws = None                                          # the last shape's copies freed first
        ws = [cp.random.randint(0, 2**31, size=(N * chunks * 4,), dtype=cp.uint32)
              for _ in range(copies)]
        for nr in NRS:
            _, ks, per_slice = qgemv_mma_plan(N, K, "q4_0", nr=nr)
            grid = (cdiv(N, 128 * nr), ks)
            for u in us:
                row = []
                for rowwise in (0, 1):
                    kernel = module.get_function(f"loads<{nr},{u},{rowwise}>")
                    us_ = time_us(cp, kernel, grid, lambda i: (ws[i % copies], np.int32(N),
                                                               np.int32(chunks),
                                                               np.int32(per_slice), out))
                    row.append(f"{us_:6.1f} us {nbytes / us_ / 1e3 / bandwidth:.2f}")
                print(f"{shape:7s} nr{nr} ks{ks:<3d} u{u}: mma {row[0]} | rows {row[1]}",
                      flush=True)


if __name__ == "__main__":
    main()

"""qgemv_mma beside qgemv on the Llama-2-7B matrices (development harness, needs a GPU).

    PYTHONPATH=. python kernels/dev/bench_mma.py [--rows 1,8] [--formats q4_0,q8_0,f16,bf16]
                                               [--ks 0.5,2] [--probe]

For each format and row count: every 7B matrix (wqkv, wo, w13, w2, the classifier) timed with
qgemv's v1 / v2 and with qgemv_mma at both tile heights and a few k splits, each the median of
20 launches that rotate over enough copies of the weight to leave L2 behind. Prints
microseconds, the fraction of the copy bandwidth (measured first), and the per-token sum over
32 layers and the classifier for the best of each kernel. Checks each candidate against
float64 of the dequantized weights on the way (relative error in the norm).

--probe also times a matrix of 4096 x 256 (one step of loads per block, left out of the sums):
its time is nearly all the part of a launch that does not stream weights (the launch, the first
loads, the barriers of x's staging, the k split's sums; its slices of x are shorter than a
4096-wide matrix's), which docs/kernels.md ("What bounds qgemv_mma at 8 rows") estimates at
~9.5 us from wo and w2.
"""
import argparse

import numpy as np

from minillama.bench.gpu7b import random_linear
from minillama.cuda import kernels, require_cupy
from minillama.formats import dequantize

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096),
          "w2": (4096, 11008), "output": (32000, 4096)}
PER_TOKEN = {"wqkv": 32, "wo": 32, "w13": 32, "w2": 32, "output": 1}
DTYPE = {"f16": "float16", "bf16": "bfloat16", "q8_0": "int8", "q4_0": "q4_0"}


def copy_gbs(cp):
    a = cp.empty(1 << 28, dtype=cp.uint8)
    b = cp.empty_like(a)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(2):
        start.record()
        for _ in range(10):
            b[...] = a
        end.record()
        end.synchronize()
    return 2 * a.nbytes * 10 / (cp.cuda.get_elapsed_time(start, end) / 1000) / 1e9


def timed_us(cp, fn, copies, reps=20):
    """Microseconds per launch: `reps` launches rotating over the copies, captured into one CUDA
    graph (so the host's launch cost is not timed), the graph replayed 3 times, the best kept."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for i in range(reps):
            fn(copies[i % len(copies)])
        graph = stream.end_capture()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        best = None
        for _ in range(4):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            ms = cp.cuda.get_elapsed_time(start, end)
            best = ms if best is None else min(best, ms)
    return 1000 * best / reps


def rel(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--formats", default="q4_0,q8_0,f16,bf16")
    ap.add_argument("--ks", default="0.5,2",
                    help="k splits to try besides the rule's, as factors of it")
    ap.add_argument("--probe", action="store_true",
                    help="also time 4096 x 256, the fixed part of a launch (not in the sums)")
    a = ap.parse_args()
    shapes = dict(SHAPES, **({"probe": (4096, 256)} if a.probe else {}))
    factors = [None] + [float(f) for f in a.ks.split(",")]
    cp = require_cupy()
    bw = copy_gbs(cp)
    print(f"copy bandwidth {bw:.0f} GB/s")
    for fmt in a.formats.split(","):
        for M in (int(r) for r in a.rows.split(",")):
            totals = {}
            for name, (N, K) in shapes.items():
                w0 = random_linear(N, K, DTYPE[fmt])
                nbytes = w0.nbytes
                copies = [w0] + [random_linear(N, K, DTYPE[fmt])
                                 for _ in range(max(1, int(np.ceil(150e6 / nbytes))) - 1)]
                x = cp.asarray(np.random.default_rng(0).standard_normal((M, K)).astype(np.float32))
                ref = x.get().astype(np.float64) @ dequantize(w0.map(cp.asnumpy)).astype(np.float64).T
                out = cp.empty((M, N), dtype=cp.float32)
                cands = {"v2" if M == 1 else "v1": lambda w, v=(2 if M == 1 else 1):
                         kernels.qgemv(x, w, out=out, version=v)}
                for nr in kernels.MMA_NR:
                    for ks in factors:
                        tiles = -(-N // kernels.mma_tile_rows(nr))
                        # slices as multiples of about two blocks an SM (the plan's rule
                        # before qgemv_mma_plan); ks None: the package's plan
                        base = max(1, round(kernels.MMA_BLOCKS_PER_SM * kernels.sm_count() / tiles))
                        k = None if ks is None else max(1, int(base * ks))
                        cands[f"mma nr{nr} ks{'*' if k is None else k}"] = (
                            lambda w, nr=nr, k=k: kernels.qgemv_mma(x, w, out=out, nr=nr, ks=k))
                line = []
                for cname, fn in cands.items():
                    try:
                        fn(w0)
                        err = rel(out.get(), ref)
                        us = timed_us(cp, fn, copies)
                    except Exception as e:                      # a candidate that fails says so
                        line.append(f"{cname}: FAILED {type(e).__name__}: {str(e)[:80]}")
                        continue
                    frac = nbytes / (us * 1e-6) / (bw * 1e9)
                    line.append(f"{cname} {us:7.1f} us {frac:4.2f} err {err:.1e}")
                    kind = "mma" if cname.startswith("mma") else cname
                    best = totals.setdefault(kind, {}).get(name)
                    if best is None or us < best[0]:
                        totals[kind][name] = (us, nbytes)
                print(f"{fmt} M={M} {name:6s} {N}x{K}: " + " | ".join(line), flush=True)
                del copies, w0
                cp.get_default_memory_pool().free_all_blocks()
            for kind, per in totals.items():
                us = sum(PER_TOKEN.get(n, 0) * t for n, (t, _) in per.items())
                by = sum(PER_TOKEN.get(n, 0) * b for n, (_, b) in per.items())
                print(f"== {fmt} M={M} {kind}: per token {us:8.1f} us, "
                      f"{by / (us * 1e-6) / (bw * 1e9):.2f} of copy", flush=True)


if __name__ == "__main__":
    main()

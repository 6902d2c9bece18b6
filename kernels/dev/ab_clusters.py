"""The split's sums in clusters or by the counter, launch by launch (development tool, needs a
Hopper GPU).

    PYTHONPATH=. python kernels/dev/ab_clusters.py [--rounds 5] [--formats q4_0,q8_0]

For each of the 7B decode step's matrices (wqkv and w13 with RMSNorm, wo plain with
accumulate, w2 with SwiGLU and accumulate) at 1 and 8 rows of x: the launch the package makes
(qgemv: qgemv_v4s or qgemv_v4 at one row, qgemv_mma at 8), its plan (slices, tiles), how many
clusters of that many slices fit on the GPU at once (pdl.max_active_clusters) against the
tiles, and us a launch with the slices in clusters and by the counter (SPLIT_CLUSTER_MAX 0),
20 launches in one CUDA graph, captured the ordinary way and programmatically (as
FusedDecoder's graph is), in turn over rounds, medians.
"""
import argparse
import contextlib
import sys

import numpy as np

from minillama.cuda import kernels, pdl, require_cupy
from minillama.bench import gpu7b

SHAPES = {"wqkv": (12288, 4096, "rmsnorm"), "wo": (4096, 4096, "accumulate"),
          "w13": (22016, 4096, "rmsnorm"), "w2": (4096, 11008, "swiglu")}


def launch_once(x, w, y, what, g):
    if what == "rmsnorm":
        kernels.qgemv(x, w, out=y, norm=g)
    elif what == "swiglu":
        kernels.qgemv(x, w, out=y, swiglu=True, accumulate=True)
    else:
        kernels.qgemv(x, w, out=y, accumulate=True)


def us_per_launch(cp, run, n=20, reps=10):
    """us a launch of run()'s, n of them captured into one CUDA graph (as FusedDecoder's step,
    so that Python's launch costs are not timed), the graph replayed reps times."""
    run()                                   # eager first: workspaces, shared memory allowed
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for _ in range(n):
            run()
        graph = stream.end_capture()
        graph.launch(stream)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(reps):
            graph.launch(stream)
        end.record(stream)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1000 / (n * reps)


def launch_seen(run, cluster_max):
    """(name, grid, shared memory, cluster) of the one launch run() makes at SPLIT_CLUSTER_MAX
    = cluster_max."""
    seen, launch = [], kernels.KERNELS.launch

    def spy(name, grid, block, a, shared_mem=0, **k):
        seen.append((name, grid, shared_mem, k.get("cluster")))
        return launch(name, grid, block, a, shared_mem=shared_mem, **k)
    kernels.KERNELS.launch, kernels.SPLIT_CLUSTER_MAX = spy, cluster_max
    try:
        run()
    finally:
        kernels.KERNELS.launch, kernels.SPLIT_CLUSTER_MAX = launch, 8
    return seen[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--formats", default="q4_0,q8_0")
    args = ap.parse_args()
    cp = require_cupy()
    rng = np.random.default_rng(0)
    for fmt in args.formats.split(","):
        for M in (1, 8):
            for label, (N, K, what) in SHAPES.items():
                w = gpu7b.random_linear(N, K, {"q4_0": "q4_0", "q8_0": "int8"}[fmt])
                xk = 2 * K if what == "swiglu" else K
                x = cp.asarray(rng.standard_normal((M, xk)).astype(np.float32))
                g = cp.asarray(np.ones(K, np.float32))
                y = cp.zeros((M, N), np.float32)
                counter = launch_seen(lambda: launch_once(x, w, y, what, g), 0)
                name, grid, smem, cluster = launch_seen(lambda: launch_once(x, w, y, what, g), 8)
                fit = f"counter grid {counter[1]}, clusters grid {grid}"
                if cluster:
                    f = kernels.KERNELS.function(name, smem)
                    n = pdl.max_active_clusters(f.kernel.ptr, (256,), smem, cluster)
                    fit += f" ({n} clusters of {cluster[1]} at once)"
                times = {}
                for r in range(args.rounds):
                    for mode in ("counter", "cluster"):
                        for pdl_on in (False, True):
                            kernels.SPLIT_CLUSTER_MAX = 0 if mode == "counter" else 8
                            ctx = kernels.KERNELS.programmatic() if pdl_on else contextlib.nullcontext()
                            with ctx:
                                t = us_per_launch(cp, lambda: launch_once(x, w, y, what, g))
                            times.setdefault((mode, pdl_on), []).append(t)
                kernels.SPLIT_CLUSTER_MAX = 8
                med = {k: float(np.median(v)) for k, v in times.items()}
                print(f"{fmt} M={M} {label:4s} {name[:34]:34s} {fit}: "
                      f"ordinary counter {med[('counter', False)]:.2f} cluster "
                      f"{med[('cluster', False)]:.2f} us; programmatic counter "
                      f"{med[('counter', True)]:.2f} cluster {med[('cluster', True)]:.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

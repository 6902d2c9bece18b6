"""qgemv_mma's plans launch by launch: every (NR, slices) on the 7B matrices (development tool,
needs a GPU).

    PYTHONPATH=. python kernels/dev/sweep_mma_plan.py [--dtypes q4_0,int8] [--rows 8]
        [--rounds 3] [--max-ks 16] [--bounds "no sums,no combine"] [--in-place]

kernels.qgemv_mma_plan prices a plan as its waves times a block's work (spans a slice x NR),
which leaves out what a slice costs besides its work: x staged per block, and the last block's
sums over the slices. This tool times each plan: for the decode step's matrices (wqkv and w13
with RMSNorm, wo plain with accumulate, w2 with SwiGLU and accumulate; as run_deferred launches
them, or with --in-place as run_five does: `launcher`) at `rows` rows of x,
NR 1 and 2 and every count of slices from the fewest x's slice allows to --max-ks, us a
launch, 20 launches in one CUDA graph captured programmatically (as FusedDecoder's step is;
bench_mma.py's timed_us, the best of its replays), the plans in turn over rounds, medians;
the rule's plan marked with *. (The figures of 2026-11-30 in docs/kernels.md took the mean of
10 replays instead, before the tool called timed_us.) With --bounds, the
rule's plan only, the package's kernels against those compiled with ab_bounds.py's
SOURCE_BOUNDS edits (wrong sums, right timing), launch by launch.
"""
import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_bounds import edited_source                          # noqa: E402  (checkout first)
from bench_mma import timed_us                               # noqa: E402

from minillama.bench import gpu7b
from minillama.cuda import kernels, require_cupy

SHAPES = {"wqkv": (12288, 4096, "rmsnorm"), "wo": (4096, 4096, "accumulate"),
          "w13": (22016, 4096, "rmsnorm"), "w2": (4096, 11008, "swiglu")}


def us_per_launch(cp, run):
    """us a launch of run()'s: once eagerly (the split's workspaces, the shared memory allowed:
    never inside a capture), then bench_mma.py's timed_us, 20 of them captured into one CUDA
    graph (so that Python's launch costs are not timed), the best of its replays."""
    run()
    return timed_us(cp, lambda _: run(), [None])


def launcher(x, w, y, g, what, nr, ks, deferred=None):
    """A launch of one matrix as FusedDecoder's batch step makes it. deferred: None for
    run_five's (the norms in place, every split's slices added by its last block), else
    (sums, cleared) for run_deferred's: the normed products add into y and their rows' sums of
    squares into `sums` by atomics, wo and w2 add their slices by atomics and zero `cleared`
    (the next deferred product's output), w2 scales its x by `sums` (of w13's x, dim long).
    (Repeated, the atomics add into what the last launch left: the time is the same.)"""
    kwargs = {"rmsnorm": {"norm": g}, "swiglu": {"swiglu": True, "accumulate": True},
              "accumulate": {"accumulate": True}}[what]
    if deferred is not None:
        sums, cleared = deferred
        if what == "rmsnorm":
            kwargs["rms_out"] = sums
        else:
            kwargs.update(any_order=True, clear=cleared)
        if what == "swiglu":
            kwargs["x_ss"] = (sums, SHAPES["w13"][1])
    return lambda: kernels.qgemv_mma(x, w, out=y, nr=nr, ks=ks, **kwargs)


def bounds(cp, args, what, run):
    """The rule's launch `run`, us, with the package's kernels and each bound's."""
    names = ["package"] + args.bounds.split(",")
    times = {n: [] for n in names}
    with kernels.KERNELS.programmatic():
        for _ in range(args.rounds):
            for n in names:
                with contextlib.nullcontext() if n == "package" else edited_source(n):
                    times[n].append(us_per_launch(cp, run))
    print(f"{what[0]} {what[1]} rows {args.rows}: " + ", ".join(
        f"{n} {np.median(times[n]):.1f} us" for n in names), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="q4_0,int8")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-ks", type=int, default=16)
    ap.add_argument("--bounds", default="", help="SOURCE_BOUNDS names, comma-separated")
    ap.add_argument("--in-place", action="store_true",
                    help="the norms in place and the slices in order (run_five's launches), "
                         "not run_deferred's")
    args = ap.parse_args()
    cp = require_cupy()
    rng = np.random.default_rng(0)
    for dtype in args.dtypes.split(","):
        fmt = gpu7b.DTYPES[dtype]
        for label, (N, K, what) in SHAPES.items():
            w = gpu7b.random_linear(N, K, dtype)
            x = cp.asarray(rng.standard_normal((args.rows, 2 * K if what == "swiglu" else K),
                                               dtype=np.float32))
            g = cp.ones(K, np.float32)
            y = cp.zeros((args.rows, N), np.float32)
            # what run_deferred's wo and w2 zero (h13's rows, qkv's: the next product's)
            width = SHAPES["w13" if label == "wo" else "wqkv"][0]
            cleared = cp.zeros(args.rows * width, np.float32)
            deferred = None if args.in_place else (cp.zeros(args.rows, np.float32), cleared)
            rule = kernels.qgemv_mma_plan(N, K, fmt)
            if args.bounds:
                bounds(cp, args, (dtype, label),
                       launcher(x, w, y, g, what, rule[0], rule[1], deferred))
                continue
            plans = sorted({kernels.qgemv_mma_plan(N, K, fmt, nr=nr, ks=ks)
                            for nr in kernels.MMA_NR for ks in range(1, args.max_ks + 1)})
            times = {p: [] for p in plans}
            with kernels.KERNELS.programmatic():
                for _ in range(args.rounds):
                    for p in plans:
                        run = launcher(x, w, y, g, what, p[0], p[1], deferred)
                        times[p].append(us_per_launch(cp, run))
            cells = [f"{'*' if p == rule else ''}{p[0]}/{p[1]} {np.median(times[p]):.1f}"
                     for p in plans]
            best = min(plans, key=lambda p: np.median(times[p]))
            print(f"{dtype} {label} rows {args.rows}: best {best[0]}/{best[1]} "
                  f"{np.median(times[best]):.1f} us, rule {rule[0]}/{rule[1]} "
                  f"{np.median(times[rule]):.1f}; NR/ks us: " + ", ".join(cells), flush=True)
            w = x = y = None
            gpu7b.release_gpu()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""gemv_v3's tiles, A/B in one process (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_f32tiles.py [--sets v64,rule,v32,rows8] [--rounds 7]

gemv_v3 (kernels/gemv_batch.cu) gives a thread NR rows of W times ROWS rows of x. Until
2026-11-30 the package took 64 accumulators a thread (ROWS, NR = 8, 8 / 16, 4 / 32, 2), and
Nsight Compute put the stories110M products at 32 rows at 2 to 4 warps a scheduler and 1 to 2
blocks an SM, waiting on memory. This tool compares tile sets, {rows of x: NR}, each a plan of
kernels.gemv_v3_plan(tiles_of=...):
  rule       the package's GEMV_V3_TILES ({8: 4} since this tool's first run)
  v64        the tiles before: {8: 8, 16: 4, 32: 2}, 64 accumulators
  v32        32 accumulators a thread: {8: 4, 16: 2, 32: 1}, three blocks an SM by registers
  rows8      {8: 8}: 32 rows of x as four blocks of 8 (blockIdx.y)
  rows8v32   {8: 4} (the rule since the first run: the same plans)
The first set named is the others' base in the step ratios.
1. checks each set's instances against float64 (odd sizes, every prologue, accumulate, poisoned
   outputs, the same bits twice): relative error under 1e-5;
2. times the products of --shapes (graph over copies of W, as bench_f32batch.py) at --batches
   rows of x, with the RMSNorm prologue where the step has it, each set in two passes of
   opposite order, the faster kept;
3. the whole decode step of stories15M and stories110M at 8 and 32 rows: the same model's step
   graph captured with each set, replayed back to back, the sets interleaved over rounds, medians.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_f32batch as bf         # noqa: E402  (puts the checkout first)
import check_formats as cf          # noqa: E402
from ab_step import ab_steps, add_instances, patched        # noqa: E402
from minillama.cuda import kernels, require_cupy            # noqa: E402
from minillama.cuda.kernels import GEMV_PROLOGUES           # noqa: E402

SETS = {"rule": None, "v64": {8: 8, 16: 4, 32: 2},
        "v32": {8: 4, 16: 2, 32: 1}, "rows8": {8: 8}, "rows8v32": {8: 4}}
rng = np.random.default_rng()


def register(sets):
    """The sets' instances, compiled with the f32batch group (dev only)."""
    add_instances("f32batch", [f"gemv_v3<{r},{n},{p}>" for tiles in sets.values() if tiles
                               for r, n in tiles.items() for p in GEMV_PROLOGUES.values()])


def launch(x, w, y, tiles, norm=None):
    """gemv_v3 on x (M, K) @ w.T with the plan of a tile set (None: the package's)."""
    M, (N, K) = x.shape[0], w.shape
    return bf.launch_v3(x, w, y, kernels.gemv_v3_plan(M, N, K, tiles_of=tiles), norm=norm)


def check(cp, sets):
    """bench_f32batch's checks (odd sizes, every prologue, accumulate, poisoned outputs, the
    same bits twice, 1e-5 of float64) with each set's plan, at its shapes and a few more."""
    shapes = [(8, 37, 72), (13, 70, 300), (32, 20, 1032), (40, 9, 260), (64, 333, 4100),
              (17, 4097, 12), (32, 2304, 768), (32, 768, 2048), (16, 1536, 288), (8, 32000, 288)]
    bf.check(cp, shapes, plans_of=lambda M, N, K: {
        label: kernels.gemv_v3_plan(M, N, K, tiles_of=tiles) for label, tiles in sets.items()})


def products(cp, sets, batches, shapes):
    for shape in shapes:
        for name, N, K in bf.products(shape):
            w = cp.asarray(rng.standard_normal((N, K)), dtype=np.float32)
            copies = [w] + [w.copy() for _ in range(min(63, kernels.cdiv(400 << 20, w.nbytes)) - 1)]
            g = cp.asarray(1 + 0.1 * rng.standard_normal(K), dtype=np.float32)
            for M in batches:
                x = cp.asarray(rng.standard_normal((M, K)), dtype=np.float32)
                y = cp.empty((M, N), np.float32)
                norm = g if name in ("wqkv", "w13", "cls") else None
                # each set timed twice, the sets in one order and then the other, the faster
                # kept: the first graph timed after a new matrix can be slow (a 7B product: the
                # same kernel and plan 178 us first, 146 us second)
                line = {}
                for order in (list(sets), list(sets)[::-1]):
                    for label in order:
                        t = cf.graph_time([lambda c=c, t=sets[label]: launch(x, c, y, t, norm=norm)
                                           for c in copies], replays=3, repeats=3)
                        line[label] = min(line.get(label, t * 1e6), t * 1e6)
                plans = {label: kernels.gemv_v3_plan(M, N, K, tiles_of=t)
                         for label, t in sets.items()}
                print(f"{shape:>5} {name:5} M={M:<3} {N:>6}x{K:<5} "
                      + "  ".join(f"{k} {v:7.2f}" for k, v in line.items())
                      + "   plans " + " ".join(f"{k}={v}" for k, v in plans.items()), flush=True)
            del copies, w
            cp.get_default_memory_pool().free_all_blocks()


def steps(cp, sets, batches, rounds):
    """The whole stories steps with each set as GEMV_V3_TILES (the stories' rows are short;
    their steps short too: 20 replays a round, as before ab_step.py)."""
    variants = {label: lambda t=tiles: patched(kernels, "GEMV_V3_TILES",
                                               t or kernels.GEMV_V3_TILES)
                for label, tiles in sets.items()}
    for shape in ("15M", "110M"):
        ab_steps(cp, shape, "float32", batches, variants, rounds, steps=20, warmup=3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--batches", default="8,16,32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="15M,110M", help="the products' shapes (7B too)")
    ap.add_argument("--no-products", action="store_true")
    ap.add_argument("--no-steps", action="store_true")
    a = ap.parse_args()
    sets = {k: SETS[k] for k in a.sets.split(",")}
    cp = require_cupy()
    register(sets)
    check(cp, sets)
    if not a.no_products:
        products(cp, sets, [int(b) for b in a.batches.split(",")], a.shapes.split(","))
    if not a.no_steps:
        steps(cp, sets, [8, 32], a.rounds)


if __name__ == "__main__":
    main()

"""What each way of waiting costs: a kernel boundary, a grid barrier, a group's counter, a
cluster's barrier (development tool, needs a GPU of compute capability 9.0; issue 13).

    PYTHONPATH=. python kernels/dev/bench_sync.py [--json PATH]

Every measurement runs the same round (kernels/dev/sync.cu): read n values other blocks wrote
in the round before, add them up across the block, write this block's value, wait. Only the
wait differs, so the microseconds per round are what a decode stage costs with nothing in it:
what the chain of a one-row step is made of (docs/kernels.md, "What a wait costs"). Rounds are
timed with CUDA events over many rounds (a graph of that many kernels for the boundary; one
launch for the others), medians of a few repetitions. Each round checks that it read the values
of the round before (sync.cu), and the tool fails if any did not.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from minillama.bench.timing import gpu_ms                  # noqa: E402
from minillama.cuda import pdl, require_cupy               # noqa: E402

CLUSTERS = (2, 4, 8)
THREADS = 256


def source():
    """reduce.cu (block_sum, the programmatic waits), persistent.cu's barrier, then sync.cu."""
    kernels = ROOT / "kernels"
    text = (kernels / "persistent.cu").read_text()
    barrier = text[text.index("// ---- the grid-wide barrier"):
                   text.index("// ---- a stage's input vector")]
    return "\n".join(((kernels / "reduce.cu").read_text(), barrier,
                      (kernels / "dev" / "sync.cu").read_text()))


def module(cp):
    names = [f"sync_cluster<{c}>" for c in CLUSTERS]
    return cp.RawModule(code=source(), name_expressions=names, options=("-std=c++17",))


def boundary_us(cp, mod, errors, grid, n, programmatic, rounds=200):
    """Per kernel: a CUDA graph of `rounds` sync_kernel launches, each reading the last's (the
    buffers zeroed first, inside the graph)."""
    fn = mod.get_function("sync_kernel")
    bufs = [cp.zeros(grid, dtype=np.float32) for _ in range(2)]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for b in bufs:
            b.fill(0)
        for r in range(rounds):
            args = (bufs[r % 2], bufs[(r + 1) % 2], np.int32(n), np.int32(r), errors)
            if programmatic:
                pdl.launch(fn.kernel.ptr, (grid, 1, 1), (THREADS, 1, 1), args, 0, stream.ptr)
            else:
                fn((grid,), (THREADS,), args)
        graph = stream.end_capture()
    return 1000 * gpu_ms(graph.launch, reps=7, inner=3) / rounds


def grid_us(cp, mod, errors, grid, n, rounds=2000):
    fn = mod.get_function("sync_grid")
    buf, counter = cp.zeros(2 * grid, dtype=np.float32), cp.zeros(1, dtype=np.uint32)

    def run():
        buf.fill(0)
        counter.fill(0)
        fn((grid,), (THREADS,), (buf, counter, np.int32(rounds), np.int32(n), errors))
    return 1000 * gpu_ms(run, reps=7, inner=2) / rounds


def group_us(cp, mod, errors, grid, group, n, rounds=2000):
    fn = mod.get_function("sync_group")
    buf, counters = cp.zeros(2 * grid, dtype=np.float32), cp.zeros(grid // group, dtype=np.uint32)

    def run():
        buf.fill(0)
        counters.fill(0)
        fn((grid,), (THREADS,), (buf, counters, np.int32(rounds), np.int32(n), np.int32(group),
                                 errors))
    return 1000 * gpu_ms(run, reps=7, inner=2) / rounds


def cluster_us(cp, mod, errors, grid, c, n, rounds=2000):
    fn = mod.get_function(f"sync_cluster<{c}>")
    run = lambda: fn((grid,), (THREADS,), (np.int32(rounds), np.int32(n), errors))   # noqa: E731
    return 1000 * gpu_ms(run, reps=7, inner=2) / rounds


def l2_us(cp, mod, size=1 << 20, rounds=20000):
    """One dependent load through L2: a chase through a random cycle of `size` ints (4 MiB)."""
    order = np.random.default_rng(0).permutation(size)
    nxt = np.empty(size, dtype=np.int32)
    nxt[order] = np.roll(order, -1)
    nxt, out = cp.asarray(nxt), cp.zeros(1, dtype=np.int32)
    fn = mod.get_function("sync_l2_chain")
    run = lambda: fn((1,), (1,), (nxt, out, np.int32(rounds)))     # noqa: E731
    return 1000 * gpu_ms(run, reps=7, inner=2) / rounds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    cp = require_cupy()
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    mod, errors = module(cp), cp.zeros(1, dtype=np.int32)
    rows = [("one load through L2 (a chase, 1 thread)", l2_us(cp, mod))]
    for n, what in ((1, "1 value"), (sms, f"{sms} values")):
        rows += [(f"kernel boundary, ordinary, {sms} blocks, read {what}",
                  boundary_us(cp, mod, errors, sms, n, False)),
                 (f"kernel boundary, programmatic, {sms} blocks, read {what}",
                  boundary_us(cp, mod, errors, sms, n, True)),
                 (f"grid barrier, {sms} blocks, read {what}", grid_us(cp, mod, errors, sms, n))]
    for group in (4, 11, 22):
        blocks = sms // group * group
        rows.append((f"counter per group of {group}, {blocks} blocks, read {group} values",
                     group_us(cp, mod, errors, blocks, group, group)))
    for c in CLUSTERS:
        rows.append((f"cluster barrier, clusters of {c}, 128 blocks, read {c} values from "
                     f"neighbours' shared memory", cluster_us(cp, mod, errors, 128, c, c)))
    bad = int(errors.get()[0])
    if bad:
        raise SystemExit(f"bench_sync: {bad} rounds read a value of the wrong round")
    width = max(len(r[0]) for r in rows)
    print(f"{'one round (us)':{width}}  us")
    for label, us in rows:
        print(f"{label:{width}}  {us:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(rows)))


if __name__ == "__main__":
    main()

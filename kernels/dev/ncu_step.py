"""One decode step under Nsight Compute: each kernel's own time and DRAM bytes (development tool).

    PYTHONPATH=. ncu --profile-from-start off --clock-control none --cache-control none \
        --print-units base --csv --page raw \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        python3 kernels/dev/ncu_step.py step --shape 110M --dtype float32 --batch 32 > step.csv
    python3 kernels/dev/ncu_step.py table step.csv [--copy-gbs 4200]

`step` builds a model of the shape with random weights made on the GPU (as profile_step.py),
decodes three positions, then runs one FusedDecoder step eagerly between cudaProfilerStart and
Stop, so ncu measures exactly that step's launches, one kernel at a time (no overlap between
kernels, unlike the graph: profile_step.py's leave_out_ms measures kernels in place).
`table` sums ncu's CSV per kernel name: launches, microseconds, GB read and written, and the
bandwidth each reached, beside the copy bandwidth (--copy-gbs). That shows which kernels sit far
from the memory floor, which the graph's total time cannot.
"""
import argparse
import csv
import sys
from collections import defaultdict

import numpy as np


def step(shape, dtype, bsz, layers):
    from minillama.cuda import require_cupy
    from profile_step import random_decoder
    cp = require_cupy()
    forward, fused = random_decoder(shape, dtype, bsz, n_layers=layers)   # separate kernels
    tokens = np.ones((bsz, 1), dtype=np.int64)
    for pos in range(3):
        forward(tokens, pos)
    fused.send_step(tokens, 3)
    cp.cuda.Device().synchronize()
    cp.cuda.runtime.profilerStart()
    fused.run(bsz)
    cp.cuda.Device().synchronize()
    cp.cuda.runtime.profilerStop()


def rows(path):
    """ncu's raw CSV (a header row, a units row, then a row per launch) as dicts."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]      # skip ncu's own messages
    reader = csv.DictReader(lines)
    return [r for r in reader if r.get("ID", "").isdigit()]


def number(text):
    return float(text.replace(",", "")) if text not in ("", "n/a") else 0.0


def table(path, copy_gbs):
    sums = defaultdict(lambda: [0, 0.0, 0.0, 0.0])           # name -> launches, ns, read, written
    for r in rows(path):
        name = r["Kernel Name"].split("(")[0].removeprefix("void ")
        s = sums[name]
        s[0] += 1
        s[1] += number(r.get("gpu__time_duration.sum", ""))
        s[2] += number(r.get("dram__bytes_read.sum", ""))
        s[3] += number(r.get("dram__bytes_write.sum", ""))
    total_ns = sum(s[1] for s in sums.values())
    total_b = sum(s[2] + s[3] for s in sums.values())
    print(f"{path}: {sum(s[0] for s in sums.values())} launches, {total_ns / 1e3:.1f} us, "
          f"{total_b / 1e9:.3f} GB moved, {total_b / total_ns:.0f} GB/s"
          + (f" ({total_b / total_ns / copy_gbs:.2f} of copy)" if copy_gbs else ""))
    print(f"{'us':>9} {'share':>6} {'n':>5} {'us/launch':>9} {'GB read':>8} {'GB/s':>6}"
          f"{' of copy' if copy_gbs else ''}  kernel")
    for name, (n, ns, rd, wr) in sorted(sums.items(), key=lambda kv: -kv[1][1]):
        gbs = (rd + wr) / ns if ns else 0.0
        frac = f" {gbs / copy_gbs:8.2f}" if copy_gbs else ""
        print(f"{ns / 1e3:9.1f} {100 * ns / total_ns:5.1f}% {n:5d} {ns / 1e3 / n:9.2f} "
              f"{rd / 1e9:8.3f} {gbs:6.0f}{frac}  {name}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--shape", default="7B")
    s.add_argument("--dtype", default="q4_0")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--layers", type=int)
    t = sub.add_parser("table")
    t.add_argument("csv", nargs="+")
    t.add_argument("--copy-gbs", type=float, default=0.0)
    a = ap.parse_args()
    if a.cmd == "step":
        step(a.shape, a.dtype, a.batch, a.layers)
    else:
        for path in a.csv:
            table(path, a.copy_gbs)
            print()


if __name__ == "__main__":
    sys.exit(main())

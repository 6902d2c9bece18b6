"""The classifier's product alone, at one row: gemv against cuBLAS and the copy bandwidth
(development tool, needs a GPU; issue 13).

    PYTHONPATH=. python kernels/dev/bench_classifier.py

A stories model's one-row step ends in its classifier, 32000 rows of W read once a step. In the
step it cannot be timed alone (it overlaps the launches around it), so here it runs by itself:
a CUDA graph of 24 launches, as FusedDecoder launches it (programmatic, RMSNorm'd x), over 4
copies of W so that each launch reads its bytes from memory, not from L2; cupy.matmul (cuBLAS)
on the same product beside it; and the bytes a microsecond over the copy bandwidth of the same
run (docs/kernels.md, "Four that lost").
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from minillama.bench.timing import copy_bandwidth, gpu_ms  # noqa: E402
from minillama.cuda import kernels, require_cupy           # noqa: E402

COPIES, LAUNCHES = 4, 24


def graph(cp, launch):
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with stream, kernels.KERNELS.programmatic():
        stream.begin_capture()
        for i in range(LAUNCHES):
            launch(i)
        return stream.end_capture()


def main():
    cp = require_cupy()
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy:.0f} GB/s (read + write)")
    rng = np.random.default_rng(0)
    for N, K in ((32000, 288), (32000, 768)):
        ws = [cp.asarray(rng.standard_normal((N, K), dtype=np.float32)) for _ in range(COPIES)]
        x = cp.asarray(rng.standard_normal((1, K), dtype=np.float32))
        g = cp.asarray(1.0 + 0.1 * rng.standard_normal(K, dtype=np.float32))
        y = cp.empty((1, N), dtype=np.float32)
        kernels.gemv(x, ws[0], out=y, norm=g)                  # compiled, workspaces made
        ours = graph(cp, lambda i: kernels.gemv(x, ws[i % COPIES], out=y, norm=g))
        us = 1000 * gpu_ms(lambda: ours.launch(), reps=7, inner=3) / LAUNCHES
        xn = x * g                                              # cuBLAS: the same bytes of W
        blas = 1000 * gpu_ms(lambda: [cp.matmul(xn, w.T) for w in ws], reps=7, inner=3) / COPIES
        mb = ws[0].nbytes / 1e6
        print(f"{N} x {K} ({mb:.1f} MB): gemv {us:.2f} us ({mb / us / copy * 1e3:.2f} of the "
              f"copy bandwidth), cuBLAS {blas:.2f} us ({mb / blas / copy * 1e3:.2f}); "
              f"gemv / cuBLAS time {us / blas:.2f}")
        ws = None


if __name__ == "__main__":
    main()

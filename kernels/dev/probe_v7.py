"""Probe gemm_v7 (kernels/matmul.cu, wgmma) on exact small integers, and say how it is wrong.

    PYTHONPATH=. python kernels/dev/probe_v7.py

Inputs are small integers, so every product is exact in float16 and float32: a right kernel
matches NumPy bit for bit. Where it does not, the probe prints, per case, the wrong fraction and,
for a few wrong entries, which (m, n) of the true product holds the value the kernel wrote (a
permutation of rows or columns: a fragment layout misread) or "none" (a descriptor or swizzle
reading the wrong values). For bringing up a new tensor-core kernel on the GPU in one call.
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minillama.cuda import kernels as mk                               # noqa: E402
from minillama.cuda.runtime import require_cupy                        # noqa: E402
from minillama.formats import Packed                                   # noqa: E402


def case(cp, rng, M, N, K, config, kind):
    if kind == "rows":          # C[m, n] = m + 1 when W is all ones in k 0: row index visible
        a = np.zeros((M, K), np.float32)
        a[:, 0] = np.arange(M) + 1
        w = np.zeros((N, K), np.float32)
        w[:, 0] = 1
    elif kind == "cols":        # C[m, n] = n + 1
        a = np.zeros((M, K), np.float32)
        a[:, 0] = 1
        w = np.zeros((N, K), np.float32)
        w[:, 0] = np.arange(N) + 1
    elif kind == "k":           # C[m, n] = the k index where a row of A is 1: k visible
        a = np.zeros((M, K), np.float32)
        a[np.arange(M), np.arange(M) % K] = 1
        w = np.tile(np.arange(K, dtype=np.float32) + 1, (N, 1))
    else:
        a = rng.integers(-3, 4, (M, K)).astype(np.float32)
        w = rng.integers(-3, 4, (N, K)).astype(np.float32)
    ref = a.astype(np.float64) @ w.astype(np.float64).T
    packed = Packed("f16", (N, K), {"data": cp.asarray(w.astype(np.float16))})
    c = mk.gemm_v7(cp.asarray(a.astype(np.float16)), packed,
                   out=cp.full((M, N), np.nan, np.float32), config=config).get()
    bad = ~(c == ref)
    line = f"{config} {kind:6s} {M}x{N}x{K}: "
    if not bad.any():
        print(line + "exact", flush=True)
        return True
    print(line + f"{bad.mean():.3f} wrong ({np.isnan(c).sum()} NaN)", flush=True)
    for m, n in list(zip(*np.nonzero(bad)))[:6]:
        where = np.argwhere(ref == c[m, n])[:3].tolist() if np.isfinite(c[m, n]) else []
        print(f"    C[{m}, {n}] = {c[m, n]!r}, want {ref[m, n]!r}; the true product has it at "
              f"{where or 'none'}", flush=True)
    return False


def main():
    cp = require_cupy()
    rng = np.random.default_rng(0)
    ok = True
    for config in mk.GEMM_V7_CONFIGS:
        bn = mk.GEMM_V7_CONFIGS[config][0]
        for kind, (M, N, K) in [("rows", (128, bn, 64)), ("cols", (128, bn, 64)),
                                ("k", (128, bn, 64)), ("random", (128, bn, 64)),
                                ("random", (128, bn, 128)), ("random", (256, 2 * bn, 640)),
                                ("random", (77, 300, 72))]:
            try:
                ok &= case(cp, rng, M, N, K, config, kind)
            except Exception as e:                      # a launch failure: say which
                print(f"{config} {kind} {M}x{N}x{K}: {type(e).__name__}: {str(e)[:300]}")
                ok = False
    print("all exact" if ok else "WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time qgemv_k (kernels/qgemv_k.cu) on the k-quants beside qgemv on Q8_0 and Q4_0, at
Llama-2-7B's matrix shapes, batch 1 and 8, against the copy bandwidth of the same run.

    python kernels/dev/time_kquants.py [--cubin DIR] [--out DIR]

check_formats.py's harness (its timing helpers: one CUDA graph over enough copies of W to keep
it out of L2) on random k-quant planes made on the GPU. Correctness is tests/test_cuda_kquants.py's
and emulate.py's; this only times. Prints one line per (format, shape, batch) and a table last.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_formats as cf      # noqa: E402  (its timing helpers; it puts the checkout on sys.path)
from minillama import formats      # noqa: E402
from minillama.cuda.kernels import QGEMV_K_PLANES, qgemv      # noqa: E402
from minillama.cuda.runtime import cdiv, require_cupy, sm_count      # noqa: E402
from minillama.formats import Packed      # noqa: E402

FORMATS = ("q8_0", "q4_0") + tuple(QGEMV_K_PLANES)


def random_kquant_gpu(fmt, rows, cols):
    """Random super-blocks made on the GPU: every code and integer-scale bit random, d and
    dmin small and positive (weights of a few hundredths)."""
    cp = require_cupy()
    planes = {}
    for name, (shape, dtype) in formats.layout(fmt, (rows, cols)).items():
        if dtype == np.float16:
            planes[name] = (cp.random.random(shape, dtype=np.float32) / 4096 + 1 / 8192) \
                .astype(np.float16)
        else:
            planes[name] = cp.random.randint(0, 256, shape).astype(np.uint8).view(dtype)
    return Packed(fmt, (rows, cols), planes)


def time_formats(bw, log):
    cp = require_cupy()
    rows = []
    for N, K in cf.GEMV_SHAPES:
        for fmt in FORMATS:
            w = random_kquant_gpu(fmt, N, K) if fmt in QGEMV_K_PLANES \
                else cf.random_packed_gpu(fmt, N, K)
            copies = [w] + [w.map(lambda a: a.copy())
                            for _ in range(min(63, cdiv(600 << 20, w.nbytes)) - 1)]
            for M in (1, 8):
                x = cp.random.standard_normal((M, K), dtype=np.float32)
                y = cp.empty((M, N), np.float32)
                nbytes = w.nbytes + x.nbytes + y.nbytes
                t = cf.graph_time([lambda c=c: qgemv(x, c, out=y) for c in copies])
                log(f"gemv {fmt:5s} N={N:5d} K={K:5d} M={M} {t * 1e6:8.1f} us "
                    f"{nbytes / t / 1e9:7.0f} GB/s {nbytes / t / bw:5.2f} of copy "
                    f"{8 * w.nbytes / (N * K):5.2f} bits/weight")
                rows.append(dict(fmt=fmt, N=N, K=K, M=M, us=t * 1e6, gbs=nbytes / t / 1e9,
                                 frac=nbytes / t / bw))
            del copies, w
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cubin", help="load DIR/module.cubin + names.json (nvrtc_build.py --out)")
    ap.add_argument("--out", type=Path, help="write the log and results.json here")
    args = ap.parse_args()
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    cp = require_cupy()
    if args.cubin:
        cf.use_cubin(args.cubin)
    props = cp.cuda.runtime.getDeviceProperties(0)
    log(f"{time.strftime('%Y-%m-%d %H:%M')} {props['name'].decode()} {sm_count()} SMs, "
        f"CuPy {cp.__version__}")
    bw = cf.copy_bandwidth()
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB device-to-device, read + written)")
    results = time_formats(bw, log)
    log("")
    log(f"GEMV at batch 1 (b8/b1: time at batch 8 over batch 1), fraction of {bw / 1e9:.0f} GB/s")
    by = {(r["fmt"], r["N"], r["K"], r["M"]): r for r in results}
    for fmt in FORMATS:
        for N, K in cf.GEMV_SHAPES:
            b1, b8 = by[(fmt, N, K, 1)], by[(fmt, N, K, 8)]
            log(f"{fmt:6s} {f'{N}x{K}':12s} {b1['us']:8.1f} us {b1['frac']:5.2f} of copy  "
                f"b8/b1 {b8['us'] / b1['us']:5.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kquants.json").write_text(json.dumps(results, indent=1))
        (args.out / "kquants_log.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

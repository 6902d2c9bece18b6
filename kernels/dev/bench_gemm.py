"""Check and time gemm_v5, v6 and v7 (kernels/matmul.cu) against cuBLAS float16, on the GPU.

    python kernels/dev/bench_gemm.py [--size 4096] [--rounds 3] [--out logs/bench_gemm.json]

Issue 10's tensor-core target: the GEMM at 4096^3 in float16 at >= 0.5 of cuBLAS float16
(`cupy.matmul`) measured in the same run. The harness compiles only the instances it launches
(one CuPy module, which the package's own wrappers then launch from: KERNELS.use), checks each
one against float64 of the 16-bit inputs at odd sizes with NaN-poisoned outputs (under 2e-3, as
tests/test_cuda_formats.py), then times cuBLAS, v5 and every v6 and v7 tile shape (v7: on
compute capability 9.0 only, its own module for sm_90a) one after the other,
`rounds` times, and prints TFLOP/s and each kernel's ratio to the cuBLAS timing of its own round
(the clocks drift between rounds; within one they are close). Under two minutes on an H200.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minillama import formats                                           # noqa: E402
from minillama.bench.timing import gpu_ms, tflops                       # noqa: E402
from minillama.cuda import kernels as mk                                # noqa: E402
from minillama.cuda.runtime import kernel_source, require_cupy          # noqa: E402
from minillama.formats import Packed                                    # noqa: E402
from minillama.formats.dense import bf16_to_f32, to_bf16                # noqa: E402

CHECK_FORMATS = ("f16", "bf16", "q4_0")
# (M, N, K): odd M and N, N % 4 == 0 or not (v6's 16-byte stores), K off the 32-wide k-tile,
# several blocks each way, and more tile-rows than one of v6's L2 groups (2100 rows of 128)
CHECK_SIZES = [(1, 8, 32), (37, 127, 96), (129, 33, 1000), (300, 1000, 4128), (2100, 260, 72),
               (257, 516, 160)]


def kernels_to_run():
    """(name, wrapper, config, formats) of every kernel checked; the float16 ones are timed."""
    out = [("gemm_v5 " + mk.GEMM_V5_DEFAULT, mk.gemm_v5, mk.GEMM_V5_DEFAULT, CHECK_FORMATS)]
    for config in mk.GEMM_V6_CONFIGS:
        fmts = CHECK_FORMATS if config == mk.GEMM_V6_DEFAULT else ("f16",)
        out.append((f"gemm_v6 {config}", mk.gemm_v6, config, fmts))
    if mk.has_wgmma():                                                # gemm_v7: sm_90a
        out += [(f"gemm_v7 {config}", mk.gemm_v7, config,
                 CHECK_FORMATS if config == mk.GEMM_V7_DEFAULT else ("f16", "bf16"))
                for config in mk.GEMM_V7_CONFIGS]
    return out


def compile_module():
    """The instances the harness launches, compiled as one module the wrappers launch from."""
    cp = require_cupy()
    names = [n for n in mk.KERNELS.templates if n.startswith("f32_to_16bit")]
    names += [f"gemm_v5<{bm},{bn},{s},{mk.GEMM_V5_FORMATS[f]}>" for f in CHECK_FORMATS
              for bm, bn, s in [mk.GEMM_V5_CONFIGS[mk.GEMM_V5_DEFAULT]]]
    names += [mk._gemm_v6_name(f, config) for name, _, config, fmts in kernels_to_run()
              if name.startswith("gemm_v6") for f in fmts]
    t = time.perf_counter()
    module = cp.RawModule(code=kernel_source(), name_expressions=names)
    for name in names:
        module.get_function(name)                   # compiles now, not inside the first check
    print(f"compiled {len(names)} instances in {time.perf_counter() - t:.1f} s", flush=True)
    mk.KERNELS.use(module)


def rounded(x, fmt):
    """x as the tensor cores see it (float16, or bfloat16 for a bf16 weight), in float64."""
    if fmt == "bf16":
        return bf16_to_f32(to_bf16(x)).astype(np.float64)
    return x.astype(np.float16).astype(np.float64)


def check(rng):
    """Every kernel of kernels_to_run against float64; returns the number of failures."""
    cp = require_cupy()
    failed = passed = 0
    worst = {}
    for fmt in CHECK_FORMATS:
        for M, N, K in CHECK_SIZES:
            if fmt == "q4_0" and K % 32:
                continue                                # blocks of 32 along a row
            w = rng.standard_normal((N, K)).astype(np.float32)
            w *= (2.0 ** rng.integers(-8, 5, (N, 1))).astype(np.float32)
            packed = formats.quantize(w, fmt)
            w64 = formats.dequantize(packed).astype(np.float64)
            if fmt == "q4_0":                   # the kernels scale codes in float16 arithmetic
                w64 = w64.astype(np.float16).astype(np.float64)
            x = rng.standard_normal((M, K)).astype(np.float32)
            ref = rounded(x, fmt) @ w64.T
            a, wd = mk.to_16bit(cp.asarray(x), bf16=fmt == "bf16"), packed.map(cp.asarray)
            for name, wrapper, config, fmts in kernels_to_run():
                if fmt not in fmts:
                    continue
                c = wrapper(a, wd, out=cp.full((M, N), np.nan, np.float32), config=config).get()
                err = np.inf if not np.isfinite(c).all() else \
                    float(np.linalg.norm(c - ref) / np.linalg.norm(ref))
                worst[name] = max(worst.get(name, 0.0), err)
                if err < 2e-3:
                    passed += 1
                else:
                    failed += 1
                    print(f"FAIL {name} {fmt} {M}x{N}x{K}: error {err:.3g} (limit 2e-3)")
    for name, err in worst.items():
        print(f"  worst {name}: {err:.2e}")
    print(f"checks: {passed} passed, {failed} failed", flush=True)
    return failed


def bench(size, rounds):
    """TFLOP/s of cuBLAS float16 and of each float16 kernel at size^3, interleaved; per round
    and kernel {"tflops", "ratio"} (ratio: to cuBLAS in the same round)."""
    cp = require_cupy()
    M = N = K = size
    a = cp.random.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    w16 = cp.random.standard_normal((N, K), dtype=np.float32).astype(np.float16)
    w = Packed("f16", (N, K), {"data": w16})
    c, c16 = cp.empty((M, N), np.float32), cp.empty((M, N), np.float16)
    entries = [("cuBLAS f16 (cupy.matmul)", lambda: cp.matmul(a, w16.T, out=c16))]
    entries += [(name, lambda f=wrapper, k=config: f(a, w, out=c, config=k))
                for name, wrapper, config, _ in kernels_to_run()]
    results = {name: [] for name, _ in entries}
    for r in range(rounds):
        line, cublas = [], None
        for name, fn in entries:
            rate = tflops(M, N, K, gpu_ms(fn, reps=20, warmup=3, inner=10))
            cublas = cublas or rate
            results[name].append({"tflops": rate, "ratio": rate / cublas})
            line.append(f"{name} {rate:.0f} ({rate / cublas:.2f})")
        print(f"round {r + 1}: " + ", ".join(line), flush=True)
    return results


def summary(results, size):
    print(f"\n{size}^3 float16, median of the rounds: TFLOP/s, ratio to cuBLAS of the same round "
          f"[min .. max]")
    best = {}
    for name, runs in results.items():
        ratios = [run["ratio"] for run in runs]
        rate = float(np.median([run["tflops"] for run in runs]))
        print(f"  {name:28s} {rate:7.1f}  {np.median(ratios):.3f} [{min(ratios):.3f} .. "
              f"{max(ratios):.3f}]")
        version = name[:7]
        if version in ("gemm_v6", "gemm_v7") and (version not in best
                                                  or np.median(ratios) > best[version][1]):
            best[version] = (name, float(np.median(ratios)), min(ratios))
    for version, (name, ratio, low) in best.items():
        verdict = "met in every round" if low >= 0.5 else "missed in at least one round"
        print(f"best {version[5:]}: {name}, {ratio:.3f} of cuBLAS (worst round {low:.3f}); "
              f"target 0.5 {verdict}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    cp = require_cupy()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"{props['name'].decode()}, CuPy {cp.__version__}, CUDA runtime "
          f"{cp.cuda.runtime.runtimeGetVersion()}", flush=True)
    compile_module()
    failed = 0 if args.no_check else check(np.random.default_rng())
    results = bench(args.size, args.rounds)
    summary(results, args.size)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"size": args.size, "failed_checks": failed,
                                        "results": results}, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

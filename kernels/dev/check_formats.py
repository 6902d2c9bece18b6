"""Check and time the kernels of issue 10: qgemv (kernels/qgemv.cu) and gemm_v5 (matmul.cu).

    python kernels/dev/check_formats.py              # NumPy self-checks, then GPU checks + times
    python kernels/dev/check_formats.py --no-time    # correctness only
    python kernels/dev/check_formats.py --cubin DIR  # load nvrtc_build.py's cubin, skip compiling

A development harness in the style of llm.c's dev/cuda, kept beside the kernels and apart from
the package, that checks the package's own kernels: it launches them through the checked
wrappers the model uses (minillama.cuda.kernels: qgemv, gemm_v5, to_16bit, gemv, sgemm), from
the module minillama compiles (kernels/*.cu with the template instances of kernels.py). It makes
random weights of its own as formats.Packed planes (every code value, scales over a few
octaves), and checks every kernel against float64 NumPy of the formats package's dequantizer at
odd sizes with poisoned outputs. Then it times them against the device-to-device copy
bandwidth and cuBLAS, measured in the same run, and prints a table last.

Planes of a (rows, cols) weight, nb = cols // 32 (docs/formats.md):
    f16    data (rows, cols) float16        bf16   data (rows, cols) uint16 (bfloat16 bits)
    q8_0   qs (rows, nb, 32) int8,  d (rows, nb) float16                 w = qs * d
    q4_0   qs (rows, nb, 16) uint8, d (rows, nb) float16                 w = (nibble - 8) * d
    q4_1   qs (rows, nb, 16) uint8, d, m (rows, nb) float16              w = nibble * d + m
Byte j of a q4 block holds element j in its low nibble and element j + 16 in its high nibble.
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
from minillama.cuda.kernels import (GEMM_V5_CONFIGS, GEMM_V5_FORMATS, KERNELS,  # noqa: E402
                                    QGEMV_WEIGHTS, gemm_v5, gemv, qgemv, sgemm, to_16bit)
from minillama.cuda.runtime import cdiv, require_cupy, sm_count         # noqa: E402
from minillama.errors import DeviceError                                # noqa: E402
from minillama.formats import Packed                                    # noqa: E402
from minillama.formats.dense import bf16_to_f32, to_bf16                # noqa: E402


# ----------------------------------------------------------------------------
# the modules: minillama's own (kernels/*.cu, kernels.py's template instances, in groups),
# compiled by CuPy on the first launch, or all in one from nvrtc_build.py's cubin

def own_arch_groups():
    """kernels.py's groups compiled for the architecture CuPy picks: not those of one of their
    own (KERNELS.archs: gemm_v7's sm_90a), which nvrtc_build.py leaves out of its cubin, which
    compile themselves when launched, and which this tool launches none of."""
    return {group: names for group, names in KERNELS.groups.items() if group not in KERNELS.archs}


class CubinModule:
    """A module nvrtc_build.py compiled ahead, looked up by template name as CuPy's is."""

    def __init__(self, folder):
        self.module = require_cupy().RawModule(path=str(Path(folder) / "module.cubin"))
        self.lowered = json.loads((Path(folder) / "names.json").read_text())
        if set(self.lowered) != {n for names in own_arch_groups().values() for n in names}:
            raise ValueError("its template instances are not kernels.py's")

    def get_function(self, name):
        return self.module.get_function(self.lowered.get(name, name))   # extern "C": as is


def use_cubin(folder):
    """Launch from `folder`'s cubin instead of compiling, where it matches kernels.py."""
    try:
        KERNELS.use(CubinModule(folder))
    except Exception as e:                           # stale or foreign: compile instead
        print(f"--cubin {folder} not usable ({e}); compiling", flush=True)


def compile_all():
    """Every group of kernels.py's instances compiled (or loaded) now, not on first launch (but
    sm_90a's: own_arch_groups)."""
    for group, names in own_arch_groups().items():
        KERNELS.module(group).get_function(names[0])


# ----------------------------------------------------------------------------
# random packed weights

def to_device(w):
    return w.map(require_cupy().asarray)


def random_packed(fmt, rows, cols, rng):
    """Random planes: every code value, scales over a few octaves (not a quantized matrix)."""
    if fmt in ("f16", "bf16"):
        return formats.quantize(rng.standard_normal((rows, cols), dtype=np.float32), fmt)
    nb = cols // 32
    d = (rng.uniform(0.5, 2.0, (rows, nb)) * 2.0 ** rng.integers(-8, -2, (rows, nb)))
    d *= rng.choice([-1, 1], (rows, nb))
    if fmt == "q8_0":
        qs = rng.integers(-128, 128, (rows, nb, 32)).astype(np.int8)
        return Packed(fmt, (rows, cols), {"qs": qs, "d": d.astype(np.float16)})
    planes = {"qs": rng.integers(0, 256, (rows, nb, 16)).astype(np.uint8),
              "d": d.astype(np.float16)}
    if fmt == "q4_1":
        planes["m"] = (-8 * d * rng.uniform(0.5, 1.5, (rows, nb))).astype(np.float16)
    return Packed(fmt, (rows, cols), planes)


# ----------------------------------------------------------------------------
# NumPy self-checks (no GPU): the reference and the bit tricks the kernels rely on

def check_numpy(rng):
    # the reference (formats.quantize, then dequantize) round-trips to within half a step
    x = rng.standard_normal((7, 96), dtype=np.float32)
    for fmt, tol in [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 0.01), ("q4_0", 0.15),
                     ("q4_1", 0.1)]:
        err = np.abs(formats.dequantize(formats.quantize(x, fmt)) - x).max() / np.abs(x).max()
        assert err < tol, (fmt, err)
    # the random planes hold every code value
    for fmt in ("q8_0", "q4_0", "q4_1"):
        qs = random_packed(fmt, 64, 64, rng).qs
        assert len(np.unique(qs)) == 256, fmt
    # q4 magic: (word & 0x000F000F) | 0x64006400 is half2(1024 + nibble of byte 0, of byte 2)
    words = rng.integers(0, 2 ** 32, 1000, dtype=np.uint64).astype(np.uint32)
    half = lambda u: u.astype(np.uint32).view(np.float16).reshape(-1, 2).astype(np.float32)
    lo = half((words & 0x000F000F) | 0x64006400)
    assert (lo[:, 0] == 1024 + (words & 0xF)).all() and (lo[:, 1] == 1024 + ((words >> 16) & 0xF)).all()
    hi = half((words & 0x00F000F0) | 0x64006400)
    assert (hi[:, 0] / 16 - 72 == ((words >> 4) & 0xF).astype(np.float32) - 8).all()
    # q8 magic: bytes (b ^ 0x80, 0x64) as a float16 are 1152 + b
    b = np.arange(-128, 128).astype(np.int8)
    h = ((b.view(np.uint8) ^ 0x80).astype(np.uint16) | 0x6400).view(np.float16)
    assert (h.astype(np.float32) - 1152 == b).all()
    # the scale products are exact in float32: code * d has at most 8 + 11 significant bits
    d = rng.standard_normal(1000).astype(np.float16).astype(np.float32)
    assert ((np.float32(-128) * d).astype(np.float64) == -128.0 * d.astype(np.float64)).all()
    print("numpy: reference round trips, random planes and bit tricks ok")


# ----------------------------------------------------------------------------
# GPU checks against float64

def rel_err(got, ref):
    got = np.asarray(got.get() if hasattr(got, "get") else got, dtype=np.float64)
    if not np.isfinite(got).all():
        return float("inf")                       # an element was not written (or NaN)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def poison(shape):
    return require_cupy().full(shape, np.nan, dtype=np.float32)


class Checks:
    def __init__(self):
        self.results = []                          # (name, error, limit)

    def add(self, name, err, limit):
        self.results.append((name, err, limit))
        if not err < limit:
            print(f"FAIL {name}: error {err:.3g} (limit {limit:g})", flush=True)

    def summary(self):
        failed = [r for r in self.results if not r[1] < r[2]]
        worst = {}
        for name, err, limit in self.results:
            kind = name.split(" ")[0]
            worst[kind] = max(worst.get(kind, 0.0), err)
        for kind, err in worst.items():
            print(f"  worst {kind}: {err:.2e}")
        print(f"{len(self.results) - len(failed)} passed, {len(failed)} failed")
        return not failed


def check_qgemv(ch, rng):
    cp = require_cupy()
    from minillama.model import rms_norm, silu
    sizes = [(1, 32), (3, 96), (17, 4128), (127, 1024), (1001, 2080), (33, 11008)]
    sizes16 = [(5, 8), (77, 1000), (300, 4104)]                # f16/bf16: K % 8 == 0 only
    for fmt in QGEMV_WEIGHTS:
        for N, K in sizes + (sizes16 if fmt in ("f16", "bf16") else []):
            w = random_packed(fmt, N, K, rng)
            wd, w64 = to_device(w), formats.dequantize(w).astype(np.float64)
            for M in (1, 2, 3, 5, 8, 9, 13, 64):
                x = rng.standard_normal((M, K), dtype=np.float32)
                y = qgemv(cp.asarray(x), wd, out=poison((M, N)))
                ch.add(f"qgemv {fmt} M={M} N={N} K={K}", rel_err(y, x.astype(np.float64) @ w64.T), 1e-5)
        # prologues, accumulate, and x in several chunks (a small shared-memory budget)
        N, K = 129, 2048
        w = random_packed(fmt, N, K, rng)
        wd, w64 = to_device(w), formats.dequantize(w).astype(np.float64)
        for M in (1, 3, 8, 13):
            x = rng.standard_normal((M, K), dtype=np.float32)
            g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
            ref = rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5) @ w64.T
            y = qgemv(cp.asarray(x), wd, out=poison((M, N)), norm=cp.asarray(g), eps=1e-5)
            ch.add(f"qgemv-rmsnorm {fmt} M={M}", rel_err(y, ref), 1e-5)
            h = (2 * rng.standard_normal((M, 2 * K))).astype(np.float32)
            h64 = h.astype(np.float64)
            ref = (silu(h64[:, :K]) * h64[:, K:]) @ w64.T
            y = qgemv(cp.asarray(h), wd, out=poison((M, N)), swiglu=True)
            ch.add(f"qgemv-swiglu {fmt} M={M}", rel_err(y, ref), 1e-5)
            y0 = rng.standard_normal((M, N), dtype=np.float32)
            y = cp.asarray(y0)
            qgemv(cp.asarray(x), wd, out=y, accumulate=True)
            ch.add(f"qgemv-accumulate {fmt} M={M}", rel_err(y, y0 + x.astype(np.float64) @ w64.T), 1e-5)
            y = qgemv(cp.asarray(x), wd, out=poison((M, N)), norm=cp.asarray(g), smem=1)
            ref = rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5) @ w64.T
            ch.add(f"qgemv-chunked {fmt} M={M}", rel_err(y, ref), 1e-5)
            y = cp.asarray(y0)
            qgemv(cp.asarray(x), wd, out=y, accumulate=True, smem=1, blocks_per_sm=1)
            ch.add(f"qgemv-chunked {fmt} M={M} acc", rel_err(y, y0 + x.astype(np.float64) @ w64.T), 1e-5)


def check_gemm(ch, rng):
    cp = require_cupy()
    sizes = [(1, 8, 32), (37, 127, 96), (128, 256, 1024), (300, 1000, 4128), (129, 77, 1000)]
    for fmt in GEMM_V5_FORMATS:
        for M, N, K in sizes:
            if K % 32 and fmt.startswith("q"):
                continue
            w = random_packed(fmt, N, K, rng)
            wd = to_device(w)
            x = rng.standard_normal((M, K), dtype=np.float32)
            bf = fmt == "bf16"
            a16 = to_16bit(cp.asarray(x), bf16=bf)
            # the reference: float64 of the 16-bit inputs the tensor cores see
            xr = bf16_to_f32(to_bf16(x)) if bf else x.astype(np.float16)
            got = a16.get()
            ch.add(f"to_16bit {fmt} {M}x{K}", float(np.abs((bf16_to_f32(got) if bf else
                                                              got.astype(np.float32)) - xr).max()), 1e-30)
            wr = formats.dequantize(w)
            wr = wr.astype(np.float16) if fmt.startswith("q") else wr   # scaled in float16
            ref = xr.astype(np.float64) @ wr.astype(np.float64).T
            for config in GEMM_V5_CONFIGS:
                c = gemm_v5(a16, wd, out=poison((M, N)), config=config)
                ch.add(f"gemm_v5 {fmt} {config} {M}x{N}x{K}", rel_err(c, ref), 2e-3)
            # and against the exact weights (packed formats: includes the float16 rounding of W)
            ref_x = x.astype(np.float64) @ formats.dequantize(w).astype(np.float64).T
            ch.add(f"gemm_v5-vs-f32 {fmt} {M}x{N}x{K}", rel_err(c, ref_x), 1e-2 if bf else 2e-3)


def check_errors(ch):
    cp = require_cupy()
    host = random_packed("q4_0", 8, 64, np.random.default_rng(0))
    w = to_device(host)
    x = cp.ones((2, 64), np.float32)
    cases = [
        (lambda: qgemv(x.astype(np.float64), w), "float32"),
        (lambda: qgemv(cp.ones((2, 32), np.float32), w), "(N, K)"),
        (lambda: qgemv(x, w, accumulate=True), "accumulate"),
        (lambda: qgemv(x, host), "CuPy array"),
        (lambda: qgemv(x, to_device(formats.quantize(np.ones((8, 64), np.float32), "f32"))),
         "formats.Packed"),
        (lambda: qgemv(cp.ones((2, 12), np.float32),
                       to_device(formats.quantize(np.ones((8, 12), np.float32), "f16"))),
         "multiple of 8"),
        (lambda: qgemv(cp.ones(2 * 64 + 1, np.float32)[1:].reshape(2, 64), w), "aligned"),
        (lambda: gemm_v5(x, w), "float16"),
        (lambda: gemm_v5(x.astype(np.float16), w, config="1x1"), "config"),
    ]
    for call, words in cases:
        try:
            call()
            ch.add(f"errors {words}", 1.0, 0.5)
        except DeviceError as e:
            ch.add(f"errors {words}", 0.0 if words in str(e) else 1.0, 0.5)


# ----------------------------------------------------------------------------
# timing

def copy_bandwidth(nbytes=1 << 30):
    cp = require_cupy()
    src = cp.random.random(nbytes // 4, dtype=np.float32)
    dst = cp.empty_like(src)
    t = median_time(lambda: dst.data.copy_from_device_async(src.data, nbytes), reps=10)
    return 2 * nbytes / t                         # bytes read + written per second


def median_time(fn, reps=20, warmup=3):
    cp = require_cupy()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(times))


def graph_time(calls, replays=5, repeats=5):
    """Seconds per call of `calls` (a list of thunks, one per weight copy), captured into one
    CUDA graph and replayed: no launch gaps from Python, and the copies keep W out of L2."""
    cp = require_cupy()
    for call in calls:                             # compile, and set attributes outside capture
        call()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for call in calls:
            call()
        graph = stream.end_capture()
        graph.launch()
        stream.synchronize()
        times = []
        for _ in range(repeats):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            for _ in range(replays):
                graph.launch()
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / (replays * len(calls)))
    return float(np.median(times))


def random_packed_gpu(fmt, rows, cols):
    """Random planes made on the GPU (fast at 7B sizes); codes uniform, scales ~ 2^-6."""
    cp = require_cupy()
    nb = cols // 32
    if fmt == "f32":
        return cp.random.standard_normal((rows, cols), dtype=np.float32)
    if fmt in ("f16", "bf16"):
        w = cp.random.standard_normal((rows, cols), dtype=np.float32)
        data = w.astype(np.float16) if fmt == "f16" else (w.view(np.uint32) >> 16).astype(np.uint16)
        return Packed(fmt, (rows, cols), {"data": data})
    d = (cp.random.random((rows, nb), dtype=np.float32) / 64 + 1 / 256).astype(np.float16)
    if fmt == "q8_0":
        qs = cp.random.randint(-128, 128, (rows, nb, 32)).astype(np.int8)
        return Packed(fmt, (rows, cols), {"qs": qs, "d": d})
    data = {"qs": cp.random.randint(0, 256, (rows, nb, 16)).astype(np.uint8), "d": d}
    if fmt == "q4_1":
        data["m"] = (-8 * d.astype(np.float32)).astype(np.float16)
    return Packed(fmt, (rows, cols), data)


GEMV_SHAPES = [(4096, 4096), (11008, 4096), (22016, 4096), (4096, 11008)]   # (N, K)


def time_gemv(bw, log, sweep):
    cp = require_cupy()
    rows = []
    for N, K in GEMV_SHAPES:
        for fmt in ["f32"] + list(QGEMV_WEIGHTS):
            w = random_packed_gpu(fmt, N, K)
            wbytes = w.nbytes                        # a CuPy array's, or all planes of a Packed
            copies = [w] + [w.copy() if fmt == "f32" else w.map(lambda a: a.copy())
                            for _ in range(min(63, cdiv(600 << 20, wbytes)) - 1)]
            for M in (1, 8):
                x = cp.random.standard_normal((M, K), dtype=np.float32)
                y = cp.empty((M, N), np.float32)
                nbytes = wbytes + x.nbytes + y.nbytes
                variants = [("", {})] if fmt == "f32" else [
                    (f"bps{b},smem{s // 1024}k", dict(blocks_per_sm=b, smem=s))
                    for b, s in sweep]
                best = None
                for tag, kw in variants:
                    if fmt == "f32":
                        calls = [lambda c=c: gemv(x, c, out=y) for c in copies]
                    else:
                        calls = [lambda c=c: qgemv(x, c, out=y, **kw) for c in copies]
                    t = graph_time(calls)
                    line = (f"gemv {fmt:5s} N={N:5d} K={K:5d} M={M} {tag:16s} {t * 1e6:8.1f} us "
                            f"{nbytes / t / 1e9:7.0f} GB/s {nbytes / t / bw:5.2f} of copy")
                    log(line)
                    if best is None or t < best[0]:
                        best = (t, tag)
                rows.append(dict(fmt=fmt, N=N, K=K, M=M, us=best[0] * 1e6, variant=best[1],
                                 gbs=nbytes / best[0] / 1e9, frac=nbytes / best[0] / bw,
                                 bytes=nbytes))
            del copies, w
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def time_gemm(log):
    cp = require_cupy()
    M = N = K = 4096
    flop = 2 * M * N * K
    x = cp.random.standard_normal((M, K), dtype=np.float32)
    a16, b16 = to_16bit(x), to_16bit(x, bf16=True)
    rows = []
    w16 = cp.random.standard_normal((N, K), dtype=np.float32).astype(np.float16)
    t = median_time(lambda: cp.matmul(a16, w16.T))
    rows.append(dict(name="cuBLAS f16 (cupy.matmul)", tflops=flop / t / 1e12, us=t * 1e6))
    log(f"gemm cuBLAS f16 {t * 1e6:.0f} us {flop / t / 1e12:.1f} TFLOP/s")
    x32 = cp.random.standard_normal((M, K), dtype=np.float32)
    w32 = cp.random.standard_normal((N, K), dtype=np.float32)
    t = median_time(lambda: cp.matmul(x32, w32.T), reps=5)
    rows.append(dict(name="cuBLAS f32 (cupy.matmul)", tflops=flop / t / 1e12, us=t * 1e6))
    c32 = cp.empty((M, N), np.float32)
    t = median_time(lambda: sgemm(x32, w32, out=c32), reps=5)
    rows.append(dict(name="sgemm_v4 f32", tflops=flop / t / 1e12, us=t * 1e6))
    del x32, w32
    for fmt in GEMM_V5_FORMATS:
        w = random_packed_gpu(fmt, N, K)
        a = b16 if fmt == "bf16" else a16
        c = cp.empty((M, N), np.float32)
        for config in GEMM_V5_CONFIGS:
            t = median_time(lambda: gemm_v5(a, w, out=c, config=config))
            rows.append(dict(name=f"gemm_v5 {fmt} {config}", tflops=flop / t / 1e12, us=t * 1e6))
            log(f"gemm_v5 {fmt} {config} {t * 1e6:.0f} us {flop / t / 1e12:.1f} TFLOP/s")
    t = median_time(lambda: to_16bit(x, out=a16))
    rows.append(dict(name="f32_to_16bit 4096x4096", tflops=0.0, us=t * 1e6))
    return rows


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cubin", help="load DIR/module.cubin + names.json (nvrtc_build.py --out)")
    ap.add_argument("--out", type=Path, help="write the log and results.json here")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--only", choices=("gemv", "gemm"), help="check and time just one family")
    ap.add_argument("--numpy-only", action="store_true")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile kernels/*.cu with CuPy's NVRTC (as minillama does), and stop")
    args = ap.parse_args()
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    rng = np.random.default_rng()
    check_numpy(rng)
    if args.numpy_only:
        return 0
    cp = require_cupy()
    if args.compile_only:
        for group, names in own_arch_groups().items():
            t0 = time.perf_counter()
            KERNELS.module(group).get_function(names[0])
            print(f"CuPy compiled group {group!r}, {len(names)} template instances, in "
                  f"{time.perf_counter() - t0:.1f} s")
        return 0
    if args.cubin:
        use_cubin(args.cubin)
    props = cp.cuda.runtime.getDeviceProperties(0)
    log(f"{time.strftime('%Y-%m-%d %H:%M')} {props['name'].decode()} {sm_count()} SMs, "
        f"CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}")
    t0 = time.perf_counter()
    compile_all()
    log(f"modules ready in {time.perf_counter() - t0:.1f} s")
    ok = True
    if not args.no_check:
        ch = Checks()
        t0 = time.perf_counter()
        check_errors(ch)
        if args.only != "gemm":
            check_qgemv(ch, rng)
        if args.only != "gemv":
            check_gemm(ch, rng)
        ok = ch.summary()
        log(f"checks: {sum(e < l for _, e, l in ch.results)} passed, "
            f"{sum(not e < l for _, e, l in ch.results)} failed in {time.perf_counter() - t0:.0f} s")
    results = {}
    if not args.no_time:
        bw = copy_bandwidth()
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB device-to-device, read + written)")
        results["copy_gbs"] = bw / 1e9
        sweep = [(1, 96 << 10), (2, 96 << 10), (4, 48 << 10), (1, 200 << 10)]
        if args.only != "gemm":
            results["gemv"] = time_gemv(bw, log, sweep)
        if args.only != "gemv":
            results["gemm"] = time_gemm(log)
        print_tables(results, log)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = f"_{args.only}" if args.only else ""
        (args.out / f"results{tag}.json").write_text(json.dumps(results, indent=1))
        (args.out / f"log{tag}.txt").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


def print_tables(results, log):
    if "gemv" in results:
        print_gemv_table(results, log)
    if "gemm" in results:
        print_gemm_table(results, log)


def print_gemv_table(results, log):
    log("")
    log(f"GEMV, best variant; fraction of the copy bandwidth ({results['copy_gbs']:.0f} GB/s); "
        f"b8/b1 = time at batch 8 over batch 1")
    log(f"{'format':6s} {'N x K':12s} {'b1 us':>8s} {'b1 GB/s':>8s} {'b1 frac':>7s} "
        f"{'b8 us':>8s} {'b8/b1':>6s}")
    by = {(r["fmt"], r["N"], r["K"], r["M"]): r for r in results["gemv"]}
    for fmt in ["f32"] + list(QGEMV_WEIGHTS):
        for N, K in GEMV_SHAPES:
            b1, b8 = by[(fmt, N, K, 1)], by[(fmt, N, K, 8)]
            log(f"{fmt:6s} {f'{N}x{K}':12s} {b1['us']:8.1f} {b1['gbs']:8.0f} {b1['frac']:7.2f} "
                f"{b8['us']:8.1f} {b8['us'] / b1['us']:6.2f}")


def print_gemm_table(results, log):
    log("")
    log("GEMM 4096^3")
    cublas = next(r["tflops"] for r in results["gemm"] if r["name"].startswith("cuBLAS f16"))
    for r in results["gemm"]:
        extra = f"{r['tflops']:7.1f} TFLOP/s {r['tflops'] / cublas:5.2f} of cuBLAS f16" \
            if r["tflops"] else ""
        log(f"  {r['name']:28s} {r['us']:8.0f} us {extra}")


if __name__ == "__main__":
    sys.exit(main())

"""Check and time the kernels of issue 10: qgemv (kernels/qgemv.cu) and gemm_v5 (matmul.cu).

    python kernels/dev/check_formats.py              # NumPy self-checks, then GPU checks + times
    python kernels/dev/check_formats.py --no-time    # correctness only
    python kernels/dev/check_formats.py --cubin DIR  # load nvrtc_build.py's cubin, skip compiling

A development harness in the style of llm.c's dev/cuda, kept beside the kernels and apart from
the package: it compiles kernels/*.cu as ONE module the way minillama/cuda.py does (its
KERNEL_FILES, plus qgemv.cu until cuda.py lists it), packs random weights into the planes
layout of issue 10 with a tiny NumPy packer of its own (the formats package does the same,
separately), and checks every kernel against float64 NumPy at odd sizes with poisoned outputs.
Then it times them against the device-to-device copy bandwidth and cuBLAS, measured in the
same run, and prints a table last.

The launch wrappers (qgemv, gemm_v5, to_16bit) follow cuda.py's checked style so they can move
into the package as they are: CuPy arrays of the right dtype, shape and contiguity, or a
DeviceError naming the argument.

Planes of a (rows, cols) weight, nb = cols // 32 (issue 10):
    f16    w  (rows, cols) float16          bf16   w  (rows, cols) uint16 (bfloat16 bits)
    q8_0   qs (rows, nb, 32) int8,  d (rows, nb) float16                 w = qs * d
    q4_0   qs (rows, nb, 16) uint8, d (rows, nb) float16                 w = (nibble - 8) * d
    q4_1   qs (rows, nb, 16) uint8, d, m (rows, nb) float16              w = nibble * d + m
Byte j of a q4 block holds element j in its low nibble and element j + 16 in its high nibble.
"""
import argparse
import functools
import json
import math
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minillama.errors import DeviceError          # noqa: E402

KERNELS = Path(__file__).resolve().parents[1]
i32 = np.int32


def cdiv(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------
# the module: every kernels/*.cu file, compiled together (as minillama/cuda/runtime.py does)

QGEMV_FORMATS = {"f16": "FmtF16", "bf16": "FmtBF16", "q8_0": "FmtQ8_0", "q4_0": "FmtQ4_0",
                 "q4_1": "FmtQ4_1"}
QGEMV_WEIGHTS = {"f16": 8, "bf16": 8, "q8_0": 16, "q4_0": 32, "q4_1": 32}   # per 16-byte load
QGEMV_ROWS = (1, 2, 4, 8)          # rows of x per pass in qgemv<F, ROWS, PRO>
GEMV_PROLOGUES = {None: 0, "rmsnorm": 1, "swiglu": 2}
QGEMV_SMEM = 96 * 1024             # shared memory per block for x (more needs an opt-in)
QGEMV_BLOCKS_PER_SM = 2

GEMM_V5_FORMATS = {"f16": 0, "bf16": 1, "q8_0": 2, "q4_0": 3, "q4_1": 4}   # V5_F16 ...
GEMM_V5_CONFIGS = {"128x128x4": (128, 128, 4), "128x256x3": (128, 256, 3)}  # BM, BN, STAGES
GEMM_V5_DEFAULT = "128x256x3"


def _cpp_bool(flag):
    return "true" if flag else "false"


def kernel_files():
    """minillama's compile order, with qgemv.cu after matmul.cu if cuda.py does not list it."""
    from minillama.cuda.runtime import KERNEL_FILES
    return tuple(KERNEL_FILES) + (() if "qgemv.cu" in KERNEL_FILES else ("qgemv.cu",))


def module_source():
    return "\n".join(f'#line 1 "{name}"\n' + (KERNELS / name).read_text(encoding="utf-8")
                     for name in kernel_files())


def template_names():
    """minillama's instances plus this issue's."""
    from minillama.cuda.kernels import _templates
    names = list(_templates())
    names += [f"qgemv<{fmt},{rows},{pro}>" for fmt in QGEMV_FORMATS.values()
              for rows in QGEMV_ROWS for pro in GEMV_PROLOGUES.values()]
    names += [f"gemm_v5<{bm},{bn},{st},{wf}>" for bm, bn, st in GEMM_V5_CONFIGS.values()
              for wf in GEMM_V5_FORMATS.values()]
    names += [f"f32_to_16bit<{_cpp_bool(bf)},{_cpp_bool(vec)}>" for bf in (False, True)
              for vec in (False, True)]
    return names


CUBIN = None                        # --cubin DIR: load this instead of compiling


@functools.lru_cache(maxsize=None)
def require_cupy():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise DeviceError("no GPU")
    except ImportError:
        raise DeviceError("the GPU checks need CuPy") from None
    return cupy


@functools.lru_cache(maxsize=None)
def _module():
    """(module, template name -> mangled name or None). From --cubin when given and loadable,
    else compiled from kernels/*.cu by CuPy's NVRTC, as minillama does."""
    cp = require_cupy()
    if CUBIN:
        try:
            module = cp.RawModule(path=str(Path(CUBIN) / "module.cubin"))
            lowered = json.loads((Path(CUBIN) / "names.json").read_text())
            module.get_function(lowered["qgemv<FmtQ4_0,1,0>"])
            return module, lowered
        except Exception as e:                    # a stale or foreign cubin: compile instead
            print(f"--cubin {CUBIN} not usable ({e}); compiling", flush=True)
    try:
        return cp.RawModule(code=module_source(), name_expressions=template_names()), None
    except cp.cuda.compiler.CompileException as e:
        raise DeviceError(f"kernels/*.cu failed to compile: {e}") from None


@functools.lru_cache(maxsize=None)
def _function(name):
    module, lowered = _module()
    return module.get_function(lowered[name] if lowered else name)


def _allow_shared(name, nbytes):
    """Opt a kernel in to more than 48 KiB of dynamic shared memory. The limit only ever
    grows: lowering it for a smaller launch would make a later, larger one fail."""
    f = _function(name)
    if f.max_dynamic_shared_size_bytes < nbytes:
        f.max_dynamic_shared_size_bytes = nbytes


def launch(name, grid, block, args, shared_mem=0):
    if shared_mem > 48 * 1024:
        _allow_shared(name, shared_mem)
    try:
        _function(name)(grid, block, args, shared_mem=shared_mem)
    except Exception as e:            # say which launch, with the kernel's resource attributes
        f = _function(name)
        attrs = {k: getattr(f, k, None) for k in ("num_regs", "shared_size_bytes",
                                                  "max_dynamic_shared_size_bytes",
                                                  "max_threads_per_block")}
        raise DeviceError(f"launch {name} grid {grid} block {block} shared_mem {shared_mem}: "
                          f"{e}; {attrs}") from None


@functools.lru_cache(maxsize=None)
def sm_count():
    return require_cupy().cuda.Device().attributes["MultiProcessorCount"]


# ----------------------------------------------------------------------------
# packed weights: the planes of issue 10 (a stand-in for the formats package's Packed)

Packed = namedtuple("Packed", "format shape data")     # data: {plane name: array}
PLANES = {"f16": ("w",), "bf16": ("w",), "q8_0": ("qs", "d"), "q4_0": ("qs", "d"),
          "q4_1": ("qs", "d", "m")}


def packed_nbytes(w):
    return sum(a.nbytes for a in w.data.values())


def to_device(w):
    cp = require_cupy()
    return Packed(w.format, w.shape, {k: cp.asarray(v) for k, v in w.data.items()})


def f32_to_bf16_bits(x):
    """Round float32 to bfloat16, nearest even, as uint16 bits (NumPy has no bfloat16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _blocks(w):
    rows, cols = w.shape
    return w.astype(np.float32).reshape(rows, cols // 32, 32)


def pack(fmt, w):
    """Quantize a float (rows, cols) array into format `fmt`'s planes (GGUF's rounding)."""
    w = np.asarray(w, dtype=np.float32)
    if fmt == "f16":
        return Packed(fmt, w.shape, {"w": w.astype(np.float16)})
    if fmt == "bf16":
        return Packed(fmt, w.shape, {"w": f32_to_bf16_bits(w)})
    b = _blocks(w)                                            # (rows, nb, 32)
    if fmt == "q8_0":
        d = np.abs(b).max(-1) / 127
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
        qs = np.round(b * inv[..., None]).astype(np.int8)
        return Packed(fmt, w.shape, {"qs": qs, "d": d.astype(np.float16)})
    if fmt == "q4_0":
        amax_at = np.abs(b).argmax(-1)
        vmax = np.take_along_axis(b, amax_at[..., None], -1)[..., 0]
        d = vmax / -8
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
        q = np.clip(np.trunc(b * inv[..., None] + 8.5), 0, 15).astype(np.uint8)
        return Packed(fmt, w.shape, {"qs": nibbles(q), "d": d.astype(np.float16)})
    if fmt == "q4_1":
        lo, hi = b.min(-1), b.max(-1)
        d = (hi - lo) / 15
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
        q = np.clip(np.round((b - lo[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
        return Packed(fmt, w.shape, {"qs": nibbles(q), "d": d.astype(np.float16),
                                     "m": lo.astype(np.float16)})
    raise ValueError(fmt)


def nibbles(q):
    """(rows, nb, 32) codes 0..15 -> (rows, nb, 16) bytes: low nibble j, high nibble j + 16."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def random_packed(fmt, rows, cols, rng):
    """Random planes: every code value, scales over a few octaves (not a quantized matrix)."""
    if fmt in ("f16", "bf16"):
        return pack(fmt, rng.standard_normal((rows, cols), dtype=np.float32))
    nb = cols // 32
    d = (rng.uniform(0.5, 2.0, (rows, nb)) * 2.0 ** rng.integers(-8, -2, (rows, nb)))
    d *= rng.choice([-1, 1], (rows, nb))
    if fmt == "q8_0":
        qs = rng.integers(-128, 128, (rows, nb, 32)).astype(np.int8)
        return Packed(fmt, (rows, cols), {"qs": qs, "d": d.astype(np.float16)})
    qs = rng.integers(0, 256, (rows, nb, 16)).astype(np.uint8)
    data = {"qs": qs, "d": d.astype(np.float16)}
    if fmt == "q4_1":
        data["m"] = (-8 * d * rng.uniform(0.5, 1.5, (rows, nb))).astype(np.float16)
    return Packed(fmt, (rows, cols), data)


def dequantize(w):
    """The reference: each format's weights as float32, computed the plain way in NumPy."""
    fmt, (rows, cols), p = w.format, w.shape, w.data
    if fmt == "f16":
        return p["w"].astype(np.float32)
    if fmt == "bf16":
        return bf16_bits_to_f32(p["w"])
    d = p["d"].astype(np.float32)[..., None]                 # (rows, nb, 1)
    if fmt == "q8_0":
        return (p["qs"].astype(np.float32) * d).reshape(rows, cols)
    qs = p["qs"]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.float32)   # (rows, nb, 32)
    if fmt == "q4_0":
        return ((codes - 8) * d).reshape(rows, cols)
    return (codes * d + p["m"].astype(np.float32)[..., None]).reshape(rows, cols)


# ----------------------------------------------------------------------------
# checked entry points (in cuda.py's style)

def _check_array(name, a, dtypes, ndim=None, aligned=True):
    cp = require_cupy()
    if not isinstance(a, cp.ndarray):
        raise DeviceError(f"{name}: expected a CuPy array on the GPU, got {type(a).__name__}")
    if a.dtype not in [np.dtype(t) for t in dtypes]:
        raise DeviceError(f"{name}: expected {' or '.join(map(str, dtypes))}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise DeviceError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise DeviceError(f"{name}: expected a C-contiguous array, got strides {a.strides}")
    if aligned and a.data.ptr % 16:
        raise DeviceError(f"{name}: expected 16-byte aligned data (16-byte loads)")


PLANE_DTYPES = {("f16", "w"): (np.float16,), ("bf16", "w"): (np.uint16,),
                ("q8_0", "qs"): (np.int8,), ("q4_0", "qs"): (np.uint8,),
                ("q4_1", "qs"): (np.uint8,)}


def _check_packed(w):
    """w's planes against its format and shape; returns (qs, d, m) device pointers' arrays."""
    if not isinstance(w, Packed) or w.format not in PLANES:
        raise DeviceError(f"w: expected a Packed weight in one of {', '.join(PLANES)}, got "
                          f"{type(w).__name__} {getattr(w, 'format', '')!r}")
    rows, cols = w.shape
    if set(w.data) != set(PLANES[w.format]):
        raise DeviceError(f"w: format {w.format} has planes {PLANES[w.format]}, got {tuple(w.data)}")
    block = w.format.startswith("q")
    if cols % (32 if block else 8):
        raise DeviceError(f"w: {w.format} needs a row length that is a multiple of "
                          f"{32 if block else 8}, got {cols}")
    nb = cols // 32
    shapes = {"w": (rows, cols), "qs": (rows, nb, 32 if w.format == "q8_0" else 16),
              "d": (rows, nb), "m": (rows, nb)}
    for name, a in w.data.items():
        _check_array(f"w.{name}", a, PLANE_DTYPES.get((w.format, name), (np.float16,)),
                     aligned=name in ("w", "qs"))
        if a.shape != shapes[name]:
            raise DeviceError(f"w.{name}: expected shape {shapes[name]} for a {w.format} "
                              f"({rows}, {cols}) weight, got {a.shape}")
    main = w.data.get("w", w.data.get("qs"))
    return main, w.data.get("d", main), w.data.get("m", main)


def _output(out, shape):
    cp = require_cupy()
    if out is None:
        return cp.empty(shape, dtype=np.float32)
    _check_array("out", out, (np.float32,))
    if out.shape != tuple(shape):
        raise DeviceError(f"out: expected shape {tuple(shape)}, got {out.shape}")
    return out


def qgemv(x, w, out=None, accumulate=False, norm=None, eps=1e-5, swiglu=False,
          smem=QGEMV_SMEM, blocks_per_sm=QGEMV_BLOCKS_PER_SM):
    """x @ W.T with W packed (f16, bf16, q8_0, q4_0, q4_1): x (M, K) float32, w a Packed
    (N, K) -> (M, N) float32, every weight read once per ROWS (8) rows of x.

    accumulate, norm, eps, swiglu: as cuda.gemv (add into out; RMSNorm of x; x = [h1 | h3]).
    smem: bytes of shared memory a block may use for x; blocks_per_sm: blocks of the grid per
    SM (each block stages x once, then walks many weight rows)."""
    if norm is not None and swiglu:
        raise DeviceError("qgemv: norm and swiglu are two prologues; give one")
    qs, d, m = _check_packed(w)
    _check_array("x", x, (np.float32,), 2)
    (M, K_x), (N, K) = x.shape, w.shape
    if K_x != (2 * K if swiglu else K):
        raise DeviceError(f"qgemv: x is (M, K) = {x.shape} but w is (N, K) = {w.shape}"
                          + (" (swiglu: x must be (M, 2K))" if swiglu else ""))
    if norm is not None:
        _check_array("norm", norm, (np.float32,), 1)
        if norm.shape != (K,):
            raise DeviceError(f"norm: expected shape ({K},), got {norm.shape}")
    if accumulate and out is None:
        raise DeviceError("qgemv: accumulate=True needs the array to add into as out")
    y = _output(out, (M, N))
    if M == 0 or N == 0:
        return y
    rows = next(r for r in QGEMV_ROWS if r >= min(M, QGEMV_ROWS[-1]))
    nr = 4 if rows >= 4 else 2
    # x chunk: all of K if ROWS rows of it fit `smem`, else a multiple of one warp's sweep
    step = 32 * QGEMV_WEIGHTS[w.format]
    kc = K if rows * K * 4 <= smem else max(step, smem // (rows * 4) // step * step)
    prologue = GEMV_PROLOGUES["rmsnorm" if norm is not None else "swiglu" if swiglu else None]
    grid = min(cdiv(N, 8 * nr), blocks_per_sm * sm_count())
    launch(f"qgemv<{QGEMV_FORMATS[w.format]},{rows},{prologue}>", (grid,), (256,),
           (x, qs, d, m, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
            x if norm is None else norm, np.float32(eps), i32(kc)),
           shared_mem=rows * kc * 4)
    return y


def to_16bit(x, bf16=False, out=None):
    """float32 x -> float16 (or bfloat16 bits, uint16), rounded to nearest even: the
    activations' way into gemm_v5."""
    cp = require_cupy()
    _check_array("x", x, (np.float32,))
    dtype = np.uint16 if bf16 else np.float16
    if out is None:
        out = cp.empty(x.shape, dtype=dtype)
    else:
        _check_array("out", out, (dtype,))
        if out.shape != x.shape:
            raise DeviceError(f"out: expected shape {x.shape}, got {out.shape}")
    n = x.size
    if n:
        vec = n % 4 == 0
        launch(f"f32_to_16bit<{_cpp_bool(bf16)},{_cpp_bool(vec)}>", (cdiv(n, 4 * 256),), (256,),
               (x, out, np.int64(n)))
    return out


def gemm_v5(a, w, out=None, config=GEMM_V5_DEFAULT):
    """a @ W.T on the tensor cores: a (M, K) float16 (bfloat16 bits as uint16 when W is bf16),
    w a Packed (N, K) in f16, bf16, q8_0, q4_0 or q4_1 -> (M, N) float32, float32 accumulation.
    config: a tile shape of GEMM_V5_CONFIGS."""
    main, d, m = _check_packed(w)
    _check_array("a", a, (np.uint16,) if w.format == "bf16" else (np.float16,), 2)
    (M, K), (N, K_w) = a.shape, w.shape
    if K != K_w:
        raise DeviceError(f"gemm_v5: a is (M, K) = {a.shape} but w is (N, K) = {w.shape}")
    if config not in GEMM_V5_CONFIGS:
        raise DeviceError(f"config: expected one of {', '.join(GEMM_V5_CONFIGS)}, got {config!r}")
    c = _output(out, (M, N))
    if M == 0 or N == 0:
        return c
    bm, bn, stages = GEMM_V5_CONFIGS[config]
    launch(f"gemm_v5<{bm},{bn},{stages},{GEMM_V5_FORMATS[w.format]}>", (cdiv(N, bn), cdiv(M, bm)),
           (256,), (a, main, d, m, c, i32(M), i32(N), i32(K)),
           shared_mem=stages * (bm + bn) * 64)
    return c


# ----------------------------------------------------------------------------
# NumPy self-checks (no GPU): the packer and the bit tricks the kernels rely on

def check_numpy(rng):
    # the packer round-trips to within half a step of each format
    x = rng.standard_normal((7, 96), dtype=np.float32)
    for fmt, tol in [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 0.01), ("q4_0", 0.15),
                     ("q4_1", 0.1)]:
        err = np.abs(dequantize(pack(fmt, x)) - x).max() / np.abs(x).max()
        assert err < tol, (fmt, err)
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
    print("numpy: packer round trips and bit tricks ok")


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
    for fmt in QGEMV_FORMATS:
        for N, K in sizes + (sizes16 if fmt in ("f16", "bf16") else []):
            w = random_packed(fmt, N, K, rng)
            wd, w64 = to_device(w), dequantize(w).astype(np.float64)
            for M in (1, 2, 3, 5, 8, 9, 13, 64):
                x = rng.standard_normal((M, K), dtype=np.float32)
                y = qgemv(cp.asarray(x), wd, out=poison((M, N)))
                ch.add(f"qgemv {fmt} M={M} N={N} K={K}", rel_err(y, x.astype(np.float64) @ w64.T), 1e-5)
        # prologues, accumulate, and x in several chunks (a small shared-memory budget)
        N, K = 129, 2048
        w = random_packed(fmt, N, K, rng)
        wd, w64 = to_device(w), dequantize(w).astype(np.float64)
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
            xr = bf16_bits_to_f32(f32_to_bf16_bits(x)) if bf else x.astype(np.float16)
            got = a16.get()
            ch.add(f"to_16bit {fmt} {M}x{K}", float(np.abs((bf16_bits_to_f32(got) if bf else
                                                              got.astype(np.float32)) - xr).max()), 1e-30)
            wr = dequantize(w) if not fmt.startswith("q") else dequantize(w).astype(np.float16)
            ref = xr.astype(np.float64) @ wr.astype(np.float64).T
            for config in GEMM_V5_CONFIGS:
                c = gemm_v5(a16, wd, out=poison((M, N)), config=config)
                ch.add(f"gemm_v5 {fmt} {config} {M}x{N}x{K}", rel_err(c, ref), 2e-3)
            # and against the exact weights (packed formats: includes the float16 rounding of W)
            ref_x = x.astype(np.float64) @ dequantize(w).astype(np.float64).T
            ch.add(f"gemm_v5-vs-f32 {fmt} {M}x{N}x{K}", rel_err(c, ref_x), 1e-2 if bf else 2e-3)


def check_errors(ch):
    cp = require_cupy()
    w = to_device(random_packed("q4_0", 8, 64, np.random.default_rng(0)))
    x = cp.ones((2, 64), np.float32)
    cases = [
        (lambda: qgemv(x.astype(np.float64), w), "float32"),
        (lambda: qgemv(cp.ones((2, 32), np.float32), w), "(N, K)"),
        (lambda: qgemv(x, w, accumulate=True), "accumulate"),
        (lambda: qgemv(x, w._replace(format="q5_k")), "Packed"),
        (lambda: qgemv(x, Packed("q4_0", (8, 64), {"qs": w.data["qs"], "d": w.data["d"][:4]})), "w.d"),
        (lambda: qgemv(x, Packed("q4_0", (8, 48), w.data)), "multiple of 32"),
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
        return Packed(fmt, (rows, cols), {"w": data})
    d = (cp.random.random((rows, nb), dtype=np.float32) / 64 + 1 / 256).astype(np.float16)
    if fmt == "q8_0":
        qs = cp.random.randint(-128, 128, (rows, nb, 32)).astype(np.int8)
        return Packed(fmt, (rows, cols), {"qs": qs, "d": d})
    data = {"qs": cp.random.randint(0, 256, (rows, nb, 16)).astype(np.uint8), "d": d}
    if fmt == "q4_1":
        data["m"] = (-8 * d.astype(np.float32)).astype(np.float16)
    return Packed(fmt, (rows, cols), data)


GEMV_SHAPES = [(4096, 4096), (11008, 4096), (22016, 4096), (4096, 11008)]   # (N, K)


def gemv_f32(x, w, y):
    """cuda.gemv's launch of the float32 gemv<ROWS, VEC, PLAIN> (matmul.cu), through this module."""
    from minillama.cuda.kernels import GEMV_ROWS, gemv_ksplit
    (M, K), N = x.shape, w.shape[0]
    rows = next(r for r in GEMV_ROWS if r >= min(M, GEMV_ROWS[-1]))
    ksplit = gemv_ksplit(N, K)
    launch(f"gemv<{rows},{_cpp_bool(K % 4 == 0)},0>", (cdiv(N, 8 // ksplit), cdiv(M, rows)), (256,),
           (x, w, y, i32(M), i32(N), i32(K), i32(0), w, np.float32(1e-5), i32(ksplit)))


def sgemm_v4(a, w, c):
    from minillama.cuda.kernels import SGEMM_CONFIGS, pick_sgemm_config
    (M, K), N = a.shape, w.shape[0]
    bm, bn, bk, tm, tn, mb = SGEMM_CONFIGS[pick_sgemm_config(M, N)]
    launch(f"sgemm_v4<{bm},{bn},{bk},{tm},{tn},{mb},true>", (cdiv(N, bn), cdiv(M, bm)),
           ((bm // tm) * (bn // tn),), (a, w, c, i32(M), i32(N), i32(K)))


def time_gemv(bw, log, sweep):
    cp = require_cupy()
    rows = []
    for N, K in GEMV_SHAPES:
        for fmt in ["f32"] + list(QGEMV_FORMATS):
            w = random_packed_gpu(fmt, N, K)
            wbytes = w.nbytes if fmt == "f32" else packed_nbytes(w)
            copies = [w] + [(w.copy() if fmt == "f32" else
                             Packed(fmt, w.shape, {k: v.copy() for k, v in w.data.items()}))
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
                        calls = [lambda c=c: gemv_f32(x, c, y) for c in copies]
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
    t = median_time(lambda: sgemm_v4(x32, w32, c32), reps=5)
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
    global CUBIN
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
    CUBIN = args.cubin
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
        CUBIN = None
        t0 = time.perf_counter()
        _function("qgemv<FmtQ4_0,1,0>")
        print(f"CuPy compiled {len(template_names())} template instances in "
              f"{time.perf_counter() - t0:.1f} s")
        return 0
    props = cp.cuda.runtime.getDeviceProperties(0)
    log(f"{time.strftime('%Y-%m-%d %H:%M')} {props['name'].decode()} {sm_count()} SMs, "
        f"CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}")
    t0 = time.perf_counter()
    _module()
    _function("qgemv<FmtQ4_0,1,0>")
    log(f"module ready in {time.perf_counter() - t0:.1f} s")
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
    for fmt in ["f32"] + list(QGEMV_FORMATS):
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

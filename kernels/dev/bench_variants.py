"""Check and time the GEMV/GEMM versions: qgemv v1 and v2, gemv, the candidates of
kernels/dev/variants.cu, and the package's choice among them.

    python kernels/dev/bench_variants.py --out logs/variants.json           # checks, then times
    python kernels/dev/bench_variants.py --no-time                          # checks only
    python kernels/dev/bench_variants.py --build-only --build build/gemv_variants   # no GPU
    python kernels/dev/bench_variants.py --build build/gemv_variants --out ...      # reuses them
    python kernels/dev/bench_variants.py --only v2,v3 --formats q4_0,q8_0 --rows 1   # a part
    python kernels/dev/bench_variants.py --build-only --only v3 --ptxas-v    # registers, spills
    python kernels/dev/bench_variants.py --build-only --only splitk --wait-order   # loads vs wait

The llm.c dev/cuda way: the package's kernels (through minillama.cuda.kernels) and the
candidates, compiled beside them from the same sources plus variants.cu:

    v1        qgemv of kernels/qgemv.cu (version=1), two launch settings
    v2        qgemv_v2 of kernels/qgemv.cu: codes to float32 by the 2^23 magic, scale hoisted;
              NR weight rows per warp, U loads in flight per row, ROWS rows of x per pass (up
              to 32), in more settings than the package launches
    product   kernels.qgemv / kernels.gemv as the model calls them: the rule picks v1 or v2
    tc        qgemv_tc (variants.cu): TF32 mma.sync with x split hi + lo, the batch as the N
    v3        qgemv_v3 (variants.cu): batch 1, the weights through a per-warp cp.async pipeline
              in shared memory, in a few launch shapes (NR rows per warp, stages, warps)
    gemv      the package's float32 gemv (version=1), and v2 on float32 weights (issue 13)
    cublas    cupy.matmul (float32: no TF32), the reference of issue 13 and of the GEMM
    gemm      the package's tensor-core GEMM gemm_v5 in more tile shapes and pipeline depths
    i8        qgemv_i8 (variants.cu): batches of q8_0 / q4_0 on the tensor cores in integers
              (mma.sync m16n8k32, x in v4's 8-bit digits staged per unit, no quad transpose),
              against qgemv_mma (the "product" at 4 rows and more); a candidate, measured
              (2026-11-30): not faster
    splitk    qgemv_v4s (kernels/qgemv.cu, where the rule launches it on w2-like shapes: then it
              is "product"): batch 1 of q4_0 / q8_0, v4's inner step over a split of k (ks
              slices; tiles of R rows, R grown with ks), partial sums added in slice order by
              the last block of a tile, in more (NR, U, ks) than the package launches.
              "... pair" (variants.cu): x's digits staged once by a kernel of their own
              (v4_digits), then qgemv_v4s_pre copies its slice of them; "... kept": the same
              GEMV timed alone, the digits made once beforehand (what it would cost if the
              kernel before wrote them)
    v4b       the package's qgemv_v4 at B blocks an SM (its launch bounds and grid, the
              template's last parameter) in the (NR, U, B) of V4B_SHAPES; checked on the
              H200 (2026-11-30), not timed yet (that run's product launch was refused, its
              shared memory cut by Modules.allow_shared, and the run stopped on the results'
              prologue label; both fixed). On the whole step (ab_v4_blocks.py) every setting
              of B 3 or 4 was slower than the package's B 2

--only (these family names), --formats and --rows (batch sizes) build, check and time a part;
by default all of it. With a part, the per-token sums that need the rest show nan. --shapes
(wqkv, wo, w13, w2, cls) times only those matrices; --prologues times each as the decode
step launches it (wo: accumulate; w2: the SwiGLU prologue on x of 2K values, accumulate; wqkv,
w13 and cls: the RMSNorm prologue), every candidate alike (those without the prologue report a
failed launch and are left out).

    python kernels/dev/bench_variants.py --only splitk,v4,product --formats q4_0,q8_0 --rows 1 \
        --shapes wo,w2 --prologues                    # issue 10's short matrices
    python kernels/dev/bench_variants.py --only v4b,product --formats q4_0,q8_0 --rows 1 \
        --prologues                                   # v4 at more blocks an SM

Every instance is checked against float64 NumPy of the NumPy-dequantized weights (odd N and K,
batches 1..64, outputs poisoned with NaN, the RMSNorm and SwiGLU prologues, accumulate, x in
several shared-memory chunks; relative error under 1e-5), then timed on the Llama-2-7B matrix
shapes and the stories15M/110M shapes at batch 1, 8 and 32, in GB/s and as a fraction of the
device-to-device copy bandwidth measured in the same run (weights rotated over copies larger
than the L2, launches replayed from a CUDA graph; check_formats.py's helpers). It prints one
table per family, the Llama-2-7B matmuls per token at batch 1 for every candidate launch, and
writes every figure as JSON to --out.

All modules are compiled first, in parallel processes, by the NVRTC library (through ctypes as
nvrtc_build.py does, or CuPy's bindings), into cubins the main process loads: the compiles take
seconds per process instead of minutes in one; a --build folder whose stamp matches the sources
(built ahead where NVRTC is, e.g. with no GPU) is used as it is. --deadline stops timing new
shapes in time.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import check_formats as cf      # noqa: E402  (puts the checkout on sys.path; random planes, timers)
from minillama import formats   # noqa: E402
from minillama.cuda import kernels as mk    # noqa: E402  (imports no CuPy)
from minillama.cuda.runtime import (MAX_DYNAMIC_SHARED_SIZE_BYTES, cdiv,    # noqa: E402
                                    kernel_source)

# ----------------------------------------------------------------------------
# the candidates: template instances of variants.cu (and gemm_v5 shapes of matmul.cu)

V2_FMT = {"f32": "V2F32", "f16": "V2F16", "bf16": "V2BF16", "q8_0": "V2Q8_0", "q4_0": "V2Q4_0",
          "q4_1": "V2Q4_1"}
TC_FMT = {"f16": "TcF16", "bf16": "TcBF16", "q8_0": "TcQ8_0", "q4_0": "TcQ4_0"}
WEIGHTS = {"f32": 4, "f16": 8, "bf16": 8, "q8_0": 16, "q4_0": 32, "q4_1": 32}
TC_XPAD = {"f16": 8, "bf16": 8, "q8_0": 16, "q4_0": 16}
QUANT = ("f16", "bf16", "q8_0", "q4_0", "q4_1")

# v2 settings (NR, U) swept per batch size class: ROWS rows of x per pass
V2_SMALL = [(2, 4), (4, 2), (2, 8), (4, 4)]          # ROWS 1: memory-bound, loads in flight
V2_BATCH = [(4, 1), (2, 1), (2, 2)]                  # ROWS 8 (16, 32 for float32)
TC_NB = (1, 2, 4)                                    # 8, 16, 32 rows of x per pass
TC_U = (2, 4)
# v3 launch shapes (NR rows per warp, STAGES, warps per block), batch 1 only
V3_FMT = {"f16": "V2F16", "q8_0": "V2Q8_0", "q4_0": "V2Q4_0"}
V3_SHAPES = [(4, 3, 8), (4, 4, 8), (4, 4, 4), (4, 6, 4), (8, 3, 4)]
# v4 (NR, U) at batch 1, q4_0 and q8_0; its x units: WEIGHTS values in (3 XU + 1) uint4s
V4_FMT = {"q8_0": "V4Q8_0", "q4_0": "V4Q4_0"}
V4_SHAPES = [(2, 4), (4, 2), (2, 2), (1, 8)]      # (4, 4), (2, 8) spill
V4_XU = {"q8_0": 1, "q4_0": 2}
# qgemv_v4 at other blocks an SM (the family "v4b"): (NR, U, B); the first is the package's
# q4_0 instance, the last its q8_0
V4B_SHAPES = [(2, 2, 2), (2, 2, 3), (2, 1, 3), (1, 2, 3), (2, 1, 4), (1, 4, 3), (2, 4, 2)]
# i8 (NR, U) at batches, q8_0 and q4_0; k split as qgemv_mma's, at most I8_MAX_BLOCKS blocks a slice
I8_FMT = {"q8_0": "I8Q8_0", "q4_0": "I8Q4_0"}
I8_SHAPES = [(1, 4), (1, 8), (2, 4)]
I8_MAX_BLOCKS = 64              # variants.cu's I8_MAX_BLOCKS
# splitk (NR, U) at batch 1, q4_0 and q8_0, and the slices of k tried (each at least one
# 32-load sweep of a warp: a shape takes at most K / WEIGHTS / 32 of them)
V4S_SHAPES = [(2, 2), (2, 4), (4, 1), (8, 1)]      # (4, 2) spills on q4_0
V4S_KS = (1, 2, 4, 8)
V4S_PRE_KS = (1, 4)             # the pre-staged digits: two of them
GEMM_SHAPES = [(128, 128, 3), (128, 128, 4), (128, 128, 5), (128, 256, 3), (128, 256, 4),
               (256, 128, 3), (256, 128, 4)]
GEMM_SIZE = 4096                # M = N = K of the GEMM timing
COPIES = 31                     # weight copies rotated through in timing (at most 400 MB)
V2_SMEM = 200 * 1024            # shared memory a v2/tc block may take for x (H200: 227 KiB)


def v2_name(fmt, rows, pro, nr, u):
    return f"qgemv_v2<{V2_FMT[fmt]},{rows},{pro},{nr},{u}>"


def v3_name(fmt, nr, stages):
    return f"qgemv_v3<{V3_FMT[fmt]},{nr},{stages}>"


def v4_name(fmt, pro, nr, u, b=2):
    return f"qgemv_v4<{V4_FMT[fmt]},{pro},{nr},{u},{b}>"


def v4s_name(fmt, pro, nr, u, pre=False):
    return f"qgemv_v4s_pre<{V4_FMT[fmt]},{nr},{u}>" if pre else \
        f"qgemv_v4s<{V4_FMT[fmt]},{pro},{nr},{u}>"


def v4_digits_name(fmt, pro):
    return f"v4_digits<{V4_FMT[fmt]},{pro}>"


def i8_name(fmt, nr, u):
    return f"qgemv_i8<{I8_FMT[fmt]},{nr},{u}>"


def tc_name(fmt, nb, pro, u):
    return f"qgemv_tc<{TC_FMT[fmt]},{nb},{pro},{u}>"


def v2_instances():
    """(fmt, rows, nr, u) of every v2 instance timed; the prologue instances are added apart."""
    out = []
    for fmt in ("f16", "q8_0", "q4_0", "q4_1"):
        out += [(fmt, 1, nr, u) for nr, u in V2_SMALL]
        out += [(fmt, 8, nr, u) for nr, u in V2_BATCH]
    out += [("bf16", 1, 2, 4), ("bf16", 8, 4, 1)]
    out += [("f32", rows, nr, u) for rows in (1, 8, 16, 32) for nr, u in ((4, 1), (2, 2))]
    out += [("f32", 1, 2, 4)]
    return out


def names():
    """Template instances to compile, in groups (one process each)."""
    groups = {}
    for fmt, rows, nr, u in v2_instances():
        groups.setdefault(f"v2-{fmt}", []).append(v2_name(fmt, rows, 0, nr, u))
    for fmt in ("q8_0", "q4_0", "q4_1", "f32"):         # the prologues, on one setting each
        rows, nr, u = (8, 4, 1) if fmt == "f32" else (1, 2, 4)
        groups[f"v2-{fmt}"] += [v2_name(fmt, rows, pro, nr, u) for pro in (1, 2)]
    for fmt in TC_FMT:
        groups[f"tc-{fmt}"] = [tc_name(fmt, nb, 0, u) for nb in TC_NB for u in TC_U]
        groups[f"tc-{fmt}"] += [tc_name(fmt, 1, pro, 2) for pro in (1, 2)]
    for fmt in V3_FMT:
        groups[f"v3-{fmt}"] = [v3_name(fmt, nr, st) for nr, st, _ in V3_SHAPES]
    for fmt in V4_FMT:
        groups[f"v4-{fmt}"] = [v4_name(fmt, 0, nr, u) for nr, u in V4_SHAPES]
        groups[f"v4-{fmt}"] += [v4_name(fmt, pro, 2, 4) for pro in (1, 2)]
    for fmt in V4_FMT:                                  # every prologue: the normed products
        groups[f"v4b-{fmt}"] = [v4_name(fmt, pro, nr, u, b) for nr, u, b in V4B_SHAPES
                                for pro in (0, 1, 2)]
    for fmt in I8_FMT:
        groups[f"i8-{fmt}"] = [i8_name(fmt, nr, u) for nr, u in I8_SHAPES]
    for fmt in V4_FMT:                                  # plain (wo) and SwiGLU (w2)
        groups[f"splitk-{fmt}"] = [v4s_name(fmt, pro, nr, u) for nr, u in V4S_SHAPES
                                   for pro in (0, 2)]
        groups[f"splitk-{fmt}"] += [v4s_name(fmt, 0, nr, u, pre=True) for nr, u in V4S_SHAPES]
        groups[f"splitk-{fmt}"] += [v4_digits_name(fmt, pro) for pro in (0, 2)]
    groups["gemm"] = [f"gemm_v5<{bm},{bn},{s},{wf}>" for bm, bn, s in GEMM_SHAPES
                      for wf in (mk.GEMM_V5_FORMATS["f16"], mk.GEMM_V5_FORMATS["q4_0"])]
    return {g: sorted(set(n)) for g, n in groups.items()}


def variants_source():
    return kernel_source() + '\n#line 1 "dev/variants.cu"\n' + (HERE / "variants.cu").read_text()


# ----------------------------------------------------------------------------
# compiling: NVRTC in parallel processes, no GPU needed

def find_nvrtc():
    import glob
    if os.environ.get("NVRTC_LIB"):
        return os.environ["NVRTC_LIB"]
    for root in sys.path + ["/tmp/cu13"]:
        for pattern in ("nvidia/cu1*/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            hits = [h for h in sorted(glob.glob(os.path.join(root, pattern)))
                    if "builtins" not in h and ".alt." not in h]
            if hits:
                return hits[-1]
    return None


def compile_job(job):
    """(group, source, names, options) -> (group, cubin bytes, {name: lowered}, seconds, log)."""
    group, source, names_, options = job
    t0 = time.perf_counter()
    if find_nvrtc():
        try:
            import nvrtc_build
            os.environ.setdefault("NVRTC_LIB", find_nvrtc())
            cubin, lowered, log = nvrtc_build.compile_module(source, names_, options)
            return group, cubin, lowered, time.perf_counter() - t0, log
        except (OSError, RuntimeError) as e:      # a library that does not load: CuPy's
            print(f"ctypes NVRTC failed for {group} ({e}); trying CuPy's bindings", flush=True)
    if True:                                      # CuPy's own NVRTC bindings
        from cupy.cuda import nvrtc
        prog = nvrtc.createProgram(source, "kernels.cu", [], [])
        for n in names_:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            print(nvrtc.getProgramLog(prog))
            raise
        cubin = nvrtc.getCUBIN(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names_}
    return group, cubin, lowered, time.perf_counter() - t0, nvrtc.getProgramLog(prog)


def ptxas_summary(text, lowered):
    """ptxas -v's log as one line per instance: its registers and spilled bytes."""
    import re
    by_lowered, out, name, spills = {v: k for k, v in lowered.items()}, [], None, ""
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = by_lowered.get(m.group(1))
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spills = f"{m.group(1)} + {m.group(2)} bytes spilled (stores + loads)"
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out.append(f"    {name}: {m.group(1)} registers, {spills}")
            name = None
    return out


def build(folder, arch, jobs, log, only=None, ptxas=False):
    """Every group of the package (kernels.py's KERNELS) and of the variants, compiled to
    folder/<group>.cubin + .json, `jobs` processes at once; with `only` (an Only), the groups
    its families and formats need; with `ptxas`, each instance's registers and spills logged."""
    options = [f"-arch={arch}", "-std=c++17"] + (["-Xptxas=-v"] if ptxas else [])
    only = only or Only()
    work = []
    if any(only.family(f) for f in ("v1", "product", "gemv")):
        # the package's groups, but for those of another architecture (gemm_v7's sm_90a):
        # the harness launches none of them
        work += [(f"pkg-{g}", kernel_source(), list(n), options)
                 for g, n in mk.KERNELS.groups.items() if g not in mk.KERNELS.archs]
    src = variants_source()
    work += [(g, src, n, options) for g, n in names().items()
             if g == "gemm" and only.family("gemm")
             or g != "gemm" and only.family(g.split("-")[0]) and only.fmts([g.split("-")[1]])]
    stamp = hashlib.sha256(json.dumps(work).encode()).hexdigest()
    if (folder / "stamp").is_file() and (folder / "stamp").read_text() == stamp:
        log(f"modules: the cubins in {folder} match these sources ({arch}); not compiling")
        return
    for old in folder.glob("*.cubin"):
        old.unlink()
    work.sort(key=lambda w: -len(w[2]))               # the longest first
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for group, cubin, lowered, secs, text in pool.imap_unordered(compile_job, work):
            (folder / f"{group}.cubin").write_bytes(cubin)
            (folder / f"{group}.json").write_text(json.dumps(lowered))
            log(f"  compiled {group}: {len(lowered)} instances in {secs:.0f} s")
            for line in ptxas_summary(text, lowered) if ptxas else ():
                log(line)
    (folder / "stamp").write_text(stamp)
    log(f"modules built in {time.perf_counter() - t0:.0f} s ({jobs} processes, {arch})")


class Modules:
    """The cubins of build(), looked up by template name (extern "C" kernels: from any).
    Without a folder, CuPy compiles every group in this process instead (slow: minutes)."""

    def __init__(self, folder=None):
        cp = cf.require_cupy()
        self.by_name, self.any = {}, None
        if folder is not None:
            for path in sorted(folder.glob("*.cubin")):
                module = cp.RawModule(path=str(path))
                self.any = self.any or module
                for name, lowered in json.loads(path.with_suffix(".json").read_text()).items():
                    self.by_name[name] = (module, lowered)
        else:
            groups = [(kernel_source(), n) for n in mk.KERNELS.groups.values()]
            groups += [(variants_source(), n) for n in names().values()]
            for source, names_ in groups:
                module = cp.RawModule(code=source, name_expressions=list(names_),
                                      options=("-std=c++17",))
                self.any = self.any or module
                self.by_name.update({n: (module, n) for n in names_})
        self.functions, self.shared = {}, {}
        self.log = None        # while checking: a launch CUDA refuses is logged, its output
                               # stays poisoned (a FAIL), and the checks go on

    def get_function(self, name):
        module, lowered = self.by_name.get(name, (self.any, name))
        return module.get_function(lowered)

    def function(self, name):
        if name not in self.functions:
            self.functions[name] = self.get_function(name)
        return self.functions[name]

    def allow_shared(self, name, shared_mem):
        """Let kernel `name` take `shared_mem` bytes of dynamic shared memory. Only ever
        raised, above what the driver allows it now: lowering it for a smaller launch would
        fail a later, larger one with CUDA_ERROR_INVALID_VALUE (what the first qgemv_v3 run met
        on the H200). The attribute is the function's, and the package's launcher shares the
        function where a family times a package instance under its own name (v4b's (2, 2, 2)
        and (2, 4, 2), v4's nr2 u2 and nr2 u4): the 8320 bytes set for a q8_0 check's launch
        (K 2080) left the package's RMSNorm qgemv_v4 on 7B wqkv (16 KiB: under the default
        48 KiB, so KERNELS.launch never raises it) refused, CUDA_ERROR_INVALID_VALUE
        (2026-11-30)."""
        # static and dynamic shared memory share the 48 KiB: qgemv_tc has 24 KiB static, so
        # its small-x launches (N=3, K=96, 32 rows: 26-37 KiB dynamic) needed the opt-in too
        if shared_mem > self.shared.get(name, 0):
            driver, ptr = cf.require_cupy().cuda.driver, self.function(name).kernel.ptr
            allowed = driver.funcGetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, ptr)
            if shared_mem > allowed:
                driver.funcSetAttribute(ptr, MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem)
            self.shared[name] = max(shared_mem, allowed)

    def launch(self, name, grid, block, args, shared_mem=0):
        f = self.function(name)
        self.allow_shared(name, shared_mem)
        try:
            f(grid, block, args, shared_mem=shared_mem)
        except Exception as e:                 # CUDA_ERROR_INVALID_VALUE and the like
            if self.log is None:
                raise RuntimeError(f"{self.describe(name, grid, block, shared_mem)}: {e}") from e
            self.log(f"  launch failed: {self.describe(name, grid, block, shared_mem)}: {e}")

    def describe(self, name, grid, block, shared_mem):
        """A launch in words, for its failure: the instance, grid, block, the dynamic shared
        memory asked for and what the function allows now."""
        try:
            allowed = cf.require_cupy().cuda.driver.funcGetAttribute(
                MAX_DYNAMIC_SHARED_SIZE_BYTES, self.function(name).kernel.ptr)
        except Exception:                      # a sticky error: the context answers no more
            allowed = "?"
        return f"{name} grid {grid} block {block} shared {shared_mem} B (allowed {allowed})"


class PackageModule:
    """The package's groups from the same cubins, for KERNELS.use (v1, gemv, gemm_v5), each
    function wrapped so that a failed launch names itself (DescribedFunction)."""

    def __init__(self, modules):
        self.modules = modules

    def get_function(self, name):
        return DescribedFunction(self.modules, name)


class DescribedFunction:
    """A package kernel as KERNELS launches it (its .kernel; called with grid, block, args),
    whose failed launch says which it was, as Modules.launch's do: "product: failed" alone
    did not say which of the package's launches the driver refused."""

    def __init__(self, modules, name):
        self.modules, self.name = modules, name
        self.function = modules.function(name)
        self.kernel = self.function.kernel

    def __call__(self, grid, block, args, shared_mem=0):
        try:
            self.function(grid, block, args, shared_mem=shared_mem)
        except Exception as e:
            raise RuntimeError(f"{self.modules.describe(self.name, grid, block, shared_mem)}: "
                               f"{e}") from e


# ----------------------------------------------------------------------------
# launching the candidates: same arguments as minillama.cuda.kernels.qgemv

def planes(w):
    """(codes or values, scales, mins) of a Packed, or a float32 CuPy array as all three."""
    if isinstance(w, formats.Packed):
        main = w.planes.get("data", w.planes.get("qs"))
        return main, w.planes.get("d", main), w.planes.get("m", main)
    return w, w, w


def fmt_of(w):
    return w.format if isinstance(w, formats.Packed) else "f32"


def prologue_args(x, norm, swiglu):
    pro = 1 if norm is not None else 2 if swiglu else 0
    return pro, (x if norm is None else norm)


def run_v2(M_, x, w, y, nr, u, rows_set, pro=0, norm=None, accumulate=False, smem=V2_SMEM):
    """qgemv_v2 on x (M, K or 2K) and w (N, K): ROWS the smallest of rows_set >= M (or the
    largest); the grid as many blocks as fit on the GPU at once (the kernel's launch bounds:
    2 per SM unless ROWS >= 8 or NR * U >= 16), or fewer."""
    fmt = fmt_of(w)
    N, K = w.shape
    M = x.shape[0]
    rows = next((r for r in sorted(rows_set) if r >= M), max(rows_set))
    bps = 1 if rows >= 8 or nr * u >= 16 else 2
    step = 32 * WEIGHTS[fmt]
    kc = K if rows * K * 4 <= smem else max(step, smem // (rows * 4) // step * step)
    qs, d, m = planes(w)
    grid = min(cdiv(N, 8 * nr), bps * cf.sm_count())
    M_.launch(v2_name(fmt, rows, pro, nr, u), (grid,), (256,),
              (x, qs, d, m, y, np.int32(M), np.int32(N), np.int32(K), np.int32(accumulate),
               x if norm is None else norm, np.float32(1e-5), np.int32(kc)),
              shared_mem=rows * kc * 4)
    return y


def v3_slot_bytes(fmt, nr):
    """variants.cu's v3_slot_bytes: one pipeline step of a warp (codes, then scale pieces)."""
    # a slice of 32 loads per row has WEIGHTS scales (2 bytes each), one piece more for the
    # rounding down to 16 bytes
    spieces = 0 if fmt == "f16" else 2 * WEIGHTS[fmt] // 16 + 1
    return nr * 512 + nr * spieces * 16


def v3_blocks_per_sm(M_, name, threads, smem):
    """Blocks of qgemv_v3 resident per SM: the driver's occupancy, or where CuPy does not
    offer it the least of what the registers, the shared memory (an H100/H200's 228 KiB, 1 KiB
    reserved per block) and the threads allow."""
    cp = cf.require_cupy()
    f = M_.function(name)
    M_.allow_shared(name, smem)         # the occupancy of a size the kernel is not allowed is 0
    try:
        return max(1, cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            f.kernel.ptr, threads, smem))
    except Exception:
        regs = -(-f.num_regs // 8) * 8
        return max(1, min(65536 // (regs * threads), (228 << 10) // (smem + 1024),
                          2048 // threads))


def run_v3(M_, x, w, y, nr, stages, warps, accumulate=False):
    """qgemv_v3 on one row of x (1, K) and w (N, K): as many blocks as are resident at once,
    or fewer when the tiles of NR rows run out."""
    fmt = fmt_of(w)
    (N, K), M = w.shape, x.shape[0]
    assert M == 1, "qgemv_v3 takes one row of x"
    name = v3_name(fmt, nr, stages)
    smem = 4 * K + warps * stages * v3_slot_bytes(fmt, nr)
    key = (name, warps, smem)
    if key not in V3_OCCUPANCY:
        V3_OCCUPANCY[key] = v3_blocks_per_sm(M_, name, 32 * warps, smem)
    grid = min(cdiv(cdiv(N, nr), warps), V3_OCCUPANCY[key] * cf.sm_count())
    qs, d, _ = planes(w)
    M_.launch(name, (grid,), (32 * warps,),
              (x, qs, d, y, np.int32(N), np.int32(K), np.int32(accumulate)), shared_mem=smem)
    return y


V3_OCCUPANCY = {}       # (name, warps, shared memory) -> blocks per SM


def run_v4(M_, x, w, y, nr, u, pro=0, norm=None, accumulate=False, smem=V2_SMEM, b=None):
    """qgemv_v4 on one row of x (1, K, or 1, 2K with the SwiGLU prologue) and w (N, K): x staged
    in units of WEIGHTS values, (3 XU + 1) x 16 bytes each, K at once where `smem` allows, else
    in chunks of 32 loads; two blocks per SM (the launch bounds), or fewer. b: the instance
    at b blocks an SM instead (its launch bounds, and the grid)."""
    fmt = fmt_of(w)
    N, K = w.shape
    assert x.shape[0] == 1, "qgemv_v4 takes one row of x"
    kc, shared = mk._v4_chunk(K, fmt, smem)          # as _qgemv_v4 launches it
    qs, d, _ = planes(w)
    grid = min(cdiv(N, 8 * nr), (b or 2) * cf.sm_count())
    M_.launch(v4_name(fmt, pro, nr, u, b or 2), (grid,), (256,),
              (x, qs, d, y, np.int32(N), np.int32(K), np.int32(accumulate),
               x if norm is None else norm, np.float32(1e-5), np.int32(kc)),
              shared_mem=shared)
    return y


def run_i8(M_, x, w, y, nr, u, accumulate=False, ks=None):
    """qgemv_i8 on x (M, K) and w (N, K) q8_0 or q4_0: grid (tiles, ks) as qgemv_mma's rule
    before qgemv_mma_plan (about two blocks per SM, no empty slice, a slice at most
    I8_MAX_BLOCKS blocks of 32; what the candidate was measured with), its x in
    112 bytes per block and row of x (variants.cu's i8_smem_bytes)."""
    fmt = fmt_of(w)
    N, K = w.shape
    M = x.shape[0]
    nb, tiles = K // 32, cdiv(N, 128 * nr)
    ks = ks or round(mk.MMA_BLOCKS_PER_SM * cf.sm_count() / tiles)
    ks = max(int(ks), cdiv(nb, I8_MAX_BLOCKS), 1)
    per = cdiv(nb, min(ks, nb))
    ks = cdiv(nb, per)                                  # no empty slice
    smem = 8 * (per | 1) * 112
    scratch, counters = mk._split_workspace(ks * M * N, tiles)
    qs, d, _ = planes(w)
    M_.launch(i8_name(fmt, nr, u), (tiles, ks), (256,),
              (x, qs, d, y, np.int32(M), np.int32(N), np.int32(K), np.int32(accumulate),
               scratch, counters), shared_mem=smem)
    return y


V4S_PLANS = {}          # (N, K, fmt, nr, u, ks) -> qgemv_v4s_plan's tuple, for the log


def v4s_label_plan(label, N, K, fmt):
    """(nr, u, ks) of a "splitk nr2 u2 ks4" label and qgemv_v4s_plan's tuple for (N, K) on the
    GPU's SMs (the timing skips a label whose launch repeats an earlier one's)."""
    nr, u, ks = (int(t.lstrip("nruks")) for t in label.split()[1:4])
    return (nr, u, ks), mk.qgemv_v4s_plan(N, K, fmt, nr, ks, cf.sm_count())


def run_v4s(M_, x, w, y, nr, u, ks, pro=0, norm=None, accumulate=False, pre=None):
    """qgemv_v4s on one row of x (1, K, or 1, 2K with the SwiGLU prologue) and w (N, K) q4_0 or
    q8_0: grid (tiles, slices) by the package's qgemv_v4s_plan and _split_workspace: the
    package's launch (_qgemv_v4s) at any NR, U and ks.
    pre "pair": v4_digits stages x's digits for the whole row, then qgemv_v4s_pre copies its
    slice of them; "kept": the same, but the digits of this x object are made once and kept
    (so that a timing captures the GEMV alone)."""
    assert norm is None and pro != 1, "qgemv_v4s has no RMSNorm prologue"
    fmt = fmt_of(w)
    N, K = w.shape
    assert x.shape[0] == 1, "qgemv_v4s takes one row of x"
    slices, per, rows, tiles = mk.qgemv_v4s_plan(N, K, fmt, nr, ks, cf.sm_count())
    V4S_PLANS[(N, K, fmt, nr, u, ks)] = (slices, per, rows, tiles)
    partial, counters = mk._split_workspace(slices * N, tiles)
    qs, d, _ = planes(w)
    src = x if pre is None else stage_v4_digits(M_, x, K, fmt, pro, keep=pre == "kept")
    M_.launch(v4s_name(fmt, pro, nr, u, pre is not None), (tiles, slices), (256,),
              (src, qs, d, y, np.int32(N), np.int32(K), np.int32(accumulate), np.int32(rows),
               np.int32(per), partial, counters) + (() if pre else (np.int32(0),)),   # in order
              shared_mem=mk._v4_staged_bytes(WEIGHTS[fmt], per) + mk.v4_pair_scratch(WEIGHTS[fmt]))
    return y


V4_DIGITS = {}          # "kept": (x, K, fmt, pro) -> the digits; the x held, so its id stays its


def stage_v4_digits(M_, x, K, fmt, pro, keep=False):
    """x's digits for the whole row (variants.cu's v4_digits): (3 XU + 1) K / WEIGHTS uint4s.
    keep: made once per x object (and the prologue), then returned as they are."""
    key = (id(x), K, fmt, pro)
    if keep and key in V4_DIGITS:
        return V4_DIGITS[key][1]
    cp = cf.require_cupy()
    L = K // WEIGHTS[fmt]
    digits = cp.empty((3 * V4_XU[fmt] + 1) * L * 4, dtype=np.uint32)
    M_.launch(v4_digits_name(fmt, pro), (cdiv(L * WEIGHTS[fmt] // 4, 256),), (256,),
              (x, np.int32(K), digits))
    if keep:
        V4_DIGITS.clear()                          # one x at a time
        V4_DIGITS[key] = (x, digits)
    return digits


def tc_ks(N, K, fmt, sms):
    """Warps per 16-row tile: split k until the grid has two blocks per SM, while each
    slice keeps two chunk groups."""
    ks, span, tiles = 1, 4 * WEIGHTS[fmt], cdiv(N, 16)
    while ks < 8 and cdiv(tiles, 8 // ks) < 2 * sms and K >= 2 * span * (2 * ks):
        ks *= 2
    return ks


def run_tc(M_, x, w, y, nb_set, u, pro=0, norm=None, accumulate=False, smem=V2_SMEM, ks=None):
    fmt = fmt_of(w)
    N, K = w.shape
    M = x.shape[0]
    nb = next((b for b in sorted(nb_set) if 8 * b >= M), max(nb_set))
    rows, span = 8 * nb, 4 * WEIGHTS[fmt]
    ks = ks or tc_ks(N, K, fmt, cf.sm_count())

    def bytes_for(kc):
        return 2 * rows * (cdiv(kc, span) * span + TC_XPAD[fmt]) * 4
    kc = K if bytes_for(K) <= smem else max(span, (smem // (8 * rows) - TC_XPAD[fmt]) // span * span)
    qs, d, _ = planes(w)
    tiles = cdiv(N, 16)
    grid = min(cdiv(tiles, 8 // ks), 2 * cf.sm_count())
    M_.launch(tc_name(fmt, nb, pro, u), (grid,), (256,),
              (x, qs, d, y, np.int32(M), np.int32(N), np.int32(K), np.int32(accumulate),
               x if norm is None else norm, np.float32(1e-5), np.int32(kc), np.int32(ks)),
              shared_mem=bytes_for(kc))
    return y


def candidates(fmt, M):
    """(label, call(M_, x, w, y, **prologue)) of every candidate for a format and batch."""
    out = []
    if fmt == "f32":
        out.append(("gemv", lambda M_, x, w, y, **k: mk.gemv(x, w, out=y, version=1, **k)))
        out.append(("product", lambda M_, x, w, y, **k: mk.gemv(x, w, out=y, **k)))
    else:
        for bps, smem in ((2, 96 << 10), (1, 200 << 10)):
            out.append((f"v1 bps{bps}", lambda M_, x, w, y, bps=bps, smem=smem, **k:
                        mk.qgemv(x, w, out=y, blocks_per_sm=bps, smem=smem, version=1, **k)))
        out.append(("product", lambda M_, x, w, y, **k: mk.qgemv(x, w, out=y, **k)))
    for f, rows, nr, u in v2_instances():
        if f != fmt or (rows == 1) != (M == 1):
            continue
        rows_set = {r for f2, r, n2, u2 in v2_instances() if f2 == fmt and (n2, u2) == (nr, u)
                    and (r == 1) == (M == 1)}
        if M == 1 or rows == max(rows_set):
            out.append((f"v2 nr{nr} u{u}" + ("" if M == 1 else f" rows<={max(rows_set)}"),
                        lambda M_, x, w, y, nr=nr, u=u, rs=frozenset(rows_set), **k:
                        run_v2(M_, x, w, y, nr, u, rs, **_pro(k))))
    if fmt in TC_FMT:
        for u in TC_U:
            out.append((f"tc u{u}", lambda M_, x, w, y, u=u, **k: run_tc(M_, x, w, y, TC_NB, u,
                                                                          **_pro(k))))
    if fmt in V3_FMT and M == 1:
        for nr, st, wp in V3_SHAPES:
            out.append((f"v3 nr{nr} s{st} w{wp}", lambda M_, x, w, y, nr=nr, st=st, wp=wp, **k:
                        run_v3(M_, x, w, y, nr, st, wp, **_plain(k))))
    if fmt in V4_FMT and M == 1:
        for nr, u in V4_SHAPES:
            out.append((f"v4 nr{nr} u{u}", lambda M_, x, w, y, nr=nr, u=u, **k:
                        run_v4(M_, x, w, y, nr, u, **_pro(k))))
    if fmt in V4_FMT and M == 1:
        for nr, u, b in V4B_SHAPES:
            out.append((f"v4b nr{nr} u{u} b{b}", lambda M_, x, w, y, nr=nr, u=u, b=b, **k:
                        run_v4(M_, x, w, y, nr, u, b=b, **_pro(k))))
    if fmt in V4_FMT and M == 1:
        for nr, u in V4S_SHAPES:
            for ks in V4S_KS:
                out.append((f"splitk nr{nr} u{u} ks{ks}", lambda M_, x, w, y, nr=nr, u=u, ks=ks,
                            **k: run_v4s(M_, x, w, y, nr, u, ks, **_pro(k))))
            for ks in V4S_PRE_KS:
                for pre in ("pair", "kept"):
                    out.append((f"splitk nr{nr} u{u} ks{ks} {pre}",
                                lambda M_, x, w, y, nr=nr, u=u, ks=ks, pre=pre, **k:
                                run_v4s(M_, x, w, y, nr, u, ks, pre=pre, **_pro(k))))
    if fmt in I8_FMT and M > 1:
        for nr, u in I8_SHAPES:
            out.append((f"i8 nr{nr} u{u}", lambda M_, x, w, y, nr=nr, u=u, **k:
                        run_i8(M_, x, w, y, nr, u, **_plain(k))))
    if fmt == "f32":
        out.append(("cublas", lambda M_, x, w, y, **k: cf.require_cupy().matmul(x, w.T, out=y)))
    return out


def _plain(k):
    """The wrappers' keywords for qgemv_v3 and qgemv_i8, which have no prologue: accumulate=
    only."""
    assert k.get("norm") is None and not k.get("swiglu"), "qgemv_v3 and qgemv_i8 have no prologue"
    return dict(accumulate=k.get("accumulate", False))


FAMILIES = ("v1", "v2", "v3", "v4", "product", "tc", "gemv", "cublas", "gemm", "i8", "splitk",
            "v4b")
SHAPE_NAMES = ("wqkv", "wo", "w13", "w2", "cls")


class Only:
    """What --only, --formats and --rows select: candidate families, weight formats, batch
    sizes (None: all of them, the default)."""

    def __init__(self, families=None, formats=None, rows=None, shapes=None):
        self.families, self.formats, self.rows, self.shapes = families, formats, rows, shapes

    def family(self, name):
        return self.families is None or name in self.families

    def fmts(self, fmts):
        return [f for f in fmts if self.formats is None or f in self.formats]

    def batches(self, ms):
        return [m for m in ms if self.rows is None or m in self.rows]

    def shape(self, tag):
        """Whether to time the matrix `tag` ("7B wo", "stories15M w2": its last word)."""
        return self.shapes is None or tag.split()[-1] in self.shapes

    def candidates(self, fmt, M):
        return [(label, call) for label, call in candidates(fmt, M)
                if self.family(label.split()[0])]


def _pro(k):
    """The wrappers' keywords (norm=, swiglu=, accumulate=) as run_v2 / run_tc take them."""
    norm, swiglu = k.get("norm"), k.get("swiglu", False)
    pro = 1 if norm is not None else 2 if swiglu else 0
    return dict(pro=pro, norm=norm, accumulate=k.get("accumulate", False))


# ----------------------------------------------------------------------------
# checks against float64

def random_weight(fmt, N, K, rng):
    """A random (N, K) weight on the GPU in `fmt` ("f32": a float32 array, else a Packed),
    with its float64 reference."""
    if fmt == "f32":
        w_host = rng.standard_normal((N, K), dtype=np.float32)
        return cf.require_cupy().asarray(w_host), w_host.astype(np.float64)
    w_host = cf.random_packed(fmt, N, K, rng)
    return cf.to_device(w_host), formats.dequantize(w_host).astype(np.float64)


def check_all(M_, ch, rng, log, only=Only()):
    cp = cf.require_cupy()
    from minillama.model import rms_norm, silu
    sizes = [(3, 96), (17, 4128), (127, 1024), (1001, 2080), (33, 11008)]
    for fmt in only.fmts(("f32",) + QUANT):
        for N, K in sizes + ([(77, 1000), (300, 4104)] if fmt in ("f32", "f16", "bf16") else []):
            w, w64 = random_weight(fmt, N, K, rng)
            for M in only.batches((1, 3, 8, 13, 32, 64)):
                x = rng.standard_normal((M, K), dtype=np.float32)
                ref = x.astype(np.float64) @ w64.T
                xd = cp.asarray(x)
                for label, call in only.candidates(fmt, M):
                    if label in ("cublas", "gemv", "product") or label.startswith("v1"):
                        continue                   # checked by check_formats / test_cuda
                    y = call(M_, xd, w, cf.poison((M, N)))
                    ch.add(f"{label.split()[0]} {fmt} [{label}] M={M} N={N} K={K}",
                           cf.rel_err(y, ref), 1e-5)
                # chunked x (a small shared-memory budget)
                if M in (3, 13) and K >= 2080:
                    for nr, u in V2_SMALL[:1] if only.family("v2") else []:
                        y = run_v2(M_, xd, w, cf.poison((M, N)), 2, 4, {1}, smem=1) \
                            if (fmt, 1, 2, 4) in v2_instances() else None
                        if y is not None:
                            ch.add(f"v2-chunked {fmt} M={M} N={N} K={K}", cf.rel_err(y, ref), 1e-5)
                    if fmt in TC_FMT and only.family("tc"):
                        y = run_tc(M_, xd, w, cf.poison((M, N)), TC_NB, 2, smem=1)
                        ch.add(f"tc-chunked {fmt} M={M} N={N} K={K}", cf.rel_err(y, ref), 1e-5)
                        y = run_tc(M_, xd, w, cf.poison((M, N)), TC_NB, 2, ks=8)
                        ch.add(f"tc-ks8 {fmt} M={M} N={N} K={K}", cf.rel_err(y, ref), 1e-5)
        log(f"  checked {fmt}")
    if only.family("v3"):
        check_v3(M_, ch, rng, only.fmts(tuple(V3_FMT)))
        log("  checked v3 at K = 32, accumulate")
    if only.family("v4"):
        check_v4(M_, ch, rng, only.fmts(tuple(V4_FMT)))
        log("  checked v4: prologues, accumulate, chunks, x over 80 binades, zeros, NaN")
    if only.family("v4b"):
        check_v4(M_, ch, rng, only.fmts(tuple(V4_FMT)), shapes=V4B_SHAPES)
        log("  checked v4b: the same, every (NR, U, B)")
    if only.family("i8"):
        check_i8(M_, ch, rng, only.fmts(tuple(I8_FMT)))
        log("  checked i8: k splits, accumulate, x over 80 binades, zeros, NaN")
    if only.family("splitk") and only.batches((1,)):
        check_v4s(M_, ch, rng, only.fmts(tuple(V4_FMT)))
        log("  checked splitk: 1 to 10 slices, SwiGLU, accumulate, x over 80 binades, zeros, NaN, "
            "replays bit for bit")
    # the prologues and accumulate, on the instances compiled with them
    N, K = 129, 2048
    for fmt in only.fmts(("f32", "q8_0", "q4_0", "q4_1", "f16", "bf16")):
        if not (only.family("v2") or only.family("tc")):
            break
        w, w64 = random_weight(fmt, N, K, rng)
        for M in only.batches((1, 5, 8)):
            x = rng.standard_normal((M, K), dtype=np.float32)
            g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
            h = (2 * rng.standard_normal((M, 2 * K))).astype(np.float32)
            h64 = h.astype(np.float64)
            refs = {1: rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5) @ w64.T,
                    2: (silu(h64[:, :K]) * h64[:, K:]) @ w64.T}
            for pro in (1, 2):
                xin = cp.asarray(x if pro == 1 else h)
                norm = cp.asarray(g) if pro == 1 else None
                if fmt in ("f32", "q8_0", "q4_0", "q4_1") and (M == 1 or fmt == "f32") \
                        and only.family("v2"):
                    rows, nr, u = (8, 4, 1) if fmt == "f32" else (1, 2, 4)
                    y = run_v2(M_, xin, w, cf.poison((M, N)), nr, u, {rows}, pro=pro, norm=norm)
                    ch.add(f"v2-prologue{pro} {fmt} M={M}", cf.rel_err(y, refs[pro]), 1e-5)
                if fmt in TC_FMT and only.family("tc"):
                    y = run_tc(M_, xin, w, cf.poison((M, N)), (1,), 2, pro=pro, norm=norm)
                    ch.add(f"tc-prologue{pro} {fmt} M={M}", cf.rel_err(y, refs[pro]), 1e-5)
            y0 = rng.standard_normal((M, N), dtype=np.float32)
            ref = y0 + x.astype(np.float64) @ w64.T
            if fmt != "f32" and fmt != "bf16" and only.family("v2"):
                y = cp.asarray(y0)
                run_v2(M_, cp.asarray(x), w, y, 2, 4, {1}, accumulate=True)
                ch.add(f"v2-accumulate {fmt} M={M}", cf.rel_err(y, ref), 1e-5)
            if fmt in TC_FMT and only.family("tc"):
                y = cp.asarray(y0)
                run_tc(M_, cp.asarray(x), w, y, TC_NB, 2, accumulate=True, smem=1)
                ch.add(f"tc-accumulate {fmt} M={M}", cf.rel_err(y, ref), 1e-5)
    # gemm_v5's other tile shapes, against float64 of the float16 inputs
    for wfmt in ("f16", "q4_0") if only.family("gemm") else ():
        for M, N, K in [(37, 127, 96), (300, 1000, 4128), (129, 77, 1000)]:
            if K % 32 and wfmt == "q4_0":
                continue
            w_host = cf.random_packed(wfmt, N, K, rng)
            x = rng.standard_normal((M, K), dtype=np.float32)
            wr = formats.dequantize(w_host)
            wr = wr.astype(np.float16) if wfmt != "f16" else wr
            ref = x.astype(np.float16).astype(np.float64) @ wr.astype(np.float64).T
            a16 = cp.asarray(x.astype(np.float16))
            for bm, bn, s in GEMM_SHAPES:
                c = run_gemm(M_, a16, cf.to_device(w_host), cf.poison((M, N)), bm, bn, s)
                ch.add(f"gemm_v5 {wfmt} {bm}x{bn}x{s} {M}x{N}x{K}", cf.rel_err(c, ref), 2e-3)
    log("  checked prologues, accumulate, gemm_v5 shapes")


def check_v4(M_, ch, rng, fmts, shapes=None):
    """qgemv_v4 beyond check_all's sizes: the prologues, accumulate, x in chunks (a small
    shared-memory budget), x whose values span 2^-40 .. 2^40 (each unit scaled on its own) with
    a unit of zeros, and a NaN in x, which must reach the rows it meets. shapes: the v4b
    family's (NR, U, B) instead of v4's first two (NR, U)."""
    cp = cf.require_cupy()
    from minillama.model import rms_norm, silu
    for fmt in fmts:
        N, K = 129, 2080
        w, w64 = random_weight(fmt, N, K, rng)
        x = rng.standard_normal((1, K), dtype=np.float32)
        g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
        h = (2 * rng.standard_normal((1, 2 * K))).astype(np.float32)
        h64 = h.astype(np.float64)
        wide = (x * 2.0 ** rng.integers(-40, 40, (1, K))).astype(np.float32)
        wide[0, 64:96] = 0.0
        y0 = rng.standard_normal((1, N), dtype=np.float32)
        cases = [("rmsnorm", dict(pro=1, norm=cp.asarray(g)), x,
                  rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5) @ w64.T),
                 ("swiglu", dict(pro=2), h, (silu(h64[:, :K]) * h64[:, K:]) @ w64.T),
                 ("chunked", dict(smem=1), x, x.astype(np.float64) @ w64.T),
                 ("wide x", {}, wide, wide.astype(np.float64) @ w64.T)]
        for nr, u, b in shapes or [(nr, u, None) for nr, u in V4_SHAPES[:2]]:
            tag = f"v4b {fmt} [nr{nr} u{u} b{b}]" if b else f"v4 {fmt} [nr{nr} u{u}]"
            for label, kw, xin, ref in cases:
                # (v4's prologue instances are compiled for NR 2 only; v4b's for every shape)
                y = run_v4(M_, cp.asarray(xin), w, cf.poison((1, N)), nr, u, b=b, **kw) \
                    if kw.get("pro", 0) == 0 or nr == 2 or b else None
                if y is not None:
                    ch.add(f"{tag} {label}", cf.rel_err(y, ref), 1e-5)
            y = cp.asarray(y0)
            run_v4(M_, cp.asarray(x), w, y, nr, u, accumulate=True, b=b)
            ch.add(f"{tag} accumulate", cf.rel_err(y, y0 + x.astype(np.float64) @ w64.T), 1e-5)
        bad = x.copy()
        bad[0, 100] = np.nan                         # unit 100 // WEIGHTS: every row meets it
        y = run_v4(M_, cp.asarray(bad), w, cp.zeros((1, N), dtype=np.float32), 2, 4).get()
        ch.add(f"v4 {fmt} NaN in x reaches every row", 0.0 if np.isnan(y).all() else 1.0, 0.5)


def check_i8(M_, ch, rng, fmts):
    """qgemv_i8 beyond check_all's sizes: k splits from 2 to one block a slice, accumulate,
    x whose values span 2^-40 .. 2^40 (each unit of 32 scaled on its own) with a unit of zeros,
    and a NaN in x, which must reach every output of its row of x and no other."""
    cp = cf.require_cupy()
    for fmt in fmts:
        N, K, M = 300, 2080, 13
        w, w64 = random_weight(fmt, N, K, rng)
        x = rng.standard_normal((M, K), dtype=np.float32)
        wide = (x * 2.0 ** rng.integers(-40, 40, (M, K))).astype(np.float32)
        wide[:, 64:96] = 0.0
        y0 = rng.standard_normal((M, N), dtype=np.float32)
        for nr, u in I8_SHAPES:
            tag = f"i8 {fmt} [nr{nr} u{u}]"
            for ks in (2, 7, K // 32):       # (one slice is 64 blocks at most: K needs 2)
                y = run_i8(M_, cp.asarray(x), w, cf.poison((M, N)), nr, u, ks=ks)
                ch.add(f"{tag} ks={ks}", cf.rel_err(y, x.astype(np.float64) @ w64.T), 1e-5)
            y = run_i8(M_, cp.asarray(wide), w, cf.poison((M, N)), nr, u)
            ch.add(f"{tag} wide x", cf.rel_err(y, wide.astype(np.float64) @ w64.T), 1e-5)
            y = cp.asarray(y0)
            run_i8(M_, cp.asarray(x), w, y, nr, u, accumulate=True)
            ch.add(f"{tag} accumulate", cf.rel_err(y, y0 + x.astype(np.float64) @ w64.T), 1e-5)
        bad = x.copy()
        bad[5, 100] = np.nan
        y = run_i8(M_, cp.asarray(bad), w, cp.zeros((M, N), dtype=np.float32), 1, 4).get()
        ok = np.isnan(y[5]).all() and not np.isnan(np.delete(y, 5, axis=0)).any()
        ch.add(f"i8 {fmt} NaN in x reaches its row of x only", 0.0 if ok else 1.0, 0.5)


def check_v4s(M_, ch, rng, fmts):
    """qgemv_v4s beyond check_all's sizes (which take its plans on odd N and K): 1, 2, 3 and 10
    slices (the last: one 32-load sweep a slice, and a last slice of 1 or 2 loads), the SwiGLU
    prologue with accumulate (w2's launch),
    accumulate alone (wo's), x whose values span 2^-40 .. 2^40 with a unit of zeros, a NaN in x
    (it must reach every row), and a second launch equal bit for bit to the first (the counters
    are left at zero, the sum is in slice order whatever block is last)."""
    cp = cf.require_cupy()
    from minillama.model import silu
    for fmt in fmts:
        N, K = 1001, 9 * 32 * WEIGHTS[fmt] + 32           # 9 sweeps and a piece: 10 slices
        w, w64 = random_weight(fmt, N, K, rng)
        x = rng.standard_normal((1, K), dtype=np.float32)
        h = (2 * rng.standard_normal((1, 2 * K))).astype(np.float32)
        h64 = h.astype(np.float64)
        wide = (x * 2.0 ** rng.integers(-40, 40, (1, K))).astype(np.float32)
        wide[0, 64:96] = 0.0
        y0 = rng.standard_normal((1, N), dtype=np.float32)
        ref = x.astype(np.float64) @ w64.T
        for nr, u in V4S_SHAPES:
            for ks in (1, 2, 3, 10):
                tag = f"splitk {fmt} [nr{nr} u{u} ks{ks}]"
                y = run_v4s(M_, cp.asarray(x), w, cf.poison((1, N)), nr, u, ks)
                ch.add(f"{tag} N={N} K={K}", cf.rel_err(y, ref), 1e-5)
                y = cp.asarray(y0)
                run_v4s(M_, cp.asarray(h), w, y, nr, u, ks, pro=2, accumulate=True)
                ch.add(f"{tag} swiglu accumulate",
                       cf.rel_err(y, y0 + (silu(h64[:, :K]) * h64[:, K:]) @ w64.T), 1e-5)
            y = cp.asarray(y0)
            run_v4s(M_, cp.asarray(x), w, y, nr, u, 4, accumulate=True)
            ch.add(f"splitk {fmt} [nr{nr} u{u} ks4] accumulate", cf.rel_err(y, y0 + ref), 1e-5)
            y = run_v4s(M_, cp.asarray(wide), w, cf.poison((1, N)), nr, u, 4)
            ch.add(f"splitk {fmt} [nr{nr} u{u} ks4] wide x",
                   cf.rel_err(y, wide.astype(np.float64) @ w64.T), 1e-5)
            first = run_v4s(M_, cp.asarray(x), w, cf.poison((1, N)), nr, u, 10).get()
            again = run_v4s(M_, cp.asarray(x), w, cf.poison((1, N)), nr, u, 10).get()
            ch.add(f"splitk {fmt} [nr{nr} u{u} ks10] second launch bit for bit",
                   0.0 if np.array_equal(first.view(np.uint32), again.view(np.uint32)) else 1.0,
                   0.5)
            # the digits staged by v4_digits are v4_stage_pairs's, bit for bit, SwiGLU included
            for pro, xin in ((0, x), (2, h)):
                plain = run_v4s(M_, cp.asarray(xin), w, cf.poison((1, N)), nr, u, 4, pro=pro).get()
                pair = run_v4s(M_, cp.asarray(xin), w, cf.poison((1, N)), nr, u, 4, pro=pro,
                               pre="pair").get()
                ch.add(f"splitk {fmt} [nr{nr} u{u} ks4] pair{' swiglu' if pro else ''} = plain, "
                       f"bit for bit",
                       0.0 if np.array_equal(plain.view(np.uint32), pair.view(np.uint32)) else 1.0,
                       0.5)
        bad = x.copy()
        bad[0, 100] = np.nan                             # one unit of one slice: every row meets it
        for pre in (None, "pair"):
            y = run_v4s(M_, cp.asarray(bad), w, cp.zeros((1, N), dtype=np.float32), 2, 2, 4,
                        pre=pre).get()
            ch.add(f"splitk {fmt} {pre or ''} NaN in x reaches every row",
                   0.0 if np.isnan(y).all() else 1.0, 0.5)


def check_v3(M_, ch, rng, fmts):
    """qgemv_v3 beyond check_all's sizes: K = 32 (one scale per row, so every row's scales start
    off a 16-byte piece) and N under a tile, and accumulate, in every launch shape."""
    cp = cf.require_cupy()
    for fmt in fmts:
        for N, K, acc in ((1, 32, False), (5, 32, False), (37, 32, True), (129, 2048, True),
                          (1001, 2080, True)):
            w, w64 = random_weight(fmt, N, K, rng)
            x = rng.standard_normal((1, K), dtype=np.float32)
            y0 = rng.standard_normal((1, N), dtype=np.float32)
            ref = x.astype(np.float64) @ w64.T + (y0 if acc else 0)
            for nr, st, wp in V3_SHAPES:
                y = cp.asarray(y0) if acc else cf.poison((1, N))
                run_v3(M_, cp.asarray(x), w, y, nr, st, wp, accumulate=acc)
                ch.add(f"v3 {fmt} [nr{nr} s{st} w{wp}]{' accumulate' if acc else ''} N={N} K={K}",
                       cf.rel_err(y, ref), 1e-5)


def run_gemm(M_, a16, w, c, bm, bn, stages):
    main, d, m = planes(w)
    (M, K), N = a16.shape, w.shape[0]
    M_.launch(f"gemm_v5<{bm},{bn},{stages},{mk.GEMM_V5_FORMATS[w.format]}>",
              (cdiv(N, bn), cdiv(M, bm)), (256,),
              (a16, main, d, m, c, np.int32(M), np.int32(N), np.int32(K)),
              shared_mem=stages * (bm + bn) * 64)
    return c


# ----------------------------------------------------------------------------
# timing

SHAPES_7B = [("7B wqkv", 12288, 4096), ("7B wo", 4096, 4096), ("7B w13", 22016, 4096),
             ("7B w2", 4096, 11008), ("7B cls", 32000, 4096)]
# (name, N, K, count per token): stories15M dim 288 hidden 768 6 layers; 110M 768, 2048, 12
SHAPES_STORIES = {
    "stories15M": [("wqkv", 864, 288, 6), ("wo", 288, 288, 6), ("w13", 1536, 288, 6),
                   ("w2", 288, 768, 6), ("cls", 32000, 288, 1)],
    "stories110M": [("wqkv", 2304, 768, 12), ("wo", 768, 768, 12), ("w13", 4096, 768, 12),
                    ("w2", 768, 2048, 12), ("cls", 32000, 768, 1)],
}
LAYERS_7B = {"7B wqkv": 32, "7B wo": 32, "7B w13": 32, "7B w2": 32, "7B cls": 1}


def time_shape(M_, log, bw, rows, tag, N, K, fmts, batches, deadline, only=Only(),
               prologues=False):
    """Time every candidate on the matrix (N, K) in each format and batch. prologues: each
    matrix as the decode step launches it (wo and w2 accumulate, w2 with the SwiGLU prologue on
    x of 2K; wqkv, w13 and the classifier with the RMSNorm prologue)."""
    cp = cf.require_cupy()
    if not only.shape(tag):
        return
    name = tag.split()[-1]
    kw = dict(accumulate=True, swiglu=name == "w2") if prologues and name in ("wo", "w2") else {}
    if prologues and name in ("wqkv", "w13", "cls"):
        kw = dict(norm=cp.asarray(1 + 0.1 * np.random.default_rng(0).standard_normal(K),
                                  dtype=np.float32))
    # the results' name of the launch: the keywords given and not False ("accumulate swiglu",
    # "norm"); norm's value is a CuPy array, which has no truth value
    prologue = " ".join(sorted(k for k, v in kw.items() if v is not False))
    for fmt in only.fmts(fmts):
        batches_ = [M for M in only.batches(batches) if only.candidates(fmt, M)]
        if not batches_:
            continue
        if time.perf_counter() > deadline:
            log(f"  deadline: skipped {tag} {fmt}")
            continue
        w = cf.random_packed_gpu(fmt, N, K)
        wbytes = w.nbytes
        copies = [w] + [w.copy() if fmt == "f32" else w.map(lambda a: a.copy())
                        for _ in range(min(COPIES, cdiv(400 << 20, wbytes)) - 1)]
        for M in batches_:
            x = cp.random.standard_normal((M, 2 * K if kw.get("swiglu") else K), dtype=np.float32)
            y = cp.zeros((M, N), np.float32)
            nbytes = wbytes + x.nbytes + y.nbytes * (2 if kw.get("accumulate") else 1)
            launches = set()                       # splitk's (nr, u, plan, pair/kept) timed
            for label, call in only.candidates(fmt, M):
                if label.startswith("splitk"):     # ks beyond K / WEIGHTS / 32 repeats a plan
                    (nr, u, _), plan = v4s_label_plan(label, N, K, fmt)
                    key = (nr, u, plan, tuple(label.split()[4:]))
                    if key in launches:
                        continue
                    launches.add(key)
                try:
                    calls = [lambda c=c: call(M_, x, c, y, **kw) for c in copies]
                    if label == "cublas":          # cuBLAS refuses a graph capture in CuPy
                        t = cf.median_time(lambda: [f() for f in calls], reps=3) / len(calls)
                    else:
                        t = cf.graph_time(calls, replays=3, repeats=3)
                except Exception as e:             # report, keep going
                    log(f"  {tag} {fmt} M={M} {label}: failed ({type(e).__name__}: {e})")
                    continue
                rows.append(dict(shape=tag, fmt=fmt, N=N, K=K, M=M, variant=label,
                                 us=t * 1e6, gbs=nbytes / t / 1e9, frac=nbytes / t / bw,
                                 bytes=nbytes, prologue=prologue))
        del copies, w
        cp.get_default_memory_pool().free_all_blocks()


def time_gemm(M_, log):
    cp = cf.require_cupy()
    M = N = K = GEMM_SIZE
    flop = 2 * M * N * K
    a16 = cp.random.standard_normal((M, K), dtype=np.float32).astype(np.float16)
    w16 = cp.random.standard_normal((N, K), dtype=np.float32).astype(np.float16)
    rows = []
    t = cf.median_time(lambda: cp.matmul(a16, w16.T))
    rows.append(dict(name="cuBLAS f16 (cupy.matmul)", tflops=flop / t / 1e12, us=t * 1e6))
    for wfmt in ("f16", "q4_0"):
        w = cf.random_packed_gpu(wfmt, N, K)
        c = cp.empty((M, N), np.float32)
        for bm, bn, s in GEMM_SHAPES:
            t = cf.median_time(lambda: run_gemm(M_, a16, w, c, bm, bn, s))
            rows.append(dict(name=f"gemm_v5 {wfmt} {bm}x{bn}x{s}", tflops=flop / t / 1e12,
                             us=t * 1e6))
    t = cf.median_time(lambda: cp.matmul(a16, w16.T))      # cuBLAS again: clocks drift
    rows.append(dict(name="cuBLAS f16 again", tflops=flop / t / 1e12, us=t * 1e6))
    return rows


# ----------------------------------------------------------------------------
# tables

def best(rows, **key):
    sel = [r for r in rows if all(r[k] == v for k, v in key.items())]
    return min(sel, key=lambda r: r["us"]) if sel else None


def print_tables(res, log, record):
    """The full table into the log file only (record), the best of each and the sums to both."""
    bw, rows = res["copy_gbs"], res["gemv"]
    record("")
    record(f"GEMV, fraction of the copy bandwidth ({bw:.0f} GB/s) per candidate; "
           f"best per (shape, format, batch) marked *")
    record(f"{'shape':16s} {'fmt':5s} {'M':>3s} {'variant':24s} {'us':>9s} {'GB/s':>6s} {'frac':>5s}"
           f" {'vs v1/gemv':>10s}")
    keys = sorted({(r["shape"], r["fmt"], r["M"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2]))
    for shape, fmt, M in keys:
        sel = [r for r in rows if (r["shape"], r["fmt"], r["M"]) == (shape, fmt, M)]
        base = best(sel, variant="gemv") if fmt == "f32" else \
            min((r for r in sel if r["variant"].startswith("v1")), key=lambda r: r["us"], default=None)
        top = min(sel, key=lambda r: r["us"])
        for r in sorted(sel, key=lambda r: r["us"]):
            speed = f"{base['us'] / r['us']:10.2f}" if base else ""
            record(f"{shape:16s} {fmt:5s} {M:3d} {r['variant']:24s} {r['us']:9.1f} {r['gbs']:6.0f} "
                   f"{r['frac']:5.2f} {speed}{' *' if r is top else ''}")
    log("")
    log(f"GEMV, the best candidate of each (shape, format, batch): us, fraction of the copy "
        f"bandwidth ({bw:.0f} GB/s), and v1's or gemv's (cuBLAS for float32)")
    for shape, fmt, M in keys:
        sel = [r for r in rows if (r["shape"], r["fmt"], r["M"]) == (shape, fmt, M)]
        top = min(sel, key=lambda r: r["us"])
        base = [r for r in sel if r["variant"] == "gemv" or r["variant"].startswith("v1")]
        base = min(base, key=lambda r: r["us"]) if base else None
        cub = [r for r in sel if r["variant"] == "cublas"]
        log(f"{shape:16s} {fmt:5s} {M:2d} {top['variant']:22s} {top['us']:8.1f} {top['frac']:5.2f}"
            + (f" | v1/gemv {base['us']:8.1f} {base['frac']:5.2f}" if base else "")
            + (f" | cuBLAS {cub[0]['us']:8.1f}" if cub else ""))
    # the summaries the issues' targets are about
    log("")
    log("Per token, matmuls only (sum over the model's matrices of the best candidate; "
        "v1/gemv = the previous kernels, product = the package's choice)")
    for model, shapes in [("7B", [(s, n, k, LAYERS_7B[s]) for s, n, k in SHAPES_7B])] + \
            [(m, [(f"{m} {s}", n, k, c) for s, n, k, c in sh]) for m, sh in SHAPES_STORIES.items()]:
        for fmt in ("f32",) + QUANT:
            for M in (1, 8, 32):
                tot_best = tot_base = tot_cublas = tot_bytes = tot_product = 0.0
                complete = True
                for s, n, k, count in shapes:
                    sel = [r for r in rows if (r["shape"], r["fmt"], r["M"]) == (s, fmt, M)]
                    if not sel:
                        complete = False
                        break
                    b = min(sel, key=lambda r: r["us"])
                    base = [r for r in sel if r["variant"] in ("gemv",) or r["variant"].startswith("v1")]
                    cub = [r for r in sel if r["variant"] == "cublas"]
                    product = [r["us"] for r in sel if r["variant"] == "product"]
                    tot_product += count * product[0] if product else float("nan")
                    tot_best += count * b["us"]
                    tot_base += count * min(r["us"] for r in base) if base else float("nan")
                    tot_cublas += count * cub[0]["us"] if cub else 0.0
                    tot_bytes += count * b["bytes"]
                if not complete:
                    continue
                extra = f", cuBLAS {tot_cublas:8.1f} us ({tot_cublas / tot_best:4.2f}x)" \
                    if tot_cublas else ""
                log(f"  {model:11s} {fmt:5s} M={M:2d}: best {tot_best:8.1f} us "
                    f"({tot_bytes / tot_best / 1e3 / bw:4.2f} of copy), v1/gemv {tot_base:8.1f} us, "
                    f"product {tot_product:8.1f} us ({tot_bytes / tot_product / 1e3 / bw:4.2f})"
                    f"{extra}")
    if "gemm" in res:
        log("")
        log(f"GEMM {GEMM_SIZE}^3, float16 inputs")
        cublas = res["gemm"][0]["tflops"]
        for r in res["gemm"]:
            log(f"  {r['name']:28s} {r['us']:8.0f} us {r['tflops']:7.1f} TFLOP/s "
                f"{r['tflops'] / cublas:5.2f} of cuBLAS")


def print_variant_sums(res, log):
    """Issue 10's figure for every candidate launch: the Llama-2-7B decode's matmuls at batch 1
    (each matrix times its count per token), in us and as a fraction of the copy bandwidth."""
    bw, rows = res["copy_gbs"], res["gemv"]
    log("")
    log("7B per token at batch 1, matmuls only, per candidate: us, fraction of the copy bandwidth, "
        "and per matrix (wqkv wo w13 w2 cls)")
    for fmt in sorted({r["fmt"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows if r["fmt"] == fmt and r["M"] == 1}):
            per = [best(rows, shape=s, fmt=fmt, M=1, variant=variant) for s, _, _ in SHAPES_7B]
            if None in per:
                continue
            us = sum(LAYERS_7B[r["shape"]] * r["us"] for r in per)
            nbytes = sum(LAYERS_7B[r["shape"]] * r["bytes"] for r in per)
            log(f"  {fmt:5s} {variant:22s} {us:8.1f} us {nbytes / us / 1e3 / bw:5.2f} | "
                + " ".join(f"{r['frac']:4.2f}" for r in per))


def print_wait_order(folder, log):
    """wait_order.py's listing for the variants' cubins in `folder` (the package's groups,
    pkg-*, are wait_order.py's own): per kernel that waits, its global loads in SASS order, R a
    read-only one, 4 a 16-byte one, WAIT griddepcontrol.wait."""
    import subprocess
    import nvrtc_build
    import wait_order
    nvdisasm = nvrtc_build.find_cuda_file("NVDISASM", "nvdisasm", "bin", "nvdisasm")
    for path in sorted(folder.glob("*.cubin")):
        if path.name.startswith("pkg-"):
            continue
        lowered = {v: k for k, v in json.loads(path.with_suffix(".json").read_text()).items()}
        sass = subprocess.run([nvdisasm, "-c", str(path)], check=True, capture_output=True,
                              text=True).stdout
        for name, order in wait_order.load_orders(sass).items():
            if name in lowered:                   # not the extern "C" kernels every module has
                log(f"{lowered[name]}\n    {order}")


def print_batch1(res, log):
    """Every batch-1 candidate on each 7B matrix timed, fastest first: us, fraction of the copy
    bandwidth, speed against the package's launch (product); for splitk its plan (slices x
    16-byte loads per slice, rows per block, grid)."""
    bw, rows = res["copy_gbs"], [r for r in res["gemv"] if r["M"] == 1 and r["shape"].startswith("7B")]
    log("")
    log(f"7B matrices at batch 1, every candidate: us, fraction of the copy bandwidth "
        f"({bw:.0f} GB/s), speed against product")
    for shape, fmt in sorted({(r["shape"], r["fmt"]) for r in rows}):
        sel = sorted((r for r in rows if (r["shape"], r["fmt"]) == (shape, fmt)),
                     key=lambda r: r["us"])
        prod = next((r for r in sel if r["variant"] == "product"), None)
        log(f"  {shape} {fmt}{' (' + sel[0]['prologue'] + ')' if sel[0].get('prologue') else ''}")
        for r in sel:
            plan = ""
            if r["variant"].startswith("splitk"):
                _, (sl, per, rpb, tiles) = v4s_label_plan(r["variant"], r["N"], r["K"], fmt)
                plan = f"  {sl} x {per} loads, {rpb} rows a block, grid {tiles} x {sl}"
            speed = f"{prod['us'] / r['us']:5.2f}x" if prod else ""
            log(f"    {r['variant']:29s} {r['us']:8.2f} us {r['frac']:5.2f} {speed}{plan}")
    log("")
    log("7B matrices at batch 1, the best of each kind: us, fraction of the copy bandwidth "
        "(plain: qgemv_v4s; pair: v4_digits + qgemv_v4s_pre; kept: qgemv_v4s_pre alone)")
    for shape, fmt in sorted({(r["shape"], r["fmt"]) for r in rows}):
        sel = [r for r in rows if (r["shape"], r["fmt"]) == (shape, fmt)]
        kinds = [("product", lambda v: v == "product"),
                 ("plain", lambda v: v.startswith("splitk") and len(v.split()) == 4),
                 ("pair", lambda v: v.endswith(" pair")), ("kept", lambda v: v.endswith(" kept"))]
        cells = []
        for kind, pick in kinds:
            top = min((r for r in sel if pick(r["variant"])), key=lambda r: r["us"], default=None)
            if top:
                cells.append(f"{kind} {top['us']:6.2f} us {top['frac']:4.2f}"
                             + (f" ({' '.join(top['variant'].split()[1:4])})" if kind != "product" else ""))
        log(f"  {shape:8s} {fmt}: " + " | ".join(cells))


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON to this file (and "
                                             "the log beside it, .txt)")
    ap.add_argument("--build", type=Path, help="folder for the cubins (default: a temporary one)")
    ap.add_argument("--build-only", action="store_true", help="compile, then stop (no GPU)")
    ap.add_argument("--arch", default=None, help="sm_90 unless a GPU says otherwise")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--deadline", type=float, default=230.0,
                    help="seconds from the start after which no new shape is timed")
    ap.add_argument("--only", help="comma-separated candidate families to build, check and "
                                   f"time (default all: {','.join(FAMILIES)})")
    ap.add_argument("--formats", help="comma-separated weight formats (default all: "
                                      f"f32,{','.join(QUANT)})")
    ap.add_argument("--rows", help="comma-separated batch sizes (rows of x) to check and time")
    ap.add_argument("--shapes", help="comma-separated matrices to time (default all: "
                                     f"{','.join(SHAPE_NAMES)})")
    ap.add_argument("--prologues", action="store_true",
                    help="time wo with accumulate and w2 with the SwiGLU prologue and "
                         "accumulate, as the decode step launches them")
    ap.add_argument("--ptxas-v", action="store_true",
                    help="log each instance's registers and spills (ptxas -v) as it is built")
    ap.add_argument("--wait-order", action="store_true",
                    help="after the build, list each candidate's global loads before and after "
                         "griddepcontrol.wait in its SASS (wait_order.py's listing; no GPU)")
    args = ap.parse_args()
    split = lambda v: None if v is None else v.split(",")
    only = Only(split(args.only), split(args.formats),
                None if args.rows is None else [int(r) for r in args.rows.split(",")],
                split(args.shapes))
    for name, given, known in (("--only", only.families, FAMILIES),
                               ("--formats", only.formats, ("f32",) + QUANT),
                               ("--shapes", only.shapes, SHAPE_NAMES)):
        if given and set(given) - set(known):
            ap.error(f"{name}: {sorted(set(given) - set(known))} unknown; one of {known}")
    start = time.perf_counter()
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    def record(line):                              # the log file only
        lines.append(line)

    def write():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")

    results = {}
    rng = np.random.default_rng(1)
    cf.check_numpy(rng)
    check_numpy_v2(rng)
    log("numpy: the float32 magic numbers of v2 and tc decode every code exactly")
    check_numpy_v4(rng)
    log("numpy: v4's digits rebuild x exactly and its integer sums stay in int32")
    arch = args.arch
    if arch is None:
        arch = "sm_90"
        if not args.build_only:
            import subprocess              # the GPU's compute capability, without CUDA here
            try:
                cc = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.split()[0]
                arch = "sm_" + cc.replace(".", "")
            except Exception:
                pass
    folder = args.build or Path(tempfile.mkdtemp(prefix="minillama-variants-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        build(folder, arch, args.jobs, log, only, args.ptxas_v)
    except Exception as e:                        # no NVRTC to call: CuPy compiles, slowly
        if args.build_only:
            raise
        log(f"parallel build failed ({type(e).__name__}: {e}); CuPy compiles in-process")
        folder = None
    if args.wait_order:
        print_wait_order(folder, log)
    if args.build_only:
        return 0

    cp = cf.require_cupy()
    M_ = Modules(folder)
    mk.KERNELS.use(PackageModule(M_))
    props = cp.cuda.runtime.getDeviceProperties(0)
    log(f"{time.strftime('%Y-%m-%d %H:%M')} {props['name'].decode()} {cf.sm_count()} SMs, "
        f"CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}")
    ok = True
    if not args.no_check:
        ch = cf.Checks()
        t0 = time.perf_counter()
        M_.log = log
        check_all(M_, ch, rng, log, only)
        M_.log = None
        ok = ch.summary()
        results["checks"] = [dict(name=n, err=e, limit=l) for n, e, l in ch.results]
        log(f"checks in {time.perf_counter() - t0:.0f} s")
        write()
    if not args.no_time:
        deadline = start + args.deadline
        bw = cf.copy_bandwidth()
        results["copy_gbs"] = bw / 1e9
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
        rows = results["gemv"] = []
        if only.family("gemm"):
            results["gemm"] = time_gemm(M_, log)
        write()
        for model, shapes in SHAPES_STORIES.items() if only.fmts(("f32",)) else ():
            for s, n, k, _ in shapes:
                time_shape(M_, log, bw, rows, f"{model} {s}", n, k, ("f32",), (1, 8, 32), deadline,
                           only, args.prologues)
            log(f"  timed {model} ({time.perf_counter() - start:.0f} s)")
            write()
        for s, n, k in SHAPES_7B:
            if not only.shape(s):
                continue
            time_shape(M_, log, bw, rows, s, n, k, QUANT + ("f32",), (1, 8, 32), deadline, only,
                       args.prologues)
            log(f"  timed {s} ({time.perf_counter() - start:.0f} s)")
            write()
        results["copy_gbs"] = bw / 1e9
        results["splitk_plans"] = [dict(N=N, K=K, fmt=f, nr=nr, u=u, ks=ks, slices=sl,
                                        slice_loads=per, rows_per_block=r, tiles=t)
                                   for (N, K, f, nr, u, ks), (sl, per, r, t) in V4S_PLANS.items()]
        print_tables(results, log, record)
        print_variant_sums(results, log)
        if only.family("splitk"):
            print_batch1(results, log)
    log(f"total {time.perf_counter() - start:.0f} s")
    write()
    return 0 if ok else 1


def check_numpy_v2(rng):
    """The float32 magic of variants.cu, replayed in NumPy on every code value."""
    f = lambda u: np.asarray(u, np.uint32).view(np.float32).astype(np.float64)
    magic = 0x4B000000
    words = rng.integers(0, 2 ** 32, 4096, dtype=np.uint64).astype(np.uint32)
    words[:256] = np.arange(256, dtype=np.uint32) * 0x01010101     # every byte value
    w2 = words >> 12
    nib = lambda s: ((words >> s) & 0xF).astype(np.float64)
    # V2Q4 / TcQ4_0 (mask, shift, source): the 8 nibbles of a word, q4_0 offset 8
    cases = [(words, 0x0000000F, 0, 0), (words, 0x00000F00, 8, 8), (words, 0x000F0000, 16, 16),
             (w2, 0x0000F000, 12, 24), (words, 0x000000F0, 4, 4), (words, 0x0000F000, 12, 12),
             (w2, 0x00000F00, 8, 20), (w2, 0x000F0000, 16, 28)]
    for src, mask, s, bit in cases:
        for o in (0.0, 8.0):
            v = f((src & mask) | magic) * 2.0 ** -s - (2.0 ** (23 - s) + o)
            assert (v == nib(bit) - o).all(), (hex(mask), s, o)
            # and in float32 (one FFMA: the exact value is representable, so it is exact)
            v32 = np.float32(f((src & mask) | magic)) * np.float32(2.0 ** -s) \
                - np.float32(2.0 ** (23 - s) + o)
            assert (v32 == nib(bit) - o).all()
    # V2Q8_0: bytes (u_e, 0, 0, 0x4B) - (2^23 + 128) = the signed byte
    u = words ^ 0x80808080
    for e in range(4):
        v = f(((u >> (8 * e)) & 0xFF) | magic) - 8388736.0
        assert (v == ((words >> (8 * e)) & 0xFF).astype(np.uint8).view(np.int8)).all()
    # tf32 split: hi exact in 10 mantissa bits, lo = x - hi, |lo| < 2^-10 |x|
    x = (rng.standard_normal(10000) * 2.0 ** rng.integers(-30, 30, 10000)).astype(np.float32)
    hi = (x.view(np.uint32) & 0xFFFFE000).view(np.float32)
    lo = x - hi
    assert (hi.astype(np.float64) + lo.astype(np.float64) == x.astype(np.float64)).all()
    assert (np.abs(lo) <= np.abs(x) * 2.0 ** -10).all()


def v4_digits(x, weights):
    """qgemv.cu's v4_stage_pairs in NumPy: x (K,) float32 in units of `weights` values -> the
    digits (3, K) int64, each unit's T (units, 3) and 2^-s (units,) as float32."""
    units = x.reshape(-1, weights).astype(np.float32)
    mx = np.abs(units).max(axis=1)
    e = ((mx.view(np.uint32) >> 23) & 0xFF).astype(np.int64) - 126    # as the kernel reads it
    s = np.minimum(22 - e, 126)
    xi = np.rint(np.ldexp(units.astype(np.float64), s[:, None])).astype(np.int64)
    p0 = ((xi & 0xFF) ^ 0x80) - 0x80                 # the signed low byte
    r = (xi - p0) >> 8
    p1 = ((r & 0xFF) ^ 0x80) - 0x80
    p2 = (r - p1) >> 8
    digits = np.stack([p0, p1, p2])                  # (3, units, weights)
    assert ((digits[0] * 1 + digits[1] * 256 + digits[2] * 65536) == xi).all()
    assert np.abs(digits[:2]).max() <= 128 and np.abs(digits[2]).max() <= 64
    return digits.reshape(3, -1), digits.sum(axis=2).T, np.ldexp(np.float32(1), -s).astype(np.float32)


def check_numpy_v4(rng):
    """v4's arithmetic checked in NumPy (its bounds, not the kernel's order of additions) on
    random q4_0 and q8_0 rows and wide-ranging x: the digits rebuild the fixed-point x exactly,
    every integer sum fits int32, and a float32 result built from them is within 1e-6 of
    float64 (the GPU check holds the kernel itself to 1e-5)."""
    K, N = 4096, 8
    for fmt, weights, offset in (("q4_0", 32, 8), ("q8_0", 16, 0)):
        w_host = cf.random_packed(fmt, N, K, rng)
        w64 = formats.dequantize(w_host).astype(np.float64)
        scales = w_host.planes["d"].view(np.float16).astype(np.float32).reshape(N, -1)
        codes = np.rint(w64 / np.repeat(scales.astype(np.float64), 32, axis=1)) + offset
        for x in (rng.standard_normal(K).astype(np.float32),
                  (rng.standard_normal(K) * 2.0 ** rng.integers(-40, 40, K)).astype(np.float32)):
            digits, T, inv = v4_digits(x, weights)
            per_load = codes.reshape(N, -1, weights)              # (N, loads, weights)
            S = np.einsum("nlw,klw->nkl", per_load, digits.reshape(3, -1, weights))
            S = S - offset * T.T[None]                            # (N, 3, loads)
            assert np.abs(S).max() < 2 ** 31
            v = np.float32(S[:, 2]) * np.float32(65536) + (np.float32(S[:, 1]) * np.float32(256)
                                                            + np.float32(S[:, 0]))
            d = np.repeat(scales, 32 // weights, axis=1)          # each load's block scale
            y = ((d * inv[None]).astype(np.float32) * v.astype(np.float32)).sum(axis=1, dtype=np.float32)
            ref = w64 @ x.astype(np.float64)
            err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
            assert err < 1e-6, (fmt, err)


if __name__ == "__main__":
    sys.exit(main())

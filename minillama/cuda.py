"""The GPU backend: CuPy arrays, and minillama's own CUDA kernels for the heavy operations.

    ops = get_ops("cuda")          # = CudaOps(); DeviceError if CuPy or a GPU is missing
    model = Transformer(params, weights, ops)      # or load_model(path, device="cuda")

CudaOps is NumpyOps with `xp = cupy`, so the model's own code (RMSNorm, RoPE, SwiGLU, the KV
cache, sampling) runs through the CuPy array API unchanged. The operations that go through
`ops` run the kernels in kernels/*.cu:

    linear(x, w)        gemv for a few rows (decoding), sgemm_v4 otherwise    matmul.cu
    matmul(a, b)        bmm_strided, reading the KV cache views in place       matmul.cu
    softmax(x, pos)     softmax_warp / softmax_block, causal mask built in     softmax.cu
    decode(model, ...)  a one-token forward step in 6 launches per layer,      decode.cu
                        replayed as one CUDA graph per batch size (FusedDecoder)

The kernel functions sgemm, gemv, bmm and softmax below are the checked entry points: they take
float32 CuPy arrays (C-contiguous where the kernel indexes by row length) and raise DeviceError
on anything else. Sizes go to the kernels as numpy.int32.

All .cu files are compiled together as one module, once per process (CuPy also caches the
compiled binary on disk), from the package minillama.kernels: the kernels/ folder of a checkout
(`pip install -e .`, or just on PYTHONPATH) or the installed copy after `pip install .`.
"""
import functools
import importlib.resources
import warnings
import weakref
from pathlib import Path

import numpy as np

from .errors import DeviceError
from .ops import NumpyOps
from .quant import Q8Tensor

KERNEL_FILES = ("reduce.cu", "matmul.cu", "softmax.cu", "decode.cu")   # in compile order

# sgemm_v4 tile shapes: name -> (BM, BN, BK, TM, TN, MIN_BLOCKS), see matmul.cu. MIN_BLOCKS
# blocks fit on an SM at once (registers and shared memory allow it).
SGEMM_CONFIGS = {
    "128x128x16": (128, 128, 16, 8, 8, 2),
    "128x128x8": (128, 128, 8, 8, 8, 2),
    "128x64x8": (128, 64, 8, 8, 4, 2),
    "64x64x16": (64, 64, 16, 4, 4, 3),
}
# TFLOP/s of each when the GPU is full: `python -m minillama.bench gpu` at 4096^3, H100 80GB
# HBM3, 2026-11-24 (docs/benchmarks.md). Only their ratios matter, to pick a tile shape.
SGEMM_RATES = {"128x128x16": 41.8, "128x128x8": 37.3, "128x64x8": 31.6, "64x64x16": 29.5}
GEMV_ROWS = (1, 2, 4, 8)           # rows of x per warp in gemv<ROWS, VEC, PRO>
GEMV_PROLOGUES = {None: 0, "rmsnorm": 1, "swiglu": 2}     # GEMV_PLAIN, _RMSNORM, _SWIGLU
GEMV_MAX_M = 32                    # linear() uses gemv up to this many rows, sgemm above
# softmax_block<V, THREADS>: one block of THREADS threads holds V values each, so rows of up to
# V * THREADS floats. The smallest that fits is used; longer rows go to softmax_warp.
SOFTMAX_BLOCKS = ((1, 1024), (2, 1024), (4, 1024), (8, 1024), (16, 1024), (32, 1024))
SOFTMAX_WARP_MAX = 1024            # rows up to this long: one warp per row (softmax_warp)

i32 = np.int32


def _cpp_bool(flag):
    return "true" if flag else "false"


def cdiv(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------
# finding CuPy, the GPU and the kernels

@functools.lru_cache(maxsize=None)
def require_cupy():
    """The cupy module, once a GPU has been seen; otherwise a DeviceError saying what to do."""
    try:
        import cupy
    except ImportError:
        raise DeviceError("device 'cuda' needs CuPy: pip install 'minillama[cuda12]' "
                          "(or 'minillama[cuda13]' for CUDA 13), or use --device cpu") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:               # CUDARuntimeError: no driver, or no device
        raise DeviceError(f"device 'cuda': CuPy is installed but finds no usable NVIDIA GPU "
                          f"({e}); use --device cpu") from None
    if count == 0:
        raise DeviceError("device 'cuda': CuPy is installed but finds no NVIDIA GPU; "
                          "use --device cpu")
    return cupy


def kernel_dir():
    """The installed package minillama.kernels (pip install . or -e .), or else the kernels/
    folder beside minillama/ in a checkout that is only on PYTHONPATH."""
    try:
        return importlib.resources.files("minillama.kernels")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "kernels"


def kernel_source():
    """The text of kernels/*.cu, in compile order. #line keeps compiler messages pointing at
    the right file and line."""
    root = kernel_dir()
    return "\n".join(f'#line 1 "{name}"\n' + root.joinpath(name).read_text(encoding="utf-8")
                     for name in KERNEL_FILES)


def _template_names():
    """Every template instantiation the wrappers launch (NVRTC compiles only these)."""
    names = [f"sgemm_v4<{','.join(map(str, c))},{_cpp_bool(vec)}>"
             for c in SGEMM_CONFIGS.values() for vec in (True, False)]
    names += [f"gemv<{rows},{_cpp_bool(vec)},{pro}>" for rows in GEMV_ROWS
              for vec in (True, False) for pro in GEMV_PROLOGUES.values()]
    names += [f"attention_decode<{width}>" for width in (1, 4)]
    names += [f"softmax_block<{v},{t}>" for v, t in SOFTMAX_BLOCKS]
    return names


@functools.lru_cache(maxsize=None)
def _module():
    cupy = require_cupy()
    try:
        return cupy.RawModule(code=kernel_source(), name_expressions=_template_names())
    except cupy.cuda.compiler.CompileException as e:
        raise DeviceError(f"kernels/*.cu failed to compile: {e}") from None


@functools.lru_cache(maxsize=None)
def _function(name):
    return _module().get_function(name)


_launches = 0


def launch(name, grid, block, args, shared_mem=0):
    """Launch kernel `name` on the current stream, counting launches (see launch_count)."""
    global _launches
    _launches += 1
    _function(name)(grid, block, args, shared_mem=shared_mem)


def launch_count():
    """Kernels launched through `launch` so far in this process (CuPy's own array operations,
    such as the model's elementwise math, are not counted)."""
    return _launches


def sm_count():
    """Streaming multiprocessors of the current GPU (asked once per device: CuPy's
    Device.attributes queries every attribute, tens of microseconds)."""
    return _sm_count(require_cupy().cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    return require_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"]


# ----------------------------------------------------------------------------
# checked entry points to the kernels

def _check(name, a, ndim=None, contiguous=True):
    cupy = require_cupy()
    if not isinstance(a, cupy.ndarray):
        raise DeviceError(f"{name}: expected a CuPy array on the GPU, got {type(a).__name__} "
                          f"(move it with ops.asarray)")
    if a.dtype != np.float32:
        raise DeviceError(f"{name}: expected float32, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise DeviceError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        raise DeviceError(f"{name}: expected a C-contiguous array (cupy.ascontiguousarray), "
                          f"got strides {a.strides} for shape {a.shape}")


def _output(out, shape):
    """`out` checked against the result's shape, or a new array for it."""
    if out is None:
        return require_cupy().empty(shape, dtype=np.float32)
    _check("out", out)
    if out.shape != tuple(shape):
        raise DeviceError(f"out: expected shape {tuple(shape)}, got {out.shape}")
    return out


def _aligned(*arrays):
    """16-byte aligned data pointers, so float4 loads are legal."""
    return all(a.data.ptr % 16 == 0 for a in arrays)


def pick_sgemm_config(M, N):
    """The tile shape with the least estimated time. Big tiles reuse more (SGEMM_RATES), but the
    blocks run in waves of (SMs x blocks per SM), and a partial last wave costs a whole one:
    a 1024 x 1024 product has only 64 tiles of 128 x 128 for 132 SMs."""
    sms = sm_count()

    def cost(name):
        bm, bn, *_, per_sm = SGEMM_CONFIGS[name]
        slots = sms * per_sm
        waves = cdiv(cdiv(M, bm) * cdiv(N, bn), slots)
        return waves * slots * bm * bn / SGEMM_RATES[name]
    return min(SGEMM_CONFIGS, key=cost)


def sgemm(a, w, out=None, version=4, config=None):
    """a @ w.T for a (M, K) and w (N, K), float32 and C-contiguous -> (M, N).
    version 1..4 picks the kernel of matmul.cu (4 is the fast one); config names a tile shape
    of SGEMM_CONFIGS for version 4, chosen from the sizes when None."""
    _check("a", a, 2)
    _check("w", w, 2)
    (M, K), (N, K_w) = a.shape, w.shape
    if K != K_w:
        raise DeviceError(f"sgemm: a is (M, K) = {a.shape} but w is (N, K) = {w.shape}")
    c = _output(out, (M, N))
    if M == 0 or N == 0:
        return c
    args = (a, w, c, i32(M), i32(N), i32(K))
    if version == 1:
        launch("sgemm_v1_naive", (cdiv(N, 16), cdiv(M, 16)), (16, 16), args)
    elif version == 2:
        launch("sgemm_v2_tiled", (cdiv(N, 32), cdiv(M, 32)), (32, 32), args)
    elif version == 3:
        launch("sgemm_v3_regblock", (cdiv(N, 128), cdiv(M, 128)), (256,), args)
    elif version == 4:
        config = config or pick_sgemm_config(M, N)
        if config not in SGEMM_CONFIGS:
            raise DeviceError(f"config: expected one of {', '.join(SGEMM_CONFIGS)}, got {config!r}")
        bm, bn, bk, tm, tn, min_blocks = SGEMM_CONFIGS[config]
        vec = K % 4 == 0 and N % 4 == 0 and _aligned(a, w, c)
        name = f"sgemm_v4<{bm},{bn},{bk},{tm},{tn},{min_blocks},{_cpp_bool(vec)}>"
        launch(name, (cdiv(N, bn), cdiv(M, bm)), ((bm // tm) * (bn // tn),), args)
    else:
        raise DeviceError(f"version: expected 1, 2, 3 or 4, got {version!r}")
    return c


def gemv(x, w, out=None, accumulate=False, norm=None, eps=1e-5, swiglu=False):
    """x @ w.T for a few rows: x (M, K), w (N, K) -> (M, N), one warp per output column.

    accumulate: add into `out` (which must then be given) instead of overwriting it.
    norm: an RMSNorm weight (K,): multiply rms_norm(x, norm, eps) instead of x.
    swiglu: x is (M, 2K) = [h1 | h3]: multiply silu(h1) * h3 instead of x.
    (The last two are the prologues of matmul.cu: the step before the matmul, fused into it.)"""
    if norm is not None and swiglu:
        raise DeviceError("gemv: norm and swiglu are two prologues; give one")
    _check("x", x, 2)
    _check("w", w, 2)
    (M, K_x), (N, K) = x.shape, w.shape
    if K_x != (2 * K if swiglu else K):
        raise DeviceError(f"gemv: x is (M, K) = {x.shape} but w is (N, K) = {w.shape}"
                          + (" (swiglu: x must be (M, 2K))" if swiglu else ""))
    if norm is not None:
        _check("norm", norm, 1)
        if norm.shape != (K,):
            raise DeviceError(f"norm: expected shape ({K},), got {norm.shape}")
    if accumulate and out is None:
        raise DeviceError("gemv: accumulate=True needs the array to add into as out")
    y = _output(out, (M, N))
    if M == 0 or N == 0:
        return y
    rows = next(r for r in GEMV_ROWS if r >= min(M, GEMV_ROWS[-1]))
    vec = K % 4 == 0 and _aligned(x, w, *([norm] if norm is not None else []))
    prologue = GEMV_PROLOGUES["rmsnorm" if norm is not None else "swiglu" if swiglu else None]
    ksplit = gemv_ksplit(N, K)
    launch(f"gemv<{rows},{_cpp_bool(vec)},{prologue}>", (cdiv(N, 8 // ksplit), cdiv(M, rows)),
           (256,), (x, w, y, i32(M), i32(N), i32(K), i32(bool(accumulate)),
                    w if norm is None else norm, np.float32(eps), i32(ksplit)))
    return y


def gemv_ksplit(N, K):
    """Warps per output row in gemv (1, 2, 4 or 8): split k while there are fewer warps than
    an H100 keeps in flight (~48 per SM) and each still gets a 128-float slice of k."""
    ksplit, enough = 1, 48 * sm_count()
    while ksplit < 8 and N * ksplit < enough and K >= 128 * (2 * ksplit):
        ksplit *= 2
    return ksplit


def bmm(a, b, out=None):
    """a @ b over matching leading dims: a (..., M, K), b (..., K, N) -> (..., M, N), at most two
    leading dims, any strides (transposed views of the KV cache are read in place)."""
    _check("a", a, contiguous=False)
    _check("b", b, contiguous=False)
    if not 2 <= a.ndim <= 4 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] \
            or a.shape[-1] != b.shape[-2]:
        raise DeviceError(f"bmm: cannot multiply shapes {a.shape} and {b.shape} (expected "
                          f"(..., M, K) and (..., K, N) with the same 0-2 leading dims)")
    batch, (M, K), N = a.shape[:-2], a.shape[-2:], b.shape[-1]
    c = _output(out, batch + (M, N))
    z0, z1 = ((1, 1) + batch)[-2:]
    if c.size == 0:
        return c
    if z0 * z1 > 65535:
        raise DeviceError(f"bmm: {z0 * z1} matrices in one batch, at most 65535")
    sa = (0, 0) + tuple(s // 4 for s in a.strides)     # element strides, missing dims as 0
    sb = (0, 0) + tuple(s // 4 for s in b.strides)
    launch("bmm_strided", (cdiv(N, 16), cdiv(M, 16), z0 * z1), (16, 16),
           (a, b, c, i32(M), i32(N), i32(K), i32(z1))
           + tuple(np.int64(s) for s in sa[-4:] + sb[-4:]))
    return c


def softmax(x, out=None, start_pos=None, kernel=None):
    """Softmax over the last axis of x (float32, C-contiguous).

    With start_pos, x holds causal attention scores (..., seqlen, start_pos + seqlen): query i
    sees keys 0 .. start_pos + i and the rest come out as exact zeros, as if a -inf mask had been
    added (like NumpyOps.softmax, which masks only when seqlen > 1).
    kernel: 'warp' or 'block' to force one (see softmax.cu); by row length when None."""
    _check("x", x)
    if x.ndim == 0:
        raise DeviceError("x: expected at least one dimension, got a scalar")
    n_cols = x.shape[-1]
    n_rows = x.size // n_cols if n_cols else 0
    seqlen = x.shape[-2] if start_pos is not None and x.ndim >= 2 else 1
    if seqlen > 1:
        if start_pos < 0 or start_pos + seqlen != n_cols:
            raise DeviceError(f"softmax: causal scores for start_pos {start_pos} and seqlen "
                              f"{seqlen} need {start_pos + seqlen} columns, got {n_cols}")
        first = start_pos
    else:
        first = n_cols - 1                        # row 0 of 1 sees every column
    y = _output(out, x.shape)
    if x.size == 0:
        return y
    args = (x, y, i32(n_rows), i32(n_cols), i32(first), i32(seqlen))
    fits = [(v, t) for v, t in SOFTMAX_BLOCKS if v * t >= n_cols]
    kernel = kernel or ("block" if n_cols > SOFTMAX_WARP_MAX and fits else "warp")
    if kernel == "warp":
        launch("softmax_warp", (cdiv(n_rows, 8),), (256,), args)
    elif kernel == "block" and fits:
        v, t = fits[0]
        launch(f"softmax_block<{v},{t}>", (n_rows,), (t,), args)
    else:
        raise DeviceError(f"kernel: expected 'warp' or 'block' (rows up to "
                          f"{max(v * t for v, t in SOFTMAX_BLOCKS)}), got {kernel!r} "
                          f"for rows of {n_cols}")
    return y


# ----------------------------------------------------------------------------
# the backend

class CudaOps(NumpyOps):
    """NumpyOps on the GPU: `xp` is cupy, and linear / matmul / softmax run minillama's kernels.

    fused_decode: one-token forward calls go to FusedDecoder (6 launches per layer) instead of
        the generic path; graphs: FusedDecoder replays them as one CUDA graph per batch size.
    """
    name = "cuda"

    def __init__(self, fused_decode=True, graphs=True):
        self.xp = require_cupy()
        self.fused_decode, self.graphs = fused_decode, graphs
        self._decoders = weakref.WeakKeyDictionary()     # model -> FusedDecoder (or None)

    def matrix_layout(self, w):
        return w            # the kernels index weights row-major: (out, in), C-contiguous

    def asarray(self, a, dtype=None):
        """Bring an array onto the GPU: host arrays (NumPy, lists) are copied over, CuPy arrays
        pass through. Everything entering the model goes through here, so a host array mixed
        into a GPU model is moved, never rejected half-way through a forward pass."""
        if isinstance(a, self.xp.ndarray):
            return a if dtype is None else a.astype(dtype, copy=False)
        return self.xp.asarray(np.asarray(a), dtype=dtype)

    def linear(self, x, w):
        # x: (..., in)   w: (out, in)   ->   (..., out)
        if isinstance(w, Q8Tensor):
            return self.linear_q8(x, w)           # dequantizes, then comes back here
        x = self.asarray(x)
        rows = self.xp.ascontiguousarray(x.reshape(-1, x.shape[-1]))    # (bsz * seqlen, in)
        # float16 storage (--dtype float16) is computed in float32, like NumPy's upcast
        w = self.xp.ascontiguousarray(self.asarray(w), dtype=np.float32)
        y = gemv(rows, w) if rows.shape[0] <= GEMV_MAX_M else sgemm(rows, w)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def matmul(self, a, b):
        return bmm(self.asarray(a), self.asarray(b))

    def softmax(self, x, start_pos=None):
        return softmax(self.xp.ascontiguousarray(self.asarray(x)), start_pos=start_pos)

    def decode(self, model, tokens, start_pos):
        """One new token per row (tokens: (bsz, 1) host ints) through FusedDecoder; None when
        turned off or when the model is one it does not cover (see FusedDecoder.covers)."""
        if not self.fused_decode:
            return None
        decoder = self._decoders.get(model, False)
        if decoder is False:                                 # first call for this model
            decoder = FusedDecoder(model) if FusedDecoder.covers(model) else None
            self._decoders[model] = decoder
        return None if decoder is None else decoder(tokens, start_pos, self.graphs)


# ----------------------------------------------------------------------------
# decoding one token: the model's forward step as 9 kernels per layer, in one CUDA graph

class FusedDecoder:
    """Transformer.forward for tokens of shape (bsz, 1), with the kernels of decode.cu.

    The generic path launches ~45 small CuPy kernels per layer (RMSNorm alone is six); at one
    token per call the GPU mostly waits for the host. Here a layer is 6 launches,

        gemv(rmsnorm -> wqkv), rope_kv, attention_decode, gemv(wo, h +=),
        gemv(rmsnorm -> w13), gemv(swiglu -> w2, h +=)

    on buffers allocated once, reading the model's own weights and KV cache. The position and
    token ids live in a device array (`step`), so the launches are the same at every position:
    the first call for a batch size runs them and records them into a CUDA graph, and later calls
    copy `step` over and replay the graph with one call. Prefill (seqlen > 1) stays on the
    generic path; both write the same cache.
    """

    BLOCK = 256

    @staticmethod
    def covers(model):
        """Float32 weights (not Q8 or float16), heads that fit a block, and a cache row that
        fits shared memory; anything else stays on the generic path."""
        p = model.params
        dense = all(not isinstance(w, Q8Tensor) and w.dtype == np.float32
                    for w in FusedDecoder._weights(model))
        smem = 4 * (p.max_seq_len + p.head_dim + 4 * FusedDecoder.BLOCK)
        return dense and p.head_dim <= FusedDecoder.BLOCK and smem <= 48 * 1024

    @staticmethod
    def _weights(model):
        yield model.output
        yield model.norm
        for layer in model.layers:
            yield from (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                        layer.feed_forward.w2, layer.attention_norm, layer.ffn_norm)

    def __init__(self, model):
        import cupyx                                         # ships with cupy: pinned memory
        # No reference to the model itself: CudaOps keys its decoders by the model, weakly.
        cp, p = model.ops.xp, model.params
        self.cp, self.p = cp, p
        self.tok_embeddings, self.norm, self.output = model.tok_embeddings, model.norm, model.output
        self.freqs_cos, self.freqs_sin = model.freqs_cos, model.freqs_sin
        self.layers = [(layer.attention_norm, layer.attention.wqkv, layer.attention.wo,
                        layer.ffn_norm, layer.feed_forward.w13, layer.feed_forward.w2,
                        layer.attention.cache_k, layer.attention.cache_v)
                       for layer in model.layers]
        nb, hd = p.max_batch_size, p.head_dim

        def buf(width):
            return cp.zeros((nb, width), dtype=np.float32)
        self.step = cp.zeros(1 + nb, dtype=np.int32)         # [start_pos, token_0, token_1, ...]
        self.step_host = cupyx.empty_pinned(1 + nb, dtype=np.int32)   # its source, page-locked
        self.step_copied = cp.cuda.Event()                   # recorded: step_host was read
        self.h = buf(p.dim)                                  # the residual stream
        self.qkv = buf((p.n_heads + 2 * p.n_kv_heads) * hd)
        self.q, self.att = buf(p.n_heads * hd), buf(p.n_heads * hd)
        self.h13 = buf(2 * p.hidden_dim)                     # [h1 | h3]
        self.logits = buf(p.vocab_size)
        self.graphs = {}                                     # bsz -> cupy.cuda.Graph
        self.launches_per_step = {}                          # bsz -> kernels in one step

    def __call__(self, tokens, start_pos, use_graphs=True):
        bsz = tokens.shape[0]
        self.step_copied.synchronize()                       # the last copy has read step_host
        self.step_host[0], self.step_host[1:1 + bsz] = start_pos, tokens[:, 0]
        stream = self.cp.cuda.get_current_stream()
        self.step.data.copy_from_host_async(self.step_host.ctypes.data, 4 * (1 + bsz), stream)
        self.step_copied.record(stream)
        if use_graphs and self.graphs.get(bsz) is not None:
            self.graphs[bsz].launch()
        else:
            before = launch_count()
            self.run(bsz)
            self.launches_per_step[bsz] = launch_count() - before
            if use_graphs and bsz not in self.graphs:
                self.graphs[bsz] = self._capture(bsz)      # None if the driver refuses
        # a copy: the caller may keep the logits of every step, and the buffer is reused
        logits = self.cp.empty((bsz, 1, self.p.vocab_size), dtype=np.float32)
        logits.data.copy_from_device_async(self.logits.data, logits.nbytes)
        return logits

    def _capture(self, bsz):
        """Record run(bsz) into a CUDA graph (nothing executes while recording). Returns None,
        with a warning, where the driver refuses, and the eager launches carry on."""
        cp = self.cp
        stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.get_current_stream().synchronize()
        try:
            with stream:
                stream.begin_capture()
                try:
                    self.run(bsz)
                finally:
                    graph = stream.end_capture()
            return graph
        except cp.cuda.runtime.CUDARuntimeError as e:
            warnings.warn(f"CUDA graph capture failed ({e}); decoding without graphs")
            return None

    def run(self, bsz):
        """Launch one decode step for rows 0 .. bsz-1 on the current stream."""
        p, B, block = self.p, self.BLOCK, (self.BLOCK,)
        nh, nkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
        h, qkv, q, att, h13 = (a[:bsz] for a in (self.h, self.qkv, self.q, self.att, self.h13))
        eps = p.norm_eps
        width = 4 if hd % 4 == 0 else 1                     # float4 rows in attention_decode
        attn_smem = 4 * (hd + width * B + p.max_seq_len)
        scale = np.float32(1.0 / np.sqrt(hd))

        launch("embed_tokens", (bsz,), block, (self.step, self.tok_embeddings, h, i32(p.dim)))
        for attn_norm, wqkv, wo, ffn_norm, w13, w2, cache_k, cache_v in self.layers:
            gemv(h, wqkv, out=qkv, norm=attn_norm, eps=eps)
            launch("rope_kv", (cdiv((nh + nkv) * hd // 2, B), bsz), block,
                   (qkv, self.step, self.freqs_cos, self.freqs_sin, q, cache_k, cache_v,
                    i32(nh), i32(nkv), i32(hd), i32(p.max_seq_len)))
            launch(f"attention_decode<{width}>", (nh, bsz), block,
                   (q, cache_k, cache_v, self.step, att, i32(nh), i32(nkv), i32(hd),
                    i32(p.max_seq_len), scale), shared_mem=attn_smem)
            gemv(att, wo, out=h, accumulate=True)             # h += attention(...)
            gemv(h, w13, out=h13, norm=ffn_norm, eps=eps)
            gemv(h13, w2, out=h, accumulate=True, swiglu=True)  # h += feed_forward(...)
        gemv(h, self.output, out=self.logits[:bsz], norm=self.norm, eps=eps)

"""Weights as stored, on the GPU (issue 10): qgemv, gemm_v5 and gemm_v6 through the package's own
checked wrappers, CudaOps and FusedDecoder on models whose weights are formats.Packed, and the
float16 KV cache.

Tests marked `gpu` need CuPy and an NVIDIA GPU and skip cleanly without them (conftest's `cp`
fixture). The conventions are test_cuda.py's: fresh random inputs each run, odd sizes, outputs
poisoned with NaN first, relative errors in the norm against a float64 reference. The reference
of a stored weight is formats.dequantize, the NumPy reference the CPU backend multiplies by.

Bounds: a kernel that multiplies float32 x by exactly the weights the reference dequantizes and
sums in float32 (qgemv) is held to 1e-5, as every float32 kernel of test_cuda.py; the tensor
cores (gemm_v5, gemm_v6) see x rounded to 16 bits, and are held to 2e-3 against float64 of the
rounded inputs. A model on the GPU is held to the CPU model with the same stored weights:
logits within 1e-4 relative at every step (with a float16 KV cache 1e-3; a prompt through the
tensor cores 5e-3), greedy tokens identical, near-ties aside (decode_against_cpu says why).

The last tests need no GPU: which models FusedDecoder covers, and where the sources come from.
"""
import functools

import numpy as np
import pytest

from conftest import ODD
from minillama import formats
from minillama.checkpoints.random import random_weights
from minillama.cuda import runtime
from minillama.errors import DeviceError
from minillama.formats import Packed
from minillama.model import ModelArgs, Transformer
from minillama.ops import CPU
from test_cuda import cuda, poison, product_err, rel_err  # noqa: F401  (fixtures and helpers)
from test_cuda import decode_one_row_in_a_graph, launched_names

gpu = pytest.mark.gpu
rng = np.random.default_rng()           # fresh inputs every run

STORED = ("f16", "bf16", "q8_0", "q4_0", "q4_1")     # the formats qgemv and gemm_v5 read
BLOCKED = ("q8_0", "q4_0", "q4_1")


def stored_weight(fmt, rows, cols):
    """A random (rows, cols) weight stored in `fmt` by formats.quantize, its rows scaled over
    2^-8 .. 2^4 so that the scales span many octaves; with its float64 reference."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= (2.0 ** rng.integers(-8, 5, (rows, 1))).astype(np.float32)
    packed = formats.quantize(w, fmt)
    return packed, formats.dequantize(packed).astype(np.float64)


def rounded(x, fmt):
    """x as the tensor cores see it: float16, or bfloat16 for a bf16 weight, back in float64."""
    if fmt == "bf16":
        return formats.dense.bf16_to_f32(formats.dense.to_bf16(x)).astype(np.float64)
    return x.astype(np.float16).astype(np.float64)


# ----------------------------------------------------------------------------
# qgemv.cu

QGEMV_SIZES = [(1, 32), (3, 96), (17, 4128), (127, 1024), (33, 11008)]    # (N, K), whole blocks
DENSE_SIZES = [(5, 8), (77, 1000)]                   # f16 and bf16 need only K % 8 == 0
BATCHES = (1, 2, 3, 5, 8, 9, 13, 64)


@gpu
@pytest.mark.parametrize("version", [None, 1, 2])     # the rule (v4 or v2 for one row, v1 for more)
@pytest.mark.parametrize("fmt,N,K", [(f, n, k) for f in STORED for n, k in QGEMV_SIZES]
                         + [(f, n, k) for f in ("f16", "bf16") for n, k in DENSE_SIZES])
def test_qgemv_matches_float64_of_the_dequantized_weights(cuda, cp, fmt, N, K, version):
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    for M in BATCHES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        out = poison(cp, (M, N))
        y = cuda.kernels.qgemv(cp.asarray(x), w, out=out, version=version)
        assert y is out
        assert product_err(y, x.astype(np.float64), w64) < 1e-5, f"M={M}"


def split_partials(cuda):
    """The splits' partial-sum workspaces made so far (kernels._split_workspace's)."""
    return [buf for key, buf in cuda.kernels._SPLIT_BUFFERS.items() if key[1] == "partial"]


def assert_partials_untouched(cuda, cp, launch):
    """launch() writes no partial sums to the splits' workspaces (its slices add by atomics):
    they are poisoned with NaN first, and must still be NaN after. The caller makes the
    workspace first (a launch in slice order of the same shape), so that launch() takes one
    that was poisoned."""
    before = split_partials(cuda)
    assert before, "no workspace yet: launch the same shape in slice order first"
    for buf in before:
        buf.fill(np.nan)
    launch()
    assert len(split_partials(cuda)) == len(before), "launch() made a workspace of its own"
    assert all(bool(cp.isnan(buf).all()) for buf in before)


def assert_counters_at_zero(cuda, cp):
    """Every split's counters back at zero (each launch leaves them as it found them, or, adding
    its slices by atomics, never touches them)."""
    for key, buf in cuda.kernels._SPLIT_BUFFERS.items():
        if key[1] == "counters":
            assert int(cp.count_nonzero(buf)) == 0


def check_prologues(cp, gemv, w, w64, smems=(None,), rows=(1, 3, 8, 13), **chunked):
    """gemv(x, w, out=..., ...) (qgemv and its kin, with their fixed arguments bound) against
    float64 at each number of `rows` of x: the RMSNorm prologue (once per shared-memory size in
    `smems`, None: the default), the SwiGLU prologue, and accumulate (with `chunked`'s extra
    arguments, e.g. x in chunks of k)."""
    from minillama.model import rms_norm, silu
    N, K = w64.shape
    for M in rows:
        x = rng.standard_normal((M, K)).astype(np.float32)
        x64 = x.astype(np.float64)
        g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
        ref = rms_norm(x64, g.astype(np.float64), 1e-5) @ w64.T
        for smem in smems:
            size = {} if smem is None else {"smem": smem}
            y = gemv(cp.asarray(x), w, out=poison(cp, (M, N)), norm=cp.asarray(g), eps=1e-5,
                     **size)
            assert rel_err(y, ref) < 1e-5, f"rmsnorm M={M} smem={smem}"
        h = (2 * rng.standard_normal((M, 2 * K))).astype(np.float32)
        h64 = h.astype(np.float64)
        y = gemv(cp.asarray(h), w, out=poison(cp, (M, N)), swiglu=True)
        assert rel_err(y, (silu(h64[:, :K]) * h64[:, K:]) @ w64.T) < 1e-5, f"swiglu M={M}"
        y0 = rng.standard_normal((M, N)).astype(np.float32)
        y = cp.asarray(y0)
        gemv(cp.asarray(x), w, out=y, accumulate=True, **chunked)
        assert rel_err(y, y0 + x64 @ w64.T) < 1e-5, f"accumulate M={M}"


@gpu
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("fmt", STORED)
def test_qgemv_prologues_accumulate_and_chunks(cuda, cp, fmt, version):
    packed, w64 = stored_weight(fmt, 129, 2080)
    check_prologues(cp, functools.partial(cuda.kernels.qgemv, version=version),
                    packed.map(cp.asarray), w64, smems=(cuda.kernels.QGEMV_SMEM, 1),
                    smem=1, blocks_per_sm=1)      # x whole, or in chunks of k


V4_FORMATS = ("q4_0", "q8_0")
V4_UNIT = {"q4_0": 32, "q8_0": 16}          # values of x in one fixed point (qgemv.cu's WEIGHTS)


@gpu
@pytest.mark.parametrize("fmt,N,K", [(f, n, k) for f in V4_FORMATS for n, k in QGEMV_SIZES])
def test_qgemv_v4_matches_float64_at_one_row(cuda, cp, fmt, N, K):
    """qgemv_v4's integer products (x as three 8-bit digits of a fixed point, one scale per
    unit of 32 or 16 values) keep the float32 GEMV's 1e-5, also where x spans 80 binades (each
    unit scaled on its own) and where a unit is all zeros."""
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    x = rng.standard_normal((1, K)).astype(np.float32)
    wide = (x * 2.0 ** rng.integers(-40, 40, (1, K))).astype(np.float32)
    wide[0, 32:64] = 0.0                                 # (K = 32: x stays as it is)
    for xs in (x, wide):
        y = cuda.kernels.qgemv(cp.asarray(xs), w, out=poison(cp, (1, N)), version=4)
        assert product_err(y, xs.astype(np.float64), w64, V4_UNIT[fmt]) < 1e-5


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4_scales_each_unit_of_x_on_its_own(cuda, cp, fmt):
    """One unit of x 2^40 times the others, against weights that are zero there: with one
    scale for the whole row the small units would keep no bits (error 1), with a scale per
    unit the product keeps float32's accuracy."""
    N, K = 77, 2080
    dense = rng.standard_normal((N, K)).astype(np.float32)
    dense[:, :32] = 0.0
    packed = formats.quantize(dense, fmt)
    w64 = formats.dequantize(packed).astype(np.float64)
    x = (rng.standard_normal((1, K)) * 2.0 ** -20).astype(np.float32)
    x[0, :32] *= np.float32(2.0 ** 40)
    y = cuda.kernels.qgemv(cp.asarray(x), packed.map(cp.asarray), version=4)
    assert product_err(y, x.astype(np.float64), w64) < 1e-5


@gpu
def test_qgemv_rule_takes_v4_for_one_row_of_q4_0_and_q8_0(cuda, cp, monkeypatch):
    """kernels.qgemv's rule: v4 at one row of x on q4_0 and q8_0, v2 at one row of the other
    formats, neither at more rows."""
    k, launched = cuda.kernels, []
    launch = k.KERNELS.launch
    monkeypatch.setattr(k.KERNELS, "launch", lambda name, *a, **kw: (launched.append(name),
                                                                       launch(name, *a, **kw)))
    for fmt in STORED:
        packed, _ = stored_weight(fmt, 17, 256)
        for M in (1, 2):
            launched.clear()
            k.qgemv(cp.ones((M, 256), np.float32), packed.map(cp.asarray))
            version = launched[-1].split("<")[0]
            want = ("qgemv_v4" if fmt in V4_FORMATS else "qgemv_v2") if M == 1 else "qgemv"
            assert version == want, (fmt, M, launched)


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4_passes_nan_and_inf_of_x_on(cuda, cp, fmt):
    """A value of x that is not finite makes its unit's scale NaN, so every row it meets is
    NaN, as in a float32 product (where integers would have hidden it)."""
    packed, _ = stored_weight(fmt, 17, 4128)
    w = packed.map(cp.asarray)
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.standard_normal((1, 4128)).astype(np.float32)
        x[0, rng.integers(4128)] = bad
        y = cuda.kernels.qgemv(cp.asarray(x), w, version=4).get()
        assert not np.isfinite(y).any(), bad


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4_prologues_accumulate_and_chunks(cuda, cp, fmt):
    packed, w64 = stored_weight(fmt, 129, 2080)
    check_prologues(cp, functools.partial(cuda.kernels.qgemv, version=4),
                    packed.map(cp.asarray), w64, smems=(cuda.kernels.QGEMV_SMEM, 1), rows=(1,),
                    smem=1)                      # x whole, or in chunks of k


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4_rmsnorm_after_the_sums(cuda, cp, fmt):
    """RMSNorm at one row: where x is staged whole, v4 stages the digits of x * norm_w and
    multiplies each output by inv_rms after its sums (V4Step's late norm); in chunks of k, inv_rms
    first. Both keep 1e-5 of float64 on an x over 60 binades, at a row length that is not a
    multiple of a warp's sweep; a value of x that is not finite makes every output NaN."""
    from minillama.model import rms_norm
    N, K = 211, 4128
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    x = (rng.standard_normal((1, K)) * 2.0 ** rng.integers(-30, 30, (1, K))).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    ref = rms_norm(x.astype(np.float64), g.astype(np.float64), 1e-5) @ w64.T
    for smem in (cuda.kernels.QGEMV_SMEM, 1):                  # late, then inv_rms first
        y = cuda.kernels.qgemv(cp.asarray(x), w, out=poison(cp, (1, N)), norm=cp.asarray(g),
                               version=4, smem=smem)
        assert rel_err(y, ref) < 1e-5, smem
        bad = x.copy()
        bad[0, rng.integers(K)] = np.inf
        y = cuda.kernels.qgemv(cp.asarray(bad), w, norm=cp.asarray(g), version=4, smem=smem)
        assert np.isnan(y.get()).all(), smem


def test_qgemv_v4s_rule_splits_w2_like_shapes_only():
    """qgemv_v4s_wins (no GPU): one row of q4_0 or q8_0, no RMSNorm, K >= QGEMV_V4S_MIN_K, and
    v4's grid under a wave (N <= 8 NR x B x sms, QGEMV_V4's B: 2). The 7B on an H200 (132
    SMs): w2 splits, wo, wqkv, w13 and the classifier do not."""
    k = pytest.importorskip("minillama.cuda.kernels")
    plain, swiglu, rms = (k.GEMV_PROLOGUES[p] for p in (None, "swiglu", "rmsnorm"))
    for fmt in V4_FORMATS:
        wins = functools.partial(k.qgemv_v4s_wins, fmt=fmt, sms=132)
        assert wins(1, 4096, 11008, prologue=swiglu) and wins(1, 4096, 11008, prologue=plain)
        for N, K in ((4096, 4096), (12288, 4096), (22016, 4096), (32000, 4096)):
            assert not wins(1, N, K, prologue=plain), (N, K)          # wo, wqkv, w13, cls
        assert not wins(1, 4096, 11008, prologue=rms)     # a slice does not see the row's RMS
        assert not wins(2, 4096, 11008, prologue=swiglu) and not wins(64, 33, 11008, prologue=plain)
        assert wins(1, 33, 8192, prologue=plain) and not wins(1, 33, 8160, prologue=plain)
        assert wins(1, 4224, 8192, prologue=plain)        # v4: 264 blocks, one wave of 2 an SM
        assert not wins(1, 4225, 8192, prologue=plain)    # 265
        assert not k.qgemv_v4s_wins(1, 4096, 11008, fmt, plain, sms=66)     # two waves there
    for fmt in ("q4_1", "f16", "bf16"):
        assert not k.qgemv_v4s_wins(1, 4096, 11008, fmt, plain, sms=132)


def test_qgemv_v4s_plan_fills_one_wave_with_whole_sweeps():
    """qgemv_v4s_plan (no GPU) at the rule's (NR, ks) on the 7B w2 and an H200's 132 SMs, and
    on odd sizes: slices of whole 32-load sweeps (the last may be shorter, never empty), rows a
    multiple of 8 NR, tiles x slices within 2 blocks an SM."""
    k = pytest.importorskip("minillama.cuda.kernels")
    assert k.qgemv_v4s_plan(4096, 11008, "q4_0", 4, 8, 132) == (6, 64, 96, 43)
    assert k.qgemv_v4s_plan(4096, 11008, "q8_0", 8, 8, 132) == (8, 96, 128, 32)
    for fmt in V4_FORMATS:
        nr, _, ks = k.QGEMV_V4S[fmt]
        for N, K in ((4096, 11008), (33, 11040), (17, 4128), (3, 96), (4224, 8192),
                     (3333, 4128), (2369, 12928)):     # (rounding the tiles up once overflowed)
            slices, per, rows, tiles = k.qgemv_v4s_plan(N, K, fmt, nr, ks, 132)
            loads = K // k.QGEMV_WEIGHTS[fmt]
            assert per == loads or per % 32 == 0, (N, K)
            assert (slices - 1) * per < loads <= slices * per and slices <= ks
            assert rows % (8 * nr) == 0 and (tiles - 1) * rows < N <= tiles * rows
            assert tiles * slices <= 2 * 132, (N, K)
            assert rows == 8 * nr or -(-N // (rows - 8 * nr)) * slices > 2 * 132, (N, K)  # fewest


def forced_split(k, monkeypatch):
    """qgemv's rule takes qgemv_v4s for every one-row launch it can run (q4_0 or q8_0, no
    RMSNorm), whatever the shape; returns the names launched from now on."""
    monkeypatch.setattr(k, "qgemv_v4s_wins", lambda M, N, K, fmt, pro, sms=None: M == 1 and fmt
                        in k.QGEMV_V4S and pro != k.GEMV_PROLOGUES["rmsnorm"])
    return launched_names(k, monkeypatch)


# (N, K): N under and over a block's rows, K an odd number of 32-blocks: long enough for the
# rule to split (11040), short and split anyway (forced: 4128 and 2080 are 2 to 5 slices, the
# last one or two loads long), one slice (96: ks = 1 writes y directly)
V4S_SIZES = [(1001, 11040), (33, 11040), (17, 4128), (129, 2080), (3, 96)]


@gpu
@pytest.mark.parametrize("fmt,N,K", [(f, n, k) for f in V4_FORMATS for n, k in V4S_SIZES])
def test_qgemv_v4s_matches_float64_at_one_row(cuda, cp, monkeypatch, fmt, N, K):
    """qgemv_v4s (v4 split over k, the slices added in order by a tile's last block) keeps
    v4's 1e-5 against float64, x spanning 80 binades and a unit of zeros too; two launches in
    a row give the same bits (the counters are back at zero, the sum in slice order)."""
    k = cuda.kernels
    launched = forced_split(k, monkeypatch)
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    x = rng.standard_normal((1, K)).astype(np.float32)
    wide = (x * 2.0 ** rng.integers(-40, 40, (1, K))).astype(np.float32)
    wide[0, 32:64] = 0.0
    for xs in (x, wide):
        y = k.qgemv(cp.asarray(xs), w, out=poison(cp, (1, N)))
        assert product_err(y, xs.astype(np.float64), w64, V4_UNIT[fmt]) < 1e-5
    again = k.qgemv(cp.asarray(wide), w, out=poison(cp, (1, N)))
    assert np.array_equal(y.get().view(np.uint32), again.get().view(np.uint32))
    assert set(launched) == {k._qgemv_v4s_name(fmt, 0)}, launched


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4s_prologues_and_accumulate(cuda, cp, monkeypatch, fmt):
    """SwiGLU (w2's launch) and accumulate (wo's and w2's) through the split; RMSNorm goes to
    v4 (a slice of k does not see the row's sum of squares)."""
    k = cuda.kernels
    launched = forced_split(k, monkeypatch)
    packed, w64 = stored_weight(fmt, 129, 2080)
    check_prologues(cp, k.qgemv, packed.map(cp.asarray), w64, rows=(1,))
    assert set(launched) == {k._qgemv_v4_name(fmt, 1), k._qgemv_v4s_name(fmt, 2),
                             k._qgemv_v4s_name(fmt, 0)}, launched


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4s_any_order_adds_the_slices_by_atomics(cuda, cp, monkeypatch, fmt):
    """any_order with accumulate (FusedDecoder's one-row w2 unless deterministic): each slice
    adds into y as it ends, plain or after SwiGLU, within 1e-5 of float64, and no counter is
    touched; without accumulate it changes nothing, bit for bit."""
    from minillama.model import silu
    k = cuda.kernels
    launched = forced_split(k, monkeypatch)
    N, K = 1001, 11040
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    y0 = rng.standard_normal((1, N)).astype(np.float32)
    x = rng.standard_normal((1, K)).astype(np.float32)
    k.qgemv(cp.asarray(x), w)                        # in order: the workspace made here
    y = cp.asarray(y0)
    assert_partials_untouched(cuda, cp, lambda: k.qgemv(cp.asarray(x), w, out=y,
                                                        accumulate=True, any_order=True))
    assert rel_err(y, y0 + x.astype(np.float64) @ w64.T) < 1e-5
    h = (2 * rng.standard_normal((1, 2 * K))).astype(np.float32)
    h64 = h.astype(np.float64)
    y = cp.asarray(y0)
    k.qgemv(cp.asarray(h), w, out=y, accumulate=True, swiglu=True, any_order=True)
    assert rel_err(y, y0 + (silu(h64[:, :K]) * h64[:, K:]) @ w64.T) < 1e-5
    plain = k.qgemv(cp.asarray(x), w)
    assert cp.array_equal(k.qgemv(cp.asarray(x), w, any_order=True), plain)
    assert set(launched) == {k._qgemv_v4s_name(fmt, 0), k._qgemv_v4s_name(fmt, 2)}, launched
    assert_counters_at_zero(cuda, cp)


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4s_replays_in_a_cuda_graph(cuda, cp, monkeypatch, fmt):
    """A graph of the split launch (programmatic, as FusedDecoder captures a one-row step),
    replayed 3 times into a poisoned output: each replay the eager launch's bits, so each
    launch leaves the counters at zero for the next (else no block would be last, and y
    would stay NaN). With accumulate, each replay adds once more."""
    k = cuda.kernels
    forced_split(k, monkeypatch)
    N, K = 1001, 11040
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    h = cp.asarray((2 * rng.standard_normal((1, 2 * K))).astype(np.float32))
    y, acc = poison(cp, (1, N)), cp.zeros((1, N), np.float32)
    eager = k.qgemv(h, w, out=y, swiglu=True).get()          # the workspace made here
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.get_current_stream().synchronize()
    with stream, k.KERNELS.programmatic():
        stream.begin_capture()
        try:
            k.qgemv(h, w, out=y, swiglu=True)
            k.qgemv(h, w, out=acc, swiglu=True, accumulate=True)
        finally:
            graph = stream.end_capture()
    for replay in range(1, 4):
        with stream:                                   # in order with the replay
            y.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        assert np.array_equal(y.get().view(np.uint32), eager.view(np.uint32)), replay
        assert rel_err(acc, replay * eager.astype(np.float64)) < 1e-6, replay


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_qgemv_v4s_passes_nan_and_inf_of_x_on(cuda, cp, monkeypatch, fmt):
    """A value of x that is not finite, in one slice, makes every row NaN (its unit's scale is
    NaN, and the tile's sum adds that slice)."""
    k = cuda.kernels
    forced_split(k, monkeypatch)
    packed, _ = stored_weight(fmt, 129, 11040)
    w = packed.map(cp.asarray)
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.standard_normal((1, 11040)).astype(np.float32)
        x[0, rng.integers(11040)] = bad
        y = k.qgemv(cp.asarray(x), w, out=cp.zeros((1, 129), np.float32)).get()
        assert np.isnan(y).all(), bad


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "f16", "bf16"])
def test_qgemv_mma_plan_keeps_each_slice_in_shared_memory_and_none_empty(fmt):
    from minillama.cuda.kernels import (MMA_BLOCKS_PER_SM, MMA_MAX_SLICE, MMA_NR, MMA_SPAN,
                                        MMA_WARPS, cdiv, qgemv_mma_plan)
    span, slots, tile = MMA_SPAN[fmt], MMA_BLOCKS_PER_SM * 132, 16 * MMA_WARPS

    def waves_work(N, K, nr, ks, per_slice):
        return cdiv(cdiv(N, tile * nr) * ks, slots) * per_slice * nr
    for N, K in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096),
                 (33, span), (1000, 11040), (70000, 333)]:
        nr, ks, per_slice = qgemv_mma_plan(N, K, fmt, sms=132)
        spans = cdiv(K, span)
        assert nr in MMA_NR and per_slice * span <= max(MMA_MAX_SLICE, span)
        assert (ks - 1) * per_slice < spans <= ks * per_slice           # every slice has work
        # no plan the rule could take has fewer waves times a block's work
        for other_nr in MMA_NR:
            for other_ks in range(1, 40):
                o = qgemv_mma_plan(N, K, fmt, sms=132, nr=other_nr, ks=other_ks)
                assert waves_work(N, K, *o) >= waves_work(N, K, nr, ks, per_slice) or \
                    o[1] > max(cdiv(spans * span, MMA_MAX_SLICE), slots // cdiv(N, tile * o[0]))
    # the 7B matrices at 8 rows: wqkv and w13 in one wave of two 256-row tiles a block (the rule
    # of 2026-11-29 left them at 288 and 344 blocks of 8 warps, 1.1 and 1.3 waves of 264)
    assert qgemv_mma_plan(12288, 4096, "q4_0", sms=132) == (2, 5, 7)
    assert qgemv_mma_plan(22016, 4096, "q4_0", sms=132) == (2, 3, 11)
    assert qgemv_mma_plan(4096, 11008, "q4_0", sms=132) == (1, 8, 11)
    # then the fewest blocks: the classifier's 125 tiles of 256 rows x 2 slices cost what 63
    # of 512 rows x 2 do (two waves of 16 spans against one of 16 x 2), in half the blocks
    assert qgemv_mma_plan(32000, 4096, "q4_0", sms=132) == (2, 2, 16)
    assert qgemv_mma_plan(12288, 4096, "q4_0", sms=132, nr=1, ks=3) == (1, 3, 11)
    assert qgemv_mma_plan(100, 4096, "q4_0", sms=132, ks=1) == (1, 2, 16)  # x's slice must fit


def test_launch_rules_follow_the_blocks_an_sm_set_when_called(monkeypatch):
    """qgemv_mma_plan's waves follow MMA_BLOCKS_PER_SM and MMA_WARPS (its tiles' height) and
    qgemv_v4s_wins' wave QGEMV_V4's B as they are when called (the plan's cache is keyed by the
    slots and tile height, not frozen at the first call), and the instance names follow them
    too: what kernels/dev/ab_mma_plan.py and ab_v4_blocks.py set to compare three blocks an SM
    of 8 warps with the package's (no GPU)."""
    k = pytest.importorskip("minillama.cuda.kernels")
    assert k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132) == (2, 5, 7)     # 120 of 132 slots
    monkeypatch.setattr(k, "MMA_BLOCKS_PER_SM", 3)
    monkeypatch.setattr(k, "MMA_WARPS", 8)
    monkeypatch.setattr(k, "MMA_U", {fmt: {1: 2, 2: 1} for fmt in k.MMA_FORMATS})
    nr, ks, per_slice = k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132)
    assert 2 * 132 < k.cdiv(12288, 128 * nr) * ks <= 3 * 132 and per_slice * nr < 7 * 2
    assert k._qgemv_mma_name("q4_0", 2, 1) == "qgemv_mma<MmaQ4_0,2,1,1,3,8>"
    monkeypatch.undo()
    nr, ks, per_slice = k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132)
    assert (nr, ks, per_slice) == (2, 5, 7) and k.cdiv(12288, 256 * nr) * ks <= 132
    assert k._qgemv_mma_name("q4_0", 2, 1) == "qgemv_mma<MmaQ4_0,2,1,1,1,16>"
    assert k._qgemv_mma_name("q8_0", 1, 0) == "qgemv_mma<MmaQ8_0,1,0,2,1,16>"
    plain = k.GEMV_PROLOGUES[None]
    for fmt in V4_FORMATS:
        nr = k.QGEMV_V4[fmt][0]
        monkeypatch.setitem(k.QGEMV_V4, fmt, (nr, 1, 3))
        wave = 8 * nr * 3 * 132                                   # rows of one wave of v4 at B 3
        assert k.qgemv_v4s_wins(1, wave, 8192, fmt, plain, sms=132)
        assert not k.qgemv_v4s_wins(1, wave + 1, 8192, fmt, plain, sms=132)
        assert k._qgemv_v4_name(fmt, 1) == f"qgemv_v4<V4{fmt.upper()},1,{nr},1,3>"


def test_mma_plan_follows_every_setting_it_reads(monkeypatch):
    """qgemv_mma_plan's cache is keyed by every setting the plan reads: MMA_MAX_SLICE, MMA_SPAN
    and MMA_NR patched after a first call (as a dev A/B script may) give the patched plan, not
    the cached one, and the package's again once undone (no GPU)."""
    k = pytest.importorskip("minillama.cuda.kernels")
    package = k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132)
    assert package == (2, 5, 7)                        # slices of 7 spans of 128: 896 positions
    monkeypatch.setattr(k, "MMA_MAX_SLICE", 512)
    nr, ks, per_slice = k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132)
    assert per_slice * k.MMA_SPAN["q4_0"] <= 512 and ks >= 8
    monkeypatch.undo()
    monkeypatch.setitem(k.MMA_SPAN, "q4_0", 64)
    nr, ks, per_slice = k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132)
    assert (nr, ks, per_slice) != package and (ks - 1) * per_slice < 4096 // 64 <= ks * per_slice
    monkeypatch.undo()
    monkeypatch.setattr(k, "MMA_NR", (1,))
    assert k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132)[0] == 1
    monkeypatch.undo()
    assert k.qgemv_mma_plan(12288, 4096, "q4_0", sms=132) == package


@gpu
def test_qgemv_rule_takes_v4s_where_it_splits(cuda, cp, monkeypatch):
    """kernels.qgemv's rule, on this GPU: qgemv_v4s for one row of q4_0 or q8_0 with a long K
    (plain and SwiGLU), v4 under QGEMV_V4S_MIN_K, with RMSNorm, and where v4's grid is a wave
    or more (8 NR x B x SMs rows, QGEMV_V4's NR and B); v2 for q4_1, qgemv_mma from 4 rows.
    Each result still within 1e-5 of float64."""
    k = cuda.kernels
    launched = launched_names(k, monkeypatch)
    nr, _, blocks = k.QGEMV_V4["q4_0"]
    assert k.QGEMV_V4["q8_0"][::2] == (nr, blocks)
    wave = 8 * nr * blocks * k.sm_count()                         # rows of one wave of v4
    cases = [("q4_0", 1, 1000, 11040, None, "qgemv_v4s"),        # (fmt, M, N, K, prologue, want)
             ("q8_0", 1, 1000, 8192, "swiglu", "qgemv_v4s"),
             ("q4_0", 1, wave, 8192, "swiglu", "qgemv_v4s"),
             ("q8_0", 1, wave + 1, 8192, None, "qgemv_v4"),
             ("q4_0", 1, 1000, 8160, None, "qgemv_v4"),
             ("q8_0", 1, 1000, 11040, "rmsnorm", "qgemv_v4"),
             ("q4_1", 1, 1000, 11040, None, "qgemv_v2"),
             ("q4_0", 4, 1000, 11040, None, "qgemv_mma")]
    for fmt, M, N, K, pro, want in cases:
        packed, w64 = stored_weight(fmt, N, K)
        x = rng.standard_normal((M, 2 * K if pro == "swiglu" else K)).astype(np.float32)
        extra = {"swiglu": True} if pro == "swiglu" else {}
        if pro == "rmsnorm":
            extra = {"norm": cp.ones(K, np.float32)}
        launched.clear()
        y = k.qgemv(cp.asarray(x), packed.map(cp.asarray), out=poison(cp, (M, N)), **extra)
        assert [n.split("<")[0] for n in launched] == [want], (fmt, M, N, K, pro, launched)
        if pro is None:
            assert product_err(y, x.astype(np.float64), w64) < 1e-5, (fmt, N, K)


@gpu
@pytest.mark.parametrize("fmt", V4_FORMATS)
def test_one_row_graph_with_a_split_w2_matches_the_cpu(cuda, cp, monkeypatch, fmt):
    """FusedDecoder at one row on a model whose w2 is long enough to split (hidden_dim 8224, an
    odd number of 32-blocks): the step eagerly, then its graph (programmatic launches) replayed
    step after step, logits within 1e-4 of the CPU model with the same stored weights; w2 goes
    through qgemv_v4s, every other product through v4."""
    k = cuda.kernels
    p = ModelArgs(**{**PACKED_ARGS, "hidden_dim": 8224, "max_batch_size": 1})
    weights = stored_model_weights(p, fmt)
    ops = cuda.CudaOps(persistent=False)
    gpu_model, cpu_model = Transformer(p, weights, ops), Transformer(p, weights, CPU)
    launched = decode_one_row_in_a_graph(k, ops, gpu_model, cpu_model, 6, monkeypatch)
    products = {n for n in launched if n.startswith("qgemv")}
    assert products == {k._qgemv_v4s_name(fmt, 2), k._qgemv_v4_name(fmt, 1),
                        k._qgemv_v4_name(fmt, 0)}, products          # w2; wqkv, w13, cls; wo


# what a batch step's logits are held to against the CPU model's: x in two float16 parts on
# the tensor cores (x16_batches=False) keeps the float32 GEMV's bound; in one (the default,
# qgemv_mma's x16) the prompts' tensor-core bound, each value of x rounded to 11 bits
BATCH_BOUND = {False: 1e-4, True: 2e-3}
# and what two such steps that add in other orders (deterministic or not) are held to against
# each other: with x in two parts their sums differ in the last places (~4e-7); in one, a
# value of x that those last places carry across a float16 rounding boundary moves by 2^-11
# of itself, and such moves add up through the layers (up to 2.2e-4 in 15 models of three
# formats, H200, 2026-12-02)
ORDER_BOUND = {False: 1e-5, True: 1e-3}


@gpu
@pytest.mark.parametrize("x16", [True, False])
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "f16"])
def test_batch_graphs_of_stored_formats_launch_programmatically_and_match_the_cpu(cuda, cp, fmt,
                                                                                  x16):
    """FusedDecoder at 8, 16 and 32 rows of a model kept as stored: each batch's graph is
    captured with programmatic launches (PROGRAMMATIC_PACKED_ROWS, 32 since 2026-11-30) and
    replayed step after step, the logits within BATCH_BOUND of the CPU model with the same
    weights, x in one float16 part or two; 33 rows, past the rule, launch the ordinary way and
    match too."""
    from minillama.cuda import fused
    assert fused.PROGRAMMATIC_PACKED_ROWS == 32
    p = ModelArgs(**{**PACKED_ARGS, "max_batch_size": 33})
    weights = stored_model_weights(p, fmt)
    ops = cuda.CudaOps(persistent=False, x16_batches=x16)
    gpu_model, cpu_model = Transformer(p, weights, ops), Transformer(p, weights, CPU)
    forward = ops.decoder(gpu_model)
    for bsz in (8, 16, 32, 33):
        for pos in range(3):                     # the first step eager, then the graph
            tok = rng.integers(0, p.vocab_size, size=(bsz, 1))
            got = forward(tok, pos)
            want = cpu_model.forward(tok, pos)
            assert rel_err(got, want) < BATCH_BOUND[x16], (fmt, bsz, pos)
        decoder = ops._decoders[gpu_model]
        assert type(decoder).__name__ == "FusedDecoder" and decoder.graphs[bsz] is not None
        assert decoder.programmatic(bsz) == (bsz <= 32), bsz


@gpu
@pytest.mark.parametrize("x16", [True, False])
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "bf16"])
def test_batch_steps_defer_norms_and_add_in_any_order_unless_deterministic(cuda, cp, fmt, x16):
    """A batch step of a model kept as stored: FusedDecoder's steps leave wqkv's and w13's
    RMSNorm to attention_decode and w2 and add every split's slices by atomics (defers_norms,
    from MMA_MIN_ROWS rows), and CudaOps(deterministic=True)'s add them in slice order and
    repeat their bits from decoder to decoder; both within BATCH_BOUND of the CPU model, x in
    one float16 part or two, step after step through the graph (the buffers the atomics add
    into zeroed by the launches before, a 3-row step between that zeroes nothing), and within
    ORDER_BOUND of each other. bfloat16 weights keep x's three parts whatever x16 says, and
    their bounds with them."""
    from minillama.cuda.kernels import KERNELS
    one_part = x16 and fmt != "bf16"
    p = ModelArgs(**{**PACKED_ARGS, "max_batch_size": 8})
    weights = stored_model_weights(p, fmt)
    cpu_model = Transformer(p, weights, CPU)
    launch = KERNELS.launch
    tokens = [rng.integers(0, p.vocab_size, size=(8 if pos != 3 else 3, 1)) for pos in range(6)]
    want = [cpu_model.forward(tok, pos) for pos, tok in enumerate(tokens)]
    logits = {}
    for deterministic in (True, True, False):
        ops = cuda.CudaOps(persistent=False, deterministic=deterministic, x16_batches=x16)
        model = Transformer(p, weights, ops)
        forward = ops.decoder(model)
        flags = []                          # each qgemv_mma launch's (any_order, rms_out given)

        def spy(name, grid, block, args, *rest, **kwargs):
            if name.startswith("qgemv_mma<"):       # rms_out: NULL (an integer) or an array
                flags.append((int(args[12]), not isinstance(args[13], np.integer)))
            return launch(name, grid, block, args, *rest, **kwargs)
        KERNELS.launch = spy
        try:
            got = [forward(tok, pos).get() for pos, tok in enumerate(tokens)]
        finally:
            KERNELS.launch = launch
        decoder = ops._decoders[model]
        assert {f for f, _ in flags} == ({0} if deterministic else {0, 1}), flags
        assert {d for _, d in flags} == ({False} if deterministic else {False, True}), flags
        assert decoder.defers_norms(8) == (not deterministic) and not decoder.defers_norms(3)
        assert decoder.graphs[8] is not None
        for pos in range(6):
            assert rel_err(got[pos], want[pos]) < BATCH_BOUND[one_part], (deterministic, pos)
        logits.setdefault(deterministic, []).append(got)
    first, second = logits[True]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(rel_err(a, b.astype(np.float64)) < ORDER_BOUND[one_part]
               for a, b in zip(logits[False][0], first))


@gpu
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "f16", "bf16"])
def test_batch_steps_take_x_in_one_float16_part_unless_asked_for_two(cuda, cp, fmt,
                                                                     monkeypatch):
    """CudaOps() (x16_batches by default, the environment silent): a batch step's products on
    the tensor cores take x in one float16 part (qgemv_mma's x16, every launch of it an OnePart
    instance), deferred norms or not, graph or not, within the prompts' 2e-3 of the CPU model;
    CudaOps(x16_batches=False) launches none, within 1e-4. bfloat16 weights keep their three
    parts either way, and their logits are the two-part step's to its 2e-6 of atomics' order.
    A direct FusedDecoder takes one part too."""
    from minillama.cuda.fused import FusedDecoder
    monkeypatch.delenv("MINILLAMA_X16_BATCHES", raising=False)
    p = ModelArgs(**{**PACKED_ARGS, "max_batch_size": 8})
    weights = stored_model_weights(p, fmt)
    cpu_model = Transformer(p, weights, CPU)
    tokens = [rng.integers(0, p.vocab_size, size=(8, 1)) for _ in range(4)]
    want = [cpu_model.forward(tok, pos) for pos, tok in enumerate(tokens)]
    launched, got = launched_names(cuda.kernels, monkeypatch), {}
    for asked, deterministic in ((False, False), (None, False), (None, True)):
        ops = cuda.CudaOps(persistent=False, deterministic=deterministic, x16_batches=asked)
        model = Transformer(p, weights, ops)
        forward, first = ops.decoder(model), len(launched)
        x16 = asked is None                             # the default
        assert ops.x16_batches is x16 and ops._decoders[model].x16_batches is x16
        got[x16, deterministic] = [forward(tok, pos).get() for pos, tok in enumerate(tokens)]
        mma = [n for n in launched[first:] if n.startswith("qgemv_mma<")]
        assert mma and all(n.startswith("qgemv_mma<OnePart<") == (x16 and fmt != "bf16")
                           for n in mma), mma
        assert ops._decoders[model].graphs[8] is not None
        for pos in range(4):
            bound = BATCH_BOUND[x16 and fmt != "bf16"]
            assert rel_err(got[x16, deterministic][pos], want[pos]) < bound, (x16, pos)
    if fmt == "bf16":
        for a, b in zip(got[True, False], got[False, False]):
            assert rel_err(a, b.astype(np.float64)) < 2e-6
    assert FusedDecoder(Transformer(p, weights, cuda.CudaOps())).x16_batches is True


# ----------------------------------------------------------------------------
# matmul.cu: f32_to_16bit and gemm_v5

@gpu
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", [(1, 8), (3, 17), (37, 1000), (129, 4128)])
def test_to_16bit_rounds_as_numpy(cuda, cp, bf16, shape):
    # over float16's whole range: subnormals, and overflow to inf (as NumPy's cast)
    x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-20, 20, shape)).astype(np.float32)
    got = cuda.kernels.to_16bit(cp.asarray(x), bf16=bf16).get()
    if bf16:
        assert got.dtype == np.uint16 and (got == formats.dense.to_bf16(x)).all()
    else:
        with np.errstate(over="ignore"):
            want = x.astype(np.float16)
        assert got.dtype == np.float16 and (got.view(np.uint16) == want.view(np.uint16)).all()


GEMM_SIZES = [(1, 8, 32), (37, 127, 96), (65, 77, 1024), (128, 256, 1024), (300, 1000, 4128)]


# every shape a block may cut (odd M and N, N % 4 == 0 or not for gemm_v6's 16-byte stores, more
# tile-rows than one of gemm_v6's L2 groups of V6_GROUP = 16: 2100 rows of 128)
GEMM_V6_SIZES = GEMM_SIZES + [(129, 33, 1000), (2100, 300, 96), (257, 516, 160)]


def needs_sm90(cuda):
    if not cuda.kernels.has_wgmma():
        pytest.skip("gemm_v7's wgmma runs on compute capability 9.0 only")


# v6 and v7 keep v5's contract. gemm_v7's 64-wide k-tiles: K = 72, 96, 160, 1000 end in a part
# of one (and K = 96, 160, 4128 in one GGUF block of the last for packed weights); its 128 x 128
# or 256 tiles cut by odd M and N, N odd (its 8-byte stores fall back to single floats); the
# packed formats in its default tile shape (the others are compiled for f16 and bf16)
GEMMS = [("gemm_v5", None), ("gemm_v6", None)] + [
    ("gemm_v7", config) for config in ("128x256x4", "128x256x3", "128x128x6")]


@gpu
@pytest.mark.parametrize("gemm,config", GEMMS)
@pytest.mark.parametrize("fmt", STORED)
@pytest.mark.parametrize("M,N,K", GEMM_V6_SIZES + [(2100, 2049, 136), (1, 1, 8), (77, 301, 4128)])
def test_gemm_matches_float64_of_the_16bit_inputs(cuda, cp, gemm, config, fmt, M, N, K):
    if gemm == "gemm_v7":
        needs_sm90(cuda)
        if fmt in BLOCKED and config != cuda.kernels.GEMM_V7_DEFAULT:
            pytest.skip("gemm_v7's other tile shapes are compiled for f16 and bf16")
    if K % 32 and fmt in BLOCKED:
        pytest.skip("block formats hold whole blocks of 32")
    packed, w64 = stored_weight(fmt, N, K)
    if fmt in BLOCKED:                 # the kernels scale a block's codes in float16 arithmetic
        w64 = w64.astype(np.float16).astype(np.float64)
    x = rng.standard_normal((M, K)).astype(np.float32)
    a = cuda.kernels.to_16bit(cp.asarray(x), bf16=fmt == "bf16")
    out = poison(cp, (M, N))
    c = getattr(cuda.kernels, gemm)(a, packed.map(cp.asarray), out=out,
                                    **({"config": config} if config else {}))
    assert c is out
    assert rel_err(c, rounded(x, fmt) @ w64.T) < 2e-3


@gpu
@pytest.mark.parametrize("config", ["128x256x3", "128x256x4", "256x128x3", "256x128x4",
                                    "128x128x4"])
@pytest.mark.parametrize("M,N,K", [(1, 8, 32), (37, 127, 96), (300, 1000, 4128), (2100, 260, 72)])
def test_gemm_v6_tile_shapes_match_float64(cuda, cp, config, M, N, K):
    packed, w64 = stored_weight("f16", N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    a = cuda.kernels.to_16bit(cp.asarray(x))
    c = cuda.kernels.gemm_v6(a, packed.map(cp.asarray), out=poison(cp, (M, N)), config=config)
    assert rel_err(c, rounded(x, "f16") @ w64.T) < 2e-3


@gpu
def test_gemm_v7_rejects_misuse(cuda, cp):
    k = cuda.kernels
    q4 = stored_weight("q4_0", 8, 64)[0].map(cp.asarray)
    f16 = stored_weight("f16", 8, 64)[0].map(cp.asarray)
    a = cp.ones((2, 64), np.float16)
    other = next(c for c in k.GEMM_V7_CONFIGS if c != k.GEMM_V7_DEFAULT)
    cases = [
        (lambda: k.gemm_v7(a, q4, config=other), "f16 and bf16 weights only, got q4_0"),
        (lambda: k.gemm_v7(a, f16, config="256x128x4"), "config"),
        (lambda: k.gemm_v7(a.astype(np.float32), f16), "float16"),
        (lambda: k.gemm_v7(cp.ones((2, 32), np.float16), f16), "(N, K)"),
    ]
    for call, words in cases:
        with pytest.raises(DeviceError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()


@gpu
def test_packed_kernels_reject_misuse(cuda, cp):
    k = cuda.kernels
    host, _ = stored_weight("q4_0", 8, 64)
    w = host.map(cp.asarray)
    x = cp.ones((2, 64), np.float32)
    f16 = formats.quantize(np.ones((8, 12), np.float32), "f16").map(cp.asarray)
    unaligned = cp.ones(2 * 64 + 1, np.float32)[1:].reshape(2, 64)
    other_v6 = next(c for c in k.GEMM_V6_CONFIGS if c != k.GEMM_V6_DEFAULT)   # f16 only
    cases = [
        (lambda: k.qgemv(x.astype(np.float64), w), "x: expected float32"),
        (lambda: k.qgemv(cp.ones((2, 32), np.float32), w), "(N, K)"),
        (lambda: k.qgemv(x, w, accumulate=True), "accumulate"),
        (lambda: k.qgemv(x, w, norm=x[0], swiglu=True), "one"),
        (lambda: k.qgemv(x, host), "CuPy array"),
        (lambda: k.qgemv(x, np.ones((8, 64), np.float32)), "formats.Packed"),
        (lambda: k.qgemv(x, formats.quantize(np.ones((8, 64), np.float32), "f32")), "q4_1"),
        (lambda: k.qgemv(cp.ones((2, 12), np.float32), f16), "multiple of 8"),
        (lambda: k.qgemv(unaligned, w), "aligned"),
        (lambda: k.qgemv(x, w, out=cp.empty((2, 9), np.float32)), "out"),
        (lambda: k.qgemv(x, w, version=5), "version must be"),
        (lambda: k.qgemv(x, w, version=4), "version 4 takes one row of x"),
        (lambda: k.qgemv(cp.ones((1, 12), np.float32), f16, version=4), "q4_0 or q8_0 weights"),
        (lambda: k.qgemv_mma(x, w, nr=3), "nr must be one of"),
        (lambda: k.qgemv_mma(x, w, norm=x[0], swiglu=True), "qgemv_mma: norm and swiglu"),
        (lambda: k.gemm_v5(x, w), "float16"),
        (lambda: k.gemm_v5(x.astype(np.float16), w, config="1x1"), "config"),
        (lambda: k.gemm_v5(cp.ones((2, 32), np.float16), w), "(N, K)"),
        (lambda: k.to_16bit(x, out=cp.empty((2, 64), np.float32)), "out"),
        (lambda: k.gemm_v6(x, w), "float16"),
        (lambda: k.gemm_v6(x.astype(np.float16), w, config="128x128x4"), "config"),
        (lambda: k.gemm_v6(x.astype(np.float16), w, config=other_v6), "f16 weights only"),
        (lambda: k.gemm_v6(cp.ones((2, 32), np.float16), w), "(N, K)"),
    ]
    for call, words in cases:
        with pytest.raises(DeviceError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()


@gpu
def test_the_module_has_the_instances_the_wrappers_launch(cuda, cp):
    groups = cuda.kernels.KERNELS.groups           # each format's kernels: a module of its own
    for fmt in STORED:
        for rows in cuda.kernels.QGEMV_ROWS:
            for pro in cuda.kernels.GEMV_PROLOGUES.values():
                assert f"qgemv<Fmt{formats.FORMATS[fmt].KERNEL[fmt]},{rows},{pro}>" in groups[fmt]
        assert f"gemm_v5<128,128,4,{cuda.kernels.GEMM_V5_FORMATS[fmt]}>" in groups[fmt]
        assert cuda.kernels._gemm_v6_name(fmt, cuda.kernels.GEMM_V6_DEFAULT) in groups["gemm_v6"]
        for pro in cuda.kernels.GEMV_PROLOGUES.values():
            assert f"qgemv_v2<V2{formats.FORMATS[fmt].KERNEL[fmt]},1,{pro},2,4>" in groups[fmt]
            if fmt in V4_FORMATS:
                assert cuda.kernels._qgemv_v4_name(fmt, pro) in groups[fmt]
                if pro != cuda.kernels.GEMV_PROLOGUES["rmsnorm"]:
                    assert cuda.kernels._qgemv_v4s_name(fmt, pro) in groups[fmt]
    for rows in cuda.kernels.QGEMV_V2_F32_ROWS:           # float32 batches (kernels.gemv)
        for pro in cuda.kernels.GEMV_PROLOGUES.values():
            assert f"qgemv_v2<V2F32,{rows},{pro},4,1>" in groups["f32"]
    assert "attention_decode<4,unsigned short>" in groups["common"]
    assert "qgemv.cu" in runtime.KERNEL_FILES
    source = runtime.kernel_source()
    for kernel in ("qgemv", "qgemv_v2", "qgemv_v4", "qgemv_v4s", "gemm_v5", "gemm_v6",
                   "f32_to_16bit", "attention_decode"):
        assert f"\n{kernel}(" in source or f" {kernel}(" in source


# ----------------------------------------------------------------------------
# CudaOps: linear(x, Packed) reads the weight as stored

@gpu
@pytest.mark.parametrize("fmt", STORED)
def test_cuda_ops_linear_keeps_packed_weights_packed(cuda, cp, fmt):
    ops = cuda.CudaOps()
    packed, w64 = stored_weight(fmt, 45, 96)
    w = ops.weight(packed)
    assert isinstance(w, Packed) and w.format == fmt and w.shape == packed.shape
    assert all(isinstance(a, cp.ndarray) for a in w.planes.values())
    assert w.nbytes == packed.nbytes == formats.bytes_for(fmt, packed.shape)
    for lead in [(1, 1), (3, 1), (2, 5), (64, 1)]:       # up to 64 rows: qgemv, float32 x
        x = rng.standard_normal(lead + (96,)).astype(np.float32)
        got = ops.linear(x, w)
        assert isinstance(got, cp.ndarray) and got.shape == lead + (45,)
        assert rel_err(got, x.astype(np.float64) @ w64.T) < 1e-5, f"rows {lead}"
        assert rel_err(got, CPU.linear(x, packed)) < 1e-5      # NumpyOps dequantizes
    if fmt in BLOCKED:
        w64 = w64.astype(np.float16).astype(np.float64)
    for lead in [(65, 1), (3, 70)]:                       # more rows: gemm_v5, 16-bit x
        x = rng.standard_normal(lead + (96,)).astype(np.float32)
        got = ops.linear(x, w)
        assert got.shape == lead + (45,) and got.dtype == np.float32
        assert rel_err(got, rounded(x, fmt) @ w64.T) < 2e-3, f"rows {lead}"


@gpu
def test_cuda_ops_widens_a_16bit_weight_its_kernels_cannot_read(cuda, cp):
    ops = cuda.CudaOps()
    packed = formats.quantize(rng.standard_normal((7, 12)).astype(np.float32), "bf16")
    w = ops.weight(packed)                              # rows of 12 values: not 16-byte loads
    assert isinstance(w, cp.ndarray) and w.dtype == np.float32
    x = rng.standard_normal((3, 12)).astype(np.float32)
    assert rel_err(ops.linear(x, w), x.astype(np.float64) @
                   formats.dequantize(packed).astype(np.float64).T) < 1e-5


# ----------------------------------------------------------------------------
# models whose weights are stored in each format, on every GPU path

# every matrix of whole blocks of 32; 4 heads of 16, 2 kv heads (GQA), an odd vocabulary
PACKED_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96,
                   max_seq_len=48, max_batch_size=3)
MODES = ["generic", "fused", "fused+graphs"]


def stored_model_weights(p, fmt, tied=False, seed=None, embedding=None):
    """random_weights(p) with every matrix stored in `fmt` (formats.quantize; "f32" keeps them
    float32 arrays) and the norms float32. embedding: the embedding table's own format (the
    classifier too, when tied), as a GGUF file may store it; `fmt` when None."""
    seed = rng.integers(1 << 30) if seed is None else seed
    weights = random_weights(p, seed=seed, tied=tied)
    stored = {}
    for name, w in weights.items():
        if name == "output.weight" and tied:
            continue
        want = embedding if embedding and name == "tok_embeddings.weight" else fmt
        stored[name] = w if w.ndim == 1 or want == "f32" else formats.quantize(w, want, name)
    if tied:
        stored["output.weight"] = stored["tok_embeddings.weight"]
    return stored


def gpu_ops(cuda, mode):
    return cuda.CudaOps(fused_decode=mode != "generic", graphs=mode == "fused+graphs")


def decode_against_cpu(ops, gpu_model, cpu_model, vocab, bound=1e-4, bsz=3, prompt_len=5,
                       steps=12):
    """A prompt, then one token per row and step (bsz, then bsz - 1 for two steps, then bsz
    again), through ops.decoder as the generation loops call it; every step's logits within
    `bound` of the CPU model's, and the greedy token of every row the same, but where the CPU
    logits' top two are closer than twice the largest difference between the two backends
    (there either may win). The two backends add in other orders, ~1e-6 apart, and a random
    model's top two logits come that close in about one of the thousand-odd rows a run of these
    tests compares: two runs on an H200 (2026-11-30) failed on one such row each, with every
    logit within the bound, when the same token was asked for everywhere."""
    forward = ops.decoder(gpu_model)
    prompt = rng.integers(0, vocab, size=(bsz, prompt_len))
    got = forward(prompt, 0)
    ref = cpu_model.forward(prompt, 0)
    assert rel_err(got, ref) < bound, "prompt"
    for pos in range(prompt_len, prompt_len + steps):
        rows = bsz - 1 if pos in (prompt_len + 4, prompt_len + 5) else bsz
        tok = rng.integers(0, vocab, size=(rows, 1))
        got = forward(tok, pos)
        ref = cpu_model.forward(tok, pos)
        assert got.shape == (rows, 1, vocab)
        assert rel_err(got, ref) < bound, f"position {pos}"
        g, c = got.get()[:, -1], ref[:, -1]                     # (rows, vocab)
        top2 = np.sort(c, axis=-1)[:, -2:]
        same = g.argmax(-1) == c.argmax(-1)
        same |= top2[:, 1] - top2[:, 0] <= 2 * np.abs(g - c).max(-1)       # a near-tie
        assert same.all(), f"position {pos}: greedy tokens differ"


@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", STORED)
def test_stored_model_on_the_gpu_matches_the_cpu(cuda, cp, fmt, mode):
    p = ModelArgs(**PACKED_ARGS)
    weights = stored_model_weights(p, fmt, tied=fmt in ("bf16", "q8_0"))
    ops = gpu_ops(cuda, mode)
    gpu_model, cpu_model = Transformer(p, weights, ops), Transformer(p, weights, CPU)
    for w in (gpu_model.layers[0].attention.wqkv, gpu_model.layers[1].feed_forward.w2,
              gpu_model.output):                           # kept as stored, on the GPU
        assert isinstance(w, Packed) and w.format == fmt
        assert all(isinstance(a, cp.ndarray) for a in w.planes.values())
    decode_against_cpu(ops, gpu_model, cpu_model, p.vocab_size)
    check_decode_path(ops, gpu_model, mode)


def check_decode_path(ops, gpu_model, mode):
    """After decode_against_cpu (3 rows): the generic mode has no FusedDecoder; the others do,
    with 5 launches a layer and 2 more, and a CUDA graph for 3 rows in the graph mode."""
    decoder = ops._decoders.get(gpu_model)
    if mode == "generic":
        assert decoder is None
    else:
        assert decoder is not None, "FusedDecoder must cover every storage format"
        assert decoder.launches_per_step[3] == 5 * gpu_model.params.n_layers + 2
        assert (3 in decoder.graphs) == (mode == "fused+graphs")


@gpu
@pytest.mark.parametrize("fmt", STORED)
def test_a_long_prompt_goes_through_the_tensor_cores(cuda, cp, fmt):
    """3 x 30 = 90 rows: gemm_v6, x rounded to 16 bits before each product. Each rounding moves
    a value by up to 2^-11 (float16) or 2^-8 (bfloat16) of itself; through two layers and the
    classifier that is ~1e-3 (~6e-3 for bfloat16) of the logits, held to 5e-3 (2e-2). The step
    after it reads the keys and values the prompt wrote, so it is held to the same."""
    p = ModelArgs(**PACKED_ARGS)
    weights = stored_model_weights(p, fmt)
    gpu_model, cpu_model = Transformer(p, weights, cuda.CudaOps()), Transformer(p, weights, CPU)
    prompt = rng.integers(0, p.vocab_size, size=(3, 30))
    bound = 2e-2 if fmt == "bf16" else 5e-3
    assert rel_err(gpu_model.forward(prompt, 0), cpu_model.forward(prompt, 0)) < bound
    tok = rng.integers(0, p.vocab_size, size=(3, 1))          # then decoding: qgemv again
    forward = gpu_model.ops.decoder(gpu_model)
    assert rel_err(forward(tok, 30), cpu_model.forward(tok, 30)) < bound


# ----------------------------------------------------------------------------
# the float16 KV cache

@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,fmt", [("odd", "f32"), ("packed", "q4_0")])
def test_float16_kv_cache_on_the_gpu_matches_the_cpu(cuda, cp, shape, fmt, mode):
    """The cache holds float16 on both sides: a key or value is rounded to nearest as it is
    written (attention_decode, or the generic path's assignment; NumPy's on the CPU) and widened
    as it is read, and attention computes in float32. The two backends' float32 keys and values
    differ by rounding (~1e-7), and where that carries one across a float16 rounding boundary
    the caches differ by one float16 step (2^-11 of it): logits move by up to ~2e-4 on these
    tiny models, against ~1e-6 with a float32 cache. Held to 1e-3, and greedy tokens equal
    except at near-ties. The odd shape has head_dim 6 (attention reads the cache element by
    element), the packed one 16 (4 at a time)."""
    p = ModelArgs(**(ODD if shape == "odd" else PACKED_ARGS))
    weights = stored_model_weights(p, fmt)
    ops = gpu_ops(cuda, mode)
    gpu_model = Transformer(p, weights, ops, kv_dtype="float16")
    cpu_model = Transformer(p, weights, CPU, kv_dtype="float16")
    cache = gpu_model.layers[0].attention.cache_k
    assert isinstance(cache, cp.ndarray) and cache.dtype == np.float16
    decode_against_cpu(ops, gpu_model, cpu_model, p.vocab_size, bound=1e-3)
    if mode != "generic":
        assert ops._decoders.get(gpu_model) is not None, "FusedDecoder covers a float16 cache"


# ----------------------------------------------------------------------------
# one graph replay per token, nothing allocated per step

@gpu
def test_graph_decoding_allocates_nothing_per_step(cuda, cp):
    p = ModelArgs(**{**PACKED_ARGS, "max_seq_len": 64, "max_batch_size": 1})
    ops = cuda.CudaOps()
    model = Transformer(p, stored_model_weights(p, "q4_0", tied=True), ops)
    forward = ops.decoder(model)
    token = int(forward(np.array([[1, 2, 3]]), 0)[0, -1].argmax())      # the prompt
    for pos in (3, 4):                                   # the first step records the graph
        token = int(forward(np.array([[token]]), pos)[0, -1].argmax())
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    for pos in range(5, 55):                             # 50 steps, each one graph replay
        token = int(forward(np.array([[token]]), pos)[0, -1].argmax())
    assert pool.used_bytes() == before
    decoder = ops._decoders[model]
    assert 1 in decoder.graphs and decoder.graphs[1] is not None


# ----------------------------------------------------------------------------
# SmolLM2 Q4_1 (the default model) in its native format, and a random model of its shape

def greedy_logits(forward, prompt, steps):
    """Greedy ids after `prompt` (the prompt in one call, then one token per call) and the
    logits of every step, on the host."""
    ids, all_logits = list(prompt), []
    logits = forward(np.array([ids]), 0)
    for _ in range(steps):
        last = np.asarray(logits.get() if hasattr(logits, "get") else logits)[0, -1]
        all_logits.append(last)
        ids.append(int(last.argmax()))
        logits = forward(np.array([ids[-1:]]), len(ids) - 1)
    return ids[len(prompt):], np.array(all_logits)


def assert_same_greedy(gpu_run, cpu_run):
    (gpu_ids, gpu_logits), (cpu_ids, cpu_logits) = gpu_run, cpu_run
    assert gpu_ids == cpu_ids
    for step, (g, c) in enumerate(zip(gpu_logits, cpu_logits)):
        err = np.linalg.norm(g - c) / np.linalg.norm(c)
        assert err < 1e-4, f"step {step}: logits differ by {err:.2e}"


def dequantized(weights):
    """The same weights as float32 arrays (formats.dequantize), a tied table still one object."""
    done = {}
    for name, w in weights.items():
        if id(w) not in done:
            done[id(w)] = formats.dequantize(w) if isinstance(w, Packed) else w
    return {name: done[id(w)] for name, w in weights.items()}


@gpu
def test_smollm2_q4_1_greedy_on_the_gpu_in_its_own_format_matches_the_cpu(cuda, cp):
    from minillama.download import DEFAULT_MODEL, MODELS, cache_dir
    from minillama.loading import load_model
    path = cache_dir() / MODELS[DEFAULT_MODEL][0]
    if not path.is_file():
        pytest.skip(f"SmolLM2 is not cached ({path}); the random model of its shape stands in")
    gpu_model = load_model(path, device="cuda", max_seq_len=80)
    matrices = [w for layer in gpu_model.layers
                for w in (layer.attention.wqkv, layer.feed_forward.w13, layer.feed_forward.w2)]
    assert any(isinstance(w, Packed) and w.format == "q4_1" for w in matrices), \
        "the GPU keeps SmolLM2's Q4_1 tensors as stored"
    assert gpu_model.ops._fused_decoder(gpu_model) is not None
    cpu_model = load_model(path, device="cpu", max_seq_len=80)
    prompt = [1, 9690, 198, 504]                  # a few token ids
    assert_same_greedy(greedy_logits(gpu_model.ops.decoder(gpu_model), prompt, 64),
                       greedy_logits(cpu_model.forward, prompt, 64))


@gpu
def test_random_q4_1_model_of_smollm2s_shape_greedy_matches_the_cpu(cuda, cp):
    """SmolLM2-135M's widths (dim 576, 9 heads of 64 sharing 3 kv heads, hidden 1536, vocab
    49152, rope theta 1e5), 4 of its 30 layers, matrices in Q4_1 and the tied embedding in Q8_0
    as its GGUF file stores them. The CPU runs the dequantized float32 weights: what NumpyOps
    multiplies by when it keeps them packed, and what the CPU rule expands them to."""
    p = ModelArgs(dim=576, n_layers=4, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                  vocab_size=49152, rope_theta=100000.0, max_seq_len=80, max_batch_size=1)
    weights = stored_model_weights(p, "q4_1", tied=True, embedding="q8_0")
    ops = cuda.CudaOps()
    gpu_model = Transformer(p, weights, ops)
    assert isinstance(gpu_model.output, Packed) and gpu_model.output.format == "q8_0"
    assert ops._fused_decoder(gpu_model) is not None
    cpu_model = Transformer(p, dequantized(weights), CPU)
    prompt = [1, 9690, 198, 504]
    assert_same_greedy(greedy_logits(ops.decoder(gpu_model), prompt, 64),
                       greedy_logits(cpu_model.forward, prompt, 64))


# ----------------------------------------------------------------------------
# no GPU needed

def covered(matrix, cache_dtype=np.float32, params=None):
    """FusedDecoder.covers of a stand-in model: every matrix `matrix`, float32 norms, a KV
    cache of `cache_dtype`; just what covers reads."""
    from types import SimpleNamespace as Stub
    from minillama.cuda import FusedDecoder
    p = params or ModelArgs(**PACKED_ARGS)
    norm = np.ones(p.dim, np.float32)
    layer = Stub(attention=Stub(wqkv=matrix, wo=matrix, cache_k=np.zeros(1, cache_dtype)),
                 feed_forward=Stub(w13=matrix, w2=matrix), attention_norm=norm, ffn_norm=norm)
    return FusedDecoder.covers(Stub(params=p, output=matrix, norm=norm,
                                    layers=[layer] * p.n_layers))


def test_fused_decoder_covers_every_storage_format_and_a_float16_cache():
    from minillama.quant import Q8Tensor, quantize_q8
    w = rng.standard_normal((64, 64)).astype(np.float32)
    assert covered(w) and covered(w, np.float16)
    for fmt in STORED:
        assert covered(formats.quantize(w, fmt)), fmt
    assert not covered(Q8Tensor(*quantize_q8(w, 32), 32))      # llama2.c's int8: generic path
    assert not covered(w.astype(np.float16))                    # a float16 array: generic path
    assert not covered(w, np.float64)
    assert not covered(w, params=ModelArgs(**{**PACKED_ARGS, "max_seq_len": 20000}))


def test_kernel_sources_come_from_this_checkout():
    # a checkout on PYTHONPATH compiles its own kernels/, even where another is pip-installed
    from pathlib import Path
    assert runtime.kernel_dir() == Path(runtime.__file__).resolve().parents[2] / "kernels"

"""qgemv_mma (kernels/qgemv_mma.cu): batches of rows on the tensor cores with x in three
bfloat16 parts, held to the same 1e-5 as the float32 GEMV against float64 of the dequantized
weights. Odd sizes, every prologue, accumulate, both tile heights, k split into slices (the
partial sums added by the last block of each tile, or by atomics with any_order), outputs
poisoned first. Marked `gpu`.
"""
import functools

import numpy as np
import pytest

from test_cuda import cuda, poison, product_err, rel_err  # noqa: F401  (fixtures and helpers)
from test_cuda_formats import assert_counters_at_zero, assert_partials_untouched, \
    check_prologues, stored_weight

gpu = pytest.mark.gpu
rng = np.random.default_rng()

MMA = ("f16", "bf16", "q8_0", "q4_0")
X16 = ("f16", "q8_0", "q4_0")               # qgemv_mma's x16: the formats of float16 mma's
SIZES = [(1, 32), (17, 96), (129, 4128), (300, 1056), (33, 11008)]     # (N, K), whole blocks
BATCHES = (1, 2, 3, 8, 9, 13, 64)


@gpu
@pytest.mark.parametrize("ks", [None, 1, 3])
@pytest.mark.parametrize("nr", [1, 2])
@pytest.mark.parametrize("fmt,N,K", [(f, n, k) for f in MMA for n, k in SIZES]
                         + [(f, 77, 1000) for f in ("f16", "bf16")])
def test_qgemv_mma_matches_float64_of_the_dequantized_weights(cuda, cp, fmt, N, K, nr, ks):
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    for M in BATCHES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        out = poison(cp, (M, N))
        y = cuda.kernels.qgemv_mma(cp.asarray(x), w, out=out, nr=nr, ks=ks)
        assert y is out
        assert product_err(y, x.astype(np.float64), w64) < 1e-5, f"M={M}"


def rounded_x16(x, span):
    """x as qgemv_mma's x16 takes it: each span of `span` positions of each row scaled by the
    power of two that brings its largest |x| into [2^14, 2^15) (none for a span of zeros),
    rounded to float16 (to nearest, even), scaled back. float32 (M, K) -> float64."""
    M, K = x.shape
    spans = np.pad(x, ((0, 0), (0, -K % span))).reshape(M, -1, span)
    biggest = np.abs(spans).max(-1, keepdims=True).astype(np.float32)
    exponent = (biggest.view(np.int32) >> 23) & 0xFF
    shift = np.where(biggest == 0, 0, np.clip(141 - exponent, -126, 126))
    up = np.ldexp(np.float32(1), shift).astype(np.float32)
    parts = (spans * up).astype(np.float16)
    return (parts.astype(np.float64) / up).reshape(M, -1)[:, :K]


@gpu
@pytest.mark.parametrize("ks", [None, 3])
@pytest.mark.parametrize("nr", [1, 2])
@pytest.mark.parametrize("fmt,N,K", [(f, n, k) for f in X16 for n, k in SIZES[1:]])
def test_qgemv_mma_x16_multiplies_x_rounded_to_float16_exactly(cuda, cp, fmt, N, K, nr, ks):
    """x16: x in one float16 part a span. The products are those of x rounded as rounded_x16
    says, to float32's 1e-5 of float64, which fails for a kernel that keeps x's second part
    (x itself is ~2e-4 away) or rounds to fewer bits; and each output is within 2^-10 of its
    sum of |x| |w| of x itself (rounding to 11 bits moves a value by 2^-11 of it at most)."""
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    for M in (1, 3, 8, 13):
        x = rng.standard_normal((M, K)).astype(np.float32)
        y = cuda.kernels.qgemv_mma(cp.asarray(x), w, out=poison(cp, (M, N)), nr=nr, ks=ks,
                                   x16=True)
        assert product_err(y, rounded_x16(x, cuda.kernels.MMA_SPAN[fmt]), w64) < 1e-5, f"M={M}"
        x64 = x.astype(np.float64)
        assert (np.abs(y.get() - x64 @ w64.T) <= 2.0 ** -10 * (np.abs(x64) @ np.abs(w64).T)).all()


@gpu
@pytest.mark.parametrize("fmt", X16)
def test_qgemv_mma_x16_keeps_each_spans_range(cuda, cp, fmt):
    """x16 rounds each span after its own power of two: x's 32-value blocks spread over
    2^-40 .. 2^40, rows of 1e30 and 1e-30 beside them, and the products are still those of x
    rounded as rounded_x16 says (float16 alone would flush the small blocks to zero and
    overflow the large ones), split over k or not."""
    span = cuda.kernels.MMA_SPAN[fmt]
    N, K = 203, 4 * 1024 + 2 * span
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    scales = 2.0 ** rng.integers(-40, 41, (9, K // 32, 1))
    x = (rng.standard_normal((9, K // 32, 32)) * scales).reshape(9, K).astype(np.float32)
    x[3] = rng.standard_normal(K) * 1e30
    x[5] = rng.standard_normal(K) * 1e-30
    for ks in (None, 1, 5):
        y = cuda.kernels.qgemv_mma(cp.asarray(x), w, out=poison(cp, (9, N)), ks=ks, x16=True)
        assert product_err(y, rounded_x16(x, span), w64, unit=span) < 1e-5, f"ks={ks}"


@gpu
@pytest.mark.parametrize("fmt", X16)
def test_qgemv_mma_x16_after_the_prologues(cuda, cp, fmt):
    """x16 rounds x after the prologue: x * norm_w (RMSNorm's 1 / rms comes after the sums)
    and silu(h1) h3 are what rounded_x16 rounds, the slices added in order or by atomics.
    Rounding before the prologue, or not at all, is ~2e-4 away from these references."""
    from minillama.model import silu
    N, K, eps = 259, 2080, np.float32(1e-5)
    span = cuda.kernels.MMA_SPAN[fmt]
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    mma = functools.partial(cuda.kernels.qgemv_mma, w=w, x16=True, eps=eps)
    for M, ks in ((5, 1), (8, 4)):
        x = rng.standard_normal((M, K)).astype(np.float32)
        g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
        y = mma(cp.asarray(x), norm=cp.asarray(g), ks=ks)
        inv_rms = 1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)
        want = inv_rms * (rounded_x16(x * g, span) @ w64.T)
        assert rel_err(y, want) < 2e-5, f"rmsnorm M={M} ks={ks}"
        h = (2 * rng.standard_normal((M, 2 * K))).astype(np.float32)
        h64 = h.astype(np.float64)
        gated = (silu(h64[:, :K]) * h64[:, K:]).astype(np.float32)     # the kernel's, to ~1e-6
        y0 = rng.standard_normal((M, N)).astype(np.float32)
        y = cp.asarray(y0)
        mma(cp.asarray(h), out=y, accumulate=True, swiglu=True, ks=ks, any_order=True)
        want = y0 + rounded_x16(gated, span) @ w64.T
        assert rel_err(y, want) < 1e-4, f"swiglu M={M} ks={ks}"


@gpu
@pytest.mark.parametrize("ks", [None, 1, 4])
@pytest.mark.parametrize("fmt", MMA)
def test_qgemv_mma_prologues_and_accumulate(cuda, cp, fmt, ks):
    packed, w64 = stored_weight(fmt, 259, 2080)
    check_prologues(cp, functools.partial(cuda.kernels.qgemv_mma, ks=ks),
                    packed.map(cp.asarray), w64)


@gpu
@pytest.mark.parametrize("fmt", MMA)
def test_qgemv_mma_keeps_each_spans_bits_of_x_over_many_binades(cuda, cp, fmt):
    """float16 parts take one power of two per span of k (a loop step's positions: 32, 64 or
    128) and row of x, so each span keeps 22 bits of its own largest value: error measured
    against the span's largest |x|, not the row's. x's 32-value blocks are spread over 2^-40 ..
    2^40, and rows of 1e30 and 1e-30 sit beside ordinary ones; with one power of two per row
    and slice (the kernel before 2026-11-30) the small blocks lost their bits and this failed."""
    span = cuda.kernels.MMA_SPAN[fmt]
    N, K = 203, 4 * 1024 + 2 * span
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    scales = 2.0 ** rng.integers(-40, 41, (9, K // 32, 1))            # one per 32 values
    x = (rng.standard_normal((9, K // 32, 32)) * scales).reshape(9, K).astype(np.float32)
    x[3] = rng.standard_normal(K) * 1e30
    x[5] = rng.standard_normal(K) * 1e-30
    for ks in (None, 1, 5):
        y = cuda.kernels.qgemv_mma(cp.asarray(x), w, out=poison(cp, (9, N)), ks=ks)
        assert product_err(y, x.astype(np.float64), w64, unit=span) < 1e-5, f"ks={ks}"


@gpu
def test_qgemv_mma_leaves_its_counters_at_zero_and_is_deterministic(cuda, cp):
    packed, _ = stored_weight("q4_0", 1000, 4096)
    w = packed.map(cp.asarray)
    x = cp.asarray(rng.standard_normal((8, 4096)).astype(np.float32))
    first = cuda.kernels.qgemv_mma(x, w, ks=7)
    for _ in range(5):
        assert cp.array_equal(cuda.kernels.qgemv_mma(x, w, ks=7), first)
    assert_counters_at_zero(cuda, cp)


@gpu
@pytest.mark.parametrize("fmt", MMA)
def test_qgemv_mma_any_order_adds_the_slices_by_atomics(cuda, cp, fmt):
    """any_order with accumulate: each slice of k adds its sums into out as it ends (no last
    block, no counter touched), plain or after SwiGLU, within the same 1e-5 of float64 as the
    slices added in order; with RMSNorm (whose 1 / rms needs every slice) or without
    accumulate it changes nothing, bit for bit."""
    from minillama.model import silu
    N, K = 333, 2080
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    mma = functools.partial(cuda.kernels.qgemv_mma, w=w, any_order=True)
    for M in (3, 8, 13):
        for ks in (2, 5):
            y0 = rng.standard_normal((M, N)).astype(np.float32)
            x = rng.standard_normal((M, K)).astype(np.float32)
            cuda.kernels.qgemv_mma(cp.asarray(x), w, ks=ks)    # in order: the workspace made
            y = cp.asarray(y0)
            assert_partials_untouched(cuda, cp, lambda: mma(cp.asarray(x), out=y,
                                                            accumulate=True, ks=ks))
            assert rel_err(y, y0 + x.astype(np.float64) @ w64.T) < 1e-5, f"M={M} ks={ks}"
            h = (2 * rng.standard_normal((M, 2 * K))).astype(np.float32)
            h64 = h.astype(np.float64)
            y = cp.asarray(y0)
            assert_partials_untouched(cuda, cp, lambda: mma(cp.asarray(h), out=y,
                                                            accumulate=True, swiglu=True, ks=ks))
            ref = y0 + (silu(h64[:, :K]) * h64[:, K:]) @ w64.T
            assert rel_err(y, ref) < 1e-5, f"swiglu M={M} ks={ks}"
            g = cp.asarray((1 + 0.1 * rng.standard_normal(K)).astype(np.float32))
            for kwargs in ({"norm": g}, {}):          # in slice order whatever any_order says
                y_in_order = cuda.kernels.qgemv_mma(cp.asarray(x), w, ks=ks, **kwargs)
                assert cp.array_equal(mma(cp.asarray(x), ks=ks, **kwargs), y_in_order)
    assert_counters_at_zero(cuda, cp)


@gpu
@pytest.mark.parametrize("fmt", MMA)
def test_qgemv_mma_defers_the_norm_to_the_next_kernel(cuda, cp, fmt):
    """rms_out (the batches' deferred norm): out, zeros, gets the products of x * norm_w and
    rms_out each row's sum of squares of x, whatever the slices; 1 / sqrt(rms_out / K + eps)
    times out is then RMSNorm's product within 1e-5 of float64. x_ss on the next launch scales
    x's rows by such a norm (of another K) before SwiGLU, and clear zeroes its array."""
    from minillama.model import rms_norm, silu
    N, K, K_norm, eps = 259, 2016, 96, np.float32(1e-5)       # K within one slice's x: ks 1
    packed, w64 = stored_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    for M in (4, 8, 13):
        x = rng.standard_normal((M, K)).astype(np.float32)
        x64 = x.astype(np.float64)
        g = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
        for ks in (1, 3):
            out, ss = cp.zeros((M, N), dtype=np.float32), cp.zeros(M, dtype=np.float32)
            assert cuda.kernels.qgemv_mma_plan(N, K, fmt, ks=ks)[1] == ks
            cuda.kernels.qgemv_mma(cp.asarray(x), w, norm=cp.asarray(g), eps=eps, ks=ks)
            assert_partials_untouched(cuda, cp, lambda: cuda.kernels.qgemv_mma(
                cp.asarray(x), w, out=out, norm=cp.asarray(g), eps=eps, ks=ks, rms_out=ss))
            assert rel_err(ss, (x64 ** 2).sum(-1)) < 1e-5, f"M={M} ks={ks}"
            normed = out.get() / np.sqrt(ss.get()[:, None] / K + eps)
            ref = rms_norm(x64, g.astype(np.float64), float(eps)) @ w64.T
            assert rel_err(normed, ref) < 1e-5, f"M={M} ks={ks}"
        h = (2 * rng.standard_normal((M, 2 * K))).astype(np.float32)
        h_ss = (K_norm * rng.uniform(0.2, 5.0, M)).astype(np.float32)
        r = 1 / np.sqrt(h_ss.astype(np.float64) / K_norm + eps)
        h64 = h.astype(np.float64) * r[:, None]
        clear = cp.ones(1001, dtype=np.float32)
        y = cuda.kernels.qgemv_mma(cp.asarray(h), w, out=poison(cp, (M, N)), swiglu=True,
                                   eps=eps, x_ss=(cp.asarray(h_ss), K_norm), clear=clear)
        assert rel_err(y, (silu(h64[:, :K]) * h64[:, K:]) @ w64.T) < 1e-5, f"x_ss M={M}"
        assert not clear.any()


@gpu
def test_qgemv_mma_refuses_a_deferred_norm_it_cannot_apply(cuda, cp):
    from minillama.errors import DeviceError
    packed, _ = stored_weight("q8_0", 64, 256)
    w, x = packed.map(cp.asarray), cp.ones((8, 256), dtype=np.float32)
    ss, g = cp.zeros(8, dtype=np.float32), cp.ones(256, dtype=np.float32)
    with pytest.raises(DeviceError, match="rms_out defers a norm"):
        cuda.kernels.qgemv_mma(x, w, rms_out=ss)                 # no norm, no out
    with pytest.raises(DeviceError, match=r"rms_out: expected shape \(8,\)"):
        cuda.kernels.qgemv_mma(x, w, out=cp.zeros((8, 64), np.float32), norm=g, rms_out=ss[:3])
    with pytest.raises(DeviceError, match="x_ss: expected"):
        cuda.kernels.qgemv_mma(x, w, x_ss=(ss, 0))
    with pytest.raises(DeviceError, match="two norms of x"):
        cuda.kernels.qgemv_mma(x, w, norm=g, x_ss=(ss, 256))


@gpu
def test_qgemv_takes_the_tensor_cores_from_mma_min_rows(cuda, cp):
    packed, w64 = stored_weight("q8_0", 64, 256)
    w = packed.map(cp.asarray)
    before = cuda.kernels.KERNELS.launches
    x = rng.standard_normal((cuda.kernels.MMA_MIN_ROWS, 256)).astype(np.float32)
    names = []
    launch = cuda.kernels.KERNELS.launch

    def spy(name, *a, **k):
        names.append(name)
        return launch(name, *a, **k)
    cuda.kernels.KERNELS.launch = spy
    try:
        y = cuda.kernels.qgemv(cp.asarray(x), w)
    finally:
        cuda.kernels.KERNELS.launch = launch
    assert cuda.kernels.KERNELS.launches == before + 1 and names[0].startswith("qgemv_mma<")
    assert rel_err(y, x.astype(np.float64) @ w64.T) < 1e-5


def test_qgemv_mma_x16_refuses_bfloat16_weights():
    """No GPU needed: one bfloat16 part would keep 8 bits of x; checked before the device."""
    from minillama import formats
    from minillama.cuda import kernels
    from minillama.errors import DeviceError
    assert kernels.MMA_X16_FORMATS == X16
    bf16 = formats.quantize(np.ones((8, 64), np.float32), "bf16")
    with pytest.raises(DeviceError, match="x16 takes f16, q8_0, q4_0 weights .* got bf16"):
        kernels.qgemv_mma(np.ones((4, 64), np.float32), bf16, x16=True)


def test_qgemv_mma_refuses_a_format_it_does_not_read():
    """No GPU needed: the format is checked before anything touches the device."""
    from minillama import formats
    from minillama.cuda import kernels
    from minillama.errors import DeviceError
    q4_1 = formats.quantize(np.ones((8, 64), np.float32), "q4_1")
    for w in (q4_1, np.ones((8, 64), np.float32)):
        with pytest.raises(DeviceError, match="qgemv_mma reads f16, bf16, q8_0, q4_0 weights"):
            kernels.qgemv_mma(np.ones((2, 64), np.float32), w)

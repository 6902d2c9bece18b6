"""minillama.formats: every stored format against the gguf package's own reference.

Random GGUF blocks (codes and every kind of finite scale: large, tiny, subnormal, zero,
negative) dequantize to the same float32 bits as `gguf.quants.dequantize`; the quantizers write
the same bytes as `gguf.quants.quantize`; GGUF bytes -> planes -> GGUF bytes is the identity;
NaN and inf are refused by name; bf16 rounds as torch does.
"""
import re
import tracemalloc

import numpy as np
import pytest

from minillama import formats as F
from minillama.errors import ArgumentError, CheckpointError
from minillama.formats import dense, q4, q8_0

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

BLOCK_FORMATS = ("q8_0", "q4_0", "q4_1")
ALL = F.QUANTIZABLE         # every format minillama writes; the k-quants (read only): test_kquants.py
F16_SPECIAL = (0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00)
NONFINITE_F16 = (0x7C00, 0xFC00, 0x7E00, 0xFE01)       # +inf, -inf, NaN, -NaN


def qtype(fmt):
    return GGMLQuantizationType[fmt.upper()]


def gguf_dequantize(raw, fmt, shape):
    """gguf-py's reference: (rows, bytes per row) uint8 -> (rows, cols) float32."""
    out = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype(fmt))
    return np.asarray(out, np.float32).reshape(shape)


def gguf_quantize(w, fmt):
    with np.errstate(all="ignore"):
        return np.asarray(gguf.quants.quantize(w, qtype(fmt))).view(np.uint8).tobytes()


def bits(a):
    """float32 values as their bits, so that equality also tells -0.0 from 0.0."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def random_field(rng, dtype, n):
    """n random finite values of a field, as their bytes (n, itemsize): every exponent, so
    subnormals and the largest values too; float16 fields also get the edge cases."""
    if dtype == "bf16":
        dtype = np.dtype(np.uint16)
        u = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        u[(u & 0x7F80) == 0x7F80] &= 0xBFFF                        # no inf, no NaN
        return u.view(np.uint8).reshape(n, 2)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 256, (n, dtype.itemsize), dtype=np.uint8)
    if dtype == np.float32:
        u = rng.integers(0, 1 << 32, n, dtype=np.uint32)
        u[(u & 0x7F800000) == 0x7F800000] &= 0xBFFFFFFF           # no inf, no NaN
    else:                                                     # float16
        u = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        u[(u & 0x7C00) == 0x7C00] &= 0xBFFF
        k = min(n, len(F16_SPECIAL))
        u[rng.choice(n, k, replace=False)] = F16_SPECIAL[:k]
    return u.view(np.uint8).reshape(n, dtype.itemsize)


def random_gguf(rng, fmt, rows, cols):
    """A GGUF tensor of `fmt` and shape (rows, cols) with random fields: (rows, row bytes) uint8."""
    module, nb = F.FORMATS[fmt], cols // F.FORMATS[fmt].BLOCK
    n = rows * nb
    parts = [random_field(rng, "bf16" if fmt == "bf16" else dtype, n * count).reshape(n, -1)
             for _, dtype, count in module.FIELDS[fmt]]
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def blocky_weights(rng, rows, cols, low=-3, high=3):
    """Gaussian weights with each block of 32 scaled by 10**U(low, high)."""
    scale = 10.0 ** rng.uniform(low, high, (rows, cols // 32, 1))
    return (rng.standard_normal((rows, cols // 32, 32)) * scale).astype(np.float32) \
        .reshape(rows, cols)


# ----------------------------------------------------------------------------
# the constants

@pytest.mark.parametrize("fmt", ALL)
def test_constants_match_gguf(fmt):
    module = F.FORMATS[fmt]
    block, block_bytes = GGML_QUANT_SIZES[qtype(fmt)]
    assert (module.BLOCK, module.BLOCK_BYTES[fmt]) == (block, block_bytes)
    assert module.GGML_TYPE[fmt] == qtype(fmt).value and F.GGML_FORMATS[qtype(fmt).value] == fmt
    assert sum(np.dtype(t).itemsize * n for _, t, n in module.FIELDS[fmt]) == block_bytes
    assert module.KERNEL[fmt] == fmt.upper()


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (7, 160), (33, 4096)])
def test_nbytes_is_bytes_for(fmt, shape):
    p = F.from_gguf(random_gguf(np.random.default_rng(), fmt, *shape), fmt, shape)
    assert p.nbytes == F.bytes_for(fmt, shape) == shape[0] * shape[1] // 32 * {
        "f32": 128, "f16": 64, "bf16": 64, "q8_0": 34, "q4_0": 18, "q4_1": 20}[fmt]
    assert {k: (a.shape, a.dtype) for k, a in p.planes.items()} == F.layout(fmt, shape)
    assert all(a.flags.c_contiguous for a in p.planes.values())
    assert p.shape == shape and p.kernel == fmt.upper()


def test_bytes_for_needs_whole_blocks_and_a_known_format():
    assert F.bytes_for("f32", (5,)) == 20 and F.bytes_for("q4_0", (2, 3, 64)) == 6 * 2 * 18
    with pytest.raises(ArgumentError, match="q4_1 needs rows of whole blocks of 32"):
        F.bytes_for("q4_1", (4, 48))
    with pytest.raises(ArgumentError, match="format: expected one of f32, f16, bf16, q8_0"):
        F.bytes_for("iq2_xs", (4, 64))


# ----------------------------------------------------------------------------
# dequantize: the same bits as gguf's reference, every finite scale

@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 64), (7, 160), (13, 96), (33, 256)])
def test_dequantize_matches_gguf(fmt, rows, cols):
    raw = random_gguf(np.random.default_rng(), fmt, rows, cols)
    p = F.from_gguf(raw, fmt, (rows, cols), "t")
    w = F.dequantize(p)
    assert w.dtype == np.float32 and w.shape == (rows, cols)
    assert np.isfinite(w).all()                       # any finite scale gives finite weights
    assert np.array_equal(bits(w), bits(gguf_dequantize(raw, fmt, (rows, cols))))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_extreme_scales_dequantize_exactly(fmt):
    """Every scale and offset at an edge of float16, in turn: 0, -0, the smallest and largest
    subnormal, the smallest normal, +-65504. The result is exact (q8_0, q4_0: float64 agrees)
    and finite, and equals gguf's bits."""
    rng = np.random.default_rng()
    raw = random_gguf(rng, fmt, len(F16_SPECIAL), 64).reshape(len(F16_SPECIAL), 2, -1)
    for i, s in enumerate(F16_SPECIAL):
        raw[i, :, 0:2] = np.array([s], np.uint16).view(np.uint8)             # d
        if fmt == "q4_1":
            raw[i, :, 2:4] = np.array([F16_SPECIAL[-1 - i]], np.uint16).view(np.uint8)   # m
    raw = raw.reshape(len(F16_SPECIAL), -1)
    p = F.from_gguf(raw, fmt, (len(F16_SPECIAL), 64))
    w = F.dequantize(p)
    assert np.isfinite(w).all()
    assert np.array_equal(bits(w), bits(gguf_dequantize(raw, fmt, w.shape)))
    if fmt != "q4_1":
        codes = p.qs.astype(np.float64) if fmt == "q8_0" else q4.unpack(p.qs) - 8.0
        exact = codes * p.d.astype(np.float64)[..., None]
        assert np.array_equal(w, exact.reshape(w.shape))


@pytest.mark.parametrize("fmt", ALL)
def test_gguf_planes_gguf_round_trip_is_byte_exact(fmt):
    rng = np.random.default_rng()
    for rows, cols in [(1, 32), (5, 96), (17, 512)]:
        raw = random_gguf(rng, fmt, rows, cols)
        from_array = F.from_gguf(raw, fmt, (rows, cols))
        from_bytes = F.from_gguf(raw.tobytes(), fmt, (rows, cols))
        assert F.to_gguf(from_array) == F.to_gguf(from_bytes) == raw.tobytes()


@pytest.mark.parametrize("fmt", ALL)
def test_rows_select_and_gather(fmt):
    raw = random_gguf(np.random.default_rng(), fmt, 11, 96)
    p = F.from_gguf(raw, fmt, (11, 96))
    full = F.dequantize(p)
    assert np.array_equal(F.dequantize(p, slice(3, 8)), full[3:8])
    tokens = np.array([4, 0, 10, 4])                  # an embedding gather: rows by index
    assert np.array_equal(F.dequantize(p, tokens), full[tokens])
    assert np.array_equal(F.dequantize(p, 7), full[7:8])


def test_nibbles_unpack_low_then_high():
    qs = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    codes = q4.unpack(qs)                            # byte j: code j low, code j + 16 high
    assert codes.tolist() == list(range(16)) + list(range(15, -1, -1))
    assert np.array_equal(q4.pack(codes), qs)


def test_from_gguf_makes_no_float32_copy():
    """Splitting blocks into planes copies each field once in its own dtype: the traced peak
    stays near the stored bytes, far below the 4 bytes a weight of a float32 copy."""
    rows, cols = 64, 4096
    raw = random_gguf(np.random.default_rng(), "q4_1", rows, cols)
    tracemalloc.start()
    try:
        p = F.from_gguf(raw, "q4_1", (rows, cols))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * raw.nbytes < rows * cols        # float32 would be 4 * rows * cols
    f32 = random_gguf(np.random.default_rng(), "f32", 4, 64)
    assert np.shares_memory(F.from_gguf(f32, "f32", (4, 64)).data, f32)      # dense: a view
    assert p.nbytes == raw.nbytes


def test_from_gguf_checks_the_byte_count():
    raw = random_gguf(np.random.default_rng(), "q8_0", 4, 64)
    with pytest.raises(CheckpointError, match=r"^t: 270 bytes of data, expected 272 for q8_0"):
        F.from_gguf(raw.reshape(-1)[:-2], "q8_0", (4, 64), "t")


# ----------------------------------------------------------------------------
# NaN and inf are refused, by tensor name and block

@pytest.mark.parametrize("fmt,plane,at", [("q8_0", "d", 0), ("q4_0", "d", 0), ("q4_1", "d", 0),
                                          ("q4_1", "m", 2)])
@pytest.mark.parametrize("special", NONFINITE_F16)
def test_nonfinite_scale_refused(fmt, plane, at, special):
    rng = np.random.default_rng()
    rows, nb = 5, 3
    raw = random_gguf(rng, fmt, rows, 32 * nb).reshape(rows, nb, -1)
    row, block = int(rng.integers(rows)), int(rng.integers(nb))
    raw[row, block, at:at + 2] = np.array([special], np.uint16).view(np.uint8)
    value = np.array([special], np.uint16).view(np.float16)[0]
    with pytest.raises(CheckpointError) as e:
        F.from_gguf(raw, fmt, (rows, 32 * nb), "m.gguf: tensor 'blk.0.attn_q.weight'")
    assert str(e.value) == (
        f"m.gguf: tensor 'blk.0.attn_q.weight': {fmt} block {row * nb + block} (row {row}, "
        f"columns {32 * block}..{32 * block + 31}) has a non-finite {plane} = {float(value)}; a stored "
        f"weight must be finite: the file is damaged")


@pytest.mark.parametrize("fmt", ("f32", "f16", "bf16"))
def test_nonfinite_dense_value_refused(fmt):
    raw = random_gguf(np.random.default_rng(), fmt, 3, 64)
    inf = {"f32": b"\x00\x00\x80\xff", "f16": b"\x00\x7c", "bf16": b"\x80\x7f"}[fmt]
    raw = raw.reshape(-1)
    at = (64 + 37) * len(inf)                               # row 1, column 37
    raw[at:at + len(inf)] = np.frombuffer(inf, np.uint8)
    with pytest.raises(CheckpointError, match=rf"^w: {fmt} value at row 1, column 37 is "
                                              rf"non-finite \(-?inf\); a stored weight must be finite"):
        F.from_gguf(raw, fmt, (3, 64), "w")


@pytest.mark.parametrize("fmt,big", [("q8_0", 8.4e6), ("q4_0", 5.3e5), ("q4_1", -7e4),
                                     ("f16", 7e4), ("bf16", 3.4e38), ("q8_0", np.nan),
                                     ("q4_0", np.inf), ("q4_1", -np.inf), ("f32", np.nan)])
def test_quantize_refuses_what_the_format_cannot_hold(fmt, big):
    w = np.random.default_rng().standard_normal((4, 96)).astype(np.float32)
    w[2, 70] = big
    block = "block 8 (row 2, columns 64..95)" if fmt[0] == "q" else "value at row 2, column 70"
    with pytest.raises(CheckpointError, match="^" + re.escape(f"layers.0.w1: {fmt} {block}")):
        F.quantize(w, fmt, "layers.0.w1")


def test_quantize_keeps_large_weights_that_fit():
    w = np.zeros((1, 32), np.float32)
    w[0, 0] = 65504 * 127                 # d = 65504 exactly: the largest finite q8_0 scale
    assert F.dequantize(F.quantize(w, "q8_0"))[0, 0] == w[0, 0]
    w[0, 0] = -65504 * 8                  # q4_0: d = 65504
    assert F.dequantize(F.quantize(w, "q4_0"))[0, 0] == w[0, 0]


# ----------------------------------------------------------------------------
# quantize: gguf's bytes, bit for bit

def tie_blocks():
    """Blocks whose scaled values land exactly on .5, where roundf and trunc(x + .5) matter,
    and blocks with a +-max tie (Q4_0 takes the first), all zero, constant."""
    halves = np.arange(32, dtype=np.float32) - 15.5                    # -15.5 .. 15.5
    q8 = np.concatenate([[127.0], halves[1:] * 4 + 0.5 * np.sign(halves[1:])])  # d = 1
    q4_0 = np.concatenate([[-8.0], np.linspace(-7.5, 7.5, 31)])        # d = 1: x + 8.5 ties
    q4_1 = np.concatenate([[0.0, 15.0], (np.arange(30) % 15) + 0.5])  # d = 1, min 0
    pm = np.concatenate([[3.0, -3.0], np.linspace(-2, 2, 30)])
    return np.stack([q8, q4_0, q4_1, pm, -pm, np.zeros(32), np.full(32, 0.3),
                     np.full(32, -7e-5)]).astype(np.float32)


@pytest.mark.parametrize("fmt", ALL)
def test_quantize_matches_gguf_bit_for_bit(fmt):
    rng = np.random.default_rng()
    high = {"q4_1": 4, "f16": 4}.get(fmt, 5)          # keep every scale and offset finite
    for w in (blocky_weights(rng, 7, 160, -6, high), blocky_weights(rng, 33, 512),
              tie_blocks().reshape(2, -1)):
        p = F.quantize(w, fmt, "w")
        assert F.to_gguf(p) == gguf_quantize(w, fmt)


def test_round_half_away_is_roundf():
    edges = np.array([0.49999997, 0.5, 1.5, 2.5, -0.5, -2.5, -0.49999997, 126.5, 8388607.5,
                      -0.0, 0.0], np.float32)
    x = np.concatenate([edges, np.random.default_rng().uniform(-130, 130, 10_000)
                        .astype(np.float32)])
    ours = q8_0.round_half_away(x)
    assert ours[:6].tolist() == [0, 1, 2, 3, -1, -3]
    assert np.array_equal(ours, gguf.quants.np_roundf(x))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_quantize_tiny_blocks(fmt):
    """Blocks of float32 subnormals: 1/d overflows, where llama.cpp's and gguf's codes are
    undefined (a cast of inf); minillama writes a zero scale and zero codes there. Either way
    the block dequantizes to zeros, as gguf's own bytes do."""
    w = np.full((2, 64), 1e-40, np.float32)
    w[:, ::3] = -3e-41
    p = F.quantize(w, fmt, "w")
    assert not p.d.any()
    assert np.array_equal(F.dequantize(p), np.zeros_like(w))
    theirs = np.frombuffer(gguf_quantize(w, fmt), np.uint8)
    assert np.array_equal(gguf_dequantize(theirs, fmt, w.shape), F.dequantize(p))


# ----------------------------------------------------------------------------
# quantize -> dequantize: the error, measured against its bound

def f16_error(x):
    """How far float16 rounding moves x (round to nearest): half a unit in the last place,
    2^-11 |x| for normal numbers, 2^-25 (half the subnormal spacing 2^-24) below 2^-14."""
    return np.maximum(2.0 ** -11 * np.abs(x), 2.0 ** -25)


def blocks_of(a):
    return a.astype(np.float64).reshape(a.shape[0], -1, 32)            # (rows, nb, 32)


def round_trip(fmt, w):
    """(error |w - dequantize(quantize(w))| per weight, the weights), both (rows, nb, 32)."""
    p = F.quantize(w, fmt)
    return np.abs(blocks_of(F.dequantize(p)) - blocks_of(w)), blocks_of(w)


# Scales from 1e-6 to 1e3: normal, subnormal (q8_0 below max|w| = 127 * 2^-14 = 7.8e-3) and
# zero (below 127 * 2^-25 = 3.8e-6) float16 scales, all under one bound each.
WIDE = dict(rows=64, cols=512, low=-6, high=3)


def test_q8_0_round_trip_error():
    """|w - q d16| <= |w - q d| + |q| |d - d16| <= d/2 + 127 f16_error(d): half a step from
    rounding to the nearest code, plus the scale's float16 rounding times up to 127 codes."""
    err, w = round_trip("q8_0", blocky_weights(np.random.default_rng(), **WIDE))
    d = np.abs(w).max(axis=-1, keepdims=True) / 127
    assert (err <= (d / 2 + 127 * f16_error(d)) * (1 + 1e-6)).all()
    normal = d[..., 0] >= 2.0 ** -14
    assert (err / d)[normal].max() > 0.45                  # the d/2 term is real
    rel_rms = np.sqrt((err ** 2).mean(axis=-1)) / np.abs(w).max(axis=-1)
    assert rel_rms[normal].mean() < 0.003      # ~ (d / sqrt(12)) / max|w| = 0.0023 measured


def test_q4_0_round_trip_error():
    """Codes -8..7 are asymmetric: d = max / -8 puts the largest-magnitude weight at -8 exactly,
    and a weight of the opposite sign near |max| would need +8, clipped to 7. So the bound is a
    whole step |d| there and half a step elsewhere, plus 8 f16_error(d) for d's float16."""
    rng = np.random.default_rng()
    w = blocky_weights(rng, **WIDE)
    big = 2 * np.abs(w[:, 32:64]).max(axis=1)
    w[:, 32], w[:, 33] = big, -big     # block 1: +max first, so -max needs code 16: clipped
    err, w = round_trip("q4_0", w)
    i = np.abs(w).argmax(axis=-1)[..., None]
    d = np.take_along_axis(w, i, axis=-1) / -8                         # (rows, nb, 1), signed
    clipped = w / d > 7.5                                              # code w / d + 8 > 15.5
    step = np.where(clipped, 1.0, 0.5) * np.abs(d)
    assert (err <= (step + 8 * f16_error(d)) * (1 + 1e-6)).all()
    assert clipped.any() and (err[clipped] / np.abs(d).repeat(32, -1)[clipped]).max() > 0.9


def test_q4_1_round_trip_error():
    """w = code d + m: half a step d/2, plus 15 codes times d's float16 rounding, plus m's own
    float16 rounding, plus one float32 rounding of the sum. m's term is Q4_1's weak spot: a
    block far from zero with a small spread is limited by m's 11 bits, not by the 4 of a code."""
    rng = np.random.default_rng()
    w = blocky_weights(rng, **WIDE)
    w[:, :32] = 5 + 0.01 * rng.random((64, 32))              # block 0: offset 5, spread 0.01
    err, w = round_trip("q4_1", w)
    lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)
    d = (hi - lo) / 15
    bound = d / 2 + 15 * f16_error(d) + f16_error(lo) + 2.0 ** -24 * np.abs(w)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (err[:, 0] > d[:, 0]).any()                       # block 0: m's rounding beats 4 bits


@pytest.mark.parametrize("fmt,eps", [("f16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_half_round_trip_error(fmt, eps):
    """Round to nearest keeps the relative error within half a unit in the last place:
    2^-11 for float16's 11 significant bits, 2^-8 for bfloat16's 8 (normal numbers)."""
    w = blocky_weights(np.random.default_rng(), 16, 256, -3, 3)
    normal = np.abs(w) >= 2.0 ** -14                  # float16's subnormals have fewer bits
    rel = (np.abs(F.dequantize(F.quantize(w, fmt)) - w) / np.abs(w))[normal]
    assert rel.max() <= eps and rel.max() > eps / 2


# ----------------------------------------------------------------------------
# bfloat16 as torch rounds it

def test_to_bf16_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    u = rng.integers(0, 1 << 32, 200_000, dtype=np.uint32)
    ties = (rng.integers(0, 1 << 16, 2000, dtype=np.uint32) << 16) | 0x8000   # exactly halfway
    u = np.concatenate([u, ties])
    u = u[(u & 0x7F800000) != 0x7F800000]                   # NaN is checked below
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000,
                      0x7F7F7FFF, 0x00000001, 0x00008000, 0x00018000, 0x3F808000], np.uint32)
    x = np.concatenate([u, edges]).view(np.float32)
    ours = dense.to_bf16(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(ours, theirs.view(np.uint16))
    back = torch.from_numpy(theirs.copy()).view(torch.bfloat16).float().numpy()
    assert np.array_equal(bits(dense.bf16_to_f32(ours)), bits(back))


def test_to_bf16_keeps_nan_a_nan():
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)
    assert np.isnan(dense.bf16_to_f32(dense.to_bf16(nans))).all()


# ----------------------------------------------------------------------------
# the CPU path: dequantize a bounded block of rows at a time

@pytest.mark.parametrize("fmt", ALL)
def test_row_chunks_cover_the_matrix(fmt):
    p = F.from_gguf(random_gguf(np.random.default_rng(), fmt, 37, 256), fmt, (37, 256))
    chunks = list(F.row_chunks(p, max_bytes=5 * 256 * 4))
    assert [(s, e) for s, e, _ in chunks] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25),
                                               (25, 30), (30, 35), (35, 37)]
    assert np.array_equal(np.concatenate([w for _, _, w in chunks]), F.dequantize(p))
    assert [w.shape[0] for _, _, w in F.row_chunks(p, max_bytes=1)] == [1] * 37


def test_row_chunks_bound_the_peak():
    """A linear y = x @ W.T computed chunk by chunk holds a chunk or two of float32 at a time
    (the one being used and the one being made), whatever the size of W."""
    rows, cols, chunk = 1024, 1024, 64 << 10
    p = F.quantize(blocky_weights(np.random.default_rng(), rows, cols), "q4_0")
    x = np.random.default_rng().standard_normal((1, cols)).astype(np.float32)
    y = np.empty((1, rows), np.float32)
    tracemalloc.start()
    try:
        for start, stop, w in F.row_chunks(p, max_bytes=chunk):
            y[:, start:stop] = x @ w.T
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * chunk < rows * cols * 4 / 10
    np.testing.assert_allclose(y, x @ F.dequantize(p).T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# the type

def test_packed_checks_its_planes():
    p = F.quantize(np.ones((2, 64), np.float32), "q4_1")
    with pytest.raises(ArgumentError, match=r"planes .*expected"):
        F.Packed("q4_1", (2, 64), {"qs": p.qs, "d": p.d})                       # no m
    with pytest.raises(ArgumentError, match=r"planes .*expected"):
        F.Packed("q4_1", (2, 64), {**p.planes, "d": p.d.astype(np.float32)})
    with pytest.raises(ArgumentError, match=r"planes .*expected"):
        F.Packed("q4_0", (2, 96), {"qs": p.qs, "d": p.d})
    with pytest.raises(ArgumentError, match="not C-contiguous"):
        F.Packed("f32", (2, 64), {"data": np.ones((64, 2), np.float32).T})
    with pytest.raises(ArgumentError, match=r"expected \(rows, cols\)"):
        F.Packed("f32", (128,), {"data": np.ones(128, np.float32)})
    with pytest.raises(AttributeError, match="no plane 'scales'"):
        p.scales
    assert F.to_gguf(p.map(np.copy)) == F.to_gguf(p)


def test_concat_rows_is_the_rows_stacked():
    rng = np.random.default_rng()
    for fmt in ALL:
        parts = [F.quantize(blocky_weights(rng, n, 96), fmt) for n in (3, 1, 5)]
        fused = F.concat_rows(parts)
        assert fused.shape == (9, 96) and fused.nbytes == F.bytes_for(fmt, (9, 96))
        assert np.array_equal(F.dequantize(fused), np.concatenate([F.dequantize(q) for q in parts]))


@pytest.mark.gpu
def test_packed_on_the_gpu(cp):
    for fmt in ALL:
        p = F.quantize(blocky_weights(np.random.default_rng(), 3, 64), fmt)
        g = p.map(cp.asarray)
        assert g.nbytes == p.nbytes and g.kernel == p.kernel
        assert all(isinstance(a, cp.ndarray) for a in g.planes.values())
        assert F.to_gguf(g.map(cp.asnumpy)) == F.to_gguf(p)
    b = F.quantize(np.ones((2, 32), np.float32), "bf16")
    F.Packed("bf16", (2, 32), {"data": cp.asarray(b.data).view("bfloat16")})

"""The GGUF k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 weights, two levels of scales.

A Q4_0 block spends a float16 scale on 32 weights. A k-quant super-block spends one (or two:
a scale d and a scale of the minimums dmin) on 256 weights, cut into sub-blocks of 32 (or 16),
and gives each sub-block a small integer scale (and min) of 4, 6 or 8 bits, multiplied by d:

    w = (d * sc[s]) * code - (dmin * m[s])      Q2_K, Q4_K, Q5_K   (codes 0 .. 2^bits - 1)
    w = (d * sc[s]) * code                      Q3_K, Q6_K         (signed codes: -4..3, -32..31)

s is the sub-block of the weight. The products are exact in float32 (at most 11 + 8 + 6 bits)
and the minus rounds once, so a GPU's fmaf(code, d * sc, -dmin * m) gives the same bits as
NumPy here, which computes in gguf-py's order (its dequantize_blocks is the reference). Bits a
weight: Q2_K 2.625, Q3_K 3.4375, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625. In a GGUF file, one
super-block, as llama.cpp's block_q*_K structs lay it out (bytes at the top, v = 0..255 the
weight within the super-block):

    Q4_K  0    2      4          16                                    144 bytes
          | d  | dmin | scales 12 | qs 128                                |
          f16   f16    8 6-bit sc and 8 6-bit m, for sub-blocks of 32
          qs: four chunks of 32 bytes, one per 64 weights; in chunk c, byte l holds weight
              64c + l in its low nibble and weight 64c + 32 + l in its high nibble

    Q5_K  | d | dmin | scales 12 | qh 32 | qs 128 |                       176 bytes
          qs as Q4_K (the low 4 bits); qh[l] bit s is the 5th bit of weight 32s + l

    Q6_K  0             128          192           208  210 bytes
          | ql 128       | qh 64       | scales 16  | d  |
          8-bit signed scales, one per 16 weights; code = (low 4 | high 2 << 4) - 32
          per half of 128 weights (ql 64 bytes, qh 32): weight 32j + l (j = 0..3, l = 0..31)
          has its low 4 bits in ql[32 (j % 2) + l] (low nibble for j < 2, high for j >= 2)
          and its high 2 bits in qh[l] >> 2j

    Q3_K  | hmask 32 | qs 64 | scales 12 | d |                             110 bytes
          6-bit scales minus 32, one per 16 weights; code = low 2 - (4 if the hmask bit is 0)
          per half of 128 weights (qs 32 bytes): weight 32j + l has its low 2 bits in
          qs[l] >> 2j; hmask[l] bit (v // 32) is its high bit

    Q2_K  | scales 16 | qs 64 | d | dmin |                                 84 bytes
          scales[s]: sc in the low 4 bits, m in the high 4, one per 16 weights; qs as Q3_K's

The 6-bit scales of Q4_K and Q5_K (sc[0..7], m[0..7]) pack into 12 bytes:

    byte 0..3     sc[j] (6 bits)      + bits 4..5 of sc[j + 4] on top (bits 6..7)
    byte 4..7     m[j]  (6 bits)      + bits 4..5 of m[j + 4] on top
    byte 8..11    low 4 bits of sc[j + 4] | low 4 bits of m[j + 4] << 4

and Q3_K's sixteen: low 4 bits of scale i in byte i % 8 (nibble i // 8), high 2 bits in byte
8 + i % 4 (bits 2 (i // 4) ..). In memory (Packed), one plane per field, nb = cols / 256:

    q4_k   d, dmin (rows, nb) float16   scales (rows, nb, 12) uint8   qs (rows, nb, 128) uint8
    q5_k   the same and qh (rows, nb, 32) uint8
    q6_k   ql (rows, nb, 128)  qh (rows, nb, 64)  scales (rows, nb, 16) int8  d (rows, nb) float16
    q3_k   hmask (rows, nb, 32)  qs (rows, nb, 64)  scales (rows, nb, 12)  d (rows, nb) float16
    q2_k   scales (rows, nb, 16)  qs (rows, nb, 64)  d, dmin (rows, nb) float16

so every plane of codes starts 16-byte aligned (the GPU reads them 16 bytes at a time). Every
finite float16 d and dmin gives finite weights (|w| <= 65504 * 63 * 31 for Q5_K); a NaN or inf
is refused by name (formats.from_gguf). minillama reads k-quants; it does not write them
(no `quantize` here: formats.quantize refuses them).
"""
import numpy as np


BLOCK = 256
FIELDS = {"q2_k": (("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2", 1), ("dmin", "<f2", 1)),
          "q3_k": (("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2", 1)),
          "q4_k": (("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12), ("qs", "u1", 128)),
          "q5_k": (("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12), ("qh", "u1", 32),
                   ("qs", "u1", 128)),
          "q6_k": (("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2", 1))}
BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
GGML_TYPE = {"q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14}
KERNEL = {"q2_k": "Q2_K", "q3_k": "Q3_K", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}


def bit_planes(a, shifts, mask):
    """(..., n) bytes -> (..., len(shifts), n): (a >> shift) & mask for each shift in turn."""
    return (a[..., None, :] >> np.array(shifts, np.uint8)[:, None]) & np.uint8(mask)


def crumbs(qs):
    """(..., 64) bytes of 2-bit codes ("crumbs") -> (..., 256): byte l of half h holds weights
    128h + l, + 32, + 64, + 96 in bits 0-1, 2-3, 4-5, 6-7 (Q2_K and Q3_K's qs)."""
    halves = qs.reshape(*qs.shape[:-1], 2, 32)                      # (..., 2, 32)
    return bit_planes(halves, (0, 2, 4, 6), 3).reshape(*qs.shape[:-1], 256)


def nibbles(qs, chunk):
    """(..., n) bytes of 4-bit codes -> (..., 2n): each `chunk` bytes hold 2 chunk weights, the
    first chunk in the low nibbles, the next in the high ones (Q4_K, Q5_K: chunk 32; Q6_K: 64)."""
    chunks = qs.reshape(*qs.shape[:-1], -1, chunk)                  # (..., n / chunk, chunk)
    return bit_planes(chunks, (0, 4), 15).reshape(*qs.shape[:-1], -1)


def scales_6bit(scales):
    """Q4_K and Q5_K's 12 bytes -> sc, m (..., 8): eight 6-bit scales and eight 6-bit mins."""
    lo, mid, hi = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def scales_q3(scales):
    """Q3_K's 12 bytes -> (..., 16) signed scales: 4 low bits and 2 high bits each, minus 32."""
    low = bit_planes(scales[..., 0:8], (0, 4), 15).reshape(*scales.shape[:-1], 16)
    high = bit_planes(scales[..., 8:12], (0, 2, 4, 6), 3).reshape(*scales.shape[:-1], 16)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def f32(a):
    return a.astype(np.float32)


def scaled(codes, d, sc, dmin=None, m=None):
    """The weights of super-blocks: codes (..., 256) in sub-blocks of 256 / sc.shape[-1], each
    (d * sc) * code, minus dmin * m where given. d, dmin (...,), sc, m (..., sub-blocks)."""
    w = codes.reshape(*sc.shape, -1).astype(np.float32)                # (..., subs, 256 / subs)
    w *= (f32(d)[..., None] * f32(sc))[..., None]                      # in place: one float32 copy
    if dmin is not None:
        w -= (f32(dmin)[..., None] * f32(m))[..., None]
    return w


def dequantize(packed, rows=slice(None)):
    """float32 (n, cols) of the selected rows, bit for bit gguf.quants' dequantize_blocks."""
    p, fmt = {k: a[rows] for k, a in packed.planes.items()}, packed.format
    if fmt == "q2_k":
        w = scaled(crumbs(p["qs"]), p["d"], p["scales"] & 15, p["dmin"], p["scales"] >> 4)
    elif fmt == "q3_k":
        high = bit_planes(p["hmask"], range(8), 1).reshape(*p["hmask"].shape[:-1], 256)
        codes = crumbs(p["qs"]).astype(np.int8) - ((1 - high) << 2).astype(np.int8)
        w = scaled(codes, p["d"], scales_q3(p["scales"]))
    elif fmt in ("q4_k", "q5_k"):
        codes = nibbles(p["qs"], 32)
        if fmt == "q5_k":
            codes |= bit_planes(p["qh"], range(8), 1).reshape(codes.shape) << 4
        sc, m = scales_6bit(p["scales"])
        w = scaled(codes, p["d"], sc, p["dmin"], m)
    else:                                                               # q6_k
        low = nibbles(p["ql"], 64)                                      # (..., 256)
        halves = p["qh"].reshape(*p["qh"].shape[:-1], 2, 32)
        high = bit_planes(halves, (0, 2, 4, 6), 3).reshape(low.shape)
        w = scaled((low | (high << 4)).astype(np.int8) - np.int8(32), p["d"], p["scales"])
    return w.reshape(-1, packed.shape[1])


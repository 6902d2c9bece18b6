"""Q4_0 and Q4_1: blocks of 32 weights, 4-bit codes, a float16 scale (and for Q4_1 an offset).

One block (32 consecutive weights of a row), as GGUF stores it:

    Q4_0  byte 0    2                                      18      4.5 bits a weight
               | d  | qs[0] qs[1] ...               qs[15] |
    Q4_1  byte 0    2    4                                      20      5 bits a weight
               | d  | m  | qs[0] qs[1] ...               qs[15] |
               f16  f16   16 bytes, two 4-bit codes in each

    qs[j]:  bit 7 . . 4 | 3 . . 0        the low nibble is weight j, the high nibble weight j + 16:
            code[j + 16]  code[j]        lo = qs & 0x0F, hi = qs >> 4 (not j and j + 1!)

    Q4_0   w = (code - 8) * d     codes 0..15 stand for -8..7; d = -max / 8, where max is the
                                  block's weight of largest magnitude, so it lands on -8 exactly
    Q4_1   w = code * d + m       m = min, d = (max - min) / 15: codes 0..15 span [min, max]

In memory (Packed), the same bits in planes, nb = cols // 32 blocks per row:

    qs (rows, nb, 16) uint8      d (rows, nb) float16      m (rows, nb) float16 (Q4_1)

A block's 32 codes are 16 bytes: one aligned 16-byte load on the GPU. In GGUF's 18-byte blocks
that load would straddle blocks, which is why the planes are split. The scale is what 4 bits
make expensive: 2 of Q4_0's 18 bytes (11%), 4 of Q4_1's 20 (20%), against 6% for Q8_0. A
kernel reads d once per block and multiplies once per block: sum (code - 8) * d * x
= d * (sum code * x - 8 * sum x).

Dequantizing is exact for Q4_0 (a 5-bit integer times an 11-bit float16 significand fits
float32) and one rounding for Q4_1 (code * d is exact, the + m rounds once: so a kernel's FMA
gives the same bits). Every finite float16 d and m (subnormal, negative, zero, up to 65504)
gives finite float32 weights; only a NaN or inf is refused (formats.from_gguf).
"""
import numpy as np


BLOCK = 32
FIELDS = {"q4_0": (("d", "<f2", 1), ("qs", "u1", 16)),
          "q4_1": (("d", "<f2", 1), ("m", "<f2", 1), ("qs", "u1", 16))}
BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 2 + 2 + 16}
GGML_TYPE = {"q4_0": 2, "q4_1": 3}
KERNEL = {"q4_0": "Q4_0", "q4_1": "Q4_1"}


def unpack(qs):
    """(..., 16) bytes -> (..., 32) codes 0..15: low nibbles are weights 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def pack(codes):
    """(..., 32) codes 0..15 -> (..., 16) bytes, the inverse of unpack."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def dequantize(packed, rows=slice(None)):
    """float32 (n, cols) of the selected rows."""
    w = unpack(packed.qs[rows]).astype(np.float32)            # (n, nb, 32) codes
    d = packed.d[rows].astype(np.float32)[..., None]           # (n, nb, 1): one scale a block
    if packed.format == "q4_0":
        w -= 8                                                 # codes 0..15 -> -8..7
        w *= d
    else:
        w *= d
        w += packed.m[rows].astype(np.float32)[..., None]      # (n, nb, 1): one offset a block
    return w.reshape(-1, packed.shape[1])


def quantize(w, fmt):
    """float32 (rows, cols) -> (planes of q4_0 or q4_1, why), bit for bit llama.cpp's
    quantize_row_q4_0_ref / quantize_row_q4_1_ref (and gguf-py's quantizers): codes are
    truncated after adding 8.5 (Q4_0) or 0.5 (Q4_1), i.e. rounded half up, then clipped to 15.
    The codes come from the float32 d and min; the file keeps them as f16."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // BLOCK, BLOCK)                   # (rows, nb, 32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if fmt == "q4_0":
            i = np.abs(x).argmax(axis=-1)[..., None]            # first weight of largest |w|
            d = np.take_along_axis(x, i, axis=-1) / np.float32(-8)
            offset, start = np.float32(8.5), np.float32(0)
        else:
            lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            offset, start = np.float32(0.5), lo
        inv = np.float32(1) / d
        inv[np.isinf(inv)] = 0                 # d == 0 (a constant block), or 1/d beyond float32
        codes = np.trunc((x - start) * inv + offset).astype(np.uint8).clip(0, 15)
        planes = {"qs": pack(codes), "d": d[..., 0].astype(np.float16)}
        if fmt == "q4_1":
            planes["m"] = lo[..., 0].astype(np.float16)
    why = ("every weight must be finite, and within float16's range once scaled: "
           + ("|w| <= 8 * 65504" if fmt == "q4_0"
              else "min >= -65504, min <= 65504 and max - min <= 15 * 65504"))
    return planes, why

"""Q8_0: blocks of 32 weights, one float16 scale and 32 int8 codes. 34 bytes, 8.5 bits a weight.

One block (32 consecutive weights of a row), as GGUF stores it:

    byte  0    2                                                          34
          | d  | q[0] q[1] q[2] ...                               q[31] |
            f16  int8, -127..127

    w[j] = q[j] * d          d = max|w| / 127 over the block, q[j] = round(w[j] / d)

In memory (Packed), the same bits in two planes, nb = cols // 32 blocks per row:

    qs (rows, nb, 32) int8       d (rows, nb) float16

The scale costs 2 of the 34 bytes (6%): d is read once per 32 weights, and a kernel can multiply
by it once per block, after summing q[j] * x[j] over the block.

Dequantizing is exact: an 8-bit code times an 11-bit float16 significand fits float32's 24 bits,
and every finite float16 d (down to the subnormal 2^-24, up to 65504; negative or zero as well)
gives finite float32 weights (|w| <= 127 * 65504). So the GPU, with or without FMA, computes the
same bits as this reference. Only a NaN or inf d is refused (formats.from_gguf).
"""
import numpy as np


BLOCK = 32
FIELDS = {"q8_0": (("d", "<f2", 1), ("qs", "i1", 32))}
BLOCK_BYTES = {"q8_0": 2 + 32}
GGML_TYPE = {"q8_0": 8}
KERNEL = {"q8_0": "Q8_0"}


def dequantize(packed, rows=slice(None)):
    """float32 (n, cols) of the selected rows: each code times its block's scale."""
    w = packed.qs[rows].astype(np.float32)                     # (n, nb, 32)
    w *= packed.d[rows].astype(np.float32)[..., None]          # (n, nb, 1): one scale a block
    return w.reshape(-1, packed.shape[1])


def round_half_away(x, xp=np):
    """C's roundf (halves away from zero, 2.5 -> 3, -2.5 -> -3, where NumPy's round goes to the
    even neighbour), exactly: also runq.c's rounding of activations (quant.py), on NumPy or
    CuPy (xp). floor(|x| + 0.5) is not exact in float32 (0.49999997 + 0.5 rounds up to 1.0), so
    add 1 when the fraction |x| - floor(|x|), which is exact, is at least one half. In place on
    one temporary: ten times faster than fresh arrays."""
    a = xp.abs(x)
    whole = xp.floor(a)
    a -= whole                                  # the fraction, 0 <= a < 1
    a *= 2
    xp.floor(a, out=a)                          # 1 where the fraction >= 0.5, else 0
    a += whole
    return xp.copysign(a, x, out=a)


def quantize(w, fmt="q8_0"):
    """float32 (rows, cols) -> (planes of q8_0, why), bit for bit llama.cpp's quantize_row_q8_0_ref (and
    gguf-py's Q8_0.quantize). The codes come from the float32 scale; the file keeps it as f16."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // BLOCK, BLOCK)                   # (rows, nb, 32)
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(1) / d
        inv[np.isinf(inv)] = 0                 # d == 0 (all zeros), or 1/d beyond float32
        qs = round_half_away(x * inv).astype(np.int8)
        d16 = d[..., 0].astype(np.float16)
    why = (f"every weight must be finite, and |w| <= 127 * 65504 so that max|w| / 127 is a "
           f"finite float16 scale")
    return {"qs": qs, "d": d16}, why

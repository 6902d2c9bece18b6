"""f32, f16, bf16: one floating-point value per weight, no blocks.

    f32    | sign | exponent 8 | mantissa 23 |     4 bytes   the reference: exact
    f16    | sign | exponent 5 | mantissa 10 |     2 bytes   |w| <= 65504, 11 significant bits
    bf16   | sign | exponent 8 | mantissa 7  |     2 bytes   float32's range, 8 significant bits

bfloat16 is the top half of a float32: widening is a 16-bit shift, and narrowing rounds the
low 16 bits away, to nearest with ties to even (as torch and ggml do). NumPy has no bfloat16
type, so a bf16 plane holds the bits as uint16 (on the GPU: uint16 or CuPy's bfloat16).

    data (rows, cols) float32 | float16 | uint16
"""
import numpy as np


BLOCK = 1
FIELDS = {"f32": (("data", "<f4", 1),), "f16": (("data", "<f2", 1),),
          "bf16": (("data", "<u2", 1),)}
BLOCK_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
GGML_TYPE = {"f32": 0, "f16": 1, "bf16": 30}
KERNEL = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
LARGEST = {"f32": float(np.finfo(np.float32).max), "f16": 65504.0,
           "bf16": float(np.uint32(0x7F7F0000).view(np.float32))}     # 3.39e38


def to_bf16(w):
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even. Adding 0x7FFF plus
    the lowest kept bit, then dropping 16 bits, rounds up exactly when the dropped half is over
    0x8000, or equal to it with an odd kept half. Large values round to inf as in torch; a NaN
    stays a NaN (0x7FC0; torch writes 0xFFFF or 0x7FC0 depending on the code path)."""
    u = np.asarray(w, np.float32).view(np.uint32)
    bits = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, np.uint16(0x7FC0), bits)


def bf16_to_f32(u16):
    """bfloat16 bits -> float32: the 16 stored bits become the top half, the rest zeros."""
    return (np.asarray(u16, np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequantize(packed, rows=slice(None)):
    """float32 (n, cols) of the selected rows (for f32 a view of the stored data: read only)."""
    data = packed.data[rows]
    w = bf16_to_f32(data) if packed.format == "bf16" else data.astype(np.float32, copy=False)
    return w.reshape(-1, packed.shape[1])


def quantize(w, fmt):
    """float32 (rows, cols) -> (planes of `fmt`, why). formats.quantize wraps them in a Packed
    and refuses, by name, a weight that is not finite in `fmt` (NaN, inf, or beyond its range,
    e.g. |w| > 65504 for f16), giving `why`."""
    if fmt == "f16":
        with np.errstate(over="ignore"):             # overflow becomes inf: refused below
            data = w.astype(np.float16)
    elif fmt == "bf16":
        data = to_bf16(w)
    else:
        data = np.ascontiguousarray(w, np.float32)
    why = (f"to be stored as {fmt} every weight must be finite, |w| <= {LARGEST[fmt]:.6g}; "
           f"use a wider format (float32)")
    return {"data": data}, why

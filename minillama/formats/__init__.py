"""How a weight is stored: one module per format family, one type (Packed) for a stored weight.

    dense.py   f32, f16, bf16     one value per weight: 4, 2, 2 bytes
    q8_0.py    q8_0               blocks of 32: a float16 scale + 32 int8 codes, 8.5 bits/weight
    q4.py      q4_0, q4_1         blocks of 32: float16 scale (+ offset) + 32 4-bit codes, 4.5 / 5
    kquants.py q2_k .. q6_k       super-blocks of 256: float16 d (+ dmin), a 4-8 bit scale (and
                                  min) per 16 or 32 weights, 2-6 bit codes: 2.6 to 6.6 bits/weight

Each module declares its blocks (BLOCK weights per block, FIELDS: the fields of one GGUF block in
file order, BLOCK_BYTES, GGML_TYPE, KERNEL: the GPU kernels' template argument) and holds the
NumPy reference `dequantize(packed, rows)` and, for the formats minillama writes (QUANTIZABLE:
all but the k-quants, which are read from GGUF files only), `quantize(w, fmt)`. This package
dispatches on the format name:

    FORMATS[fmt] -> module               layout(fmt, shape) -> {plane: (shape, dtype)}
    bytes_for(fmt, shape) -> int         (the memory plan: no data needed)
    quantize(w, fmt, name) -> Packed     from float32, as llama.cpp's reference quantizers do
    dequantize(packed, rows) -> float32  rows: a slice or an array of row indices (a gather)
    row_chunks(packed, max_bytes)        (start, stop, float32 rows) a bounded block at a time
    from_gguf(raw, fmt, shape, name)     GGUF tensor bytes -> Packed, no float32 copy
    to_gguf(packed) -> bytes             and back, byte for byte
    GGML_FORMATS[ggml type id] -> fmt
"""
import math

import numpy as np

from ..errors import ArgumentError
from . import dense, kquants, q4, q8_0
from .registry import FORMATS, GGML_FORMATS, bytes_for, layout, module
from .packed import Packed, check_finite, concat_rows, join_blocks, split_blocks

CHUNK_BYTES = 16 << 20          # float32 bytes of one chunk that row_chunks dequantizes
QUANTIZABLE = tuple(fmt for fmt, m in FORMATS.items() if hasattr(m, "quantize"))

__all__ = ["FORMATS", "GGML_FORMATS", "Packed", "QUANTIZABLE", "bytes_for", "concat_rows",
           "dequantize", "from_gguf", "layout", "quantize", "row_chunks", "to_gguf"]



def quantize(w, fmt, name="weight"):
    """A float32 (rows, cols) weight stored in `fmt` (one of QUANTIZABLE). Non-finite weights,
    or weights beyond the format's range, are refused with a CheckpointError naming `name` and
    the block."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ArgumentError(f"{name}: expected a (rows, cols) weight, got shape {w.shape}")
    if fmt in FORMATS and fmt not in QUANTIZABLE:
        raise ArgumentError(f"format: minillama reads {fmt} from GGUF files but does not "
                            f"quantize to it; expected one of {', '.join(QUANTIZABLE)}")
    layout(fmt, w.shape)                     # rows of whole blocks, or an ArgumentError
    planes, why = module(fmt).quantize(w, fmt)
    return check_finite(Packed(fmt, w.shape, planes), name, why)


def dequantize(packed, rows=slice(None)):
    """float32 (n, cols) of the rows `rows` (slice or index array) of a Packed with NumPy planes."""
    return module(packed.format).dequantize(packed, rows)


def row_chunks(packed, max_bytes=CHUNK_BYTES):
    """(start, stop, w) for consecutive blocks of rows, w = dequantize(packed, start:stop): at
    most max_bytes of float32 each (one row at least). A linear y = x @ W.T on the CPU writes
    y[..., start:stop] = x @ w.T chunk by chunk: the peak is a chunk or two, not the matrix."""
    n_rows, cols = packed.shape
    step = max(1, max_bytes // (4 * cols))
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        yield start, stop, dequantize(packed, slice(start, stop))


def from_gguf(raw, fmt, shape, name="weight"):
    """A GGUF tensor's bytes (its blocks, as stored) as a Packed of `shape` (rows, cols),
    without any float32 copy. A NaN or inf scale, offset or value is refused, naming `name`
    (e.g. "model.gguf: tensor 'blk.0.attn_q.weight'") and the first bad block."""
    packed = split_blocks(raw, fmt, tuple(shape), name)
    return check_finite(packed, name, "a stored weight must be finite: the file is damaged")


def to_gguf(packed):
    """The GGUF bytes of a Packed (NumPy planes): what a writer puts in the file."""
    return join_blocks(packed)

"""The formats by name: which module stores each one, and what its planes and bytes are.

Kept apart from packed.py so that imports run one way: the format modules (dense, q8_0, q4,
kquants) describe their blocks and import nothing of the package; this registry reads them;
Packed checks its planes against the registry; formats/__init__.py puts it all together.
"""
import math

import numpy as np

from ..errors import ArgumentError
from . import dense, kquants, q4, q8_0

FORMATS = {fmt: module for module in (dense, q8_0, q4, kquants) for fmt in module.FIELDS}
GGML_FORMATS = {m.GGML_TYPE[fmt]: fmt for fmt, m in FORMATS.items()}
def module(fmt):
    if fmt not in FORMATS:
        raise ArgumentError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def _rows_blocks(fmt, shape):
    """(rows, blocks per row) of a weight of `shape` (..., cols): every dimension but the last
    counts as rows; the last must be whole blocks."""
    block = module(fmt).BLOCK
    if len(shape) < 1 or shape[-1] % block:
        raise ArgumentError(f"shape: {fmt} needs rows of whole blocks of {block} values, "
                            f"got shape {tuple(shape)}")
    return math.prod(shape[:-1]), shape[-1] // block


def layout(fmt, shape):
    """The planes a (rows, cols) weight stored in `fmt` has: {plane: (shape, dtype)}."""
    rows, nb = _rows_blocks(fmt, shape)
    return {plane: ((rows, nb, count) if count > 1 else (rows, nb), np.dtype(dtype))
            for plane, dtype, count in module(fmt).FIELDS[fmt]}


def bytes_for(fmt, shape):
    """Bytes a weight of `shape` takes stored in `fmt`: blocks times BLOCK_BYTES."""
    rows, nb = _rows_blocks(fmt, shape)
    return rows * nb * module(fmt).BLOCK_BYTES[fmt]

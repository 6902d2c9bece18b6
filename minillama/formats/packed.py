"""Packed: one weight as it is stored, in whatever format; and the way between GGUF's blocks and it.

    Packed(format, shape, planes)
        format  a name in formats.FORMATS: "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"
        shape   the logical (rows, cols) of the weight, as if it were float32
        planes  the stored arrays by name, each C-contiguous: {"data"} for the dense formats,
                {"qs", "d"} or {"qs", "d", "m"} for the block formats (the format's FIELDS)

GGUF stores a block format as an array of structures: block after block, each one its scale(s)
then its codes (18 bytes for Q4_0). Packed keeps the same bits as a structure of arrays, one
plane per field, so the GPU can read the codes of a block with one aligned 16-byte load:

    GGUF, one row:   | d qs | d qs | d qs | ...               (rows, nb) blocks of BLOCK_BYTES
    Packed:          qs (rows, nb, 16)   d (rows, nb)   [m (rows, nb)]

The planes may be NumPy or CuPy arrays: Packed reads only their shape, dtype, flags and nbytes,
so the same object describes a weight in host memory and on the GPU (`packed.map(cupy.asarray)`).
"""
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError, CheckpointError
from . import registry

DTYPE_ALIASES = {"bfloat16": "uint16"}     # CuPy's bfloat16 holds the bits a bf16 plane holds


@dataclass(eq=False)
class Packed:
    format: str
    shape: tuple
    planes: dict

    def __post_init__(self):
        self.shape = tuple(int(n) for n in self.shape)
        if len(self.shape) != 2:
            raise ArgumentError(f"Packed {self.format}: shape {self.shape}, expected (rows, cols)")
        expected = {k: (shape, dtype.name) for k, (shape, dtype) in
                    registry.layout(self.format, self.shape).items()}
        got = {k: (tuple(a.shape), DTYPE_ALIASES.get(a.dtype.name, a.dtype.name))
               for k, a in self.planes.items()}
        if got != expected:
            raise ArgumentError(f"Packed {self.format} {self.shape}: planes {got}, "
                                f"expected {expected}")
        for k, a in self.planes.items():
            if not a.flags.c_contiguous:
                raise ArgumentError(f"Packed {self.format} {self.shape}: plane {k} is not "
                                    f"C-contiguous")

    def __getattr__(self, plane):
        """packed.qs, packed.d, packed.m, packed.data: the planes by name."""
        try:
            return self.__dict__["planes"][plane]
        except KeyError:
            raise AttributeError(f"Packed {self.__dict__.get('format')} has no plane "
                                 f"{plane!r}") from None

    @property
    def nbytes(self):
        """The stored bytes, all planes together (what the memory plan counts)."""
        return sum(int(a.nbytes) for a in self.planes.values())

    @property
    def kernel(self):
        """The GPU kernels' template argument for this format, e.g. "Q4_0"."""
        return registry.FORMATS[self.format].KERNEL[self.format]

    def map(self, fn):
        """The same weight with fn applied to every plane: map(cupy.asarray), map(cupy.asnumpy)."""
        return Packed(self.format, self.shape, {k: fn(a) for k, a in self.planes.items()})

    def __repr__(self):
        planes = ", ".join(f"{k} {a.dtype.name} {tuple(a.shape)}" for k, a in self.planes.items())
        return f"Packed({self.format!r}, {self.shape}, {planes}; {self.nbytes} bytes)"


def concat_rows(parts):
    """One Packed holding the rows of `parts` (NumPy planes, one format, one cols) in order:
    how wq, wk, wv become one wqkv. Blocks run along rows, so each plane concatenates on axis 0."""
    first = parts[0]
    planes = {k: np.concatenate([p.planes[k] for p in parts]) for k in first.planes}
    return Packed(first.format, (sum(p.shape[0] for p in parts), first.shape[1]), planes)


# ----------------------------------------------------------------------------
# GGUF's blocks <-> planes: a format's layout lists its planes in the order of the fields of a
# block, e.g. Q4_1's d (rows, nb) float16, m (rows, nb) float16, qs (rows, nb, 16) uint8.

def split_blocks(raw, fmt, shape, name):
    """The planes of a GGUF tensor's bytes `raw` (bytes or a uint8 array): one copy of each field
    in its own dtype, no float32 anywhere. A dense format's one field is contiguous already, so
    its plane stays a view of `raw`."""
    raw = raw.reshape(-1).view(np.uint8) if isinstance(raw, np.ndarray) \
        else np.frombuffer(raw, np.uint8)              # bytes, memoryview, mmap: no copy
    expected = registry.bytes_for(fmt, shape)
    if raw.size != expected:
        raise CheckpointError(f"{name}: {raw.size} bytes of data, expected {expected} for {fmt} "
                              f"of shape {tuple(shape)}")
    blocks = raw.reshape(shape[0], -1, registry.FORMATS[fmt].BLOCK_BYTES[fmt])   # (rows, nb, bytes)
    planes, at = {}, 0
    for plane, (plane_shape, dtype) in registry.layout(fmt, shape).items():
        size = dtype.itemsize * math.prod(plane_shape[2:])              # bytes in one block
        field = np.ascontiguousarray(blocks[..., at:at + size])        # the one copy: AoS -> SoA
        planes[plane] = field.view(dtype).reshape(plane_shape)
        at += size
    return Packed(fmt, shape, planes)


def join_blocks(packed):
    """The GGUF bytes of `packed` (NumPy planes): its fields interleaved again, block by block."""
    rows, nb = packed.shape[0], next(iter(packed.planes.values())).shape[1]
    parts = [packed.planes[plane].view(np.uint8).reshape(rows, nb, -1)
             for plane in registry.layout(packed.format, packed.shape)]
    return np.concatenate(parts, axis=-1).tobytes()


# ----------------------------------------------------------------------------
# every floating-point field of a stored weight must be finite

def check_finite(packed, name, why):
    """Refuse `packed` (NumPy planes) if a scale, offset or dense value is NaN or inf: a
    CheckpointError naming the tensor (`name`), the first such block and `why`."""
    block = registry.FORMATS[packed.format].BLOCK
    for plane, a in packed.planes.items():
        if packed.format == "bf16":
            bad = (a & 0x7F80) == 0x7F80            # exponent all ones: inf or NaN
        elif a.dtype.kind == "f":
            bad = ~np.isfinite(a)
        else:
            continue                                # integer codes are always valid
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            row, b = divmod(i, a.shape[1])
            value = _as_float(packed.format, a.reshape(-1)[i:i + 1])
            where = (f"block {i} (row {row}, columns {b * block}..{b * block + block - 1}) "
                     f"has a non-finite {plane} = {value}" if block > 1
                     else f"value at row {row}, column {b} is non-finite ({value})")
            raise CheckpointError(f"{name}: {packed.format} {where}; {why}")
    return packed


def _as_float(fmt, v):
    """The one stored value v (a 1-element array) as a float, for a message."""
    return float((v.astype(np.uint32) << 16).view(np.float32)[0] if fmt == "bf16" else v[0])

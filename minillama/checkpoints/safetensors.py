"""The .safetensors container, read with NumPy alone (Hugging Face's own format, no pickle):

    8 bytes        N, little-endian uint64
    N bytes        JSON: {name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [b, e]},
                          "__metadata__": {...}}
    the data       tensor `name` is bytes [b, e) of this part, row-major, little-endian

Nothing but the header is read here: each tensor comes back as a LazyTensor that reads its own
bytes later. hf.py maps the names onto Meta's.
"""
import json
import os

import numpy as np

from ..dtypes import LazyTensor
from ..errors import CheckpointError, shown

DTYPES = {"F32": ("<f4", "f32"), "F16": ("<f2", "f16"), "BF16": ("<u2", "bf16")}   # bf16 as bits
MAX_HEADER = 100 << 20          # a header is a few hundred kB even for large models


def read_safetensors(path):
    """{name: LazyTensor} from the header of one .safetensors file; the data is read later."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors header")
        n = int(np.frombuffer(head, "<u8")[0])
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {n} does not fit the file "
                                  f"({size} bytes); not a safetensors file, or truncated")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    base, data_len = 8 + n, size - 8 - n
    return {name: _tensor(path, name, info, base, data_len)
            for name, info in header.items() if name != "__metadata__"}


def _tensor(path, name, info, base, data_len):
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError, OverflowError):     # OverflowError: int(inf)
        raise CheckpointError(f"{path}: tensor {shown(name)} has a malformed header entry") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {shown(name)} is {shown(dtype, quote=False)}; minillama reads "
                              f"{', '.join(DTYPES)}")
    np_dtype, fmt = np.dtype(DTYPES[dtype][0]), DTYPES[dtype][1]
    count = int(np.prod(shape))
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len \
            or end - begin != count * np_dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {shown(name)} ({dtype} {shown(list(shape))}) has data offsets "
                              f"[{begin}, {end}) that do not fit its size or the file "
                              f"({data_len} data bytes; truncated?)")

    def read():             # the stored values: float32, float16, or bfloat16 bits (uint16)
        return np.fromfile(path, dtype=np_dtype, count=count, offset=base + begin).reshape(shape)

    def raw():              # the same bytes, mapped: a slice reads only its own
        return np.memmap(path, np.uint8, "r", offset=base + begin, shape=(end - begin,))
    return LazyTensor(shape, fmt, read, raw)

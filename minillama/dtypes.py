"""How weights are stored: on disk (bfloat16, float16, float32) and in memory (--dtype).

Checkpoint readers hand over weights as arrays, Q8Tensors, or LazyTensors (a weight still on
disk: its shape is known from the header, its bytes are read when asked for). Nothing large is
read until `store_weights` converts each weight, one at a time, to the storage dtype chosen by
the user. So memory can be planned from the shapes alone, and the peak while loading is the
stored model plus one weight in float32.

Storage dtypes (`--dtype`):
    float32   every weight float32 (the reference: exact to the checkpoint's float32 values)
    float16   linear weights float16, 2 bytes each; the matmul upcasts them and computes in float32
    int8      linear weights Q8_0: int8 values in groups of up to 32 along `in`, one float32
              scale per group; dequantized inside the matmul, activations stay float32
In every dtype the norms and the embedding table stay float32: the norms are tiny, and the
table is gathered by row (a tied classifier is that same table).
"""
import numpy as np

from .errors import ArgumentError, CheckpointError
from .model import classifier_is_embedding
from .quant import Q8Tensor, dequantize_q8, quantize_q8

WEIGHT_DTYPES = ("float32", "float16", "int8")
Q8_GROUP_SIZE = 32          # GGUF's Q8_0 group; llama2.c's export uses 64


class LazyTensor:
    """A weight not read yet. `read()` returns it as float32 (float16 sources as float16).

    NumPy treats it as an array (np.asarray reads it), so code that only needs an array works;
    `store_weights` reads each one once, converting it straight to its storage dtype."""

    def __init__(self, shape, source_dtype, read):
        self.shape = tuple(int(n) for n in shape)
        self.source_dtype = source_dtype      # "float32" | "float16" | "bfloat16", as on disk
        self.read = read

    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def nbytes(self):
        """Bytes on disk (float32 4, float16 and bfloat16 2 per value)."""
        return self.size * (4 if self.source_dtype == "float32" else 2)

    def __array__(self, dtype=None, copy=None):
        a = self.read()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, source_dtype={self.source_dtype!r})"


def check_dtype(dtype):
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ArgumentError(f"dtype: expected one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    return dtype


def q8_group_size(n, preferred=Q8_GROUP_SIZE):
    """The largest group size <= preferred that divides a row of n values.
    Rows of stories260K's w2 have 172 = 4 * 43 values, so they get groups of 4."""
    return max(g for g in range(1, min(n, preferred) + 1) if n % g == 0)


def role(name):
    """'embedding', 'norm' or 'linear': what decides how a weight is stored."""
    if name == "tok_embeddings.weight":
        return "embedding"
    return "norm" if name.endswith("norm.weight") else "linear"


def stored_nbytes(shape, dtype, role_):
    """Bytes a weight of `shape` takes once stored in `dtype` (see the module docstring)."""
    count = int(np.prod(shape))
    if role_ != "linear" or dtype == "float32":
        return 4 * count
    if dtype == "float16":
        return 2 * count
    rows, cols = shape
    return rows * cols + 4 * rows * (cols // q8_group_size(cols))     # int8 values + scales


def resolve_dtype(dtype, weights):
    """The dtype the weights will be stored in: `dtype`, or for None the checkpoint's own
    (int8 when it holds Q8 weights, such as a llama2.c version-2 file, else float32)."""
    if check_dtype(dtype) is not None:
        return dtype
    return "int8" if any(isinstance(w, Q8Tensor) for w in weights.values()) else "float32"


def store_weights(weights, dtype=None):
    """Weights in their storage dtype, reading LazyTensors one at a time.

    dtype None keeps Q8 weights as they are and makes everything else float32. A tied classifier
    (output.weight is the embedding object) stays tied."""
    check_dtype(dtype)
    tied = classifier_is_embedding(weights)
    stored = {}
    for name, w in weights.items():
        if tied and name == "output.weight":
            continue
        stored[name] = _store(name, w, dtype, role(name))
    if tied:
        stored["output.weight"] = stored["tok_embeddings.weight"]
    return stored


def _store(name, w, dtype, role_):
    if isinstance(w, Q8Tensor):
        if dtype in (None, "int8"):
            return w                       # already int8 groups: keep the checkpoint's own
        w = dequantize_q8(w.q, w.s, w.group_size)
    if role_ != "linear" or dtype in (None, "float32"):
        return np.asarray(w, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):          # overflow is reported just below, by name
            w16 = np.asarray(w, dtype=np.float16)
        if not np.isfinite(w16).all():
            raise CheckpointError(f"{name}: values outside float16's range (|w| > 65504); "
                                  f"use --dtype float32 or int8")
        return w16
    w32 = np.asarray(w, dtype=np.float32)               # (out, in)
    gs = q8_group_size(w32.shape[-1])
    q, s = quantize_q8(w32, gs)
    return Q8Tensor(q, s, gs, w8a8=False)

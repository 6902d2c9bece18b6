"""How each weight is kept in memory: decided here, once, for the loader and the memory plan.

Checkpoint readers hand over weights as the file holds them: float32 arrays, llama2.c's
Q8Tensors, or LazyTensors (a weight still on disk that knows its format; its bytes are read when
asked for, as stored or as float32). `storage_plan` decides, from the formats and shapes alone,
what each weight becomes; `store_weights` then reads each weight once, straight into that
format. So memory is planned before anything large is read, and the peak while loading is the
stored model plus one weight.

A linear weight (out, in) under each `--dtype`, with its bytes per weight (formats.md has the
blocks; a "row of blocks" needs `in` % 32 == 0):

    --dtype    kept as                                           bytes per weight
    float32    float32 array                                      4
    float16    Packed f16                                         2
    bfloat16   Packed bf16                                        2
    int8       Packed q8_0 (a row of blocks)                      34 / 32 = 1.0625
               else llama2.c's Q8 groups (float32 scales)         1 + 4 / g  (g = 4 for 172)
    q4_0       Packed q4_0 (a row of blocks)                      18 / 32 = 0.5625
               else float32 array                                 4
    None       as the file stores it: float32, Packed f16, bf16,  4, 2, 2,
               q8_0, q4_0, q4_1 (GGUF), Q8 groups (llama2.c v2)   1.0625, 0.5625, 0.625, 1 + 4 / g

A weight already in the target format is kept as read (a GGUF Q8_0 tensor under --dtype int8),
never rounded twice. The norms are float32 arrays in every dtype (they are tiny). The embedding
table is float32 under an explicit dtype and as stored under None; either way the model gathers
from a float32 copy it makes, and a tied classifier reads the stored table (model.py). Weights
the model multiplies as one (wq, wk, wv; w1, w3: FUSED) share one format; a file that stores
them differently has the group kept as float32.

Under None on the CPU, memory.plan_checkpoint may expand every Packed weight to float32 at load
(NumPy has no packed matrix product, so float32 is the fast path when it fits): it asks for
--dtype float32 then, and says so in `minillama info`.
"""
import math

import numpy as np

from . import formats
from .errors import ArgumentError
from .formats import Packed
from .formats.dense import bf16_to_f32
from .model import classifier_is_embedding
from .ops import float32_weight
from .quant import Q8Tensor, quantize_q8

WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "int8", "q4_0")   # widest first
DTYPE_FORMATS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int8": "q8_0",
                 "q4_0": "q4_0"}
Q8_GROUPS = "q8"            # llama2.c's Q8Tensor: the one stored form that is not a formats name
FORMAT_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "int8",
                 Q8_GROUPS: "int8", "q4_0": "q4_0"}
Q8_GROUP_SIZE = 32          # GGUF's Q8_0 group; llama2.c's export uses 64
FUSED = (("wq", "wk", "wv"), ("w1", "w3"))      # model.Attention's wqkv, FeedForward's w13


class LazyTensor:
    """A weight not read yet, and the format the file stores it in.

    format: a formats name, "f32", "f16", "bf16" (.safetensors, .pth, GGUF, llama2.c) or "q8_0",
    "q4_0", "q4_1", "q2_k" .. "q6_k" (GGUF). read() returns the stored values: an array of
    `shape` (float32, float16, or bfloat16 bits as uint16) for a dense format, a Packed for a
    block format. (checkpoints/llama2c.LazyQ8, format Q8_GROUPS, reads a Q8Tensor.) `packed()` gives
    the weight as stored, `np.asarray(lazy)` as numbers (float32; a float16 source as float16).
    raw: where the reader can give it, a function returning the stored bytes as a read-only
    np.memmap (uint8, row after row, GGUF's blocks for a block format), so that a slice of the
    weight reads only its own bytes from disk (tensor parallelism, parallel/slicing.py)."""

    def __init__(self, shape, format, read, raw=None):
        self.shape = tuple(int(n) for n in shape)
        self.format = format
        self.read = read
        self.raw = raw

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        """Bytes as stored in the file."""
        return formats.bytes_for(self.format, self.shape)

    def packed(self):
        """The weight as stored, a Packed (rows, cols): no float32 copy."""
        stored = self.read()
        if isinstance(stored, Packed):
            return stored
        rows_cols = (math.prod(self.shape[:-1]), self.shape[-1])
        data = np.ascontiguousarray(stored).reshape(rows_cols)          # f16, or bf16 bits
        return Packed(self.format, rows_cols, {"data": data})

    def __array__(self, dtype=None, copy=None):
        stored = self.read()
        if isinstance(stored, Packed):
            a = formats.dequantize(stored).reshape(self.shape)
        else:
            a = bf16_to_f32(stored) if self.format == "bf16" else stored
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, format={self.format!r})"


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


def source_format(w):
    """The format a weight arrives in: a LazyTensor's or Packed's own, Q8_GROUPS for a
    Q8Tensor, "f32" for an array (whatever its dtype: an array is read as float32)."""
    if isinstance(w, Q8Tensor):
        return Q8_GROUPS
    return w.format if isinstance(w, (LazyTensor, Packed)) else "f32"


# ----------------------------------------------------------------------------
# the decision

def storage_format(name, shape, source, dtype):
    """The format weight `name` of `shape`, arriving as `source`, is kept in (see the table)."""
    if source == Q8_GROUPS and dtype in (None, "int8"):
        return Q8_GROUPS                     # llama2.c's own groups: runq's arithmetic
    kind = role(name)
    if kind == "norm":
        return "f32"
    if dtype is None:
        return source
    if kind == "embedding":
        return "f32"
    fmt = DTYPE_FORMATS[dtype]
    if fmt in ("q8_0", "q4_0") and shape[-1] % formats.module(fmt).BLOCK:
        return Q8_GROUPS if dtype == "int8" else "f32"       # rows are not whole blocks
    return fmt


def storage_plan(sources, dtype, tied=False):
    """{name: format} for every weight; sources: {name: (format as read, shape)}. A tied
    classifier is the embedding's table, in the embedding's format."""
    check_dtype(dtype)
    plan = {name: storage_format(name, shape, source, dtype)
            for name, (source, shape) in sources.items()}
    for group in _fused_groups(plan):
        if len({plan[name] for name in group}) > 1:       # one product needs one format
            plan.update((name, "f32") for name in group)
    if tied:
        plan["output.weight"] = plan["tok_embeddings.weight"]
    return plan


def _fused_groups(names):
    """Lists of the names the model multiplies as one, e.g. layers.3.attention.wq/wk/wv."""
    groups = {}
    for name in names:
        parts = name.split(".")                 # layers, i, attention, wq, weight
        for group in FUSED:
            if len(parts) == 5 and parts[0] == "layers" and parts[3] in group:
                groups.setdefault((parts[1], group), []).append(name)
    return groups.values()


def stored_nbytes(fmt, shape):
    """Bytes a weight of `shape` takes kept as `fmt` (Q8 groups: int8 values + float32 scales)."""
    if fmt == Q8_GROUPS:
        rows, cols = shape
        return rows * cols + 4 * rows * (cols // q8_group_size(cols))
    return formats.bytes_for(fmt, shape)


def storage_name(plan, dtype=None):
    """The storage in words: the dtype given, or for None the dtype the linear weights amount
    to ("float32", "int8"), else "as stored (q4_1, q8_0)"."""
    if dtype is not None:
        return dtype
    linear = sorted({fmt for name, fmt in plan.items() if role(name) == "linear"})
    names = {FORMAT_DTYPES.get(fmt) for fmt in linear}
    if len(names) == 1 and None not in names:
        return names.pop()
    return f"as stored ({', '.join(linear)})"


def resolve_dtype(dtype, weights):
    """storage_name for a checkpoint's weights: e.g. "int8" for a llama2.c version-2 file."""
    return storage_name(storage_plan(_sources(weights), dtype, classifier_is_embedding(weights)),
                        dtype)


def _sources(weights):
    return {name: (source_format(w), tuple(w.shape)) for name, w in weights.items()}


# ----------------------------------------------------------------------------
# reading and converting

def store_weights(weights, dtype=None):
    """Weights kept as storage_plan says, each LazyTensor read once. A tied classifier
    (output.weight is the embedding object) stays tied."""
    tied = classifier_is_embedding(weights)
    plan = storage_plan(_sources(weights), dtype, tied)
    stored = {}
    for name, w in weights.items():
        if tied and name == "output.weight":
            continue
        stored[name] = _store(name, w, plan[name], dtype)
    if tied:
        stored["output.weight"] = stored["tok_embeddings.weight"]
    return stored


def _store(name, w, fmt, dtype):
    """w (array, Q8Tensor, Packed or LazyTensor) kept as `fmt`."""
    if fmt == "f32":
        return float32_weight(w)
    if fmt == source_format(w):
        return w.packed() if isinstance(w, LazyTensor) else w      # as read: no rounding
    w32 = float32_weight(w)                                         # (out, in)
    if fmt == Q8_GROUPS:
        gs = q8_group_size(w32.shape[-1])
        q, s = quantize_q8(w32, gs)
        return Q8Tensor(q, s, gs, w8a8=False)
    return formats.quantize(w32, fmt, f"{name} (--dtype {dtype})")

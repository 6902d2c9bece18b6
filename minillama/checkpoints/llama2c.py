"""llama2.c checkpoints: the legacy format (v0), version 1 (float32) and version 2 (int8 Q8_0).

Legacy (what llama2.c's `run.c` reads):
    7 x int32   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                (vocab_size < 0 means the classifier is not shared with the embedding)
    float32     tok_embeddings, attention_norm[L], wq[L], wk[L], wv[L], wo[L], ffn_norm[L],
                w1[L], w2[L], w3[L], norm, freq_cis_real, freq_cis_imag (skipped), [output]

Versions 1 and 2 (llama2.c's `export.py`), a 256-byte header:
    uint32 magic 0x616b3432 ("ak42"), int32 version, the 7 int32 above,
    uint8 shared_classifier, (v2 only) int32 group_size, zero padding to 256 bytes
  v1: float32  attention_norm[L], ffn_norm[L], norm, tok_embeddings, wq[L], wk[L], wv[L], wo[L],
               w1[L], w2[L], w3[L], [output]
  v2: float32  attention_norm[L], ffn_norm[L], norm; then each of tok_embeddings, wq[L], wk[L],
               wv[L], wo[L], w1[L], w2[L], w3[L], [output] as int8 values followed by float32
               scales, one tensor (one layer) at a time.

A v2 tensor is quantized as one flat run of values, groups of group_size taken across row ends.
runq.c multiplies row i (length n) by whole groups only, j = 0, gs, ... <= n - gs, and uses the
scale of flat group (i * n + j) // gs for the group starting at column j. When n is a multiple
of gs that is the ordinary per-row grouping; when it is not (stories260K: hidden_dim 172, gs 8),
the last n % gs columns are skipped and odd rows borrow a neighbouring scale. We build per-row
scales with exactly that indexing, so the model computes what runq computes.
"""
import functools
import math
import os
import struct

import numpy as np

from ..dtypes import Q8_GROUPS, LazyTensor
from ..errors import CheckpointError
from ..model import ModelArgs
from ..ops import float32_weight
from ..quant import Q8Tensor

MAGIC = 0x616B3432
HEADER_V1V2 = 256
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
PER_LAYER = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def tensor_names(p: ModelArgs, kind):
    """Meta names of the linear weights of one kind ('wq', ..., 'w3'), one per layer."""
    sub = "feed_forward" if kind.startswith("w") and kind[1].isdigit() else "attention"
    return [f"layers.{i}.{sub}.{kind}.weight" for i in range(p.n_layers)]


def norm_names(p: ModelArgs, kind):
    return [f"layers.{i}.{kind}.weight" for i in range(p.n_layers)]


class _Reader:
    """Consecutive arrays of a file whose total size was checked up front, handed out still on
    disk: each a LazyTensor that reads its own bytes when asked, so memory is planned first."""

    def __init__(self, path, offset):
        self.path, self.offset = path, offset

    def take(self, dtype, shape):
        count, offset = math.prod(shape), self.offset
        self.offset += count * np.dtype(dtype).itemsize
        return functools.partial(_read_array, self.path, dtype, shape, offset)

    def take_f32(self, shape):
        return LazyTensor(shape, "f32", self.take(np.float32, shape))


def _read_array(path, dtype, shape, offset):
    a = np.fromfile(path, dtype=dtype, count=math.prod(shape), offset=offset)
    if a.size != math.prod(shape):
        raise CheckpointError(f"{path}: file ends inside a tensor (truncated since it was opened?)")
    return a.reshape(shape)


class LazyQ8(LazyTensor):
    """A version-2 matrix still on disk: read() gives its Q8Tensor (int8 values, and per-row
    scales in runq's indexing, see the module docstring)."""

    def __init__(self, shape, values, scales, group_size):
        super().__init__(shape, Q8_GROUPS, functools.partial(
            _read_q8, values, scales, shape, group_size))
        self.group_size = group_size

    @property
    def nbytes(self):
        rows, cols = self.shape
        return rows * cols + 4 * rows * (cols // self.group_size)

    def packed(self):
        return self.read()

    def __array__(self, dtype=None, copy=None):
        return float32_weight(self.read()).astype(dtype or np.float32, copy=False)


def _read_q8(values, scales, shape, gs):
    rows, cols = shape
    flat_scales = scales()
    # runq's indexing (module docstring): group starting at column j of row i
    starts = np.arange(rows)[:, None] * cols + np.arange(cols // gs)[None, :] * gs
    return Q8Tensor(values(), flat_scales[starts // gs], gs, w8a8=True)


# ----------------------------------------------------------------------------
# reading

def is_llama2c(path):
    """Any other file: llama2.c's legacy format has no magic, so read_header decides."""
    return os.path.isfile(path) and not path.endswith((".gguf", ".safetensors", ".pth", ".json"))


def read_header(path):
    """(version, config dict, header bytes) for a llama2.c file, checking it is readable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_V1V2)
    if len(head) < 28:
        raise CheckpointError(f"{path}: {size} bytes is too short for a llama2.c header (28 bytes)")
    if struct.unpack("<I", head[:4])[0] != MAGIC:
        return 0, dict(zip(FIELDS, struct.unpack("<7i", head[:28]))), 28
    if len(head) < HEADER_V1V2:
        raise CheckpointError(f"{path}: truncated header ({size} bytes, version header is 256)")
    version = struct.unpack("<i", head[4:8])[0]
    if version not in (1, 2):
        raise CheckpointError(f"{path}: llama2.c version {version} is not supported "
                              f"(expected 1 or 2, or the legacy headerless format)")
    cfg = dict(zip(FIELDS, struct.unpack("<7i", head[8:36])))
    cfg["shared_classifier"] = head[36]
    if version == 2:
        cfg["group_size"] = struct.unpack("<i", head[37:41])[0]
    return version, cfg, HEADER_V1V2


def _params(path, cfg, version, max_seq_len, max_batch_size):
    for name in FIELDS:
        value = cfg[name]
        if name == "vocab_size" and version == 0:
            value = abs(value)
        if value <= 0 or value > 1 << 24:
            raise CheckpointError(f"{path}: not a model file minillama knows (read as a legacy "
                                  f"llama2.c file, which has no magic number: header field "
                                  f"{name} = {cfg[name]} is not a plausible size)")
    dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv:
        raise CheckpointError(f"{path}: header has dim={dim}, n_heads={n_heads}, "
                              f"n_kv_heads={n_kv}: expected n_heads | dim (even head size) "
                              f"and n_kv_heads | n_heads")
    return ModelArgs(dim=dim, hidden_dim=cfg["hidden_dim"], n_layers=cfg["n_layers"],
                     n_heads=n_heads, n_kv_heads=n_kv, vocab_size=abs(cfg["vocab_size"]),
                     max_seq_len=max_seq_len or cfg["seq_len"], max_batch_size=max_batch_size)


def _linear_shapes(p: ModelArgs):
    """(kind, shape) of each per-layer linear weight, in file order."""
    kv = p.kv_dim
    return [("wq", (p.dim, p.dim)), ("wk", (kv, p.dim)), ("wv", (kv, p.dim)),
            ("wo", (p.dim, p.dim)), ("w1", (p.hidden_dim, p.dim)),
            ("w2", (p.dim, p.hidden_dim)), ("w3", (p.hidden_dim, p.dim))]


def expected_size(version, cfg, p: ModelArgs, header_bytes):
    """Bytes the file must have, computed from the header alone."""
    L, dim, vocab = p.n_layers, p.dim, p.vocab_size
    shared = cfg["vocab_size"] > 0 if version == 0 else bool(cfg["shared_classifier"])
    norms = (2 * L + 1) * dim
    linear = L * sum(a * b for _, (a, b) in _linear_shapes(p))
    mats = vocab * dim + linear + (0 if shared else vocab * dim)
    if version == 0:
        freq_cis = cfg["seq_len"] * p.head_dim          # real and imag halves together
        return header_bytes + 4 * (norms + mats + freq_cis), shared
    if version == 1:
        return header_bytes + 4 * (norms + mats), shared
    return header_bytes + 4 * norms + mats + 4 * (mats // cfg["group_size"]), shared


def read_llama2c(path, max_seq_len=None, max_batch_size=1):
    """(ModelArgs, weights under Meta's names) of a llama2.c checkpoint, every weight still on
    disk (LazyTensors): the header and the file size are checked, nothing large is read, so
    the memory plan comes first (a header claiming 7B on a sparse file is refused unread)."""
    path = os.fspath(path)
    version, cfg, header_bytes = read_header(path)
    p = _params(path, cfg, version, max_seq_len, max_batch_size)
    if version == 2:
        gs = cfg["group_size"]
        if gs <= 0 or p.dim % gs or (p.dim * p.hidden_dim) % gs:
            raise CheckpointError(f"{path}: group_size {gs} must be positive and divide dim "
                                  f"({p.dim}) and the size of every tensor")
    want, shared = expected_size(version, cfg, p, header_bytes)
    size = os.path.getsize(path)
    if size != want:
        raise CheckpointError(f"{path}: file is {size} bytes but its header "
                              f"({', '.join(f'{k}={cfg[k]}' for k in FIELDS)}) needs {want} bytes"
                              f"{' (truncated?)' if size < want else ''}")
    read = {0: _read_v0, 1: _read_v1, 2: _read_v2}[version]
    weights = read(_Reader(path, header_bytes), p, cfg)
    if shared:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return p, weights


def load_llama2c(path, max_seq_len=None, max_batch_size=1):
    """Read a llama2.c checkpoint: (ModelArgs, weights dict under Meta's names), float32 arrays
    (Q8Tensors for version 2's matrices); a shared classifier is the embedding's array."""
    p, lazy = read_llama2c(path, max_seq_len, max_batch_size)
    read = {id(w): w.read() for w in lazy.values()}
    return p, {name: read[id(w)] for name, w in lazy.items()}


def _read_v0(r, p, cfg):
    w = {"tok_embeddings.weight": r.take_f32((p.vocab_size, p.dim))}
    layers = [("wq", "wk", "wv", "wo"), ("w1", "w2", "w3")]
    shapes = dict(_linear_shapes(p))
    for norm, kinds in zip(("attention_norm", "ffn_norm"), layers):
        for name in norm_names(p, norm):
            w[name] = r.take_f32((p.dim,))
        for kind in kinds:
            for name in tensor_names(p, kind):
                w[name] = r.take_f32(shapes[kind])
    w["norm.weight"] = r.take_f32((p.dim,))
    r.take(np.float32, (cfg["seq_len"] * p.head_dim,))        # freq_cis_real, freq_cis_imag
    if cfg["vocab_size"] < 0:
        w["output.weight"] = r.take_f32((p.vocab_size, p.dim))
    return w


def _read_norms(r, p):
    w = {}
    for kind in ("attention_norm", "ffn_norm"):
        for name in norm_names(p, kind):
            w[name] = r.take_f32((p.dim,))
    w["norm.weight"] = r.take_f32((p.dim,))
    return w


def matrices(p):
    """(name, shape) of every matrix after the norms, in v1/v2 file order."""
    out = [("tok_embeddings.weight", (p.vocab_size, p.dim))]
    for kind, shape in _linear_shapes(p):
        out += [(name, shape) for name in tensor_names(p, kind)]
    return out


def _read_v1(r, p, cfg):
    w = _read_norms(r, p)
    mats = matrices(p) + ([] if cfg["shared_classifier"] else [("output.weight", (p.vocab_size, p.dim))])
    for name, shape in mats:
        w[name] = r.take_f32(shape)
    return w


def _read_v2(r, p, cfg):
    w, gs = _read_norms(r, p), cfg["group_size"]
    mats = matrices(p) + ([] if cfg["shared_classifier"] else [("output.weight", (p.vocab_size, p.dim))])
    for name, (rows, cols) in mats:
        values = r.take(np.int8, (rows, cols))
        scales = r.take(np.float32, (rows * cols // gs,))
        w[name] = LazyQ8((rows, cols), values, scales, gs)
    return w

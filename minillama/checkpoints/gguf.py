"""GGUF, llama.cpp's one-file model format (versions 2 and 3), read with NumPy alone.

The file, all little-endian:

    "GGUF"  uint32 version  uint64 n_tensors  uint64 n_kv
    n_kv times       key (string)  uint32 value_type  value
    n_tensors times  name (string)  uint32 n_dims  uint64 ne[n_dims]  uint32 ggml_type  uint64 offset
    zero padding up to a multiple of `general.alignment` (32 when absent), then the tensor data:
    tensor t starts at data_start + t.offset, and t.offset is a multiple of the alignment.

    string = uint64 length + UTF-8 bytes (no terminating zero)
    array  = uint32 element type + uint64 count + the elements (arrays may nest)
    ne[0] is the dimension that moves fastest, so a (rows, cols) matrix has ne = [cols, rows].

Weights are stored in blocks along each row (of 32, or super-blocks of 256 for the k-quants);
one block of each type we read (minillama.formats holds the layouts, drawn in full):

    F32, F16, BF16  plain floats
    Q8_0      f16 d, 32 x int8 q                   w = q * d
    Q4_0      f16 d, 16 bytes of 4-bit nibbles     w = (nibble - 8) * d
    Q4_1      f16 d, f16 m, 16 bytes of nibbles    w = nibble * d + m
    byte j of the nibbles holds element j in its low 4 bits and element j + 16 in its high 4.
    Q2_K .. Q6_K  256 weights: f16 d (and dmin), a small integer scale (and min) per 16 or 32
              weights, 2 to 6 bit codes          w = d * sc * q (- dmin * m)   (formats/kquants.py)

RoPE: llama.cpp runs the `llama` architecture with its "normal" RoPE, which turns adjacent pairs
(x[2i], x[2i+1]), as Meta's model and minillama do. Hugging Face stores q and k with their rows
permuted for its rotate-half RoPE; llama.cpp's converter undoes that permutation when it writes
the GGUF, so the q/k weights here are already in Meta's order and need no change. (The SmolLM2
test checks this numerically against transformers, which re-permutes them when it loads a GGUF.)
Llama 3.1 and later scale RoPE's slow frequencies (model.RopeScaling); llama.cpp's converter
stores the result as the tensor rope_freqs.weight, one divisor per pair of a head, which
checkpoints/rope.py reads into ModelArgs.rope_freq_factors.

    read_gguf(path) -> GGUFFile (metadata, tensor infos; no tensor data read yet)
    load_gguf(path, max_seq_len, max_batch_size) -> (ModelArgs, weights under Meta's names, path,
                             None, the GGUFFile: the tokenizer and chat defaults read it too)
    read_gguf_vocab(path, header=None) -> GGUFVocab, the tokenizer.* metadata (minillama.tokenizers
                             builds the tokenizer from it), from `header` if already parsed
"""
import functools
import math
import mmap
import os
import re
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .. import formats
from ..errors import ArgumentError, CheckpointError, TokenizerError, shown
from ..dtypes import LazyTensor
from ..formats.dense import bf16_to_f32
from ..checks import check_weights
from ..model import ModelArgs, iter_weight_shapes
from .rope import gguf_rope_freq_factors, vision_note

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                # GGML_MAX_DIMS
MAX_NESTING = 8             # arrays of arrays of ...: deeper than any real file

# metadata value types: id -> numpy dtype (8 = string and 9 = array are read by hand)
STRING, ARRAY = 8, 9
SCALAR_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
BOOL = 7
MIN_VALUE_BYTES = {STRING: 8, ARRAY: 12}    # the smallest a value of each type can be

# ggml tensor types we can read: id -> (name, elements per block, bytes per block), as the
# formats package (the one place that knows each block layout) declares them
GGML_TYPES = {t: (fmt.upper(), formats.FORMATS[fmt].BLOCK, formats.FORMATS[fmt].BLOCK_BYTES[fmt])
              for t, fmt in formats.GGML_FORMATS.items()}
# ... and the names of the others, to say which one a file uses
OTHER_GGML_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
                    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def ggml_type_name(type_id):
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id][0]
    return OTHER_GGML_TYPES.get(type_id, f"unknown type {type_id}")


@dataclass
class TensorInfo:
    name: str
    shape: tuple                # NumPy order: (rows, cols) for a matrix, i.e. ne reversed
    ggml_type: int
    offset: int                 # absolute, in the file
    nbytes: Optional[int]       # None for a type we cannot read

    @property
    def type_name(self):
        return ggml_type_name(self.ggml_type)


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict              # key -> int | float | bool | str | list
    tensors: dict               # name -> TensorInfo, in file order
    alignment: int
    data_start: int

    def tensor(self, name):
        """The tensor `name` as a float32 array, dequantized."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {shown(name)}")
        return read_tensor(self.path, self.tensors[name])


# ----------------------------------------------------------------------------
# the header: every size is checked against the bytes left before it is used

class _Cursor:
    """Reads header fields one after another from the mapped file."""

    def __init__(self, path, buf):
        self.path, self.buf, self.pos = path, buf, 0

    def need(self, n, what):
        left = len(self.buf) - self.pos
        if n > left:
            raise CheckpointError(f"{self.path}: {what} needs {n} bytes at offset {self.pos}, "
                                  f"but the file ends {left} bytes later (truncated or corrupt)")

    def take(self, n, what):
        self.need(n, what)
        data = self.buf[self.pos:self.pos + n]           # a copy: nothing keeps the map alive
        self.pos += n
        return data

    def array(self, dtype, count, what):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype)

    def scalar(self, dtype, what):
        return self.array(dtype, 1, what)[0].item()

    def string(self, what):
        n = self.scalar("<u8", f"{what} (length)")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not valid UTF-8") from None


def _read_value(cur, vtype, what, depth=0):
    if vtype in SCALAR_TYPES:
        value = cur.scalar(SCALAR_TYPES[vtype], what)
        return bool(value) if vtype == BOOL else value
    if vtype == STRING:
        return cur.string(what)
    if vtype != ARRAY:
        raise CheckpointError(f"{cur.path}: {what} has value type {vtype}, which GGUF does not "
                              f"define (expected 0..12)")
    if depth >= MAX_NESTING:
        raise CheckpointError(f"{cur.path}: {what} nests arrays more than {MAX_NESTING} deep")
    etype = cur.scalar("<u4", f"{what} (array element type)")
    count = cur.scalar("<u8", f"{what} (array length)")
    if etype in SCALAR_TYPES:
        values = cur.array(SCALAR_TYPES[etype], count, f"{what} ({count} elements)").tolist()
        return [bool(v) for v in values] if etype == BOOL else values
    if etype not in MIN_VALUE_BYTES:
        raise CheckpointError(f"{cur.path}: {what} is an array of value type {etype}, which "
                              f"GGUF does not define (expected 0..12)")
    # check the count can fit before looping over it: a hostile count must not spin for hours
    cur.need(count * MIN_VALUE_BYTES[etype], f"{what} ({count} elements)")
    return [_read_value(cur, etype, f"{what}[{i}]", depth + 1) for i in range(count)]


def _read_tensor_info(cur, index, alignment):
    name = cur.string(f"tensor #{index} name")
    what = f"tensor {shown(name)}"
    n_dims = cur.scalar("<u4", f"{what} (n_dims)")
    if not 1 <= n_dims <= MAX_DIMS:
        raise CheckpointError(f"{cur.path}: {what} has n_dims {n_dims}, expected 1..{MAX_DIMS}")
    ne = cur.array("<u8", n_dims, f"{what} (dims)").tolist()
    ggml_type = cur.scalar("<u4", f"{what} (type)")
    offset = cur.scalar("<u8", f"{what} (offset)")
    if min(ne) < 1:
        raise CheckpointError(f"{cur.path}: {what} has dims {ne}, expected all >= 1")
    if offset % alignment:
        raise CheckpointError(f"{cur.path}: {what} has offset {offset}, which is not a multiple "
                              f"of the alignment {alignment}")
    nbytes = None
    if ggml_type in GGML_TYPES:
        tname, block, block_bytes = GGML_TYPES[ggml_type]
        if ne[0] % block:
            raise CheckpointError(f"{cur.path}: {what} has rows of {ne[0]} elements, not a "
                                  f"multiple of the {tname} block size {block}")
        nbytes = int(np.prod(ne, dtype=object)) // block * block_bytes
    return TensorInfo(name, tuple(reversed(ne)), ggml_type, offset, nbytes)


def _alignment(path, metadata):
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 \
            or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment is {shown(alignment)}, expected a power "
                              f"of two")
    return alignment


def _check_version(path, version):
    if version in VERSIONS:
        return
    if version & 0xFFFF == 0 and version >> 24 in VERSIONS:
        raise CheckpointError(f"{path}: is a big-endian GGUF file; minillama reads "
                              f"little-endian ones only")
    raise CheckpointError(f"{path}: GGUF version {version} is not supported (expected 2 or 3; "
                          f"version 1 files need converting with a newer llama.cpp)")


def read_gguf(path):
    """Parse the header of a GGUF file: metadata and tensor infos, every field checked."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        if size < 24:
            raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF header "
                                  f"(24 bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf)


def _parse(path, buf):
    cur = _Cursor(path, buf)
    magic = cur.take(4, "magic")
    if magic != MAGIC:
        raise CheckpointError(f"{path}: magic is {shown(magic)}, expected {shown(MAGIC)}: not a GGUF file")
    version = cur.scalar("<u4", "version")
    _check_version(path, version)
    n_tensors = cur.scalar("<u8", "n_tensors")
    n_kv = cur.scalar("<u8", "n_kv")
    cur.need(n_kv * 13, f"n_kv = {n_kv} metadata entries")     # key length, type, 1 byte at least
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<u4", f"metadata {shown(key)} (value type)")
        if key in metadata:
            raise CheckpointError(f"{path}: metadata key {shown(key)} appears twice")
        metadata[key] = _read_value(cur, vtype, f"metadata {shown(key)}")
    alignment = _alignment(path, metadata)
    cur.need(n_tensors * 24, f"n_tensors = {n_tensors} tensor infos")  # 24 bytes at least each
    tensors = {}
    for i in range(n_tensors):
        info = _read_tensor_info(cur, i, alignment)
        if info.name in tensors:
            raise CheckpointError(f"{path}: tensor {shown(info.name)} appears twice")
        tensors[info.name] = info
    data_start = -(-cur.pos // alignment) * alignment                  # round up
    for info in tensors.values():
        info.offset += data_start
        end = info.offset + (info.nbytes or 0)
        if end > len(buf):
            raise CheckpointError(f"{path}: tensor {shown(info.name)} ({info.type_name}, shape "
                                  f"{info.shape}) ends at byte {end}, past the end of the "
                                  f"file ({len(buf)} bytes)")
    return GGUFFile(path, version, metadata, tensors, alignment, data_start)


# ----------------------------------------------------------------------------
# tensor data

def read_stored(path, info: TensorInfo):
    """One tensor as the file stores it, without a float32 copy: a Packed (rows, cols) for a
    block format (Q8_0, Q4_0, Q4_1, Q2_K .. Q6_K), the values in their own dtype and NumPy
    shape for F32 and F16 (BF16: its bits, uint16). The blocks are read by minillama.formats
    (the one place that knows each block layout), which also refuses a NaN or inf scale or
    value, naming the tensor and the block."""
    if info.ggml_type not in GGML_TYPES:
        supported = ", ".join(name for name, _, _ in GGML_TYPES.values())
        raise CheckpointError(f"{path}: tensor {shown(info.name)} has type {info.type_name}, which "
                              f"minillama cannot read (supported: {supported})")
    with open(path, "rb") as f:
        f.seek(info.offset)
        raw = np.frombuffer(f.read(info.nbytes), np.uint8)
    if raw.size != info.nbytes:
        raise CheckpointError(f"{path}: tensor {shown(info.name)} is truncated")
    rows_cols = (math.prod(info.shape[:-1]), info.shape[-1])    # a norm (n,) is one row
    name = f"{path}: tensor {shown(info.name)} ({info.type_name})"
    packed = formats.from_gguf(raw, formats.GGML_FORMATS[info.ggml_type], rows_cols, name)
    return packed.data.reshape(info.shape) if "data" in packed.planes else packed


def read_tensor(path, info: TensorInfo):
    """One tensor from the file, dequantized to float32 in its NumPy shape."""
    stored = read_stored(path, info)
    if isinstance(stored, formats.Packed):
        return formats.dequantize(stored).reshape(info.shape)
    if info.type_name == "BF16":
        return bf16_to_f32(stored)
    return stored.astype(np.float32, copy=False)


def dequantize(raw, ggml_type, shape=None, name="tensor"):
    """float32 values of the bytes `raw` (uint8) holding tensor data of `ggml_type`, as `shape`
    (rows, cols) or, by default, one flat row. minillama.formats reads the blocks."""
    fmt = formats.GGML_FORMATS[ggml_type]
    _, block, block_bytes = GGML_TYPES[ggml_type]
    shape = shape or (1, raw.size // block_bytes * block)
    return formats.dequantize(formats.from_gguf(raw, fmt, shape, name=name)).reshape(-1)


# ----------------------------------------------------------------------------
# the llama architecture: hyperparameters and tensor names

def _get(gf, key, kind, default=None):
    """Metadata value `key`, checked to be a positive integer ("count") or number ("float")."""
    value = gf.metadata.get(key, default)
    if value is None:
        raise CheckpointError(f"{gf.path}: metadata {shown(key)} is missing")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and value > 0 and (isinstance(value, int) if kind == "count" else np.isfinite(value))
    if not ok:
        expected = "a positive integer" if kind == "count" else "a positive number"
        raise CheckpointError(f"{gf.path}: metadata {shown(key)} is {shown(value)}, expected {expected}")
    return value


def model_args(gf: GGUFFile, max_seq_len=None, max_batch_size=1):
    """ModelArgs of a `llama` GGUF, from llama.* metadata; unsupported variants are refused."""
    arch = gf.metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{gf.path}: general.architecture is {shown(arch)}"
                              f"{vision_note(arch)}; minillama runs 'llama' models only")
    dim = _get(gf, "llama.embedding_length", "count")
    n_heads = _get(gf, "llama.attention.head_count", "count")
    n_kv_heads = _get(gf, "llama.attention.head_count_kv", "count", n_heads)
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise CheckpointError(f"{gf.path}: embedding_length {dim}, head_count {n_heads} and "
                              f"head_count_kv {n_kv_heads} do not make even heads in groups")
    head_dim = dim // n_heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length",
                "llama.attention.value_length"):
        if gf.metadata.get(key, head_dim) != head_dim:
            raise CheckpointError(f"{gf.path}: metadata {shown(key)} is {shown(gf.metadata[key])}; "
                                  f"minillama needs it equal to the head size {head_dim}")
    freq_factors = gguf_rope_freq_factors(gf, head_dim)     # Llama 3's RoPE scaling, or None
    if gf.metadata.get("llama.expert_count", 0):
        raise CheckpointError(f"{gf.path}: is a mixture-of-experts model, which minillama "
                              f"does not implement")
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    vocab_size = len(tokens) if isinstance(tokens, list) else _get(gf, "llama.vocab_size", "count")
    context = max_seq_len or _get(gf, "llama.context_length", "count")
    try:                        # ModelArgs' own checks (norm_eps 1e300 ...), as faults of the file
        p = ModelArgs(
            dim=dim, n_layers=_get(gf, "llama.block_count", "count"), n_heads=n_heads,
            n_kv_heads=n_kv_heads, vocab_size=vocab_size,
            hidden_dim=_get(gf, "llama.feed_forward_length", "count"),
            norm_eps=float(_get(gf, "llama.attention.layer_norm_rms_epsilon", "float")),
            rope_theta=float(_get(gf, "llama.rope.freq_base", "float", 10000.0)),
            rope_freq_factors=freq_factors)
    except ArgumentError as e:
        raise CheckpointError(f"{gf.path}: {e}") from None
    # the caller's sizes, checked as arguments (not as faults of the file)
    return replace(p, max_seq_len=context, max_batch_size=max_batch_size)


# GGUF name -> Meta name. Per layer: blk.N.<left> -> layers.N.<right>
GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight",
                "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}
LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq",
               "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
               "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def meta_name(name):
    """Meta's name for a GGUF tensor name, or None if it is not one of a llama model's."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = _LAYER_TENSOR.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}.weight"
    return None


def gguf_name(name):
    """The GGUF tensor name for a Meta name: meta_name() backwards (for writing GGUF files)."""
    for gguf, meta in GLOBAL_NAMES.items():
        if meta == name:
            return gguf
    _, i, rest = name.split(".", 2)                 # layers.N.<meta>.weight
    left = {meta: gg for gg, meta in LAYER_NAMES.items()}[rest[:-len(".weight")]]
    return f"blk.{i}.{left}.weight"


def load_gguf(path, max_seq_len=None, max_batch_size=1):
    """(ModelArgs, weights under Meta's names, path, None, header) of a `llama` GGUF file. Each
    weight is a LazyTensor in the tensor's own format (f32, f16, bf16, q8_0, q4_0, q4_1, q2_k ..
    q6_k): it is read when stored, as its blocks or as float32 as dtypes.py decides, so memory
    can be planned first. The path comes back as the model's tokenizer: it is in the metadata,
    which comes back too, as the parsed header (GGUFFile), for the tokenizer and the chat
    defaults to read without parsing the file again (None: no choice of files to report)."""
    gf = read_gguf(path)
    p = model_args(gf, max_seq_len, max_batch_size)
    infos = {}
    for name, info in gf.tensors.items():
        if name == "rope_freqs.weight":
            continue                    # read by model_args: RoPE scaling, not a weight
        meta = meta_name(name)
        if meta is None:
            raise CheckpointError(f"{gf.path}: tensor {shown(name)} is not part of a llama model "
                                  f"minillama knows")
        infos[meta] = info
    if "output.weight" not in infos and "tok_embeddings.weight" in infos:
        infos["output.weight"] = infos["tok_embeddings.weight"]      # tied classifier
    # names, shapes and types are all checked before anything big is read
    check_weights(iter_weight_shapes(p), infos, source=gf.path)
    for info in infos.values():
        if info.ggml_type not in GGML_TYPES:
            read_stored(gf.path, info)                  # raises, naming the tensor and type
    # one LazyTensor per stored tensor: a tied classifier is the embedding's own object
    lazy = {info.name: LazyTensor(info.shape, formats.GGML_FORMATS[info.ggml_type],
                                  functools.partial(read_stored, gf.path, info),
                                  functools.partial(np.memmap, gf.path, np.uint8, "r",
                                                    info.offset, (info.nbytes,)))
            for info in infos.values()}
    return p, {meta: lazy[info.name] for meta, info in infos.items()}, gf.path, None, gf


def is_gguf(path):
    """Cheap probe: the file starts with b"GGUF"."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ----------------------------------------------------------------------------
# the vocabulary in the metadata, as plain data (minillama.tokenizers builds the tokenizer)

@dataclass
class GGUFVocab:
    path: str
    model: str                  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama"
    tokens: list                # str, one per id
    token_types: Optional[list]     # int per id: 1 normal, 3 control, 4 user-defined, 6 byte ...
    scores: Optional[list]      # float per id ("llama": merge priority, higher first)
    merges: Optional[list]      # "a b" strings in priority order ("gpt2")
    pre: str                    # tokenizer.ggml.pre: the pre-tokenizer ("gpt2")
    bos_id: int                 # the special ids, -1 where the file gives none
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool               # whether encode() should start with BOS
    chat_template: Optional[str]    # tokenizer.chat_template (Jinja), if any


VOCAB_MODELS = ("gpt2", "llama")


def read_gguf_vocab(path, header=None):
    """The tokenizer.* metadata of a GGUF file, every field checked for its type; a problem is
    a TokenizerError, since the file is being read for its tokenizer. header: the file's
    GGUFFile where the model's reader has parsed it already (else it is parsed here)."""
    try:
        gf = header or read_gguf(path)
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    model = gf.metadata.get("tokenizer.ggml.model")
    if model not in VOCAB_MODELS:
        raise TokenizerError(f"{gf.path}: tokenizer.ggml.model is {shown(model)}; minillama reads "
                             f"'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies")
    tokens = _meta_list(gf, "tokenizer.ggml.tokens", str)
    n = len(tokens)
    return GGUFVocab(
        gf.path, model, tokens,
        token_types=_meta_list(gf, "tokenizer.ggml.token_type", int, n, required=False),
        scores=_meta_list(gf, "tokenizer.ggml.scores", float, n, required=model == "llama"),
        merges=_meta_list(gf, "tokenizer.ggml.merges", str, required=model == "gpt2"),
        pre=gf.metadata.get("tokenizer.ggml.pre", "gpt-2"),
        **_special_ids(gf, n),
        add_bos=bool(gf.metadata.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=gf.metadata.get("tokenizer.chat_template"))


def _meta_list(gf, key, kind, length=None, required=True):
    value = gf.metadata.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value) \
            or (length is not None and len(value) != length):
        size = "" if length is None else f"{length} "
        raise TokenizerError(f"{gf.path}: metadata {shown(key)} must be a list of {size}"
                             f"{kind.__name__} values")
    return value


def _special_ids(gf, n_words):
    """bos_id, eos_id, unk_id, pad_id from the metadata (-1 where the file gives none)."""
    ids = {}
    for name, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                      ("unk_id", "unknown_token_id"), ("pad_id", "padding_token_id")):
        value = gf.metadata.get(f"tokenizer.ggml.{key}", -1)
        if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < n_words:
            raise TokenizerError(f"{gf.path}: metadata 'tokenizer.ggml.{key}' is {shown(value)}, "
                                 f"expected a token id below {n_words}")
        ids[name] = value
    return ids

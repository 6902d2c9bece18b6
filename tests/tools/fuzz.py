"""Fuzzing the readers: every model and tokenizer file minillama reads, damaged on purpose.

Model files come from the internet, so a reader must answer *any* bytes with either a result or
a MiniLlamaError that says what is wrong. This module takes real files (../shared/models) and
small files written by the project's own writers (or the reference libraries'), damages them
(bit flips, truncations, header fields overwritten with extreme integers, splices, JSON values
swapped for hostile ones, a mutated pickle re-zipped ...) and opens each result the way a user
would. A case FAILS when the reader

  - raises anything other than MiniLlamaError (a crash deep in NumPy, struct, zipfile, ...),
  - takes longer than a time limit (a hang; e.g. a loop driven by a count the file lies about),
  - allocates more than the file justifies: a traced peak above FACTOR x file size + SLACK, or
    anything near ADDRESS_SPACE_HEADROOM (the worker's address space is capped, so a header
    that asks for 40 GB meets a MemoryError instead of the machine's swap), or
  - kills the interpreter (a segfault or abort in a C extension), or
  - refuses the file with a message a terminal should not get: longer than MESSAGE_LIMIT
    characters, or holding a raw control character (a value from the file must reach the
    message through errors.shown, which escapes and bounds it). The message is checked as
    raised, before MiniLlamaError's own last guard (errors.one_line) tidies it.

From the repository root:

    python -m tests.tools.fuzz --cases 10000        every reader; prints cases and failures
    python -m tests.tools.fuzz --targets llama2c,gguf --cases 500 --save /tmp/fuzz-failures
    python -m tests.tools.fuzz --replay gguf:1234   one case, in this process, traceback shown

Cases run in worker processes (a crash or a hang in C code is caught by the parent); case i of a
target is fully determined by (seed, target, i), so every failure can be replayed.
"""
import argparse
import io
import json
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
import tracemalloc
import unicodedata
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

import minillama
from minillama.checkpoints.random import random_weights
from minillama.errors import MESSAGE_LIMIT, MiniLlamaError

from . import MODELS
from .writers import gpt2_tokens, gpt2_vocab, llama_vocab, tokenizer_bin_bytes, write_gguf, \
    write_llama2c

FACTOR = 32                  # a reader may hold ~this many bytes per byte of input ...
SLACK = 8 << 20              # ... plus this much (Python objects, imports' first-use caches)
ADDRESS_SPACE_HEADROOM = 3 << 30     # a worker's address space: what it has at start + this
TIMEOUT = 10.0               # seconds per case; a reader taking longer is hung
KILL_AFTER = 30.0            # the parent's watchdog, for hangs that SIGALRM cannot interrupt

PASSED = ("loaded", "rejected")        # the reader read the file, or refused it properly
FAILED = ("error", "hang", "memory", "crash", "message")


# ----------------------------------------------------------------------------
# damaging bytes

EXTREME_INTS = [0, 1, -1, 2, 7, 255, 256, 1 << 15, 1 << 16, 1 << 24, 2**31 - 1, -2**31,
                2**32 - 1, 1 << 40, 2**63 - 1, -2**63, 2**64 - 1]
SPECIAL_BYTES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0x20, 0x0A, 0xC3, 0xE3]


def _offset(n, rng):
    """A position in a file of n bytes, biased to the headers, where the lies that matter live."""
    r = rng.random()
    limit = 64 if r < 0.5 else 1024 if r < 0.75 else n
    return int(rng.integers(min(limit, n)))


def flip_bits(data, rng):
    for _ in range(int(rng.integers(1, 9))):
        i = _offset(len(data), rng)
        data[i] ^= 1 << int(rng.integers(8))


def set_bytes(data, rng):
    for _ in range(int(rng.integers(1, 5))):
        i = _offset(len(data), rng)
        data[i] = SPECIAL_BYTES[rng.integers(len(SPECIAL_BYTES))] if rng.random() < 0.5 \
            else int(rng.integers(256))


def overwrite_int(data, rng):
    """Write an extreme integer, 4 or 8 bytes little-endian, over a header field (or anywhere)."""
    width = 4 if rng.random() < 0.5 else 8
    value = EXTREME_INTS[rng.integers(len(EXTREME_INTS))] if rng.random() < 0.85 \
        else int(rng.integers(-2**31, 2**31))
    i = _offset(len(data), rng)
    if rng.random() < 0.7:
        i -= i % width                  # fields sit on their natural alignment, mostly
    raw = (value % (1 << (8 * width))).to_bytes(width, "little")
    data[i:i + width] = raw[:max(0, len(data) - i)]


def truncate(data, rng):
    cut = _offset(len(data), rng) if rng.random() < 0.5 else int(rng.integers(len(data)))
    del data[cut:]


def extend(data, rng):
    n = int(rng.integers(1, 4096))
    data += bytes(n) if rng.random() < 0.5 else rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def splice(data, rng):
    """Copy a chunk over another place, insert a copy, or delete a chunk."""
    n = len(data)
    a, length = int(rng.integers(n)), int(rng.integers(1, 257))
    chunk = bytes(data[a:a + length])
    b = _offset(n, rng)
    mode = rng.integers(3)
    if mode == 0:
        data[b:b + len(chunk)] = chunk[:n - b]
    elif mode == 1:
        data[b:b] = chunk
    else:
        del data[b:b + length]


BYTE_MUTATORS = [flip_bits, set_bytes, overwrite_int, overwrite_int, truncate, extend, splice]


def mutate_bytes(data: bytes, rng) -> bytes:
    """1 to 3 byte-level mutations."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        if not data:
            break
        BYTE_MUTATORS[rng.integers(len(BYTE_MUTATORS))](data, rng)
    return bytes(data)


HOSTILE_JSON = [0, -1, 1, 3, 2**31, 2**63, -2**63, 10**30, 0.5, 12.9, 1e300, 1e308, -1e308,
                float("inf"), float("nan"), "", "x", "F64", "BF16", "false", "1e-5",
                "\x1b[2J" + "x" * 3000, None, True, False, [], {}, [2**40, 2**40], [-1, 4],
                [0, 10**12], {"a": 1}]      # (a long string with a control character: the
                                            # message must cut it short and escape it)


def _json_slots(obj, out):
    """Every (container, key) pair of a parsed JSON value."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, list) else ()
    for k, v in items:
        out.append((obj, k))
        _json_slots(v, out)
    return out


def mutate_json(data: bytes, rng) -> bytes:
    """Replace one value of a JSON document with a hostile one, or delete a key."""
    try:
        obj = json.loads(data)
    except ValueError:
        return mutate_bytes(data, rng)
    slots = _json_slots(obj, [])
    if not slots:
        return mutate_bytes(data, rng)
    for _ in range(int(rng.integers(1, 3))):
        container, key = slots[rng.integers(len(slots))]
        if isinstance(container, dict) and rng.random() < 0.15:
            container.pop(key, None)
        elif key in container or isinstance(container, list):
            container[key] = HOSTILE_JSON[rng.integers(len(HOSTILE_JSON))]
    return json.dumps(obj).encode()


def mutate_safetensors(data: bytes, rng) -> bytes:
    """Mutate the JSON header of a .safetensors file and re-frame it with a correct length."""
    n = int.from_bytes(data[:8], "little")
    if rng.random() < 0.4 or n > len(data):
        return mutate_bytes(data, rng)
    header = mutate_json(data[8:8 + n], rng)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


# opcodes whose argument is a little-endian integer of this many bytes (a length, an index)
PICKLE_INT_ARGS = {"BINPUT": 1, "LONG_BINPUT": 4, "BINGET": 1, "LONG_BINGET": 4, "BININT": 4,
                   "BININT1": 1, "BININT2": 2, "BINUNICODE": 4, "SHORT_BINUNICODE": 1,
                   "BINBYTES": 4, "SHORT_BINBYTES": 1, "BINUNICODE8": 8, "BINBYTES8": 8,
                   "BYTEARRAY8": 8, "FRAME": 8, "LONG1": 1, "LONG4": 4, "PROTO": 1}


# a short form and the opcode of its wide sibling, whose argument can say far more
PICKLE_WIDER = {"BINPUT": "LONG_BINPUT", "BINGET": "LONG_BINGET", "BININT1": "BININT",
                "SHORT_BINUNICODE": "BINUNICODE8", "SHORT_BINBYTES": "BINBYTES8",
                "BINBYTES": "BYTEARRAY8"}


def mutate_pickle(data: bytes, rng) -> bytes:
    """Overwrite one integer argument of a pickle opcode (a memo index, a length, a tensor
    size...) with an extreme value, the numbers an unpickler trusts; or first swap the opcode
    for its wide sibling (a 1-byte memo index becomes a 4-byte one)."""
    import pickletools
    try:
        ops = [(op.name, pos) for op, _, pos in pickletools.genops(data)
               if op.name in PICKLE_INT_ARGS]
    except Exception:                   # noqa: BLE001 - already damaged: damage it more
        ops = []
    if not ops or rng.random() < 0.3:
        return mutate_bytes(data, rng)
    name, pos = ops[rng.integers(len(ops))]
    old_width = width = PICKLE_INT_ARGS[name]
    opcode = data[pos:pos + 1]
    if name in PICKLE_WIDER and rng.random() < 0.5:
        name = PICKLE_WIDER[name]
        opcode, width = _opcode(name), PICKLE_INT_ARGS[name]
    value = EXTREME_INTS[rng.integers(len(EXTREME_INTS))] % (1 << (8 * width))
    data = bytearray(data)
    data[pos:pos + 1 + old_width] = opcode + value.to_bytes(width, "little")
    return bytes(data)


def _opcode(name):
    import pickletools
    return next(op.code for op in pickletools.opcodes if op.name == name).encode("latin-1")


def mutate_zip(data: bytes, rng) -> bytes:
    """Mutate one member of a zip archive (mostly the pickle) and write a valid archive again,
    so the damage gets past zipfile's CRC checks to the unpickler and the tensor records."""
    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [(info.filename, z.read(info)) for info in z.infolist()]
    except (zipfile.BadZipFile, ValueError):
        return mutate_bytes(data, rng)
    pickles = [i for i, (name, _) in enumerate(members) if name.endswith(".pkl")]
    pick = pickles[0] if pickles and rng.random() < 0.7 else int(rng.integers(len(members)))
    name, content = members[pick]
    mutate = mutate_pickle if name.endswith(".pkl") else mutate_bytes
    members[pick] = (name, mutate(content, rng) if content else content)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, content in members:
            z.writestr(name, content)
    return out.getvalue()


def mutator_for(filename):
    if filename.endswith(".json"):
        return mutate_json
    if filename.endswith(".safetensors"):
        return mutate_safetensors
    if filename.endswith(".pth"):
        return mutate_zip
    return mutate_bytes


# ----------------------------------------------------------------------------
# seed files: a seed is (label, {relative file name: bytes}, entry), `entry` being the path
# (relative to the case's folder) that the reader is given: one of the files, or "." for the
# folder itself (a Meta or Hugging Face model directory).

Seed = Tuple[str, Dict[str, bytes], str]


def _tiny_args(**over):
    from minillama.model import ModelArgs
    # odd sizes (vocab 37, hidden 24), grouped-query heads (4 heads share 2 kv heads)
    return ModelArgs(**dict(dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=37,
                                 hidden_dim=24, max_seq_len=12, max_batch_size=1), **over))


def _real(models, *names):
    """Real files from ../shared/models, read by path (never copied into the repository)."""
    out = []
    for name in names:
        path = Path(models) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the fuzzer's real seed files live in {models}")
        out.append((name, {name: path.read_bytes()}, name))
    return out


def _written(write, *args, **kwargs):
    """The bytes write(path, *args, **kwargs) writes."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "file")
        write(path, *args, **kwargs)
        return path.read_bytes()


def seeds_llama2c(models):
    seeds = _real(models, "stories260K.bin", "stories260K-q8.bin")
    p = _tiny_args()
    for version in (0, 1, 2):
        for tied in (True, False):
            blob = _written(write_llama2c, p, random_weights(p, version, tied), version,
                            group_size=8)
            label = f"tiny-v{version}-{'tied' if tied else 'untied'}.bin"
            seeds.append((label, {"model.bin": blob}, "model.bin"))
    return seeds


def _tiny_vocab():
    """<unk> <s> </s>, the 256 byte tokens, a space, some letters and merges of them."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    words = [b" ", b"a", b"b", b"c", b" a", b" b", b"ab", b" ab", b"ba", b"\xc3\xa9", b"\n"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    return pieces + words, scores


def seeds_tokenizer_bin(models):
    seeds = _real(models, "tok512.bin", "tokenizer.bin")
    pieces, scores = _tiny_vocab()
    seeds.append(("tiny-tokenizer.bin", {"tok.bin": tokenizer_bin_bytes(pieces, scores)},
                  "tok.bin"))
    return seeds


def seeds_sentencepiece(models):
    return _real(models, "tok512.model", "tokenizer.model")


def seeds_gguf(models):
    """Tiny llama GGUFs written by the `gguf` package (llama.cpp's own writer), one per tensor
    type minillama reads, carrying tok512's vocabulary as a `llama` tokenizer."""
    import gguf
    from minillama.tokenizers import Llama2cTokenizer
    vocab = Llama2cTokenizer(Path(models) / "tok512.bin")
    p = _tiny_args(dim=32, hidden_dim=64, vocab_size=vocab.n_words, n_heads=4, n_kv_heads=2)
    seeds = []
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
              "q4_1": gguf.GGMLQuantizationType.Q4_1}
    for (label, qtype), tied in zip(qtypes.items(), (True, False, False, True, False)):
        weights = random_weights(p, len(seeds), tied)
        seeds.append((f"tiny-{label}.gguf",
                      {"model.gguf": _written(write_gguf, p, weights, qtype, llama_vocab(vocab),
                                              tied)}, "model.gguf"))
    # and a byte-level BPE vocabulary, as SmolLM2 carries
    p = _tiny_args(dim=32, hidden_dim=64, vocab_size=len(gpt2_tokens()), n_heads=4, n_kv_heads=2)
    weights = random_weights(p, 9, True)
    seeds.append(("tiny-gpt2-q8_0.gguf",
                  {"model.gguf": _written(write_gguf, p, weights, qtypes["q8_0"], gpt2_vocab,
                                          True)}, "model.gguf"))
    return seeds


def seeds_safetensors(models):
    """Hugging Face model folders: config.json + model.safetensors (written by the safetensors
    package), float32 / float16 / bfloat16, tied and untied."""
    from safetensors.numpy import save
    from minillama.checkpoints.hf import HF_LAYER_NAMES
    p = _tiny_args()
    seeds = []
    for k, (dtype, tied) in enumerate([("float32", False), ("float16", True),
                                       ("bfloat16", False)]):
        weights = random_weights(p, k, tied)
        tensors = {}
        for name, a in weights.items():
            if tied and name == "output.weight":
                continue
            tensors[_hf_name(name, HF_LAYER_NAMES)] = _as_dtype(a, dtype)
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                  "hidden_size": p.dim, "intermediate_size": p.hidden_dim,
                  "num_hidden_layers": p.n_layers, "num_attention_heads": p.n_heads,
                  "num_key_value_heads": p.n_kv_heads, "vocab_size": p.vocab_size,
                  "max_position_embeddings": p.max_seq_len, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "tie_word_embeddings": tied, "hidden_act": "silu"}
        blob = save(tensors)
        if dtype == "bfloat16":     # NumPy has no bfloat16: relabel the stored halves
            blob = _relabel_safetensors(blob, "U16", "BF16")
        files = {"config.json": json.dumps(config).encode(), "model.safetensors": blob}
        seeds.append((f"tiny-hf-{dtype}", files, "."))
    # sharded: two files and the index that says which tensor is where
    names = sorted(tensors)
    shards = {f"model-0000{k + 1}-of-00002.safetensors": {n: tensors[n] for n in names[k::2]}
              for k in range(2)}
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    files = {f: _relabel_safetensors(save(part), "U16", "BF16") for f, part in shards.items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["config.json"] = json.dumps(config).encode()
    seeds.append(("tiny-hf-sharded", files, "."))
    return seeds


def _relabel_safetensors(blob, old, new):
    """Change every tensor's dtype `old` to `new` in a .safetensors header."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    for info in header.values():
        if isinstance(info, dict) and info.get("dtype") == old:
            info["dtype"] = new
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n:]


def _hf_name(name, hf_layer_names):
    globals_ = {"tok_embeddings.weight": "model.embed_tokens.weight",
                "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if name in globals_:
        return globals_[name]
    _, i, rest = name.split(".", 2)
    module = {v: k for k, v in hf_layer_names.items()}[rest[:-len(".weight")]]
    return f"model.layers.{i}.{module}.weight"


def _as_dtype(a, dtype):
    if dtype == "bfloat16":          # the top 16 bits of each float32, as uint16
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return a.astype(dtype)


def seeds_meta(models):
    """Meta model folders: params.json + consolidated.00.pth (+ .01: two model-parallel ranks),
    written by torch.save in bfloat16, as Meta's download gives them."""
    import torch
    from minillama.checkpoints.meta import concat_axis
    p = _tiny_args(vocab_size=38)          # every split dimension even, for two ranks
    params = {"dim": p.dim, "n_layers": p.n_layers, "n_heads": p.n_heads,
              "n_kv_heads": p.n_kv_heads, "vocab_size": p.vocab_size, "multiple_of": 8,
              "norm_eps": 1e-5}
    seeds = []
    for ranks in (1, 2):
        weights = random_weights(p, ranks)
        files = {"params.json": json.dumps(params).encode()}
        for rank in range(ranks):
            sd = {}
            for name, a in weights.items():
                axis = concat_axis(name)
                part = a if axis is None or ranks == 1 else np.split(a, ranks, axis=axis)[rank]
                sd[name] = torch.from_numpy(np.ascontiguousarray(part)).to(torch.bfloat16)
            buf = io.BytesIO()
            torch.save(sd, buf)
            files[f"consolidated.{rank:02d}.pth"] = buf.getvalue()
        seeds.append((f"tiny-meta-{ranks}-rank", files, "."))
    return seeds


# ----------------------------------------------------------------------------
# what a user does with a file: open it, and use what comes back

SAMPLE_TEXT = "Once upon a time, Lily saw a cat. \u00e9\u65e5\u672c \U0001F642\t\n  x\x00\x1b"


def read_checkpoint_file(path):
    """Open a checkpoint as `minillama run/complete` do: every weight read, shapes checked."""
    from minillama.loading import open_checkpoint
    from minillama.checks import check_weights
    from minillama.model import iter_weight_shapes
    ckpt = open_checkpoint(path)
    check_weights(iter_weight_shapes(ckpt.params), ckpt.weights, source=path)
    if ckpt.tokenizer_path and ckpt.tokenizer_path == path:    # a GGUF carries its tokenizer
        use_tokenizer(path)
    return ckpt


def use_tokenizer(path):
    """Load a tokenizer and exercise it: encode, decode, stream-decode, pieces."""
    from minillama.tokenizers import StreamDecoder, load_tokenizer
    tok = load_tokenizer(path)
    ids = tok.encode(SAMPLE_TEXT, bos=True, eos=True)
    if not all(0 <= i < tok.n_words for i in ids):
        raise AssertionError(f"encode() gave ids outside 0..{tok.n_words - 1}: {ids}")
    some = list(range(min(tok.n_words, 300))) + [tok.n_words - 1]
    tok.decode(ids)
    tok.decode(some)
    stream = StreamDecoder(tok)
    "".join(stream.feed(i) for i in some) + stream.flush()
    for i in some[:40]:
        tok.piece(i)
        tok.decode_piece(tok.bos_id, i)
    return tok


@dataclass
class Target:
    name: str
    seeds: Callable            # models folder -> [Seed]
    read: Callable             # path -> anything; raises on a bad file
    needs: Tuple[str, ...] = ()    # modules that must be importable (readers still being written,
    #                                or the reference writers the seeds come from)


TARGETS = [
    Target("llama2c", seeds_llama2c, read_checkpoint_file),
    Target("tokenizer_bin", seeds_tokenizer_bin, use_tokenizer),
    Target("sentencepiece", seeds_sentencepiece, use_tokenizer, ("sentencepiece",)),
    Target("gguf", seeds_gguf, read_checkpoint_file, ("minillama.checkpoints.gguf", "gguf")),
    Target("safetensors", seeds_safetensors, read_checkpoint_file,
           ("minillama.checkpoints.hf", "safetensors")),
    Target("meta_pth", seeds_meta, read_checkpoint_file,
           ("minillama.checkpoints.meta", "minillama.checkpoints.torchzip", "torch")),
]
TARGET_NAMES = [t.name for t in TARGETS]


def target(name) -> Target:
    for t in TARGETS:
        if t.name == name:
            return t
    raise KeyError(f"unknown fuzz target {name!r} (expected one of {', '.join(TARGET_NAMES)})")


def missing_modules(t: Target):
    import importlib.util
    missing = []
    for mod in t.needs:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(mod)
    return missing


# ----------------------------------------------------------------------------
# one case

@dataclass
class Outcome:
    kind: str                  # "loaded", "rejected", or one of FAILED
    detail: str = ""           # the error, where it was raised
    peak: int = 0              # traced bytes at the peak
    limit: int = 0             # the peak allowed for this input
    seconds: float = 0.0
    seed_label: str = ""
    mutation: str = ""


class _Timeout(BaseException):
    """Raised by SIGALRM. A BaseException, so a reader's `except Exception` cannot swallow it."""


def _alarm(signum, frame):
    raise _Timeout()


def _memory_error_behind(exc):
    """Whether a MemoryError was being handled when `exc` was raised (`raise ... from None`
    hides it from the traceback, not from __context__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _where(exc):
    """'file.py:123 in function' of the innermost frame in minillama's readers (else the
    innermost frame outside this harness)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    package = os.path.dirname(minillama.__file__)
    ours = [f for f in frames if f.filename.startswith(package)] or frames
    f = (ours or [None])[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" if f else "?"


def message_fault(e):
    """What is wrong with a MiniLlamaError's message as raised ("" if nothing): too long, or a
    raw control character in it."""
    raw = str(e.args[0]) if e.args else ""
    if len(raw) > MESSAGE_LIMIT:
        return f"a message of {len(raw):,} characters (bound {MESSAGE_LIMIT})"
    control = next((c for c in raw if unicodedata.category(c) == "Cc"), None)
    return f"a raw control character {control!r} in the message" if control else ""


def guarded(read, path, size, timeout=TIMEOUT):
    """Run read(path) under a time limit and a memory budget; classify what happened."""
    limit = FACTOR * size + SLACK
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    t0 = time.perf_counter()
    try:
        read(path)
        kind, detail = "loaded", ""
    except MiniLlamaError as e:
        kind, detail = "rejected", f"{type(e).__name__}: {e}"
        fault = message_fault(e)
        if fault:
            kind, detail = "message", f"{fault} at {_where(e)}: {detail[:300]}"
        if _memory_error_behind(e):     # a reader turned a MemoryError into a clean refusal:
            kind = "memory"             # the allocation was still attempted
            detail = f"MemoryError behind the refusal ({detail})"
    except _Timeout:
        kind, detail = "hang", f"no answer after {timeout:g} s"
    except MemoryError as e:
        kind, detail = "memory", f"MemoryError at {_where(e)}"
    except Exception as e:                                    # noqa: BLE001 - the point
        kind, detail = "error", f"{type(e).__name__} at {_where(e)}: {str(e)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    if not started:
        tracemalloc.stop()
    if kind in PASSED and peak > limit:
        kind, detail = "memory", (f"peak {peak:,} bytes traced for a {size:,}-byte input "
                                  f"(allowed {limit:,}); {detail}")
    return Outcome(kind, detail, peak, limit, seconds)


def case_rng(seed, target_name, index):
    return np.random.default_rng([seed, zlib.crc32(target_name.encode()), index])


def make_case(t_name, seeds: List[Seed], seed, index):
    """(label, files, entry, mutation) of case `index`: a seed with one of its files damaged
    (or, rarely, removed)."""
    rng = case_rng(seed, t_name, index)
    label, files, entry = seeds[rng.integers(len(seeds))]
    files = dict(files)
    name = sorted(files)[rng.integers(len(files))]
    if len(files) > 1 and rng.random() < 0.03:
        del files[name]
        return label, files, entry, f"removed {name}"
    mutate = mutator_for(name)
    files[name] = mutate(files[name], rng)
    return label, files, entry, f"{mutate.__name__}({name})"


def run_case(t: Target, seeds, seed, index, timeout=TIMEOUT, keep=None):
    """Build case `index`, write its files to a fresh folder and read them. keep: a folder to
    copy the damaged files into (for failures worth looking at)."""
    label, files, entry, mutation = make_case(t.name, seeds, seed, index)
    with tempfile.TemporaryDirectory(prefix="minillama-fuzz-") as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        outcome = guarded(t.read, os.path.normpath(os.path.join(d, entry)),
                          sum(map(len, files.values())), timeout)
        if keep and outcome.kind in FAILED:
            save_case(files, os.path.join(keep, f"{t.name}-{seed}-{index}"))
    outcome.seed_label, outcome.mutation = label, mutation
    return outcome


def save_case(files, folder):
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        Path(folder, name).write_bytes(data)


# ----------------------------------------------------------------------------
# workers: cases run in child processes, so a crash or an uninterruptible hang is caught

def cap_address_space(headroom=ADDRESS_SPACE_HEADROOM):
    """Limit this process's address space to what it uses now + headroom: a reader that asks
    for tens of gigabytes gets a MemoryError instead of pushing the machine into swap."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        vsize = int(f.read().split()[0]) * page
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = vsize + headroom
    if hard == resource.RLIM_INFINITY or want < hard:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def _worker(conn, targets, seeds, cases, seed, timeout, keep):
    # Import the readers before capping memory and before the first measured case, so one-time
    # import costs do not count against the first file.
    import minillama.loading, minillama.tokenizers  # noqa: F401, E401
    for t in targets.values():
        for mod in t.needs:
            __import__(mod)
    # ... and build what the readers build once per process: the byte-level BPE pre-tokenizer
    # scans every Unicode code point (seconds on a busy machine, which a case's time limit
    # must not pay for)
    from minillama.tokenizers.bpe import PRE_TOKENIZERS
    for makers in PRE_TOKENIZERS.values():
        for make in makers:
            make()
    cap_address_space()
    tracemalloc.start()
    for t_name, index in cases:
        conn.send(("start", t_name, index))
        conn.send(("done", t_name, index,
                   run_case(targets[t_name], seeds[t_name], seed, index, timeout, keep)))
    conn.send(("finished",))


@dataclass
class Report:
    seed: int
    counts: Dict[str, Counter] = field(default_factory=dict)      # target -> kind -> count
    failures: List[Tuple[str, int, Outcome]] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)         # target -> why
    worst_ratio: Dict[str, float] = field(default_factory=dict)   # target -> max peak / limit
    seconds: float = 0.0

    def record(self, t_name, index, outcome: Outcome):
        self.counts.setdefault(t_name, Counter())[outcome.kind] += 1
        if outcome.limit and outcome.kind in PASSED:
            ratio = outcome.peak / outcome.limit
            self.worst_ratio[t_name] = max(self.worst_ratio.get(t_name, 0.0), ratio)
        if outcome.kind in FAILED:
            self.failures.append((t_name, index, outcome))

    @property
    def cases(self):
        return sum(sum(c.values()) for c in self.counts.values())

    def summary(self):
        lines = [f"{'reader':<15}{'cases':>7}{'loaded':>8}{'rejected':>10}{'failed':>8}"
                 f"{'worst peak':>12}"]
        for t_name, c in self.counts.items():
            failed = sum(c[k] for k in FAILED)
            lines.append(f"{t_name:<15}{sum(c.values()):>7}{c['loaded']:>8}{c['rejected']:>10}"
                         f"{failed:>8}{self.worst_ratio.get(t_name, 0):>11.0%}")
        for t_name, why in self.skipped.items():
            lines.append(f"{t_name:<15} skipped: {why}")
        lines.append(f"cases: {self.cases}  failures: {len(self.failures)}  "
                     f"({self.seconds:.1f} s, seed {self.seed})")
        return lines

    def failure_lines(self, limit=50):
        lines = []
        by_kind = Counter((t, o.kind, o.detail.split(":")[0] + o.detail.split(" at ")[-1][:60])
                          for t, _, o in self.failures)
        for t_name, index, o in self.failures[:limit]:
            lines.append(f"FAIL {t_name}:{index} [{o.kind}] {o.seed_label} {o.mutation}: "
                         f"{o.detail}")
        if len(self.failures) > limit:
            lines.append(f"... and {len(self.failures) - limit} more "
                         f"({len(by_kind)} distinct)")
        if self.failures:
            lines.append(f"replay one with: python -m tests.tools.fuzz --seed {self.seed} "
                         f"--replay {self.failures[0][0]}:{self.failures[0][1]}")
        return lines


def build_seeds(targets, models=MODELS):
    """{target: [Seed]} for the targets that can run here, and {target: why} for the others.
    Each seed must load as it is: fuzzing from files the reader refuses anyway proves little."""
    seeds, skipped = {}, {}
    for t in targets:
        name = t.name
        missing = missing_modules(t)
        if missing:
            skipped[name] = f"needs {', '.join(missing)}"
            continue
        target_seeds = t.seeds(models)
        for label, files, entry in target_seeds:
            with tempfile.TemporaryDirectory() as d:
                for fname, data in files.items():
                    Path(d, fname).write_bytes(data)
                try:
                    t.read(os.path.normpath(os.path.join(d, entry)))
                except Exception as e:      # noqa: BLE001 - reported, and a test fails on it
                    skipped[name] = (f"seed {label} does not load undamaged: "
                                     f"{type(e).__name__}: {str(e)[:200]}")
                    break
        else:
            seeds[name] = target_seeds
    return seeds, skipped


def run(targets=None, cases=300, seed=0, jobs=None, timeout=TIMEOUT, models=MODELS, keep=None,
        progress=None, kill_after=KILL_AFTER):
    """Run `cases` cases spread evenly over `targets` (names or Target objects; default: all)
    in `jobs` worker processes. Returns a Report."""
    t0 = time.perf_counter()
    targets = [target(t) if isinstance(t, str) else t for t in (targets or TARGET_NAMES)]
    seeds, skipped = build_seeds(targets, models)
    report = Report(seed, skipped=skipped)
    live = {t.name: t for t in targets if t.name in seeds}
    for n in live:
        report.counts[n] = Counter()
    if not live:
        return report
    names = list(live)
    todo = [(names[k % len(names)], k // len(names)) for k in range(cases)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    _run_workers(todo, jobs, live, seeds, seed, timeout, kill_after, keep, report, progress)
    report.seconds = time.perf_counter() - t0
    return report


def _run_workers(todo, jobs, targets, seeds, seed, timeout, kill_after, keep, report, progress):
    ctx = multiprocessing.get_context("spawn")     # a clean interpreter: nothing inherited
    queues = [todo[j::jobs] for j in range(jobs)]
    workers = {}                                   # connection -> [process, queue, current]

    def start(queue):
        if not queue:
            return
        mine = {t for t, _ in queue}
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, daemon=True,
                           args=(child, {t: targets[t] for t in mine},
                                 {t: seeds[t] for t in mine}, queue, seed, timeout, keep))
        proc.start()
        child.close()
        workers[parent] = [proc, list(queue), None, time.monotonic()]

    for q in queues:
        start(q)
    done = 0
    while workers:
        for conn in wait(list(workers), timeout=1.0):
            proc, queue, current, since = workers[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                proc.join(5)
                _lost(report, workers, conn, f"worker died (exit status {proc.exitcode})",
                      "crash", start)
                continue
            if msg[0] == "start":
                workers[conn][2:] = [(msg[1], msg[2]), time.monotonic()]
            elif msg[0] == "done":
                report.record(msg[1], msg[2], msg[3])
                queue.pop(0)
                workers[conn][2] = None
                done += 1
                if progress and done % 500 == 0:
                    progress(done, len(todo), len(report.failures))
            else:
                proc.join()
                del workers[conn]
        now = time.monotonic()
        for conn, (proc, queue, current, since) in list(workers.items()):
            if current and now - since > timeout + kill_after:
                proc.kill()
                proc.join()
                _lost(report, workers, conn, f"no answer after {now - since:.0f} s "
                      f"(killed)", "hang", start)


def _lost(report, workers, conn, detail, kind, start):
    """A worker crashed or hung on its current case: record it, go on with the rest."""
    proc, queue, current, _ = workers.pop(conn)
    if current is None and queue:
        current = queue[0]
    if current is not None:
        report.record(current[0], current[1], Outcome(kind, detail))
        queue = [c for c in queue if c != current]
    start(queue)


# ----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.tools.fuzz",
                                     description="Fuzz minillama's file readers.")
    parser.add_argument("--cases", type=int, default=10000, help="cases in all (default 10000)")
    parser.add_argument("--targets", default=",".join(TARGET_NAMES),
                        help=f"comma-separated readers (default all: {','.join(TARGET_NAMES)})")
    parser.add_argument("--seed", type=int, default=0, help="which cases (default 0)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: cores)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per case")
    parser.add_argument("--models", default=str(MODELS), help="folder of the real seed files")
    parser.add_argument("--save", default=None, help="copy failing inputs into this folder")
    parser.add_argument("--replay", default=None, metavar="TARGET:INDEX",
                        help="run one case in this process and show its traceback")
    args = parser.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    for n in names:
        if n not in TARGET_NAMES:
            parser.error(f"--targets: unknown reader {n!r} (expected {', '.join(TARGET_NAMES)})")
    if args.cases < 0:
        parser.error(f"--cases: expected a number >= 0, got {args.cases}")
    if args.replay:
        return replay(args.replay, args.seed, args.models, args.save)
    report = run(names, args.cases, args.seed, args.jobs, args.timeout, args.models, args.save,
                 progress=lambda d, n, f: print(f"  {d}/{n} cases, {f} failures", flush=True))
    print("\n".join(report.summary()))
    print("\n".join(report.failure_lines()))
    return 1 if report.failures else 0


def replay(spec, seed, models, keep=None):
    """Run one case in this process, without catching anything, so its traceback shows."""
    t_name, _, index = spec.partition(":")
    t, index = target(t_name), int(index)
    seeds = t.seeds(models)
    label, files, entry, mutation = make_case(t.name, seeds, seed, index)
    print(f"{t.name}:{index}: seed file {label}, {mutation}")
    if keep:
        save_case(files, os.path.join(keep, f"{t.name}-{seed}-{index}"))
    with tempfile.TemporaryDirectory(prefix="minillama-fuzz-") as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        try:
            t.read(os.path.normpath(os.path.join(d, entry)))
        except MiniLlamaError as e:
            print(f"rejected: {type(e).__name__}: {e}")
            return 0
    print("loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GGUF k-quants (Q2_K .. Q6_K) and BF16 tensors: read as stored, dequantized bit for bit as
the gguf package's reference does, and a model whose matrices are k-quant blocks.

Random super-blocks (every code, every kind of finite float16 d and dmin: large, tiny,
subnormal, zero, negative) dequantize to the same float32 bits as `gguf.quants.dequantize`;
GGUF bytes -> planes -> GGUF bytes is the identity; NaN and inf scales are refused, naming the
tensor and the super-block; a tiny GGUF whose linear weights are k-quant blocks loads them as
Packed (no float32 copy) and gives the logits of the same model dequantized by gguf.
"""
import struct

import numpy as np
import pytest

from minillama import formats as F
from minillama.checkpoints import gguf as mg
from minillama.checkpoints.random import random_weights
from minillama.errors import ArgumentError, CheckpointError
from minillama.formats import Packed, kquants
from minillama.model import ModelArgs, Transformer
from test_formats import F16_SPECIAL, NONFINITE_F16, bits, gguf_dequantize, qtype, random_gguf
from tests.tools.writers import gpt2_tokens, gpt2_vocab, write_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES  # noqa: E402

KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
SCALES = {"q2_k": ("d", "dmin"), "q3_k": ("d",), "q4_k": ("d", "dmin"), "q5_k": ("d", "dmin"),
          "q6_k": ("d",)}                   # the float16 fields of a super-block
rng = np.random.default_rng()               # fresh blocks every run


# ----------------------------------------------------------------------------
# the constants

@pytest.mark.parametrize("fmt", KQUANTS)
def test_constants_match_gguf(fmt):
    module = F.FORMATS[fmt]
    assert module is kquants
    assert (module.BLOCK, module.BLOCK_BYTES[fmt]) == GGML_QUANT_SIZES[qtype(fmt)]
    assert module.GGML_TYPE[fmt] == qtype(fmt).value and F.GGML_FORMATS[qtype(fmt).value] == fmt
    assert sum(np.dtype(t).itemsize * n for _, t, n in module.FIELDS[fmt]) == module.BLOCK_BYTES[fmt]
    assert module.KERNEL[fmt] == fmt.upper()
    name, block, block_bytes = mg.GGML_TYPES[qtype(fmt).value]       # the reader's type table
    assert (name, block, block_bytes) == (fmt.upper(), 256, module.BLOCK_BYTES[fmt])


def test_the_reader_reads_every_format_minillama_knows():
    assert {mg.GGML_TYPES[t][0].lower() for t in mg.GGML_TYPES} == set(F.FORMATS)
    assert not set(mg.GGML_TYPES) & set(mg.OTHER_GGML_TYPES)
    assert mg.ggml_type_name(30) == "BF16" and mg.ggml_type_name(14) == "Q6_K"


@pytest.mark.parametrize("fmt", KQUANTS)
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (7, 2560)])
def test_planes_and_bytes(fmt, shape):
    p = F.from_gguf(random_gguf(rng, fmt, *shape), fmt, shape)
    assert p.nbytes == F.bytes_for(fmt, shape) == shape[0] * shape[1] // 256 * \
        {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}[fmt]
    assert {k: (a.shape, a.dtype) for k, a in p.planes.items()} == F.layout(fmt, shape)
    assert all(a.flags.c_contiguous for a in p.planes.values())
    # the planes of codes are whole 16-byte loads per super-block: the GPU reads them so
    for name, a in p.planes.items():
        if a.ndim == 3 and name != "scales":
            assert a.shape[-1] % 16 == 0, name
    assert p.kernel == fmt.upper()


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ArgumentError, match="q4_k needs rows of whole blocks of 256"):
        F.bytes_for("q4_k", (4, 576))            # SmolLM2's width: llama.cpp falls back there
    # the reader says so from the tensor's info, before any data is read
    info = struct.pack("<Q", 1) + b"w" + struct.pack("<IQQIQ", 2, 576, 3, 14, 0)
    with pytest.raises(CheckpointError, match="rows of 576 elements, not a multiple of the Q6_K "
                                              "block size 256"):
        mg._read_tensor_info(mg._Cursor("m.gguf", info), 0, 32)


def test_k_quants_are_read_not_written():
    assert set(F.QUANTIZABLE) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"}
    with pytest.raises(ArgumentError, match="reads q4_k from GGUF files but does not quantize"):
        F.quantize(np.ones((2, 256), np.float32), "q4_k")


# ----------------------------------------------------------------------------
# dequantize: gguf's bits, every finite scale

@pytest.mark.parametrize("fmt", KQUANTS)
@pytest.mark.parametrize("rows,cols", [(1, 256), (3, 512), (13, 768), (4, 2816)])
def test_dequantize_matches_gguf(fmt, rows, cols):
    raw = random_gguf(rng, fmt, rows, cols)
    w = F.dequantize(F.from_gguf(raw, fmt, (rows, cols), "t"))
    assert w.dtype == np.float32 and w.shape == (rows, cols)
    assert np.isfinite(w).all()                       # any finite scale gives finite weights
    assert np.array_equal(bits(w), bits(gguf_dequantize(raw, fmt, (rows, cols))))


@pytest.mark.parametrize("fmt", KQUANTS)
def test_extreme_scales_dequantize_as_gguf(fmt):
    """d (and dmin) at every edge of float16 in turn: 0, -0, the smallest and largest
    subnormal, the smallest normal, +-65504, +-1; every code and sub-scale random, and once
    all at their largest (all bits set). Finite, and gguf's bits."""
    n = len(F16_SPECIAL)
    p = F.from_gguf(random_gguf(rng, fmt, n + 1, 512), fmt, (n + 1, 512))
    for plane in p.planes:
        if plane not in SCALES[fmt]:
            p.planes[plane][n] = -1 if plane == "scales" and fmt == "q6_k" else 0xFF
    for i, s in enumerate(F16_SPECIAL):
        for j, plane in enumerate(SCALES[fmt]):
            p.planes[plane].view(np.uint16)[i] = F16_SPECIAL[i if j == 0 else -1 - i]
    for plane in SCALES[fmt]:
        p.planes[plane].view(np.uint16)[n] = 0x7BFF                    # 65504
    raw = np.frombuffer(F.to_gguf(p), np.uint8).reshape(n + 1, -1)
    w = F.dequantize(F.from_gguf(raw, fmt, (n + 1, 512)))
    assert np.isfinite(w).all()
    assert np.array_equal(bits(w), bits(gguf_dequantize(raw, fmt, w.shape)))
    assert np.abs(w[n]).max() > 65504                  # the largest codes and sub-scales


@pytest.mark.parametrize("fmt", KQUANTS)
def test_round_trip_rows_and_gather(fmt):
    raw = random_gguf(rng, fmt, 11, 512)
    p = F.from_gguf(raw, fmt, (11, 512))
    assert F.to_gguf(p) == raw.tobytes() == F.to_gguf(F.from_gguf(raw.tobytes(), fmt, (11, 512)))
    full = F.dequantize(p)
    assert np.array_equal(F.dequantize(p, slice(3, 8)), full[3:8])
    tokens = np.array([4, 0, 10, 4])                  # an embedding gather: rows by index
    assert np.array_equal(F.dequantize(p, tokens), full[tokens])
    assert np.array_equal(F.dequantize(p, 7), full[7:8])
    x = rng.standard_normal((2, 512)).astype(np.float32)   # NumpyOps' row chunks
    y = np.empty((2, 11), np.float32)
    for start, stop, w_rows in F.row_chunks(p, max_bytes=3 * 512 * 4):
        assert stop - start <= 3
        y[:, start:stop] = x @ w_rows.T
    assert np.allclose(y, x @ full.T, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("fmt", KQUANTS)
@pytest.mark.parametrize("bad", NONFINITE_F16)
def test_nonfinite_scales_are_refused_by_name(fmt, bad):
    plane = SCALES[fmt][-1]                            # dmin where there is one, else d
    p = F.from_gguf(random_gguf(rng, fmt, 3, 512), fmt, (3, 512))
    p.planes[plane].view(np.uint16)[2, 1] = bad        # row 2, its second super-block
    raw = F.to_gguf(p)
    name = "model.gguf: tensor 'blk.0.ffn_down.weight'"
    with pytest.raises(CheckpointError) as e:
        F.from_gguf(raw, fmt, (3, 512), name)
    value = "nan" if bad & 0x3FF else ("inf" if bad == 0x7C00 else "-inf")
    assert str(e.value) == (f"{name}: {fmt} block 5 (row 2, columns 256..511) has a non-finite "
                            f"{plane} = {value}; a stored weight must be finite: the file is "
                            f"damaged")


# ----------------------------------------------------------------------------
# a model whose matrices are k-quant blocks, in a GGUF file

KQ_ARGS = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512,
               vocab_size=len(gpt2_tokens()), max_seq_len=32, max_batch_size=2)
# as llama.cpp's Q4_K_M mixes them: a different k-quant for each kind of matrix
MIXED = {"tok_embeddings": "q2_k", "wq": "q3_k", "wk": "q3_k", "wv": "q3_k", "wo": "q5_k",
         "w1": "q4_k", "w3": "q4_k", "w2": "q6_k", "output": "q6_k"}


def kquant_blocks(fmt, rows, cols, std=0.05):
    """Random super-blocks of `fmt` whose weights have about `std`: random codes and
    sub-scales, d and dmin scaled together. uint8 (rows, bytes a row), as GGUF stores them."""
    p = F.from_gguf(random_gguf(rng, fmt, rows, cols), fmt, (rows, cols))
    for plane in SCALES[fmt]:              # one octave of positive scales, then one factor
        p.planes[plane][...] = rng.uniform(1, 2, p.planes[plane].shape).astype(np.float16)
    factor = std / F.dequantize(p).std()
    for plane in SCALES[fmt]:
        p.planes[plane][...] = (p.planes[plane] * factor).astype(np.float16)
    return np.frombuffer(F.to_gguf(p), np.uint8).reshape(rows, -1)


def kquant_gguf(tmp_path, formats_of, tied=False):
    """A tiny llama GGUF with matrices of k-quant blocks: formats_of(short name) -> format."""
    p = ModelArgs(**KQ_ARGS)
    weights = random_weights(p, seed=1, tied=tied)
    blocks = {}
    for name, w in weights.items():
        if w.ndim == 2 and not (tied and name == "output.weight"):
            fmt = formats_of(name.split(".")[-2])
            blocks[name] = (qtype(fmt), kquant_blocks(fmt, *w.shape))
    path = tmp_path / "tiny-kquants.gguf"
    write_gguf(path, p, weights, gguf.GGMLQuantizationType.F32, gpt2_vocab, tied=tied,
               blocks=blocks)
    return p, path


@pytest.mark.parametrize("kind", KQUANTS + ("mixed",))
def test_kquant_model_logits_equal_the_gguf_dequantized_model(tmp_path, monkeypatch, kind):
    from test_storage import gguf_tensors, held_nbytes, open_as_stored
    from conftest import greedy, max_rel_err
    p, path = kquant_gguf(tmp_path, (lambda short: MIXED[short]) if kind == "mixed"
                          else (lambda short: kind), tied=kind == "q6_k")

    def no_float32(*args, **kwargs):
        raise AssertionError("a stored weight was dequantized while loading")
    monkeypatch.setattr(kquants, "dequantize", no_float32)
    monkeypatch.setattr(F, "dequantize", no_float32)
    ckpt = open_as_stored(path, max_batch_size=2)         # kept as stored: the blocks
    monkeypatch.undo()
    file = gguf_tensors(path)
    for name, w in ckpt.weights.items():
        if len(w.shape) == 2:
            want = kind if kind != "mixed" else MIXED[name.split(".")[-2]]
            assert isinstance(w, Packed) and w.format == want, name
            assert F.to_gguf(w) == file[name][0], name       # the file's bytes, as read

    packed = Transformer(p, ckpt.weights)
    assert ckpt.plan.weights == held_nbytes(packed)         # the plan counts the blocks
    reference = Transformer(p, {name: values for name, (_, values) in file.items()})
    tokens = rng.integers(0, p.vocab_size, (2, 9))
    ref = reference.forward(tokens, 0)
    assert np.isfinite(ref).all() and ref.std() > 0.1         # a model that says something
    assert max_rel_err(packed.forward(tokens, 0), ref) <= 1e-5
    # one more position, cached (any ids: tokens[:, :1] + 1 is past the vocabulary for a row
    # that starts with its last id, 1 run in 133)
    step = rng.integers(0, p.vocab_size, (2, 1))
    assert max_rel_err(packed.forward(step, 9), reference.forward(step, 9)) <= 1e-5
    expanded = Transformer(p, mg.load_gguf(path)[1])          # the CPU rule's float32
    assert greedy(expanded.forward, [1, 40, 7], 12) == greedy(
        Transformer(p, {n: v for n, (_, v) in file.items()}).forward, [1, 40, 7], 12)


def test_bf16_tensors_are_read_as_stored(tmp_path):
    from test_storage import gguf_tensors, open_as_stored
    from conftest import max_rel_err
    p = ModelArgs(**{**KQ_ARGS, "dim": 64, "hidden_dim": 96})
    path = tmp_path / "tiny-bf16.gguf"
    write_gguf(path, p, random_weights(p, seed=2, scale=0.3), gguf.GGMLQuantizationType.BF16,
               gpt2_vocab)
    ckpt = open_as_stored(path, max_batch_size=2)
    w = ckpt.weights["layers.0.attention.wq.weight"]
    assert isinstance(w, Packed) and w.format == "bf16"
    file = gguf_tensors(path)
    reference = Transformer(p, {name: values for name, (_, values) in file.items()})
    tokens = rng.integers(0, p.vocab_size, (2, 7))
    assert max_rel_err(Transformer(p, ckpt.weights).forward(tokens, 0),
                       reference.forward(tokens, 0)) <= 1e-5
    gf = mg.read_gguf(path)
    assert np.array_equal(gf.tensor("blk.0.attn_q.weight"), file["layers.0.attention.wq.weight"][1])

"""GGUF: tiny random models written by the `gguf` package (llama.cpp's own Python writer),
read back by minillama and checked against gguf's dequantization, a float64 PyTorch forward and
transformers' GGUF loader; hostile files; the chat renderer; and the real SmolLM2 file."""
import io
import os
import re
import struct

import numpy as np
import pytest

from minillama.tokenizers import BPETokenizer, Llama2Chat, TemplateChat, load_tokenizer
from minillama.checkpoints import gguf as mg
from minillama.checkpoints.random import random_weights
from minillama.errors import ArgumentError, CheckpointError, TokenizerError
from minillama.loading import detect_format, open_checkpoint
from minillama.model import ModelArgs, Transformer, weight_shapes

from conftest import greedy
from tests.tools import writers
from tests.tools.writers import finish_gguf, reference_gguf_name

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QTYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1]

# A small byte-level vocabulary: 3 control tokens, the 256 byte symbols, a few merges.
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "Ġa n", "Ġan d",
          "Ġ w", "o r", "l l", "Ġ o"]


def tiny_vocab():
    from minillama.tokenizers.bpe import BYTE_TO_CHAR
    tokens = CONTROL + [BYTE_TO_CHAR[b] for b in range(256)]
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    return tokens, types


# the ChatML template as SmolLM2's is, without its default system message
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# the prompt the SmolLM2 tests below were recorded with: the question in ChatML, no system message
SMOLLM2_PROMPT = "<|im_start|>user\nWhat is the largest animal?<|im_end|>\n<|im_start|>assistant\n"

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
            vocab_size=len(tiny_vocab()[0]), max_seq_len=32, max_batch_size=2, norm_eps=1e-5,
            rope_theta=10000.0)


def tiny_gpt2_vocab(w):
    """The tiny byte-level vocabulary as a `gpt2` GGUF tokenizer, with the ChatML template."""
    tokens, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)


def write_gguf(path, p, weights, qtype=Q.F32, tied=False, tokenizer=True, extra=None,
               alignment=None, arch="llama"):
    """A GGUF of `weights` (Meta names), matrices stored as `qtype`, norms as F32, with the tiny
    vocabulary (tokenizer=False: none); the writer of tests/tools/writers.py."""
    return writers.write_gguf(path, p, weights, qtype, tiny_gpt2_vocab if tokenizer else None,
                              tied=tied, extra=extra, alignment=alignment, arch=arch)


def gguf_reference_weights(path, p):
    """The weights as the gguf package itself reads and dequantizes them, under Meta's names."""
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for meta in weight_shapes(p):
        t = (by_name.get(reference_gguf_name(meta))
             or by_name[reference_gguf_name("tok_embeddings.weight")])          # tied
        out[meta] = np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
            tuple(reversed([int(n) for n in t.shape])))
    return out


@pytest.fixture
def tiny_args():
    return ModelArgs(**TINY)


# ----------------------------------------------------------------------------
# dequantization

@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantize_equals_gguf_exactly(qtype):
    rng = np.random.default_rng(int(qtype))
    a = (rng.standard_normal((7, 96)) * rng.uniform(0.01, 50, (7, 1))).astype(np.float32)
    a[0, :32] = 0.0                                      # an all-zero block (d = 0)
    a[1, :32] = -3.5                                     # a constant block
    raw = gguf.quants.quantize(a, qtype)
    ours = mg.dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(qtype))
    theirs = gguf.quants.dequantize(raw, qtype).reshape(-1)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def _f16_bytes(x):
    return np.float16(x).tobytes()


def test_block_layouts_by_hand():
    """One block of each type, built from the layout alone (not by gguf), decoded by hand."""
    nibbles = bytes(range(16))                  # byte j = (high j>>4=0, low j): low = j, high 0
    nibbles = bytes((j & 0xF) | ((15 - j) << 4) for j in range(16))  # low j, high 15 - j
    low, high = np.arange(16), 15 - np.arange(16)
    q = np.concatenate([low, high]).astype(np.float32)  # elements 0..15 low, 16..31 high

    q4_0 = np.frombuffer(_f16_bytes(0.5) + nibbles, np.uint8)
    np.testing.assert_array_equal(mg.dequantize(q4_0, 2), (q - 8) * 0.5)

    q4_1 = np.frombuffer(_f16_bytes(0.25) + _f16_bytes(-1.0) + nibbles, np.uint8)
    np.testing.assert_array_equal(mg.dequantize(q4_1, 3), q * 0.25 - 1.0)

    ints = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.frombuffer(_f16_bytes(-2.0) + ints.tobytes(), np.uint8)
    np.testing.assert_array_equal(mg.dequantize(q8_0, 8), ints.astype(np.float32) * -2.0)

    f16 = np.array([1.5, -0.0, 65504.0], np.float16)
    np.testing.assert_array_equal(mg.dequantize(f16.view(np.uint8), 1), f16.astype(np.float32))


# ----------------------------------------------------------------------------
# whole tiny models

@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_model_matches_float64_reference(tmp_path, tiny_args, qtype, tied):
    torch = pytest.importorskip("torch")
    from minillama.bench import torch_reference as ref
    p = tiny_args
    path = write_gguf(tmp_path / "tiny.gguf", p, random_weights(p, seed=3, tied=tied), qtype, tied)
    assert detect_format(path) == "gguf"
    ckpt = open_checkpoint(path, max_batch_size=2)
    assert ckpt.fmt == "gguf" and ckpt.tokenizer_path == str(path)
    assert (ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]) == tied
    expected = gguf_reference_weights(path, p)
    for name, w in ckpt.weights.items():
        np.testing.assert_array_equal(np.asarray(w), expected[name], err_msg=name)

    model = Transformer(ckpt.params, ckpt.weights)
    reference = ref.Reference(p, expected)
    tokens = np.random.default_rng(7).integers(0, p.vocab_size, (2, 9))
    ours, theirs = model.forward(tokens, 0), reference.forward(tokens, 0)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale
    # one more position through the KV cache
    step = tokens[:, :1] + 1
    ours, theirs = model.forward(step, 9), reference.forward(step, 9)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    del torch


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_tiny_model_matches_transformers(tmp_path, tiny_args, qtype):
    """transformers reads the GGUF with its own reader and dequantizer and turns q/k back into
    its rotate-half layout; agreeing with it checks the RoPE layout of GGUF q/k weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")                  # transformers needs it to load a GGUF
    p = tiny_args
    path = write_gguf(tmp_path / "tiny.gguf", p, random_weights(p, seed=5, scale=0.3), qtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ckpt = open_checkpoint(path)
    model = Transformer(ckpt.params, ckpt.weights)
    tokens = np.random.default_rng(11).integers(0, p.vocab_size, (1, 12))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.double().numpy()
    ours = model.forward(tokens, 0)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    with torch.no_grad():
        hf_ids = hf.generate(torch.as_tensor(tokens), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12)[0, 12:].tolist()
    assert greedy(model.forward, tokens[0].tolist(), 12) == hf_ids


# ----------------------------------------------------------------------------
# the header: versions, metadata types, alignment, names

def test_versions_2_and_3_read_alike(tmp_path, tiny_args):
    path = write_gguf(tmp_path / "v3.gguf", tiny_args, random_weights(tiny_args), Q.Q8_0)
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<I", data, 4)[0] == 3
    struct.pack_into("<I", data, 4, 2)                 # v2 has the same layout (64-bit counts)
    (tmp_path / "v2.gguf").write_bytes(data)
    v2, v3 = mg.read_gguf(tmp_path / "v2.gguf"), mg.read_gguf(path)
    assert (v2.version, v3.version) == (2, 3)
    assert v2.metadata == v3.metadata and v2.tensors == v3.tensors
    for version, match in ((1, "version 1"), (4, "version 4"), (0x03000000, "big-endian")):
        struct.pack_into("<I", data, 4, version)
        (tmp_path / "bad.gguf").write_bytes(data)
        with pytest.raises(CheckpointError, match=match):
            mg.read_gguf(tmp_path / "bad.gguf")


def test_every_metadata_type_round_trips(tmp_path, tiny_args):
    V = gguf.GGUFValueType
    extra = {"t.u8": (200, V.UINT8), "t.i8": (-100, V.INT8), "t.u16": (65000, V.UINT16),
             "t.i16": (-32000, V.INT16), "t.u32": (4_000_000_000, V.UINT32),
             "t.i32": (-2_000_000_000, V.INT32), "t.f32": (0.25, V.FLOAT32),
             "t.bool": (True, V.BOOL), "t.str": ("héllo ✓", V.STRING),
             "t.u64": (2**63 + 5, V.UINT64), "t.i64": (-2**62, V.INT64),
             "t.f64": (1e300, V.FLOAT64),
             "t.ints": ([1, -2, 3], V.ARRAY), "t.strs": (["a", "", "日本"], V.ARRAY),
             "t.floats": ([0.5, -1.5], V.ARRAY), "t.nested": ([[1, 2], [3]], V.ARRAY)}
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args), extra=extra)
    meta = mg.read_gguf(path).metadata
    for key, (value, _) in extra.items():
        assert meta[key] == value, key
    assert meta["llama.embedding_length"] == tiny_args.dim
    # the gguf package's reader agrees on every key
    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "t.nested":   # gguf's reader flattens that
            assert meta[key] == field.contents(), key


def test_empty_arrays_and_no_tensors(tmp_path):
    # the gguf writer refuses empty arrays; llama.cpp's reader accepts them, and so do we
    data = (_header(n_kv=2) + _string("a") + struct.pack("<IIQ", 9, 0, 0)
            + _string("b") + struct.pack("<IIQ", 9, 8, 0))
    (tmp_path / "e.gguf").write_bytes(data)
    gf = mg.read_gguf(tmp_path / "e.gguf")
    assert gf.metadata == {"a": [], "b": []} and gf.tensors == {}
    with pytest.raises(CheckpointError, match="architecture is None"):
        mg.load_gguf(tmp_path / "e.gguf")


@pytest.mark.parametrize("alignment", [32, 64, 256])
def test_custom_alignment(tmp_path, tiny_args, alignment):
    weights = random_weights(tiny_args, seed=1)
    path = write_gguf(tmp_path / "m.gguf", tiny_args, weights, Q.F16, alignment=alignment)
    gf = mg.read_gguf(path)
    assert gf.alignment == alignment and gf.data_start % alignment == 0
    assert all(info.offset % alignment == 0 for info in gf.tensors.values())
    np.testing.assert_array_equal(gf.tensor("blk.1.ffn_down.weight"),
                                  weights["layers.1.feed_forward.w2.weight"].astype(np.float16))


def test_hyperparameters_and_names(tmp_path, tiny_args):
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args))
    p, weights, tokenizer_path, source, header = mg.load_gguf(path, max_seq_len=20,
                                                              max_batch_size=3)
    expected = dict(TINY, max_seq_len=20, max_batch_size=3,
                    norm_eps=float(np.float32(TINY["norm_eps"])))   # stored as float32
    assert {k: getattr(p, k) for k in expected} == expected
    assert tokenizer_path == str(path) and source is None
    assert header.path == str(path) and header.metadata["general.architecture"] == "llama"
    assert mg.load_gguf(path)[0].max_seq_len == TINY["max_seq_len"]    # context_length
    assert mg.meta_name("blk.12.ffn_gate.weight") == "layers.12.feed_forward.w1.weight"
    assert mg.meta_name("blk.0.attn_output.weight") == "layers.0.attention.wo.weight"
    assert mg.meta_name("output_norm.weight") == "norm.weight"
    assert mg.meta_name("blk.0.attn_q.bias") is None
    # gguf_name (used by the fuzzer's writer) is meta_name backwards, and agrees with the test
    # writers' own table, written independently
    for name in weight_shapes(ModelArgs(**TINY)):
        assert mg.gguf_name(name) == reference_gguf_name(name)
        assert mg.meta_name(mg.gguf_name(name)) == name


# ----------------------------------------------------------------------------
# hostile and unsupported files: always a CheckpointError naming the file and the field

def _header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


HOSTILE = {
    "bad magic": (b"GGML" + bytes(40), "magic"),
    "short": (b"GGUF\x03\x00", "too short"),
    "huge n_kv": (_header(n_kv=2**63) + bytes(16), "n_kv"),
    "huge n_tensors": (_header(n_tensors=2**60) + bytes(16), "n_tensors"),
    "huge key length": (_header(n_kv=1) + struct.pack("<Q", 2**62) + bytes(16), "key #0"),
    "huge string value": (_header(n_kv=1) + _string("k") + struct.pack("<IQ", 8, 2**40)
                          + bytes(8), "'k'"),
    "huge array": (_header(n_kv=1) + _string("k") + struct.pack("<IIQ", 9, 8, 2**61) + bytes(8),
                   "'k'"),
    "huge numeric array": (_header(n_kv=1) + _string("k") + struct.pack("<IIQ", 9, 12, 2**61),
                           "'k'"),
    "unknown value type": (_header(n_kv=1) + _string("k") + struct.pack("<I", 13) + bytes(16),
                           "value type 13"),
    "deep nesting": (_header(n_kv=1) + _string("k") + struct.pack("<I", 9)
                     + struct.pack("<IQ", 9, 1) * 20 + bytes(16), "nests"),
    "bad utf-8 key": (_header(n_kv=1) + struct.pack("<Q", 2) + b"\xff\xfe" + bytes(16), "UTF-8"),
    "duplicate key": (_header(n_kv=2) + (_string("k") + struct.pack("<IB", 0, 1)) * 2 + bytes(8),
                      "twice"),
    "bad alignment": (_header(n_kv=1) + _string("general.alignment") + struct.pack("<II", 4, 3)
                      + bytes(16), "alignment"),
    "zero dims": (_header(n_tensors=1) + _string("t") + struct.pack("<I", 0) + bytes(40),
                  "n_dims"),
    "five dims": (_header(n_tensors=1) + _string("t") + struct.pack("<I", 5) + bytes(60),
                  "n_dims"),
    "zero-size dim": (_header(n_tensors=1) + _string("t") + struct.pack("<IQIQ", 1, 0, 0, 0)
                      + bytes(32), "dims"),
    "offset past EOF": (_header(n_tensors=1) + _string("t") + struct.pack("<IQIQ", 1, 8, 0, 0)
                        + bytes(3), "past the end"),
    "huge dims": (_header(n_tensors=1) + _string("t") + struct.pack("<IQQIQ", 2, 2**40, 2**40,
                                                                    0, 0) + bytes(64),
                  "past the end"),
    "unaligned offset": (_header(n_tensors=1) + _string("t") + struct.pack("<IQIQ", 1, 8, 0, 4)
                         + bytes(64), "multiple of the alignment"),
    "partial block": (_header(n_tensors=1) + _string("t") + struct.pack("<IQIQ", 1, 31, 8, 0)
                      + bytes(64), "block size"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers(tmp_path, case):
    data, match = HOSTILE[case]
    path = tmp_path / "evil.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=match) as e:
        mg.read_gguf(path)
    assert str(path) in str(e.value)


def test_every_truncation_is_a_checkpoint_error(tmp_path, tiny_args):
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args), Q.Q4_0)
    data = path.read_bytes()
    header_end = mg.read_gguf(path).data_start
    cut = tmp_path / "cut.gguf"
    for n in list(range(0, header_end, 7)) + [header_end, len(data) - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError):
            mg.load_gguf(cut)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, tiny_args):
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args), Q.F32)
    gf = mg.read_gguf(path)
    info = gf.tensors["blk.1.attn_v.weight"]
    # the type field sits right before the offset field at the end of the tensor's info
    data = bytearray(path.read_bytes())
    name = _string("blk.1.attn_v.weight")
    at = bytes(data).index(name) + len(name) + 4 + 8 * len(info.shape)
    assert struct.unpack_from("<I", data, at)[0] == 0
    struct.pack_into("<I", data, at, 23)                         # IQ4_XS
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"'blk\.1\.attn_v\.weight' has type IQ4_XS"):
        mg.load_gguf(path)
    struct.pack_into("<I", data, at, 99)
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="unknown type 99"):
        mg.load_gguf(path)


def test_non_finite_weights_are_refused(tmp_path, tiny_args):
    weights = random_weights(tiny_args)
    weights["layers.0.ffn_norm.weight"][3] = np.nan
    path = write_gguf(tmp_path / "m.gguf", tiny_args, weights)
    lazy = mg.load_gguf(path)[1]                         # the header is fine ...
    with pytest.raises(CheckpointError, match="ffn_norm.*non-finite"):
        np.asarray(lazy["layers.0.ffn_norm.weight"])     # ... the data is not


@pytest.mark.parametrize("change, match", [
    ({"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}, "RoPE scaling"),
    ({"llama.expert_count": (8, gguf.GGUFValueType.UINT32)}, "mixture-of-experts"),
    ({"llama.attention.key_length": (8, gguf.GGUFValueType.UINT32)}, "key_length"),
])
def test_unsupported_models_are_refused(tmp_path, tiny_args, change, match):
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args), extra=change)
    with pytest.raises(CheckpointError, match=match):
        mg.load_gguf(path)


def test_a_float64_epsilon_past_float32_is_refused_naming_the_file(tmp_path, tiny_args,
                                                                   monkeypatch):
    """1e300 is finite as a FLOAT64, inf in the float32 norm: every activation 0, silently."""
    key = "llama.attention.layer_norm_rms_epsilon"
    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps",
                        lambda w, value: w.add_float64(key, 1e300))
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: norm_eps: expected a "
                                              f"number >= 0 and < 1, got 1e\\+300$"):
        mg.load_gguf(path)


def test_other_architectures_are_refused(tmp_path, tiny_args):
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args), arch="qwen2")
    with pytest.raises(CheckpointError, match="architecture is 'qwen2'"):
        mg.load_gguf(path)


def test_wrong_shape_and_missing_and_extra_tensors(tmp_path, tiny_args):
    w = random_weights(tiny_args)
    w["layers.1.attention.wk.weight"] = w["layers.1.attention.wk.weight"][:-1]
    path = write_gguf(tmp_path / "m.gguf", tiny_args, w)
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.wk\.weight.*shape"):
        mg.load_gguf(path)
    w = random_weights(tiny_args)
    del w["layers.0.ffn_norm.weight"]
    write_gguf(path, tiny_args, w)
    with pytest.raises(CheckpointError, match=r"layers\.0\.ffn_norm\.weight.*missing"):
        mg.load_gguf(path)
    # rope_freqs (Llama 3's RoPE scaling, tests/test_llama3.py) must hold one factor per pair
    writers.write_gguf(path, tiny_args, random_weights(tiny_args),
                       tensors={"rope_freqs.weight": np.ones(tiny_args.head_dim // 2 + 1, np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight.*one per pair"):
        mg.load_gguf(path)


# ----------------------------------------------------------------------------
# the tokenizer and chat template in the metadata

def test_gpt2_tokenizer_from_metadata(tmp_path, tiny_args):
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args))
    tok = load_tokenizer(path, vocab_size=tiny_args.vocab_size)
    assert isinstance(tok, BPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, tiny_args.vocab_size)
    ids = tok.encode("<|im_start|>the and 42<|im_end|>", bos=True, eos=False)
    assert ids[0] == 1 and ids[-1] == 2                      # specials whole, no BOS added
    assert tok.decode(ids) == "the and 42"                   # control tokens print nothing
    with pytest.raises(TokenizerError, match="tokens but the model's vocab_size"):
        load_tokenizer(path, vocab_size=7)


def write_sentencepiece_gguf(path, tokens, scores, bos_id=1):
    p = ModelArgs(**dict(TINY, vocab_size=len(tokens)))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("llama.context_length", 32), ("llama.embedding_length", p.dim),
                       ("llama.block_count", p.n_layers), ("llama.feed_forward_length", 96),
                       ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2)):
        w.add_uint32(key, value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, a in random_weights(p).items():
        w.add_tensor(reference_gguf_name(name), a)
    finish_gguf(w)
    return path


def test_sentencepiece_vocab_from_metadata(tmp_path, shared):
    """A `llama` vocabulary (pieces + scores) encodes like llama2.c's tokenizer.bin of it."""
    from minillama.tokenizers import Llama2cTokenizer
    ref = Llama2cTokenizer(shared / "models" / "tok512.bin")
    tokens = [piece.decode("utf-8").replace(" ", "\u2581") for piece in ref.vocab]
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf", tokens, ref.vocab_scores)
    tok = load_tokenizer(path, vocab_size=512)
    for text in ["Once upon a time, there was a little girl.", "  spaces\nand lines", "日本 ok",
                 ""]:
        assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
        ids = ref.encode(text, bos=True, eos=False)
        assert tok.decode(ids) == ref.decode(ids)
    assert isinstance(tok.chat, Llama2Chat)                # Llama 2's [INST] format applies
    # the byte fallback (byte b = id b + 3) needs Llama's layout; another one is refused
    swapped = tokens[:3] + tokens[4:5] + tokens[3:4] + tokens[5:]
    write_sentencepiece_gguf(path, swapped, ref.vocab_scores)
    with pytest.raises(TokenizerError, match="byte tokens"):
        load_tokenizer(path)


def test_a_sentencepiece_vocab_without_bos(tmp_path, shared, capsys):
    """No tokenizer.ggml.bos_token_id: encode adds no BOS (it added id -1: "token id -1 is
    outside 0..511"), decode keeps the spaces (bos_id -1 read every token as following BOS),
    and `run` with an empty prompt says there is no BOS to start from."""
    from minillama.cli import main
    from minillama.tokenizers import Llama2cTokenizer
    ref = Llama2cTokenizer(shared / "models" / "tok512.bin")
    tokens = [piece.decode("utf-8").replace(" ", "\u2581") for piece in ref.vocab]
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf", tokens, ref.vocab_scores, bos_id=None)
    tok = load_tokenizer(path, vocab_size=512)
    text = "Once upon a time"
    assert tok.encode("", bos=True, eos=False) == []
    assert tok.encode(text, bos=True, eos=True) == ref.encode(text, bos=False, eos=True)
    assert tok.decode(ref.encode(text, bos=False, eos=False)) == text
    assert tok.chat.encode_dialog(tok, [{"role": "user", "content": "hi"}])[0] != -1
    assert main(["run", str(path), "-n", "4"]) == 2
    assert capsys.readouterr().err == (f"minillama: error: -i: {path} has no BOS token to start "
                                       f"from an empty prompt; give one with -i, or chat with "
                                       f"-m chat\n")
    assert main(["run", str(path), "-n", "4", "-t", "0", "-i", "Once"]) == 0
    assert capsys.readouterr().out.startswith("Once")         # no dummy-prefix space first


def test_chatml_rendering(tmp_path, tiny_args):
    path = write_gguf(tmp_path / "m.gguf", tiny_args, random_weights(tiny_args))
    tok = load_tokenizer(path)
    assert isinstance(tok.chat, TemplateChat)
    first = tok.chat.next_turn(tok, [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi there"}], [])
    assert first.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there"
                          "<|im_end|>\n<|im_start|>assistant\n")
    assert first.ids == tok.encode(first.text, bos=True, eos=False)
    assert tok.chat.next_turn(tok, [{"role": "user", "content": "Hi"}], []).text == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # a later turn: after the reply and its EOS (<|im_end|>), the loop feeds what follows them
    fed = first.ids + tok.encode("the and", bos=False, eos=True)
    later = tok.chat.next_turn(tok, [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi there"},
                                     {"role": "assistant", "content": "the and"},
                                     {"role": "user", "content": "More"}], fed)
    assert later.keep == len(fed) and later.ids == \
        tok.encode("\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n", True, False)
    dialog = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    expected = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
                "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.chat.encode_dialog(tok, dialog) == tok.encode(expected, bos=True, eos=False)
    start = [1] + tok.encode("system\n", bos=False, eos=False)      # <|im_start|> is one id
    assert tok.chat.encode_dialog(tok, dialog)[:len(start)] == start
    with pytest.raises(ArgumentError, match="ending with a 'user'"):
        tok.chat.encode_dialog(tok, dialog[:3])


def test_hostile_tokenizer_metadata(tmp_path, tiny_args):
    V = gguf.GGUFValueType
    for extra, match in (({"tokenizer.ggml.bos_token_id": (10**6, V.UINT32)}, "bos_token_id"),
                         ({"tokenizer.ggml.model": ("bert", V.STRING)}, "'bert'")):
        path = tmp_path / "m.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_token_list(["a", "b"])
        w.add_token_merges(["a b"])
        for key, (value, vtype) in extra.items():
            w.add_key_value(key, value, vtype)
        if "tokenizer.ggml.model" not in extra:
            w.add_tokenizer_model("gpt2")
        finish_gguf(w)
        with pytest.raises(TokenizerError, match=match):
            load_tokenizer(path)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(30))
    with pytest.raises(TokenizerError, match="version 0"):
        load_tokenizer(tmp_path / "bad.gguf")


# ----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32), the default model

@pytest.fixture(scope="session")
def smollm2():
    """The SmolLM2 GGUF from minillama's cache, fetched if missing. CI fetches it first
    (`python -m minillama download smollm2-135m-instruct`); without a network elsewhere, skip."""
    from minillama.download import DEFAULT_MODEL, cache_dir, model_path
    from minillama.errors import DownloadError
    try:
        return model_path(DEFAULT_MODEL)
    except DownloadError as e:
        if os.environ.get("CI"):
            pytest.fail(f"SmolLM2 is not in {cache_dir()} and cannot be fetched: {e}")
        pytest.skip(f"SmolLM2 is not in {cache_dir()} and cannot be fetched: {e}")


@pytest.fixture(scope="module")
def smollm2_models(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32).eval()
    ckpt = open_checkpoint(smollm2, max_seq_len=160)
    tokenizer = load_tokenizer(ckpt.tokenizer_path, vocab_size=ckpt.params.vocab_size)
    return Transformer(ckpt.params, ckpt.weights), tokenizer, hf


def test_smollm2_hyperparameters(smollm2):
    p = mg.load_gguf(smollm2)[0]
    assert (p.dim, p.n_layers, p.n_heads, p.n_kv_heads, p.hidden_dim, p.vocab_size) == \
        (576, 30, 9, 3, 1536, 49152)
    assert (p.rope_theta, p.max_seq_len) == (100000.0, 8192)
    types = {info.type_name for info in mg.read_gguf(smollm2).tensors.values()}
    assert types == {"Q4_1", "Q8_0", "F32"}


def test_smollm2_logits_and_greedy_match_transformers(smollm2_models):
    """transformers dequantizes the same file with its own code and runs its own Llama. The
    prompt is the chat prompt chat_completion builds; greedy, SmolLM2 answers with the whale."""
    import torch
    model, tokenizer, hf = smollm2_models
    prompt = tokenizer.encode(SMOLLM2_PROMPT, bos=False, eos=False)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0].numpy()
    ours = model.forward(np.array([prompt]), 0)[0]
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()

    hf_ids = []
    for _ in range(32):         # greedy on transformers' side: the whole sequence every step
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + hf_ids])).logits[0, -1].numpy()
        hf_ids.append(int(np.argmax(logits)))
    model_ids = greedy(model.forward, prompt, 32)
    assert model_ids == hf_ids
    assert "whale" in tokenizer.decode(model_ids).lower(), tokenizer.decode(model_ids)


def test_smollm2_chat_mode_answers_the_largest_animal(smollm2_models):
    """`minillama run -m chat` on the default model: llama2.c's chat loop with SmolLM2's chat
    template, greedy. (With no system prompt the template's default one applies, and then
    SmolLM2-135M calls the largest animal "a concept"; asked for one sentence, it names the
    whale.)"""
    from minillama.run import chat
    from minillama.sampler import Llama2cSampler
    model, tokenizer, _ = smollm2_models
    question, system = "What is the largest animal?", "Answer in one sentence."
    n_prompt = len(tokenizer.chat.encode_dialog(tokenizer, [
        {"role": "system", "content": system}, {"role": "user", "content": question}]))
    out = io.BytesIO()
    chat(model, tokenizer, Llama2cSampler(tokenizer.n_words, temperature=0.0), question, system,
         n_prompt + 12, inp=io.StringIO(""), out=out)
    reply = out.getvalue().decode()
    assert reply.startswith("Assistant: ") and "whale" in reply.lower(), reply
    # the EOSes the model predicts while the ChatML prompt is fed print nothing
    assert reply.startswith("Assistant: The largest animal"), reply


def test_smollm2_generate_prints_the_prompt_without_bos(smollm2_models):
    """SmolLM2 adds no BOS: run's loop prints what follows each token, so the first prompt
    token must be printed before it."""
    from minillama.run import generate
    from minillama.sampler import Llama2cSampler
    model, tokenizer, _ = smollm2_models
    out = io.BytesIO()
    generate(model, tokenizer, Llama2cSampler(tokenizer.n_words, temperature=0.0),
             "The capital of France is", 8, out=out, err=io.StringIO())
    assert out.getvalue().decode().startswith("The capital of France is Paris")


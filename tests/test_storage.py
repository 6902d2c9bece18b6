"""Weights kept as stored (issue 10): GGUF blocks and bf16 arrive as Packed with no float32 copy,
--dtype bfloat16 / q4_0 / int8 quantize at load, the memory plan counts what the model holds, the
CPU rule (expand to float32 when it fits, else keep packed) and the float16 KV cache."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ODD, greedy, max_rel_err
from minillama import formats
from minillama.checkpoints import gguf as mg
from minillama.checkpoints.random import random_weights
from minillama.checkpoints.safetensors import read_safetensors
from minillama.checks import locate_nonfinite
from minillama.dtypes import Q8_GROUPS, storage_plan, store_weights
from minillama.errors import ArgumentError, CheckpointError
from minillama.formats import Packed
from minillama.loading import load_model, open_checkpoint, read_checkpoint
from minillama.memory import kv_cache_bytes, plan_checkpoint, plan_memory, weights_bytes
from minillama.model import ModelArgs, Transformer, weight_shapes
from minillama.ops import CPU
from minillama.quant import Q8Tensor
from tests.tools import MODELS
from tests.tools.writers import gpt2_tokens, gpt2_vocab, write_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
STORED = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "F16": "f16"}
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
            vocab_size=len(gpt2_tokens()), max_seq_len=32, max_batch_size=2)


def tiny_gguf(tmp_path, qtype, tied=False, seed=3):
    p = ModelArgs(**TINY)
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, p, random_weights(p, seed=seed, tied=tied, scale=0.3), Q[qtype],
               gpt2_vocab, tied=tied)
    return p, path


def gguf_tensors(path):
    """{Meta name: (the file's bytes of the tensor, its float32 values as gguf dequantizes
    them)}, read by the gguf package."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)
        out[mg.meta_name(t.name)] = (np.asarray(t.data).tobytes(), values.astype(np.float32))
    if "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def open_as_stored(path, **kwargs):
    """open_checkpoint on the CPU with a budget one byte short of the float32 plan: the CPU
    rule keeps the weights as stored."""
    expanded = plan_checkpoint(read_checkpoint(path, **kwargs), None, "cpu", budget=1 << 50)
    assert expanded.load_dtype == "float32"
    return open_checkpoint(path, device="cpu", budget=expanded.total - 1, **kwargs)


def held_nbytes(model):
    """Bytes of the weights the model holds, each object once."""
    held = [model.tok_embeddings, model.output, model.norm]
    for layer in model.layers:
        held += [layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                 layer.feed_forward.w2, layer.attention_norm, layer.ffn_norm]
    return sum(w.nbytes for w in {id(w): w for w in held}.values())


# ----------------------------------------------------------------------------
# GGUF blocks, kept as stored

@pytest.mark.parametrize("qtype", list(STORED))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_weights_arrive_packed_without_a_float32_copy(tmp_path, monkeypatch, qtype, tied):
    p, path = tiny_gguf(tmp_path, qtype, tied)

    def no_float32(*args, **kwargs):
        raise AssertionError("a stored weight was dequantized while loading")
    for module in {id(m): m for m in formats.FORMATS.values()}.values():
        monkeypatch.setattr(module, "dequantize", no_float32)
    monkeypatch.setattr(formats, "dequantize", no_float32)
    ckpt = open_as_stored(path, max_batch_size=2)
    monkeypatch.undo()

    assert ckpt.plan.note.startswith(f"as stored ({STORED[qtype]})")
    file = gguf_tensors(path)
    for name, w in ckpt.weights.items():
        if isinstance(w, np.ndarray):
            assert w.ndim == 1 and w.dtype == np.float32          # norms: F32 in the file
            continue
        assert isinstance(w, Packed) and w.format == STORED[qtype], name
        assert formats.to_gguf(w) == file[name][0], name          # the file's bytes, as read
    assert (ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]) == tied

    # the model holds the Packed weights (and a float32 table to gather from), and the plan
    # counts exactly what it holds
    model = Transformer(ckpt.params, ckpt.weights)
    assert isinstance(model.layers[1].feed_forward.w13, Packed)
    assert isinstance(model.output, Packed) and model.output is not model.tok_embeddings
    assert ckpt.plan.weights == held_nbytes(model)


@pytest.mark.parametrize("qtype", list(STORED))
def test_packed_logits_equal_the_gguf_dequantized_model(tmp_path, qtype):
    p, path = tiny_gguf(tmp_path, qtype, tied=qtype in ("Q4_1", "F16"), seed=5)
    packed = Transformer(p, open_as_stored(path, max_batch_size=2).weights)
    reference = Transformer(p, {name: values for name, (_, values) in gguf_tensors(path).items()})
    tokens = np.random.default_rng(7).integers(0, p.vocab_size, (2, 9))
    assert max_rel_err(packed.forward(tokens, 0), reference.forward(tokens, 0)) <= 1e-5
    step = tokens[:, :1] + 1                                   # one more position, cached
    assert max_rel_err(packed.forward(step, 9), reference.forward(step, 9)) <= 1e-5
    packed, reference = (Transformer(p, open_as_stored(path).weights),
                         Transformer(p, {n: v for n, (_, v) in gguf_tensors(path).items()}))
    assert greedy(packed.forward, [1, 40, 7], 20) == greedy(reference.forward, [1, 40, 7], 20)


def test_the_cpu_rule_expands_when_float32_fits(tmp_path):
    p, path = tiny_gguf(tmp_path, "Q4_1", tied=True)
    ckpt = open_checkpoint(path, device="cpu")                   # measured: it fits
    assert ckpt.plan.load_dtype == "float32" and ckpt.plan.dtype == "float32"
    assert ckpt.plan.note.startswith("float32, expanded at load from the file's q4_1")
    assert all(type(w) is np.ndarray and w.dtype == np.float32 for w in ckpt.weights.values())
    model = Transformer(p, ckpt.weights)
    assert model.output is model.tok_embeddings                 # one float32 table again
    assert ckpt.plan.weights == held_nbytes(model)
    # on the GPU nothing is expanded: the kernels read the blocks (no GPU needed to plan)
    gpu = plan_checkpoint(read_checkpoint(path), None, "cuda", budget=1 << 30)
    assert gpu.load_dtype is None and gpu.dtype == "as stored (q4_1)"
    assert "the GPU kernels read each format directly" in gpu.note
    # too little memory even as stored: refused, with what would fit
    with pytest.raises(Exception, match="does not fit on cpu.*as stored \\(q4_1\\)"):
        open_checkpoint(path, device="cpu", budget=1000)


def test_info_names_the_stored_format(tmp_path):
    _, path = tiny_gguf(tmp_path, "Q4_1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "minillama", "info", str(path), *a],
                                    capture_output=True, text=True, timeout=300)
    r = run()
    assert r.returncode == 0, r.stderr
    assert "stored as       q4_1 x 16, f32 x 5 (tensors by format, in the file)" in r.stdout
    assert "storage   float32, expanded at load from the file's q4_1: it fits" in r.stdout
    r = run("--device", "cuda", "--kv-dtype", "float16")
    assert "memory plan: cuda, weights as stored (q4_1), --kv-dtype float16" in r.stdout
    assert "storage   as stored (q4_1): the GPU kernels read each format directly" in r.stdout
    assert "(float16)" in r.stdout and " x 2 bytes" in r.stdout


# ----------------------------------------------------------------------------
# bf16 checkpoints keep their bits

def test_bf16_pth_stays_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    import json
    p = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, hidden_dim=96)
    w = random_weights(p, seed=8)
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()}
    torch.save(sd, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(dict(dim=64, n_layers=2, n_heads=4,
                                                          vocab_size=-1)))
    bits = {k: v.view(torch.int16).numpy().view(np.uint16) for k, v in sd.items()}
    for dtype, device in (("bfloat16", "cpu"), (None, "cuda")):
        ckpt = open_checkpoint(tmp_path, dtype=dtype, device=device, budget=1 << 30)
        wq = ckpt.weights["layers.1.attention.wq.weight"]
        assert isinstance(wq, Packed) and wq.format == "bf16"
        np.testing.assert_array_equal(wq.data, bits["layers.1.attention.wq.weight"])
        assert ckpt.weights["norm.weight"].dtype == np.float32
    # a .safetensors bf16 tensor reads as the same bits, as stored
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file({"w": sd["layers.1.attention.wq.weight"].contiguous()}, tmp_path / "w.safetensors")
    lazy = read_safetensors(tmp_path / "w.safetensors")["w"]
    assert lazy.format == "bf16" and lazy.nbytes == 2 * lazy.size
    np.testing.assert_array_equal(lazy.packed().data, bits["layers.1.attention.wq.weight"])
    # as float32 on the CPU by default (the fast path), with the same values
    ckpt = open_checkpoint(tmp_path)
    widened = torch.from_numpy(w["layers.1.attention.wq.weight"]).to(torch.bfloat16).float()
    np.testing.assert_array_equal(ckpt.weights["layers.1.attention.wq.weight"], widened.numpy())


# ----------------------------------------------------------------------------
# --dtype at load: what each stores, and how far from float32

ROUND_TRIP = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96,
                  max_seq_len=24, max_batch_size=2)


@pytest.mark.parametrize("dtype, fmt, weight_err, logit_err", [
    # weights: the bounds of docs/formats.md (bf16 rounds to 8 significant bits; Q8_0 is half
    # a step of max|w| / 127 plus the float16 scale's rounding; Q4_0 a whole step of max|w| / 8
    # where a weight is clipped), measured 0.00388, 0.00428, 0.12503. Logits, relative to the
    # largest: measured 0.012, 0.027, 0.39 (random N(0, 1/in) weights are 4 bits' worst case)
    ("bfloat16", "bf16", 2 ** -8, 0.025),
    ("int8", "q8_0", 1 / 254 + 2 ** -11, 0.05),
    ("q4_0", "q4_0", 1 / 8 + 2 ** -11, 0.6),
])
def test_dtype_round_trips(dtype, fmt, weight_err, logit_err):
    p = ModelArgs(**ROUND_TRIP)
    w = random_weights(p, seed=9)
    stored = store_weights(w, dtype)
    for name, a in w.items():
        s = stored[name]
        if name == "tok_embeddings.weight" or a.ndim == 1:
            assert type(s) is np.ndarray and s.dtype == np.float32    # gathered / tiny
            continue
        assert isinstance(s, Packed) and s.format == fmt, name
        err = np.abs(formats.dequantize(s) - a)
        if fmt == "bf16":
            assert np.all(err <= weight_err * np.abs(a)), name         # relative, per weight
        else:                                   # relative to the block's largest weight
            block_max = np.abs(a.reshape(a.shape[0], -1, 32)).max(-1, keepdims=True)
            assert np.all(err.reshape(block_max.shape[0], -1, 32) <= weight_err * block_max)
    tokens = np.random.default_rng(1).integers(0, 100, (2, 12))
    exact = Transformer(p, w).forward(tokens, 0)
    assert 0 < max_rel_err(Transformer(p, stored).forward(tokens, 0), exact) <= logit_err


def test_rows_that_are_not_whole_blocks():
    """stories260K's w2 has rows of 172 values: int8 keeps llama2.c's groups there, q4_0
    keeps float32; the plan counts it and `info` says which matrices."""
    p = ModelArgs(**ODD)                                     # dim 36, hidden 70: no whole blocks
    w = random_weights(p)
    assert isinstance(store_weights(w, "int8")["layers.0.feed_forward.w2.weight"], Q8Tensor)
    assert store_weights(w, "q4_0")["layers.0.feed_forward.w2.weight"].dtype == np.float32
    plan = plan_checkpoint(read_checkpoint(MODELS / "stories260K.bin"), "q4_0", budget=1 << 30)
    assert plan.note == ("q4_0, except where rows are not whole blocks of 32: "
                         "feed_forward.w2 x 5: float32")
    int8 = plan_checkpoint(read_checkpoint(MODELS / "stories260K.bin"), "int8", budget=1 << 30)
    assert "feed_forward.w2 x 5: llama2.c's Q8 groups" in int8.note


def test_a_llama2c_int8_file_in_other_dtypes(shared):
    """stories260K-q8's w2 rows (172) end in 4 columns outside its groups of 8, which runq
    leaves out of every product: as float32 they are zeros, so --dtype float32 / q4_0 work
    and compute what the groups do."""
    path = MODELS / "stories260K-q8.bin"
    q8 = open_checkpoint(path).weights["layers.0.feed_forward.w2.weight"]
    w2 = open_checkpoint(path, dtype="float32").weights["layers.0.feed_forward.w2.weight"]
    assert w2.shape == (64, 172) and not w2[:, 168:].any()
    x = np.random.default_rng(0).standard_normal((3, 172)).astype(np.float32)
    q8.w8a8 = False                                      # runq's activations rounding aside
    np.testing.assert_allclose(x @ w2.T, CPU.linear(x, q8), rtol=1e-5, atol=1e-5)
    tokens = np.array([[1, 403, 407, 260]])
    exact = load_model(MODELS / "stories260K.bin").forward(tokens, 0)
    for dtype in ("float32", "q4_0"):        # measured 0.989 and 0.988 (the file's own: 0.989)
        logits = load_model(path, dtype=dtype).forward(tokens, 0)
        assert np.corrcoef(logits.ravel(), exact.ravel())[0, 1] > 0.95


def test_weights_already_in_the_format_are_kept_as_read(tmp_path):
    _, path = tiny_gguf(tmp_path, "Q8_0")
    file = gguf_tensors(path)
    ckpt = open_checkpoint(path, dtype="int8")
    w2 = ckpt.weights["layers.0.feed_forward.w2.weight"]
    assert isinstance(w2, Packed)
    assert formats.to_gguf(w2) == file["layers.0.feed_forward.w2.weight"][0]
    q4 = open_checkpoint(path, dtype="q4_0").weights["layers.0.feed_forward.w2.weight"]
    assert q4.format == "q4_0"                                  # re-quantized from the Q8_0


def test_one_format_per_fused_group():
    """wq, wk, wv are multiplied as one: a file that stores them differently gets the group
    kept as float32, and the plan counts it so."""
    p = ModelArgs(**ROUND_TRIP)
    sources = {name: ("q4_1", shape) if len(shape) == 2 else ("f32", shape)
               for name, shape in weight_shapes(p).items()}
    sources["layers.1.attention.wv.weight"] = ("q8_0", (p.kv_dim, p.dim))
    plan = storage_plan(sources, None)
    assert {plan[f"layers.1.attention.{w}.weight"] for w in ("wq", "wk", "wv")} == {"f32"}
    assert plan["layers.0.attention.wv.weight"] == "q4_1" and plan["output.weight"] == "q4_1"
    assert storage_plan({"layers.0.attention.wq.weight": (Q8_GROUPS, (4, 8))}, None) == \
        {"layers.0.attention.wq.weight": Q8_GROUPS}                 # llama2.c's own groups


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_plan_counts_the_held_bytes(dtype, tied):
    p = ModelArgs(**ROUND_TRIP)
    model = Transformer(p, store_weights(random_weights(p, tied=tied), dtype))
    assert weights_bytes(p, dtype, tied) == held_nbytes(model)


def test_a_bad_quantization_names_the_weight_and_dtype():
    p = ModelArgs(**ROUND_TRIP)
    w = random_weights(p)
    w["layers.1.feed_forward.w1.weight"][5, 40] = np.nan
    with pytest.raises(CheckpointError, match=r"layers.1.feed_forward.w1.weight \(--dtype q4_0\)"
                                              r": q4_0 block 11 \(row 5, columns 32..63\)"):
        store_weights(w, "q4_0")
    w["layers.1.feed_forward.w1.weight"][5, 40] = 3.4e38           # rounds up to bf16's inf
    with pytest.raises(CheckpointError, match=r"layers.1.feed_forward.w1.weight \(--dtype "
                                              r"bfloat16\): bf16 value at row 5, column 40"):
        store_weights(w, "bfloat16")


def test_a_packed_weight_that_goes_bad_is_named():
    """locate_nonfinite looks into a Packed weight's scales."""
    p = ModelArgs(**ROUND_TRIP)
    model = Transformer(p, store_weights(random_weights(p, seed=2), "int8"))
    model.layers[1].feed_forward.w2.d[3, 1] = np.inf
    tokens = np.array([[3, 4, 5]])
    with np.errstate(all="ignore"):
        where = locate_nonfinite(model, tokens, 0)
    assert "layer 1 (layers.1); its weights feed_forward.w2 are not finite" in where


# ----------------------------------------------------------------------------
# the KV cache in float16

def test_kv_cache_float16():
    # measured: logits within 3.1e-4 of the float32 cache's (relative), same greedy tokens
    p = ModelArgs(**{**ROUND_TRIP, "max_seq_len": 64})
    w = random_weights(p, seed=4)
    half, full = Transformer(p, w, kv_dtype="float16"), Transformer(p, w)
    assert half.layers[0].attention.cache_k.dtype == np.float16
    cache = sum(layer.attention.cache_k.nbytes + layer.attention.cache_v.nbytes
                for layer in half.layers)
    assert kv_cache_bytes(p, 64, 2, "float16") == cache == kv_cache_bytes(p, 64, 2) // 2
    tokens = np.random.default_rng(3).integers(0, 100, (2, 20))
    a, b = half.forward(tokens, 0), full.forward(tokens, 0)
    assert a.dtype == np.float32 and 0 < max_rel_err(a, b) <= 1e-3
    assert greedy(half.forward, [5, 6, 7], 30) == greedy(full.forward, [5, 6, 7], 30)


def test_kv_dtype_through_the_loaders(shared):
    # stories260K with a float16 cache: measured, the same 150 greedy tokens, and logits over
    # those 151 positions within 1.05e-3 of the float32 cache's (relative)
    model = load_model(MODELS / "stories260K.bin", max_seq_len=160, kv_dtype="float16")
    assert model.layers[0].attention.cache_v.dtype == np.float16
    full = load_model(MODELS / "stories260K.bin", max_seq_len=160)
    ids = greedy(full.forward, [1], 150)
    assert greedy(model.forward, [1], 150) == ids
    text = np.array([[1] + ids])
    assert max_rel_err(model.forward(text, 0), full.forward(text, 0)) <= 2e-3
    plan = plan_memory(model.params, "float32", 160, 1, budget=1 << 30, kv_dtype="float16")
    assert plan.kv_cache == kv_cache_bytes(model.params, 160, 1) // 2
    assert " x 2 bytes" in plan.format() and "--kv-dtype float16" in plan.format()
    args = ["complete", "--ckpt_dir", MODELS / "stories260K.bin", "--tokenizer_path",
            MODELS / "tok512.bin", "--prompt", "Tom and Sue", "--max_gen_len", 10,
            "--temperature", 0, "--kv-dtype", "float16", "--max_seq_len", 64]
    r = subprocess.run([sys.executable, "-m", "minillama", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "> were playing in the park." in r.stdout, r.stderr


@pytest.mark.parametrize("call", [
    lambda: Transformer(ModelArgs(**ROUND_TRIP), random_weights(ModelArgs(**ROUND_TRIP)),
                        kv_dtype="int8"),
    lambda: plan_memory(ModelArgs(**ROUND_TRIP), None, 8, 1, kv_dtype="bfloat16"),
    lambda: load_model(MODELS / "stories260K.bin", kv_dtype="float64"),
])
def test_a_bad_kv_dtype_names_the_argument(call):
    with pytest.raises(ArgumentError, match="kv_dtype: expected one of float32, float16, got"):
        call()


# ----------------------------------------------------------------------------
# the default model on the CPU: still the fast path, still the same tokens

# greedy after SmolLM2's chat prompt for "What is the largest animal?", recorded before weights
# were kept as stored (float32 dequantized at load): "The largest animal is the Blue Whale. ..."
SMOLLM2_GREEDY = [504, 3995, 3161, 314, 260, 10062, 38435, 30, 10062, 13346, 359, 6207, 6734,
                  351, 253, 3519, 282, 690, 216, 33, 32, 32, 3282, 30, 1069, 359, 983, 281, 260,
                  5065, 284, 359]


@pytest.mark.slow
def test_smollm2_on_the_cpu_expands_and_keeps_its_tokens():
    from minillama.download import DEFAULT_MODEL, MODELS as FILES, cache_dir
    from minillama.tokenizers import load_tokenizer
    path = cache_dir() / FILES[DEFAULT_MODEL][0]
    if not path.is_file():                       # not fetched here: test_gguf.py fetches it
        pytest.skip(f"SmolLM2 is not in {cache_dir()}")
    ckpt = open_checkpoint(path, max_seq_len=64, device="cpu")
    assert ckpt.plan.load_dtype == "float32"                       # the fast path
    assert all(type(w) is np.ndarray for w in ckpt.weights.values())
    tokenizer = load_tokenizer(ckpt.tokenizer_path, vocab_size=ckpt.params.vocab_size)
    # the question in ChatML without a system message, as SMOLLM2_GREEDY was recorded
    prompt = tokenizer.encode("<|im_start|>user\nWhat is the largest animal?<|im_end|>\n"
                              "<|im_start|>assistant\n", bos=False, eos=False)
    model = Transformer(ckpt.params, ckpt.weights)
    assert greedy(model.forward, prompt, 32) == SMOLLM2_GREEDY
    # kept as stored (too little memory for float32): the same logits, to float32 rounding
    packed = Transformer(ckpt.params, open_as_stored(path, max_seq_len=64).weights)
    assert isinstance(packed.layers[0].attention.wqkv, Packed)
    tokens = np.array([prompt + SMOLLM2_GREEDY[:8]])
    assert max_rel_err(packed.forward(tokens, 0), model.forward(tokens, 0)) <= 1e-5

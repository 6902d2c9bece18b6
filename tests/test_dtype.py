"""Weight storage dtypes (--dtype float32|float16|bfloat16|int8|q4_0) and the bfloat16
conversion."""
import numpy as np
import pytest

from conftest import MODELS
from minillama.checkpoints.random import random_weights
from minillama.dtypes import LazyTensor, q8_group_size, resolve_dtype, store_weights
from minillama.formats.dense import bf16_to_f32
from minillama.errors import ArgumentError, CheckpointError
from minillama.formats import Packed
from minillama.loading import load_model, open_checkpoint
from minillama.model import ModelArgs, Transformer
from minillama.quant import Q8Tensor, dequantize_q8


def test_bf16_to_f32_matches_torch_on_every_bit_pattern():
    torch = pytest.importorskip("torch")
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_to_f32(bits).view(np.uint32), want.view(np.uint32))


def test_q8_group_size():
    assert [q8_group_size(n) for n in (64, 96, 172, 43, 30, 7)] == [32, 32, 4, 1, 30, 7]


def weights_for(seed=0, tied=False):
    p = ModelArgs(dim=40, n_layers=2, n_heads=5, n_kv_heads=1, vocab_size=53, hidden_dim=86,
                  max_seq_len=16)
    return p, random_weights(p, seed=seed, tied=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_what_each_dtype_stores(tied):
    p, w = weights_for(tied=tied)
    for dtype in (None, "float32", "float16", "int8"):
        s = store_weights(w, dtype)
        assert set(s) == set(w)
        assert s["tok_embeddings.weight"].dtype == np.float32          # gathered by row
        assert s["layers.1.ffn_norm.weight"].dtype == np.float32
        assert (s["output.weight"] is s["tok_embeddings.weight"]) == tied
        wq = s["layers.0.attention.wq.weight"]
        if dtype == "int8":
            assert isinstance(wq, Q8Tensor) and not wq.w8a8 and wq.group_size == 20   # of 40
            w2 = s["layers.0.feed_forward.w2.weight"]                   # rows of 86 = 2 x 43
            assert w2.group_size == 2
            # each value within half a step of its group's scale
            for name in ("layers.0.attention.wq.weight", "layers.0.feed_forward.w2.weight"):
                q = s[name]
                err = np.abs(dequantize_q8(q.q, q.s, q.group_size) - w[name])
                step = np.repeat(q.s, q.group_size, axis=1)
                assert np.all(err <= step / 2 + 1e-7)
        elif dtype == "float16":                                        # Packed f16
            assert isinstance(wq, Packed) and wq.format == "f16" and wq.data.dtype == np.float16
            np.testing.assert_array_equal(wq.data,
                                          w["layers.0.attention.wq.weight"].astype(np.float16))
        else:
            assert wq.dtype == np.float32
            np.testing.assert_array_equal(wq, w["layers.0.attention.wq.weight"])


def test_float16_computes_in_float32():
    p, w = weights_for(seed=1)
    tokens = np.random.default_rng(0).integers(0, 53, (2, 7))
    exact = Transformer(p, store_weights(w, "float32")).forward(tokens, 0)
    half = Transformer(p, store_weights(w, "float16")).forward(tokens, 0)
    rounded = {k: (v.astype(np.float16).astype(np.float32) if v.ndim == 2 and "tok_" not in k
                   else v) for k, v in w.items()}
    want = Transformer(p, rounded).forward(tokens, 0)
    assert half.dtype == np.float32
    # the float16 model is the float32 model of the rounded weights, to float32 rounding
    assert np.abs(half - want).max() <= 1e-5 * np.abs(want).max()
    assert 0 < np.abs(half - exact).max() < 1e-2 * np.abs(exact).max()


def test_float16_overflow_is_an_error():
    p, w = weights_for()
    w["layers.1.feed_forward.w3.weight"][3, 4] = 1e6
    with pytest.raises(CheckpointError, match="layers.1.feed_forward.w3.weight.*float16"):
        store_weights(w, "float16")


def test_bad_dtype_names_the_argument(shared):
    p, w = weights_for()
    with pytest.raises(ArgumentError, match="dtype: expected one of float32, float16, "
                                            "bfloat16, int8, q4_0, got 'int4'"):
        store_weights(w, "int4")
    with pytest.raises(ArgumentError, match="dtype"):
        load_model(MODELS / "stories260K.bin", dtype="int4")


def test_lazy_weights_are_read_once_each():
    p, w = weights_for()
    reads = []

    def lazy(name, a):
        def read():
            reads.append(name)
            return a
        return LazyTensor(a.shape, "float32", read)
    lazies = {k: lazy(k, v) for k, v in w.items()}
    s = store_weights(lazies, "int8")
    assert sorted(reads) == sorted(w)
    np.testing.assert_array_equal(s["norm.weight"], w["norm.weight"])


def test_a_quantized_checkpoint_keeps_its_own_q8_unless_asked(shared):
    q8 = MODELS / "stories260K-q8.bin"
    for dtype in (None, "int8"):
        w = open_checkpoint(q8, dtype=dtype).weights["layers.0.attention.wq.weight"]
        assert isinstance(w, Q8Tensor) and w.w8a8                  # runq's own arithmetic
    assert resolve_dtype(None, open_checkpoint(q8).weights) == "int8"
    w = open_checkpoint(q8, dtype="float32").weights["layers.0.attention.wq.weight"]
    assert w.dtype == np.float32


# ----------------------------------------------------------------------------
# stories260K: how close float16 and int8 stay to float32

def greedy_run(model, steps):
    ids = [1]
    logits = model.forward(np.array([ids]), 0)
    for _ in range(steps):
        ids.append(int(np.argmax(logits[0, -1])))
        logits = model.forward(np.array([ids[-1:]]), len(ids) - 1)
    return ids


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("dtype, min_same, min_corr", [("float16", 150, 0.99999),
                                                       ("int8", 64, 0.999)])
def test_stories260k_stays_close_to_float32(shared, dtype, min_same, min_corr):
    # measured: float16 keeps all 150 greedy tokens, min correlation 0.9999997;
    # int8 (groups of 32, and of 4 along w2's 172-wide rows) keeps 114, min correlation 0.99978
    path = MODELS / "stories260K.bin"
    ref = greedy_run(load_model(path, dtype="float32", max_seq_len=160), 150)
    got = greedy_run(load_model(path, dtype=dtype, max_seq_len=160), 150)
    assert first_difference(ref, got) >= min_same
    # teacher-forced on the float32 text: every position's logits line up
    seq = np.array([ref])
    a = load_model(path, dtype=dtype, max_seq_len=160).forward(seq, 0)[0]
    b = load_model(path, dtype="float32", max_seq_len=160).forward(seq, 0)[0]
    corr = min(np.corrcoef(x, y)[0, 1] for x, y in zip(a, b))
    assert corr > min_corr
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.98

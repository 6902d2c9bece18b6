"""The NumPy model against an independent float64 PyTorch forward, block by block and whole."""
import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.errors import ArgumentError, CheckpointError, GenerationError
from minillama.model import (ModelArgs, Transformer, apply_rotary_emb, ffn_hidden_dim,
                             precompute_freqs, rms_norm, silu)
from minillama.ops import CPU, causal_mask

from conftest import ODD

torch = pytest.importorskip("torch")
from minillama.bench import torch_reference as ref  # noqa: E402  (needs torch)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture
def rng():
    return np.random.default_rng()          # fresh inputs every run


# ----------------------------------------------------------------------------
# blocks

def test_rms_norm(rng):
    x = rng.standard_normal((3, 5, 37)).astype(np.float32)
    w = rng.standard_normal(37).astype(np.float32)
    want = ref.rms_norm(ref.t64(x), ref.t64(w), 1e-5).numpy()
    assert rel_err(rms_norm(x, w, 1e-5), want) < 1e-6


def test_rope_matches_complex_rotation_and_keeps_norms(rng):
    hd, seqlen = 14, 9
    x = rng.standard_normal((2, seqlen, 3, hd)).astype(np.float32)
    cos, sin = precompute_freqs(hd, seqlen, theta=500.0)
    got = apply_rotary_emb(x, cos, sin)
    want = ref.rope(ref.t64(x), ref.freqs_cis(hd, seqlen, 500.0)).numpy()
    assert rel_err(got, want) < 1e-5
    pairs = lambda a: np.linalg.norm(a.reshape(*a.shape[:-1], -1, 2), axis=-1)
    np.testing.assert_allclose(pairs(got), pairs(x), rtol=1e-5)
    np.testing.assert_array_equal(got[:, 0], x[:, 0])         # position 0 is not rotated


def test_swiglu(rng):
    x = rng.standard_normal((4, 11)).astype(np.float32) * 4
    w1, w3 = (rng.standard_normal((13, 11)).astype(np.float32) for _ in range(2))
    w2 = rng.standard_normal((11, 13)).astype(np.float32)
    got = CPU.linear(silu(CPU.linear(x, w1)) * CPU.linear(x, w3), w2)
    want = ref.swiglu(*(ref.t64(a) for a in (x, w1, w2, w3))).numpy()
    assert rel_err(got, want) < 1e-5


def test_silu_is_finite_for_huge_inputs():
    x = np.array([-1e30, -100.0, 0.0, 100.0, 1e30], np.float32)
    y = silu(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, [0, 0, 0, 100, 1e30], atol=1e-30)


def test_causal_mask_is_metas():
    m = causal_mask(3, 2)
    want = np.array([[0, 0, 0, -np.inf, -np.inf],
                     [0, 0, 0, 0, -np.inf],
                     [0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(m, want)


def test_softmax_rows_and_causal(rng):
    x = rng.standard_normal((2, 3, 4, 7)).astype(np.float32) * 5 + 80   # exp(80+) overflows unshifted
    p = CPU.softmax(x, start_pos=3)
    np.testing.assert_allclose(p.sum(-1), 1, rtol=1e-6)
    assert np.all(p[..., 0, 4:] == 0) and np.all(p[..., 3, :] > 0)


def test_ffn_hidden_dim_is_metas_rule():
    assert ffn_hidden_dim(4096, 256) == 11008               # Llama 2 7B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672         # Llama 2 70B


# ----------------------------------------------------------------------------
# the whole forward

@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_float64_reference(tied, rng):
    p = ModelArgs(**ODD, rope_theta=1234.0)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), tied=tied)
    tokens = rng.integers(0, p.vocab_size, (3, 13))
    got = Transformer(p, w).forward(tokens, 0)
    want = ref.Reference(p, w).forward(tokens, 0)
    assert got.shape == (3, 13, p.vocab_size) and got.dtype == np.float32
    assert rel_err(got, want) < 1e-5


def test_kv_cache_decode_matches_reference_and_prefill(rng):
    """A prefill, then single tokens through the cache, equals the reference step for step,
    and equals one prefill of the whole sequence."""
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=int(rng.integers(1 << 30)))
    tokens = rng.integers(0, p.vocab_size, (2, 17))
    model, reference, whole = Transformer(p, w), ref.Reference(p, w), Transformer(p, w)
    steps = [(0, 5)] + [(i, i + 1) for i in range(5, 17)]
    got = np.concatenate([model.forward(tokens[:, a:b], a) for a, b in steps], axis=1)
    want = np.concatenate([reference.forward(tokens[:, a:b], a) for a, b in steps], axis=1)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, whole.forward(tokens, 0)) < 1e-5


def test_batch_rows_are_independent(rng):
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=3)
    tokens = rng.integers(0, p.vocab_size, (3, 6))
    batched = Transformer(p, w).forward(tokens, 0)
    alone = Transformer(p, w).forward(tokens[1:2], 0)
    # different GEMM shapes round differently (BLAS blocks by size): compare by norm
    assert rel_err(batched[1:2], alone) < 1e-5


# ----------------------------------------------------------------------------
# misuse

def test_pad_id_never_reaches_the_embedding():
    p = ModelArgs(**ODD)
    model = Transformer(p, random_weights(p))
    with pytest.raises(ArgumentError, match=r"tokens: id -1 at row 1, column 2"):
        model.forward(np.array([[1, 2, 3], [4, 5, -1]]), 0)
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        model.forward(np.array([[p.vocab_size]]), 0)


def test_forward_limits():
    p = ModelArgs(**ODD)
    model = Transformer(p, random_weights(p))
    with pytest.raises(ArgumentError, match="max_batch_size"):
        model.forward(np.zeros((p.max_batch_size + 1, 1), np.int64), 0)
    with pytest.raises(GenerationError, match="max_seq_len"):
        model.forward(np.zeros((1, 2), np.int64), p.max_seq_len - 1)
    with pytest.raises(ArgumentError, match="integer"):
        model.forward(np.zeros((1, 2), np.float32), 0)


def test_wrong_weight_shape_is_named():
    p = ModelArgs(**ODD)
    w = random_weights(p)
    w["layers.1.attention.wk.weight"] = w["layers.1.attention.wk.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.wk\.weight.*shape"):
        Transformer(p, w)
    del w["norm.weight"]
    with pytest.raises(CheckpointError, match="norm.weight.*missing"):
        Transformer(p, w)


@pytest.mark.parametrize("field,value", [("dim", 0), ("n_heads", 7), ("n_kv_heads", 4),
                                         ("vocab_size", -5)])
def test_model_args_validated(field, value):
    args = dict(ODD, **{field: value})
    with pytest.raises(ArgumentError, match=field if field != "n_heads" else "dim"):
        ModelArgs(**args)

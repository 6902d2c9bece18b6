"""CpuDecoder (minillama/cpu_decode.py): the batch-1 decode step of the CPU against model.forward.

It must compute the model's logits (within 1e-6 relative; it does the same operations, so they
come out equal), write the same KV cache, and leave everything it does not cover (prompts,
batches, bad input, weights kept as stored) to model.forward.
"""
import json

import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.cpu_decode import CpuDecoder
from minillama.errors import ArgumentError, GenerationError
from minillama.model import ModelArgs, Transformer

from conftest import GOLDEN, ODD, greedy, max_rel_err, require_shared

SHAPES = {
    "odd GQA": ODD,                                            # 6 heads sharing 2 kv heads
    "no GQA, untied": dict(dim=32, n_layers=2, n_heads=4, vocab_size=50, hidden_dim=48,
                           max_seq_len=24, max_batch_size=1),
    "stories15M-like": dict(dim=96, n_layers=2, n_heads=2, vocab_size=300, hidden_dim=256,
                            max_seq_len=32, max_batch_size=2),
}


def two_models(shape, tied=True, seed=0):
    """Two models of the same weights: one for model.forward, one for its CpuDecoder."""
    p = ModelArgs(**shape)
    w = random_weights(p, seed=seed, tied=tied)
    return Transformer(p, w), Transformer(p, w)


@pytest.mark.parametrize("name", SHAPES)
def test_steps_match_model_forward(name):
    """A prompt, then one token per call to the end of the context: the same logits as the
    generic forward, step after step, and the same cache behind them."""
    ref, model = two_models(SHAPES[name], tied=name != "no GQA, untied")
    forward = model.ops.decoder(model)
    assert isinstance(forward, CpuDecoder)
    prompt = np.array([[1, 5, 9]])
    a, b = ref.forward(prompt, 0), forward(prompt, 0)          # the prompt: model.forward
    assert max_rel_err(b, a) < 1e-6
    for pos in range(3, ref.params.max_seq_len):
        token = a[:, -1].argmax(-1).reshape(1, 1)
        a, b = ref.forward(token, pos), forward(token, pos)
        assert b.shape == a.shape == (1, 1, ref.params.vocab_size)
        assert max_rel_err(b, a) < 1e-6, f"position {pos}"
    for mine, theirs in zip(model.layers, ref.layers):
        np.testing.assert_allclose(mine.attention.cache_k, theirs.attention.cache_k, rtol=1e-6)
        np.testing.assert_allclose(mine.attention.cache_v, theirs.attention.cache_v, rtol=1e-6)


def test_each_step_returns_its_own_logits():
    """A caller may keep the logits of every step: a step must not overwrite the last one's."""
    _, model = two_models(SHAPES["odd GQA"])
    forward = model.ops.decoder(model)
    first = forward(np.array([[3]]), 0)
    kept = first.copy()
    forward(np.array([[4]]), 1)
    np.testing.assert_array_equal(first, kept)


def test_batches_and_bad_input_go_to_model_forward():
    """Rows > 1 are model.forward's (the same logits); bad input gets model.forward's errors."""
    ref, model = two_models(SHAPES["odd GQA"])
    forward = model.ops.decoder(model)
    tokens = np.array([[1], [2], [3]])
    assert max_rel_err(forward(tokens, 0), ref.forward(tokens, 0)) < 1e-6
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        forward(np.array([[ODD["vocab_size"]]]), 1)
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        forward(np.array([[-1]]), 1)
    with pytest.raises(GenerationError, match="max_seq_len"):
        forward(np.array([[1]]), ODD["max_seq_len"])
    with pytest.raises(ArgumentError, match="start_pos"):
        forward(np.array([[1]]), 1.0)


def test_weights_kept_as_stored_stay_with_model_forward():
    from minillama.dtypes import store_weights
    p = ModelArgs(**SHAPES["stories15M-like"])
    w = store_weights(random_weights(p, seed=1, tied=False), "int8")
    model = Transformer(p, w)
    assert not CpuDecoder.covers(model)
    assert model.ops.decoder(model) == model.forward


def test_float16_cache_stays_with_model_forward():
    p = ModelArgs(**SHAPES["odd GQA"])
    model = Transformer(p, random_weights(p), kv_dtype="float16")
    assert model.ops.decoder(model) == model.forward


def test_stories260k_greedy_matches_llama2c_golden():
    """The real model, greedy through the decoder as run.py calls it: llama2.c's ids, and
    model.forward's logits at every step."""
    require_shared()
    from minillama.loading import load_model
    golden = json.loads(GOLDEN.read_text())["generation"][0]
    assert golden["model"] == "stories260K.bin" and golden["temperature"] == 0.0
    model = load_model(require_shared() / "models" / golden["model"], max_batch_size=1)
    ref = load_model(require_shared() / "models" / golden["model"], max_batch_size=1)
    forward = model.ops.decoder(model)
    assert isinstance(forward, CpuDecoder)
    token, ids = 1, []
    for pos in range(golden["steps"]):
        tokens = np.array([[token]])
        logits = forward(tokens, pos)
        assert max_rel_err(logits, ref.forward(tokens, pos)) < 1e-6, f"position {pos}"
        token = int(logits[0, -1].argmax())
        ids.append(token)
        if token == 1:
            break
    assert ids == golden["generated_ids"]
    assert greedy(forward, [1], 8) == golden["generated_ids"][:8]


def test_a_backend_that_records_its_calls_keeps_model_forward():
    """A NumpyOps subclass overriding softmax (notebook 4 records attention this way) must see
    every call: its decoder is model.forward, which makes them."""
    from minillama.ops import NumpyOps

    class Recording(NumpyOps):
        def softmax(self, x, start_pos=None):
            return super().softmax(x, start_pos)
    p = ModelArgs(**ODD)
    model = Transformer(p, random_weights(p), Recording())
    assert model.ops.decoder(model) == model.forward


def test_bench_profile_rest_line_names_its_parts_or_the_noise():
    """What the products leave of a CpuDecoder step: Python and the elementwise work where it is
    positive; where the products alone measured slower than the whole step, the noise."""
    from minillama.bench.cpu import rest_line
    assert rest_line(0.010, 0.008).split() == ["everything", "else", "2.000", "ms", "20.0%",
                                               "(Python,", "norms,", "RoPE,", "attention,",
                                               "SwiGLU,", "the", "cache)"]
    negative = rest_line(0.010, 0.012)
    assert negative.split()[2:5] == ["-2.000", "ms", "-20.0%"] and "the machine's noise" in negative


def test_bench_profile_gives_each_product_and_the_ceiling(tmp_path):
    """`bench cpu --profile`'s lines for one step: each product with the bandwidth it read its
    weights at, what the products leave of the step, and the ceiling (the products alone, as
    ms and tokens/s: issue 13's honest ceiling, printed beside the step). No time is asserted,
    only that every part is there and the ceiling's two figures agree."""
    import re
    from minillama.bench.cpu import profile_decoder
    lines = profile_decoder("260K", 2, str(tmp_path))        # no model files: the random shape
    assert lines[0].startswith("260K: one CpuDecoder step, ")
    parts = {line.split()[0] for line in lines[1:-2]}
    assert parts == {"wqkv", "wo", "w13", "w2", "classifier"}
    assert all("GB/s of weights" in line for line in lines[1:-2])
    assert lines[-2].split()[:2] == ["everything", "else"]
    ms, rate = map(float, re.fullmatch(r"  ceiling: the products alone, ([\d.]+) ms a step, "
                                       r"([\d.]+) tokens/s with nothing else", lines[-1]).groups())
    assert ms > 0 and abs(rate * ms / 1e3 - 1) < 0.01 + 0.005 / ms    # the same time, rounded

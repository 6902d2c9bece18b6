"""The gpt-fast-style PyTorch reference of the GPU benchmark (minillama/bench/torch_compiled.py)
against minillama's NumPy model on the same weights, eager on the CPU. The compiled CUDA path
runs in `python -m minillama.bench gpu`; here Dynamo only traces the step (no GPU, no Inductor)."""
import math

import numpy as np
import pytest

from minillama.model import ModelArgs, Transformer, weight_shapes

from conftest import max_rel_err
from minillama.checkpoints.random import random_weights

torch = pytest.importorskip("torch")
from minillama.bench import torch_compiled as tc  # noqa: E402  (needs torch)

# odd sizes, GQA (6 query heads share 2 kv heads), an untied classifier
TINY = dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=100, vocab_size=97,
            max_seq_len=32, max_batch_size=2)
PROMPT, STEPS = 7, 8


def logits_side_by_side(dtype, seed=0):
    """(reference, ours) logits for a prompt of PROMPT tokens (2 rows), then STEPS single-token
    steps through both KV caches, both fed the reference's greedy tokens."""
    p = ModelArgs(**TINY)
    w = random_weights(p, seed=seed)
    ref = Transformer(p, w)
    ours = tc.Llama(p, w, dtype=dtype, device="cpu")
    ours.setup_cache(2, p.max_seq_len)
    tokens = np.random.default_rng(seed).integers(p.vocab_size, size=(2, PROMPT))
    pairs, pos = [], 0
    with torch.no_grad():
        for _ in range(STEPS + 1):
            seqlen = tokens.shape[1]
            want = ref.forward(tokens, pos)
            got = ours(torch.from_numpy(tokens), torch.arange(pos, pos + seqlen))
            pairs.append((want, got.float().numpy()))
            pos += seqlen
            tokens = want[:, -1].argmax(-1)[:, None]
    return pairs


def test_float32_matches_numpy_model():
    for want, got in logits_side_by_side(torch.float32):
        assert got.shape == want.shape
        assert max_rel_err(got, want) < 1e-4


def test_bfloat16_matches_numpy_model_to_bfloat16_precision():
    # bfloat16 keeps 8 significant bits (epsilon 2^-7); the weights, the activations, the KV
    # cache and the logits all round to it. Over 3 layers the logits land ~2-4 epsilons from
    # float32's; a wrong formula (RoPE pairs, GQA heads, a mask off by one) is off by O(1).
    for want, got in logits_side_by_side(torch.bfloat16):
        assert max_rel_err(got, want) < 8 * 2.0 ** -7


def test_decode_step_is_greedy_decoding():
    p = ModelArgs(**TINY)
    w = random_weights(p, seed=3)
    ref = Transformer(p, w)
    ours = tc.Llama(p, w, dtype=torch.float32, device="cpu")
    ours.setup_cache(2, 16)
    want = np.ones((2, 1), dtype=np.int64)
    got = torch.ones((2, 1), dtype=torch.int64)
    with torch.no_grad():
        for pos in range(10):
            want = ref.forward(want, pos)[:, -1].argmax(-1)[:, None]
            got = tc.decode_step(ours, got, torch.tensor([pos]))
            assert got.tolist() == want.tolist()


def test_decode_step_traces_as_one_graph():
    """fullgraph=True, as the benchmark compiles it: no graph break anywhere in the step, and
    the in-place cache writes survive functionalization (aot_eager). Inductor and the CUDA
    graph are the GPU's part."""
    p = ModelArgs(**TINY)
    ours = tc.Llama(p, random_weights(p, seed=4), dtype=torch.float32, device="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(tc.decode_step, backend="aot_eager", fullgraph=True)
    runs = []
    for step in (tc.decode_step, compiled):
        ours.setup_cache(2, 16)
        tokens, pos = torch.ones((2, 1), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        out = []
        with torch.no_grad(), tc.math_attention():
            for _ in range(6):
                tokens = step(ours, tokens, pos)
                out.append(tokens.clone())
                pos += 1
        runs.append(torch.cat(out, dim=1).tolist())
    torch._dynamo.reset()
    assert runs[0] == runs[1]


def test_prefill_traces_as_one_graph():
    p = ModelArgs(**TINY)
    ours = tc.Llama(p, random_weights(p, seed=5), dtype=torch.float32, device="cpu")
    tokens, pos = torch.arange(24).reshape(2, 12) % p.vocab_size, torch.arange(12)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ours.setup_cache(2, 16)
        want = ours(tokens, pos)
        ours.setup_cache(2, 16)
        got = compiled(tokens, pos)
    torch._dynamo.reset()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_weight_bytes_per_token():
    p = ModelArgs(**TINY)
    shapes = weight_shapes(p)
    params = sum(math.prod(s) for s in shapes.values())
    not_read = p.vocab_size * p.dim - p.dim          # of the embedding table, one row is read
    w = random_weights(p)
    untied = tc.Llama(p, w, torch.bfloat16, "cpu")
    assert tc.weight_bytes_per_token(untied) == 2 * (params - not_read)
    w["output.weight"] = w["tok_embeddings.weight"]   # tied: one table, read whole as classifier
    tied = tc.Llama(p, w, torch.float32, "cpu")
    assert tied.output is tied.tok_embeddings
    assert tc.weight_bytes_per_token(tied) == 4 * (params - p.vocab_size * p.dim)


def test_shapes():
    seven_b = tc.model_args("7B")
    assert sum(math.prod(s) for s in weight_shapes(seven_b).values()) == 6_738_415_616
    assert (seven_b.dim, seven_b.hidden_dim, seven_b.n_heads, seven_b.vocab_size) == \
        (4096, 11008, 32, 32000)
    assert tc.model_args("110M", 8, 512, n_layers=2).n_layers == 2
    assert {"15M", "110M"} <= set(tc.SHAPES)


def test_random_weights_are_made_on_demand():
    p = ModelArgs(**TINY)
    w = tc.RandomWeights(p, torch.bfloat16, "cpu", seed=1)
    assert set(w) == set(weight_shapes(p))
    a = w["layers.0.attention.wq.weight"]
    assert a.dtype == torch.bfloat16 and tuple(a.shape) == (p.dim, p.dim)
    assert torch.equal(a, w["layers.0.attention.wq.weight"])       # the same seed, the same
    assert abs(float(w["norm.weight"].float().mean()) - 1) < 0.1
    tc.Llama(p, w, torch.bfloat16, "cpu")


def test_measure_eager_on_the_cpu(monkeypatch):
    monkeypatch.setitem(tc.SHAPES, "tiny", TINY)
    p = ModelArgs(**TINY)
    r, reason = tc.measure("tiny", batches=(1, 2), steps=5, dtype="float32", prefill_len=9,
                           device="cpu", weights=random_weights(p), compile=False)
    assert reason is None
    assert [d["bsz"] for d in r["decode"]] == [1, 2]
    assert all(d["tokens_per_s"] > 0 and "error" not in d for d in r["decode"])
    assert r["prefill"]["seqlen"] == 9 and r["prefill"]["ms"] > 0 and r["prefill"]["compile_s"] > 0
    assert r["weight_bytes_per_token"] > 0


def test_a_failed_compile_is_reported_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no compiler\nmore lines")
    monkeypatch.setitem(tc.SHAPES, "tiny", TINY)
    monkeypatch.setattr(torch, "compile", broken)
    r, reason = tc.measure("tiny", batches=(1, 2), steps=3, dtype="float32", prefill_len=4,
                           device="cpu")
    assert reason is None
    assert [d["error"] for d in r["decode"]] == ["RuntimeError: inductor: no compiler"] * 2
    assert r["prefill"]["error"] == "RuntimeError: inductor: no compiler"


def test_unavailable_says_why(monkeypatch):
    if not torch.cuda.is_available():
        assert tc.measure("15M")[1] == f"torch {torch.__version__} sees no CUDA device"
    assert tc.measure("15M", dtype="int3", device="cpu") == \
        (None, "dtype: expected one of bfloat16, float16, float32, got 'int3'")
    monkeypatch.setattr(tc, "torch", None)
    assert tc.measure("15M") == (None, "torch is not installed")

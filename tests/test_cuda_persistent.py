"""PersistentDecoder (minillama/cuda/persistent.py, kernels/persistent.cu): a whole decode step
as one kernel, against the CPU path.

Every test needs CuPy and a GPU (the `cp` fixture skips cleanly without them). Shapes have every
width a multiple of 4 (the kernel's float4 loads) but are otherwise odd: GQA, a tied and an
untied classifier, a vocabulary that is not a multiple of the grid's warps, keys past one
block's 512 threads. Steps run at batch 1 to 8 (one kernel) and 9 (FusedDecoder's launches in the
same object), with and without CUDA graphs, after a prefill on the generic path.
"""
import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.model import ModelArgs, Transformer
from minillama.ops import CPU

gpu = pytest.mark.gpu
rng = np.random.default_rng()

SHAPES = {
    "gqa": dict(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=1001, hidden_dim=172,
                max_seq_len=40),
    "mha-long": dict(dim=96, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=517, hidden_dim=260,
                     max_seq_len=700),
}


def rel_err(got, ref):
    got = np.asarray(got.get(), dtype=np.float64)
    assert np.isfinite(got).all(), "non-finite logits: an element was not written"
    return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def models(cuda, shape, bsz, tied=False, graphs=True):
    p = ModelArgs(**SHAPES[shape], max_batch_size=bsz)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), tied=tied)
    ops = cuda.CudaOps(graphs=graphs)
    return Transformer(p, w, ops), Transformer(p, w, CPU), ops


@pytest.fixture(scope="module")
def cuda(cp):
    import minillama.cuda
    return minillama.cuda


@gpu
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_persistent_steps_match_the_cpu(cuda, cp, graphs, tied):
    gpu_model, cpu_model, ops = models(cuda, "gqa", bsz=9, tied=tied, graphs=graphs)
    forward = ops.decoder(gpu_model)
    prompt = rng.integers(0, 1001, size=(9, 5))
    forward(prompt, 0)
    cpu_model.forward(prompt, 0)
    decoder = ops._decoders[gpu_model]
    assert type(decoder).__name__ == "PersistentDecoder"
    assert not any(decoder.fits(b) for b in range(1, 10))   # dim 64: the graph, at every batch
    decoder.min_dim = 0                         # at any width, 2 to 7 rows through the kernel
    assert not decoder.fits(1) and decoder.fits(2) and decoder.fits(7) and not decoder.fits(8)
    decoder.min_rows, decoder.max_rows = 1, 8   # one and eight rows through the kernel too
    for pos, bsz in zip(range(5, 17), [1, 2, 3, 8, 9, 8, 5, 9, 1, 4, 7, 6]):
        tok = rng.integers(0, 1001, size=(bsz, 1))
        got = forward(tok, pos)
        ref = cpu_model.forward(tok, pos)
        assert got.shape == (bsz, 1, 1001)
        assert rel_err(got, ref) < 1e-4, f"pos {pos}, bsz {bsz}"
    assert decoder.launches_per_step[8] == decoder.launches_per_step[1] == 1   # one kernel
    assert decoder.launches_per_step[9] == 5 * 3 + 2         # FusedDecoder's launches
    assert (1 in decoder.graphs) == graphs


@gpu
def test_persistent_attention_past_one_block_of_keys(cuda, cp):
    """700 positions: each thread of the 512 scores more than one key, and the cache rows the
    step writes are read by other blocks in the same launch."""
    gpu_model, cpu_model, ops = models(cuda, "mha-long", bsz=2)
    forward = ops.decoder(gpu_model)
    ops._decoders[gpu_model].min_dim = 0        # two rows through the kernel at dim 96
    assert ops._decoders[gpu_model].fits(2)
    prompt = rng.integers(0, 517, size=(2, 600))
    forward(prompt, 0)
    cpu_model.forward(prompt, 0)
    for pos in range(600, 620):
        tok = rng.integers(0, 517, size=(2, 1))
        assert rel_err(forward(tok, pos), cpu_model.forward(tok, pos)) < 1e-4


@gpu
def test_persistent_step_allocates_nothing_that_grows(cuda, cp):
    gpu_model, _, ops = models(cuda, "gqa", bsz=2)
    forward = ops.decoder(gpu_model)
    ops._decoders[gpu_model].min_dim = 0        # two rows through the kernel at dim 64
    forward([[3], [5]], 0)
    forward([[4], [6]], 1)
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    for pos in range(2, 40):
        logits = forward([[int(pos)], [int(pos) + 1]], pos)
    del logits
    assert pool.used_bytes() == before


@gpu
def test_float16_cache_and_packed_weights_stay_with_fused_decoder(cuda, cp):
    from minillama.cuda import FusedDecoder, PersistentDecoder
    p = ModelArgs(**SHAPES["gqa"], max_batch_size=1)
    w = random_weights(p, seed=1)
    half_cache = Transformer(p, w, cuda.CudaOps(), kv_dtype="float16")
    assert not PersistentDecoder.covers(half_cache) and FusedDecoder.covers(half_cache)
    odd = ModelArgs(**{**SHAPES["gqa"], "hidden_dim": 170}, max_batch_size=1)
    assert not PersistentDecoder.covers(Transformer(odd, random_weights(odd), cuda.CudaOps()))

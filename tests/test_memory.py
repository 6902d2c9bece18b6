"""Memory planning: the bytes each part needs, checked against what the model really allocates,
and the refusal (with options that fit) under simulated budgets, Llama-2-7B on a 12 GB card
included. No real 7B file is needed: the plan works from the hyperparameters."""
import tracemalloc

import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.dtypes import store_weights
from minillama.errors import ArgumentError, OutOfMemoryError
from minillama.memory import (fmt_bytes, free_memory, kv_cache_bytes, plan_memory,
                              weights_bytes, working_bytes)
from minillama.model import ModelArgs, Transformer

GiB = 1 << 30
LLAMA2_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008)


def test_llama2_7b_float16_is_refused_on_a_12_gib_card_and_int8_is_offered():
    # Meta's example: --max_seq_len 128 --max_batch_size 4, on a 12 GiB GPU, 64 GiB of RAM
    plan = plan_memory(LLAMA2_7B, "float16", 128, 4, "cuda", budget=12 * GiB,
                       host_budget=64 * GiB)
    assert 12.5e9 < plan.weights < 14e9                       # ~6.7e9 parameters, 2 bytes each
    assert plan.kv_cache == 2 * 32 * 4 * 128 * 4096 * 4       # 512 MiB
    assert not plan.fits
    with pytest.raises(OutOfMemoryError) as e:
        plan.check()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"needs {fmt_bytes(plan.total)}" in msg and "12.0 GiB is free (given)" in msg
    int8 = plan_memory(LLAMA2_7B, "int8", 128, 4, "cuda", budget=12 * GiB)
    assert int8.fits and int8.total < 10 * GiB
    assert f"--dtype int8 ({fmt_bytes(int8.total)})" in msg
    assert "--device cpu" in msg                               # 64 GiB of RAM holds it
    # no shorter sequence or smaller batch helps: the weights alone exceed the card
    assert "--max_seq_len" not in msg and "--max_batch_size" not in msg
    assert plan_memory(LLAMA2_7B, "float32", 128, 4, "cpu", budget=64 * GiB).fits


def test_the_suggested_sizes_are_the_largest_that_fit():
    p = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, hidden_dim=1376)
    budget = 3 * GiB
    plan = plan_memory(p, "float32", 2048, 16, "cpu", budget=budget)
    assert not plan.fits
    seq = int(next(o for o in plan.options if o.startswith("--max_seq_len")).split()[1])
    bsz = int(next(o for o in plan.options if o.startswith("--max_batch_size")).split()[1])
    fits = lambda **kw: plan_memory(p, "float32", **{"max_seq_len": 2048, "max_batch_size": 16,
                                                      "device": "cpu", "budget": budget,
                                                      **kw}).fits
    assert fits(max_seq_len=seq) and not fits(max_seq_len=seq + 1)
    assert fits(max_batch_size=bsz) and not fits(max_batch_size=bsz + 1)
    assert not any(o.startswith("--device") for o in plan.options)   # already on the CPU


def test_combined_option_when_no_single_change_is_enough():
    # 13 GiB: int8 needs ~11.5 GiB while loading (its fused wqkv/w13 copies) and a 4 GiB cache
    plan = plan_memory(LLAMA2_7B, "float32", 4096, 1, "cpu", budget=13 * GiB)
    assert len(plan.options) == 1 and plan.options[0].startswith("--dtype int8 --max_seq_len ")
    seq = int(plan.options[0].split()[3])
    assert plan_memory(LLAMA2_7B, "int8", seq, 1, "cpu", budget=13 * GiB).fits
    hopeless = plan_memory(LLAMA2_7B, "float32", 4096, 1, "cpu", budget=1 * GiB)
    assert hopeless.options == [] and "nothing fits" in hopeless.message()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "q4_0"])
def test_planned_weights_and_cache_are_what_the_model_holds(dtype, tied):
    p = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, hidden_dim=172,
                  max_seq_len=50, max_batch_size=3)
    stored = store_weights(random_weights(p, tied=tied), dtype)
    unique = {id(w): w for w in stored.values()}
    assert weights_bytes(p, dtype, tied) == sum(w.nbytes for w in unique.values())
    model = Transformer(p, stored)
    cache = sum(layer.attention.cache_k.nbytes + layer.attention.cache_v.nbytes
                for layer in model.layers)
    assert kv_cache_bytes(p, 50, 3) == cache


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "q4_0"])
@pytest.mark.parametrize("kw, seqlen, bsz", [
    (dict(dim=64, n_heads=8, n_kv_heads=2, vocab_size=300, hidden_dim=172), 200, 2),  # attention
    (dict(dim=64, n_heads=4, n_kv_heads=4, vocab_size=5000, hidden_dim=128), 20, 3),  # logits
    (dict(dim=128, n_heads=4, n_kv_heads=1, vocab_size=100, hidden_dim=512), 64, 1),  # FFN
])
def test_working_estimate_covers_the_measured_peak(dtype, kv_dtype, kw, seqlen, bsz):
    """NumPy reports its allocations to tracemalloc: the peak of a whole-prompt forward must be
    below the estimate, and the estimate not far above it (at most 2x)."""
    p = ModelArgs(**kw, n_layers=2, max_seq_len=seqlen, max_batch_size=bsz)
    model = Transformer(p, store_weights(random_weights(p), dtype), kv_dtype=kv_dtype)
    tokens = np.random.default_rng(0).integers(0, p.vocab_size, (bsz, seqlen))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        model.forward(tokens, 0)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    estimate = working_bytes(p, dtype, seqlen, bsz, seqlen, kv_dtype)
    assert peak <= estimate <= 2 * peak


def test_load_model_refuses_before_reading_any_weight(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import json
    p = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, hidden_dim=64)
    torch.save({k: torch.from_numpy(v) for k, v in random_weights(p).items()},
               tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(dict(dim=32, n_layers=2, n_heads=4,
                                                          vocab_size=-1)))
    from minillama.loading import load_model
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("read a weight"))
    with pytest.raises(OutOfMemoryError, match=r"needs .* but 1000 B is free \(given\)"):
        load_model(tmp_path, max_seq_len=64, budget=1000)
    monkeypatch.undo()
    model = load_model(tmp_path, max_seq_len=64, budget=64 << 20)
    assert model.params.vocab_size == 50


def test_format_for_info():
    plan = plan_memory(LLAMA2_7B, "int8", 128, 4, "cuda", budget=12 * GiB)
    text = plan.format()
    assert text.splitlines()[0] == ("memory plan: cuda, --dtype int8, --max_seq_len 128, "
                                    "--max_batch_size 4")
    assert "KV cache    512.0 MiB" in text and "12.0 GiB (given): fits" in text
    bad = plan_memory(LLAMA2_7B, "float16", 128, 4, "cuda", budget=12 * GiB, host_budget=0)
    assert "DOES NOT FIT" in bad.format() and "--dtype int8" in bad.format()


def test_measured_budget_and_arguments():
    free, source = free_memory("cpu")
    assert source == "MemAvailable" and free > 0
    plan = plan_memory(LLAMA2_7B, None, 128, 1, "cpu")
    assert plan.dtype == "float32" and plan.budget == pytest.approx(free, rel=0.5)
    with pytest.raises(ArgumentError, match="device"):
        plan_memory(LLAMA2_7B, "int8", 128, 1, "tpu")
    with pytest.raises(ArgumentError, match="max_seq_len"):
        plan_memory(LLAMA2_7B, "int8", 0, 1, "cpu")
    with pytest.raises(ArgumentError, match="dtype"):
        plan_memory(LLAMA2_7B, "int4", 128, 1, "cpu")


# ----------------------------------------------------------------------------
# on the GPU: cudaMemGetInfo as the budget, and the plan against CuPy's own pool

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_gpu_plan_covers_what_the_pool_allocates(cp, dtype):
    from minillama.devices import get_ops
    p = ModelArgs(dim=256, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=2000,
                  hidden_dim=688, max_seq_len=256, max_batch_size=2)
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    before = pool.total_bytes()
    model = Transformer(p, store_weights(random_weights(p), dtype), get_ops("cuda"))
    tokens = np.random.default_rng(1).integers(0, p.vocab_size, (2, 256))
    model.forward(tokens, 0)
    cp.cuda.Device().synchronize()
    used = pool.total_bytes() - before          # the pool keeps freed blocks: about the peak
    plan = plan_memory(p, dtype, 256, 2, "cuda", budget=1 << 40, tied=False)
    assert used <= plan.total
    free, source = free_memory("cuda")
    assert source == "cudaMemGetInfo" and free > 0


@pytest.mark.gpu
def test_gpu_refusal_measures_the_card(cp, tmp_path):
    from tests.tools.writers import write_llama2c
    from minillama.loading import load_model
    p = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=300, hidden_dim=172,
                  max_seq_len=64)
    write_llama2c(tmp_path / "m.bin", p, random_weights(p, seed=2), version=1)
    with pytest.raises(OutOfMemoryError, match=r"does not fit on cuda.*\(cudaMemGetInfo\)"):
        load_model(tmp_path / "m.bin", device="cuda", max_seq_len=10 ** 7, max_batch_size=1000)
    tokens = np.array([[1, 203, 17, 261, 78]])
    for dtype in ("float16", "int8"):
        cpu = load_model(tmp_path / "m.bin", dtype=dtype)
        gpu = load_model(tmp_path / "m.bin", device="cuda", dtype=dtype)
        a, b = cpu.forward(tokens, 0), cp.asnumpy(gpu.forward(tokens, 0))
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()

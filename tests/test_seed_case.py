"""The seed case, end to end: Meta's llama-2-7b did not fit the seed's 12 GB card in float16.
The memory plan must say so before any weight is read, naming the storage that fits (int8,
q4_0); in those it must then load and decode within that budget.

The planner's side runs anywhere (CI) on a checkpoint of LazyTensors that raise if read. The
GPU side (marked gpu) builds the 7B shape from random weights made on the GPU as stored, with
the planner's budget and CuPy's pool limit both at 12 GiB; `python -m minillama.bench gpu`
prints the same case as a row (minillama/bench/gpu7b.py, seed_case).
"""
import numpy as np
import pytest

from minillama.bench.gpu7b import (DTYPES, SEED_BUDGET, SEED_SHAPE, SEED_STEPS, decode_few,
                                   params, pool_limit, release_gpu, unread_checkpoint)
from minillama.dtypes import role
from minillama.errors import OutOfMemoryError
from minillama.formats import bytes_for
from minillama.memory import fmt_bytes, plan_checkpoint
from minillama.model import weight_shapes

GiB = 1 << 30


@pytest.fixture
def llama2_7b():
    """Llama-2-7B (max_seq_len 128, batch 4, as Meta's example_text_completion.py) as a reader
    hands it over before reading: shapes, and weights that raise if anything reads them."""
    return unread_checkpoint(params(**SEED_SHAPE))


def stored_bytes(p, dtype):
    """What the model holds stored as `dtype`: linear weights (the classifier too) in their
    format, the embedding table and the norms in float32."""
    return sum(bytes_for(DTYPES[dtype], shape) if role(name) == "linear" else 4 * np.prod(shape)
               for name, shape in weight_shapes(p).items())


def test_the_seed_card_is_12_gib():
    assert SEED_BUDGET == 12 * GiB


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_llama2_7b_is_refused_on_a_12_gib_gpu_with_int8_and_q4_0_offered(llama2_7b, dtype):
    plan = plan_checkpoint(llama2_7b, dtype, "cuda", SEED_BUDGET, host_budget=8 * GiB)
    assert plan.weights > SEED_BUDGET                      # the weights alone: ~13.5 GB in 16 bits
    with pytest.raises(OutOfMemoryError) as e:
        plan.check()
    msg = str(e.value)
    assert "\n" not in msg and "12.0 GiB is free (given)" in msg
    for fits in ("int8", "q4_0"):
        total = plan_checkpoint(llama2_7b, fits, "cuda", SEED_BUDGET).total
        assert f"--dtype {fits} ({fmt_bytes(total)})" in msg
    # nothing else helps: a shorter sequence or a smaller batch leaves the weights as they are,
    # and 8 GiB of RAM cannot hold them either
    assert "--max_seq_len" not in msg and "--max_batch_size" not in msg
    assert "--device cpu" not in msg


@pytest.mark.parametrize("dtype", ["int8", "q4_0"])
def test_llama2_7b_fits_a_12_gib_gpu_in_int8_and_q4_0(llama2_7b, dtype):
    plan = plan_checkpoint(llama2_7b, dtype, "cuda", SEED_BUDGET)
    assert plan.check().fits
    # counted as stored: Q8_0 34 bytes and Q4_0 18 bytes per block of 32, ~7.5 and ~4.3 GB
    assert plan.weights == stored_bytes(llama2_7b.params, dtype)


# ----------------------------------------------------------------------------
# on the GPU

@pytest.mark.gpu
def test_llama2_7b_decodes_within_12_gib_in_int8_and_q4_0(cp, llama2_7b):
    p = llama2_7b.params
    with pool_limit(SEED_BUDGET) as pool:
        with pytest.raises(OutOfMemoryError, match="--dtype int8 .*--dtype q4_0 "):
            plan_checkpoint(llama2_7b, "float16", "cuda", SEED_BUDGET).check()
        for dtype in ("int8", "q4_0"):
            plan_checkpoint(llama2_7b, dtype, "cuda", SEED_BUDGET).check()
            r = decode_few(p, dtype, SEED_STEPS)              # CuPy raises past the limit
            tokens = np.array(r["tokens"])
            assert tokens.shape == (p.max_batch_size, SEED_STEPS)
            assert ((0 <= tokens) & (tokens < p.vocab_size)).all() and r["finite"]
            assert r["peak_used"] < SEED_BUDGET and pool.total_bytes() <= SEED_BUDGET
            release_gpu()

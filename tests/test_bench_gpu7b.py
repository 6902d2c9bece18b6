"""The arithmetic of the 7B section of `python -m minillama.bench gpu` (minillama/bench/gpu7b.py)
that needs no GPU: what a decode step reads, counted from the model, against the memory plan's
count from the hyperparameters."""
import pytest

from minillama.bench.gpu7b import bytes_per_step, stored_weights
from minillama.checkpoints.random import random_weights
from minillama.memory import kv_cache_bytes, weights_bytes
from minillama.model import ModelArgs, Transformer

P = ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, hidden_dim=160,
              max_seq_len=40, max_batch_size=4)


@pytest.mark.parametrize("bsz, steps", [(1, 1), (1, 32), (4, 7)])
def test_a_step_reads_the_weights_once_and_per_row_one_embedding_row_and_the_cache(bsz, steps):
    model = Transformer(P, random_weights(P))               # untied: the classifier is read too
    table = 4 * P.vocab_size * P.dim
    assert sum(w.nbytes for w in stored_weights(model)) == weights_bytes(P, "float32") - table
    one_position = kv_cache_bytes(P, 1, 1)                  # k and v of one position, all layers
    per_row = 4 * P.dim + one_position * (steps + 1) / 2    # positions 0..steps-1 read 1..steps
    assert bytes_per_step(model, bsz, steps) == weights_bytes(P, "float32") - table + bsz * per_row

"""Shared test helpers: the real files in ../shared, small model shapes, greedy decoding.

Random weights are minillama.checkpoints.random.random_weights; the writers of test files and
the fuzzer and soak test are in tests/tools/.
"""
import os

import numpy as np
import pytest

from minillama.model import ModelArgs
from tests.tools import MODELS, SHARED

GOLDEN = SHARED / "golden" / "llama2c_run.json"


def require_shared():
    """The real files live in ../shared beside the checkout. CI always has them (so a missing
    folder fails there); a developer without them gets a skip that says where to put them."""
    if not MODELS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED} is missing: CI must have ../shared beside the checkout")
        pytest.skip(f"needs the model files in {SHARED}")
    return SHARED


@pytest.fixture
def shared():
    return require_shared()


# odd sizes on purpose: 5 heads of 6 over dim 30 isn't GQA; 6 heads sharing 2 kv heads is.
ODD = dict(dim=36, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=97, hidden_dim=70,
           max_seq_len=40, max_batch_size=3)


@pytest.fixture
def odd_args():
    return ModelArgs(**ODD)


def greedy(forward, prompt, steps):
    """Greedy ids after `prompt`: the prompt in one forward, then one token per call through
    the KV cache. forward(tokens (1, seqlen), start_pos) -> logits (1, seqlen, vocab)."""
    ids = list(prompt)
    logits = forward(np.array([ids]), 0)
    for _ in range(steps):
        ids.append(int(np.argmax(logits[0, -1])))
        logits = forward(np.array([ids[-1:]]), len(ids) - 1)
    return ids[len(prompt):]


def max_rel_err(a, b):
    """Largest absolute difference, relative to the reference's largest magnitude."""
    return float(np.abs(a - b).max() / np.abs(b).max())


class StubTokenizer:
    """Just the ids generate() needs, for tests that feed token ids directly."""
    def __init__(self, eos_id=2, bos_id=1, pad_id=-1):
        self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, pad_id
        self.stop_tokens = [eos_id]

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def cp():
    """cupy, for the tests marked gpu; a clean skip where there is no CuPy or no GPU."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:                            # no driver
        pytest.skip(f"CuPy finds no usable GPU: {e}")
    if count < 1:
        pytest.skip("CuPy finds no GPU")
    return cupy


# ----------------------------------------------------------------------------
# transformers' LlamaForCausalLM as the reference (torch imported by the tests that use these)

def spread_weights(model):
    """Weights of a random LlamaForCausalLM large enough for distinct logits (its default
    init, std 0.02, gives nearly uniform ones, where greedy ties would prove nothing): norms
    near 1, matrices N(0, 1/in). -> the model, in eval mode."""
    import torch
    with torch.no_grad():
        for prm in model.parameters():
            if prm.ndim == 1:
                prm.copy_(1 + 0.1 * torch.randn_like(prm))
            else:
                prm.copy_(torch.randn_like(prm) / prm.shape[1] ** 0.5)
    return model.eval()


def hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def hf_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(hf_logits(model, [ids])[0, -1].argmax()))
    return ids[len(prompt):]

"""Samplers: llama2.c's (bit-exact against the golden runs) and Meta's sample_top_p."""
import json

import numpy as np
import pytest

from minillama.errors import ArgumentError
from minillama.loading import load_model
from minillama.run import next_logits
from minillama.sampler import Llama2cSampler, random_u32, sample_top_p

from conftest import GOLDEN


def xorshift_reference(state, n):
    """xorshift64* written out with explicit 64-bit wrap-around, one shift at a time."""
    out = []
    for _ in range(n):
        state = (state ^ (state >> 12)) % 2**64
        state = (state ^ (state * 2**25)) % 2**64
        state = (state ^ (state >> 27)) % 2**64
        out.append((state * 0x2545F4914F6CDD1D % 2**64) // 2**32)
    return out


def test_random_u32_is_xorshift64_star():
    state, got = 133742, []
    for _ in range(5):
        state, bits = random_u32(state)
        got.append(bits)
    assert got == xorshift_reference(133742, 5)
    assert all(0 <= b < 2**32 for b in got)


@pytest.mark.parametrize("case", [0, 1])
def test_golden_generations_token_for_token(shared, case):
    """stories260K greedy and seeded top-p: the ids llama2.c's run generated."""
    golden = json.loads(GOLDEN.read_text())["generation"][case]
    model = load_model(shared / "models" / golden["model"])
    sampler = Llama2cSampler(512, golden["temperature"], golden["topp"], golden["seed"])
    token, out, forward = 1, [], model.ops.decoder(model)
    for pos in range(golden["steps"]):
        token = sampler.sample(next_logits(forward, model, token, pos))
        out.append(token)
        if token == 1:
            break
    assert out == golden["generated_ids"]


def test_temperature_zero_is_argmax_first_maximum():
    s = Llama2cSampler(4, temperature=0.0, topp=0.9, rng_seed=1)
    assert s.sample(np.array([0.5, 2.0, 2.0, -1.0], np.float32)) == 1
    assert s.rng_state == 1                                  # greedy draws no random number


def test_topp_never_samples_outside_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    s = Llama2cSampler(4, temperature=1.0, topp=0.7, rng_seed=42)
    seen = {s.sample(logits) for _ in range(400)}
    assert seen == {0, 1}                                    # 0.5 + 0.3 > 0.7: the nucleus


def test_multinomial_frequencies_follow_the_probabilities():
    probs = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    s = Llama2cSampler(4, temperature=1.0, topp=1.0, rng_seed=7)
    draws = np.bincount([s.sample(np.log(probs)) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(draws, probs, atol=0.015)


@pytest.mark.parametrize("t,p,match", [(-1.0, 0.9, "temperature"), (float("nan"), 0.9, "temperature"),
                                       (1.0, 0.0, "top_p"), (1.0, 1.01, "top_p")])
def test_sampler_arguments(t, p, match):
    with pytest.raises(ArgumentError, match=match):
        Llama2cSampler(10, t, p, 1)


def test_sample_top_p_masks_and_renormalises():
    rng = np.random.default_rng(0)
    probs = np.array([[0.05, 0.6, 0.25, 0.1], [0.25, 0.25, 0.25, 0.25]])
    draws = np.stack([sample_top_p(probs, 0.8, rng) for _ in range(4000)])
    # row 0: sorted 0.6, 0.25 (mass before 0.25 is 0.6 <= 0.8), 0.1 (before: 0.85 > 0.8) dropped
    assert set(draws[:, 0]) == {1, 2}
    np.testing.assert_allclose(np.mean(draws[:, 0] == 1), 0.6 / 0.85, atol=0.03)
    assert set(draws[:, 1]) == {0, 1, 2, 3}

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


@pytest.mark.parametrize("topp", [0.9, 1.0])                   # top-p, and plain multinomial
@pytest.mark.parametrize("t", [1e-38, 1e-44])
def test_a_tiny_temperature_is_the_limit_t_to_0_greedy(t, topp):
    """7 / 1e-38 overflows float32; softmax then took inf - inf = NaN and sampled garbage (or
    failed, IndexError). The limit T -> 0 is greedy: the first maximum, every time."""
    s = Llama2cSampler(4, temperature=t, topp=topp, rng_seed=3)
    logits = np.array([0.5, 7.0, 7.0, -1.0], np.float32)
    assert [s.sample(logits) for _ in range(50)] == [1] * 50


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


def meta_sample_top_p(probs, p, rng):
    """Meta's sample_top_p as written, the whole vocabulary sorted: sample_top_p with its order
    taken from np.argsort(-probs, kind="stable") instead of nucleus_order."""
    from unittest import mock
    from minillama import sampler
    with mock.patch.object(sampler, "nucleus_order",
                           lambda row, p: np.argsort(-row, kind="stable")):
        return sampler.sample_top_p(probs, p, rng)


def softmax_rows(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("vocab", [300, 2049, 32000, 50021])
@pytest.mark.parametrize("spread", [0.0, 0.5, 3.0, 12.0])        # flat .. peaked
@pytest.mark.parametrize("p", [0.5, 0.9, 0.95, 0.999, 1.0])
def test_sample_top_p_draws_what_metas_whole_sort_draws(vocab, spread, p):
    """The candidates sorted first (nucleus_order) give the token Meta's whole sort gives, for
    the same draws: flat distributions (every token tied, or nearly: the whole-sort fallback),
    peaked ones, p near 1, ties from logits rounded to a few values, odd vocabularies."""
    data = np.random.default_rng(vocab * 7 + int(spread * 10) + int(p * 1000))
    logits = data.standard_normal((3, vocab)) * spread
    logits[1] = np.round(logits[1])                     # many exact ties among the likely
    probs = softmax_rows(logits)
    seed = int(data.integers(1 << 30))
    ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(20):
        np.testing.assert_array_equal(sample_top_p(probs, p, ours),
                                      meta_sample_top_p(probs, p, theirs))


def test_nucleus_order_sorts_only_the_candidates_where_their_mass_passes_p():
    from minillama.sampler import nucleus_order
    row = softmax_rows(np.random.default_rng(1).standard_normal((1, 32000)) * 8)[0]
    order = nucleus_order(row, 0.9)
    full = np.argsort(-row, kind="stable")
    m = int(np.sum(row >= np.sort(row)[-1024]))          # the first candidates: 1024, no ties
    assert m == 1024 and row[full[:m]].sum() > 0.9
    np.testing.assert_array_equal(order[:m], full[:m])   # the same first m
    np.testing.assert_array_equal(order[m:], np.sort(full[m:]))   # the rest by id
    assert not np.array_equal(order, full)
    # too little mass among the first 1024, enough among 8192: the more
    flat = softmax_rows(np.random.default_rng(2).standard_normal((1, 32000)) * 3)[0]
    order, full = nucleus_order(flat, 0.9), np.argsort(-flat, kind="stable")
    assert flat[full[:1024]].sum() < 0.9 < flat[full[:8192]].sum()
    np.testing.assert_array_equal(order[:8192], full[:8192])
    np.testing.assert_array_equal(order[8192:], np.sort(full[8192:]))
    # too little among them all (p = 1 keeps every token): the whole sort
    np.testing.assert_array_equal(nucleus_order(row, 1.0), np.argsort(-row, kind="stable"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_descending_is_the_stable_sort_of_minus_the_values(dtype):
    """The keyed sort (float32) and the stable sort (any other) against np.argsort(-v, stable):
    ties (exact repeats, zeros), the smallest and largest positive floats, odd lengths."""
    from minillama.sampler import descending
    data = np.random.default_rng(5)
    for n in (1, 2, 7, 1000, 32001):
        v = data.random(n).astype(dtype) * 1e-3
        v[data.integers(n, size=n // 3)] = v[0]                     # repeats of one value
        v[data.integers(n, size=n // 5)] = 0.0
        v[-1] = np.finfo(dtype).tiny if n > 3 else v[-1]
        v[n // 2] = np.finfo(dtype).max
        got = descending(v)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.argsort(-v, kind="stable"))
        for odd in (-0.0, np.nan):                  # bits that do not order as the values
            w = v.copy()
            w[data.integers(n, size=max(1, n // 7))] = odd
            np.testing.assert_array_equal(descending(w), np.argsort(-w, kind="stable"))

"""Meta's generate(): batching with padding, eos, echo, logprobs, seeds, and argument checks."""
import types

import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.errors import ArgumentError, GenerationError
from minillama.generation import AHEAD, Llama, cross_entropy
from minillama.model import ModelArgs, Transformer
from minillama.tokenizers import Llama2Chat

from conftest import ODD, StubTokenizer


def make_llama(seed=0, eos_id=2, **overrides):
    p = ModelArgs(**dict(ODD, **overrides))
    # large weights make greedy choices far from ties, so batched == alone is exact
    return Llama(Transformer(p, random_weights(p, seed=seed, scale=0.5)),
                 StubTokenizer(eos_id=eos_id), seed=seed)


def greedy_alone(seed, prompt, max_gen_len, eos_id=2):
    return make_llama(seed, eos_id=eos_id).generate([prompt], max_gen_len, temperature=0)[0][0]


def test_batched_padded_prompts_equal_each_alone():
    rng = np.random.default_rng()
    prompts = [list(rng.integers(3, 97, n)) for n in (1, 7, 4)]
    # an eos that never occurs, so every row generates all 9 tokens (eos is tested below)
    gen, _ = make_llama(5, eos_id=-7).generate(prompts, max_gen_len=9, temperature=0)
    for prompt, got in zip(prompts, gen):
        assert got == greedy_alone(5, prompt, 9, eos_id=-7)
        assert len(got) == 9


def test_output_is_cut_at_eos_and_generation_stops(monkeypatch):
    prompt = [5, 6, 7]
    free = greedy_alone(1, prompt, 12, eos_id=-7)          # an eos that never occurs
    eos = free[3]                                            # make the 4th token the eos
    llama = make_llama(1, eos_id=eos)
    calls = []
    decoder = type(llama.model.ops).decoder                 # the forward generate calls

    def counted(ops, model):
        forward = decoder(ops, model)
        return lambda t, s: calls.append(s) or forward(t, s)
    monkeypatch.setattr(type(llama.model.ops), "decoder", counted)
    out, _ = llama.generate([prompt], 12, temperature=0)
    assert out[0] == free[:free.index(eos)]
    assert len(calls) == free.index(eos) + 1               # stopped right after the eos


def test_eos_in_the_prompt_does_not_stop_generation():
    prompt = [5, 2, 7]                                       # contains eos_id=2
    out, _ = make_llama(2).generate([prompt, [9]], 5, temperature=0, echo=True)
    assert out[0][:1] == [5]                                 # echo is cut at the prompt's eos...
    gen, _ = make_llama(2).generate([prompt, [9]], 5, temperature=0)
    assert len(gen[1]) > 0                                   # ...and the batch still generated


def test_echo_returns_prompt_then_generation():
    prompt = [4, 8, 15, 16]
    gen = greedy_alone(3, prompt, 6, eos_id=-7)
    out, _ = make_llama(3, eos_id=-7).generate([prompt], 6, temperature=0, echo=True)
    assert out[0] == prompt + gen


def test_logprobs_equal_log_softmax_of_a_full_forward():
    llama = make_llama(4, eos_id=-7)
    prompts = [[3, 9, 27], [5, 25]]
    gen, lps = llama.generate(prompts, 5, temperature=0, logprobs=True, echo=True)
    fresh = Transformer(llama.model.params, random_weights(llama.model.params, seed=4, scale=0.5))
    for toks, lp in zip(gen, lps):
        logits = fresh.forward(np.array([toks]), 0)[0]                       # (T, vocab)
        logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        want = [0.0] + [logsm[i, toks[i + 1]] for i in range(len(toks) - 1)]
        np.testing.assert_allclose(lp, want, rtol=1e-4, atol=1e-5)


def test_cross_entropy_ignores_pad():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]], np.float32))
    ce = cross_entropy(logits, np.array([[0, -1]]), ignore_index=-1)
    np.testing.assert_allclose(ce, [[np.log(2), 0.0]], rtol=1e-6)


class NumpyOnDevice:
    """A stand-in GPU's array module (not numpy itself): generate's greedy step then takes its
    device branch (the argmax where the logits are, only ids and flags copied back)."""


def greedy_pick(last):
    """kernels.greedy_pick's contract in NumPy: (2 bsz,) int32, the ids, then a flag per row,
    1 where a logit is not finite."""
    return np.concatenate((np.argmax(last, axis=-1), ~np.isfinite(last).all(axis=1))).astype(np.int32)


def on_device(model, forward=None):
    """The model as generate sees it, its ops claiming a device (NumpyOnDevice, greedy_pick)."""
    ops = types.SimpleNamespace(xp=NumpyOnDevice, decoder=lambda m: m.forward,
                                greedy_pick=greedy_pick)
    return types.SimpleNamespace(params=model.params, ops=ops, forward=forward or model.forward)


def test_greedy_on_the_device_picks_the_hosts_tokens():
    rng = np.random.default_rng()
    prompts = [list(rng.integers(3, 97, n)) for n in (1, 7, 4)]
    host = make_llama(4, eos_id=-7)
    want, _ = host.generate(prompts, max_gen_len=9, temperature=0)
    device = make_llama(4, eos_id=-7)
    device.model = on_device(device.model)
    assert device.generate(prompts, max_gen_len=9, temperature=0)[0] == want


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_greedy_on_the_device_still_refuses_non_finite_logits(bad):
    llama = make_llama(4)
    forward = llama.model.forward

    def poisoned(tokens, start_pos):
        logits = forward(tokens, start_pos)
        logits[0, -1, 5] = bad                  # one value, not the row's maximum
        return logits
    llama.model = on_device(llama.model, poisoned)
    with pytest.raises(GenerationError, match="NaN" if np.isnan(bad) else "infinity"):
        llama.generate([[5, 6]], max_gen_len=3, temperature=0)


def with_greedy_steps(model, calls, poison=None, poison_from=2, poison_to=None,
                      forward_steps=False, forward_poisoned=True):
    """The model as generate sees it on a GPU whose decoder has greedy_steps (FusedDecoder's:
    the picks inside the steps' graph), here in NumPy; calls records the calls it served.
    poison: a value put into logit 5 of row 0 of the logits at the positions poison_from ..
    poison_to (None: on to the end), by greedy_steps, and by forward too where
    forward_poisoned (as a NaN in the weights would be). forward_steps: forward may serve
    steps too (else it refuses them: greedy_steps' to serve; a step made again to say where a
    flag came from is forward's)."""
    def logits(tokens, start_pos, poisoned=True):
        out = model.forward(np.asarray(tokens), start_pos)
        at = start_pos + out.shape[1] - 1
        if poison is not None and poisoned and poison_from <= at <= (poison_to or at):
            out[0, -1, 5] = poison
        return out

    def greedy_steps(tokens, start_pos, n, then=0):
        calls.append((np.shape(tokens), start_pos, n, then))
        backs = []
        for _ in range(n):
            last = logits(tokens, start_pos)[:, -1]
            backs.append(greedy_pick(last))
            start_pos, tokens = start_pos + np.shape(tokens)[1], backs[-1][:len(last), None]
        # with steps queued behind, the GPU's last logits are theirs by the time they are read
        return np.stack(backs), (None if then else last)

    def forward(tokens, start_pos):
        assert forward_steps, "greedy_steps' step went to forward"
        return logits(tokens, start_pos, forward_poisoned)
    forward.greedy_steps = greedy_steps
    device = on_device(model)
    device.ops.decoder = lambda m: forward
    return device


@pytest.mark.parametrize("shortest", [1, 2])
def test_greedy_takes_the_decoders_greedy_steps_for_every_step(shortest):
    """Every step of a greedy generate goes to the decoder's greedy_steps, the prompt's first
    columns too (shortest prompt 2: a step of 2 tokens a row, then one token a row), one step
    a call while a row has prompt left, then AHEAD a call, and what is left in the last; once
    no row has prompt left, each call asks for the next one's steps to be queued behind it."""
    rng = np.random.default_rng()
    prompts = [list(rng.integers(3, 97, n)) for n in (shortest, 7, 4)]
    want, _ = make_llama(4, eos_id=-7).generate(prompts, max_gen_len=12, temperature=0)
    llama, calls = make_llama(4, eos_id=-7), []
    llama.model = with_greedy_steps(llama.model, calls)
    assert llama.generate(prompts, max_gen_len=12, temperature=0)[0] == want
    assert AHEAD == 8                      # total_len 19: positions 7 .. 14, then the last 4
    assert calls == ([((3, shortest), 0, 1, 0)]
                     + [((3, 1), pos, 1, 0) for pos in range(shortest, 6)]
                     + [((3, 1), 6, 8, 4), ((3, 1), 14, 4, 0)])


def test_greedy_steps_ahead_stop_at_eos_as_one_at_a_time():
    """Steps taken ahead past a row's eos change nothing: the output is cut at the eos, and
    generation stops at the step where every row has reached it."""
    prompt = [5, 6, 7]
    free = greedy_alone(1, prompt, 30, eos_id=-7)          # an eos that never occurs
    eos = free[11]                                           # the 12th token is the eos
    llama, calls = make_llama(1, eos_id=eos), []
    llama.model = with_greedy_steps(llama.model, calls)
    out, _ = llama.generate([prompt], 30, temperature=0)
    assert out[0] == free[:free.index(eos)]
    # the prompt's step and 7 more, then 8 from position 10: the eos (position 14) in the
    # second, whose 8 queued steps (from position 18) nobody takes
    assert calls == [((1, 3), 0, 8, 8), ((1, 1), 10, 8, 8)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("max_gen_len", [3, 12])
def test_greedy_steps_refuse_non_finite_logits(bad, max_gen_len):
    """A flag at position 2: where it is its call's last step (max_gen_len 3: one call of 3,
    nothing queued behind it), check_finite on the call's logits; where it is not (12: a call
    of AHEAD), on the step made again by forward."""
    llama, calls = make_llama(4), []
    llama.model = with_greedy_steps(llama.model, calls, poison=bad, forward_steps=True)
    with pytest.raises(GenerationError, match="NaN" if np.isnan(bad) else "infinity"):
        llama.generate([[5]], max_gen_len=max_gen_len, temperature=0)
    assert [n for _, _, n, _ in calls] == ([3] if max_gen_len == 3 else [8])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("at", [2, 7])
def test_greedy_steps_say_where_a_flag_inside_a_call_came_from(bad, at):
    """Logits not finite at one position only, in a call of AHEAD steps with steps queued
    behind it: the third step (at 2), or the last (at 7), whose logits the queued steps wrote
    over (greedy_steps gives None for them). The step is made again through forward and
    check_finite names the position; where the step made again is finite (the GPU gave two
    answers), one line says so."""
    llama, calls = make_llama(4), []
    llama.model = with_greedy_steps(llama.model, calls, poison=bad, poison_from=at,
                                    poison_to=at, forward_steps=True)
    with pytest.raises(GenerationError, match=rf"at positions {at}\.\.{at}"):
        llama.generate([[5]], max_gen_len=12, temperature=0)
    llama, calls = make_llama(4), []
    llama.model = with_greedy_steps(llama.model, calls, poison=bad, poison_from=at,
                                    poison_to=at, forward_steps=True, forward_poisoned=False)
    with pytest.raises(GenerationError, match=f"at position {at} held a value that is not "
                                              "finite, and not when made again"):
        llama.generate([[5]], max_gen_len=12, temperature=0)
    assert calls == [((1, 1), 0, 8, 4)]


def test_greedy_steps_past_the_last_eos_raise_nothing():
    """Logits that turn NaN only after every row has reached eos, inside a call of AHEAD steps:
    the loop stops at the eos and never takes those steps, so nothing is raised, as in a loop
    of one step a call."""
    prompt = [5, 6, 7]
    free = greedy_alone(1, prompt, 30, eos_id=-7)
    eos = free[4]                  # the token at position 7, from the logits at 6: step 4 of 8
    llama, calls = make_llama(1, eos_id=eos), []
    llama.model = with_greedy_steps(llama.model, calls, poison=np.nan, poison_from=8)
    out, _ = llama.generate([prompt], 30, temperature=0)
    assert out[0] == free[:free.index(eos)]
    assert calls == [((1, 3), 0, 8, 8)]


def test_sampling_and_logprobs_never_take_greedy_steps():
    for kwargs in ({"temperature": 0.8}, {"temperature": 0, "logprobs": True}):
        llama, calls = make_llama(4), []
        llama.model = with_greedy_steps(llama.model, calls, forward_steps=True)
        assert len(llama.generate([[5, 6]], max_gen_len=4, **kwargs)[0][0]) == 4
        assert calls == []


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    prompts = [[3, 4], [5]]
    a = make_llama(6).generate(prompts, 8, temperature=1.0, top_p=0.95)[0]
    b = make_llama(6).generate(prompts, 8, temperature=1.0, top_p=0.95)[0]
    assert a == b
    llama = make_llama(6)
    draws = {tuple(map(tuple, llama.generate(prompts, 8, temperature=1.0)[0])) for _ in range(4)}
    assert len(draws) > 1


def test_a_tiny_temperature_generates_what_greedy_generates():
    """logits / 1e-40 overflow float32 (garbage tokens, before): the limit T -> 0, greedy."""
    prompts = [[3, 4], [5]]
    want = make_llama(6).generate(prompts, 8, temperature=0)[0]
    assert make_llama(6).generate(prompts, 8, temperature=1e-40)[0] == want


def test_total_len_is_capped_by_max_seq_len():
    llama = make_llama(7, eos_id=-7)
    prompt = list(range(3, 3 + ODD["max_seq_len"] - 2))
    out, _ = llama.generate([prompt], max_gen_len=50, temperature=0)
    assert len(out[0]) == 2                                    # only two positions were left


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_gen_len=-1), "max_gen_len"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(prompt_tokens=[[1, 2]], max_gen_len=4)
    args.update(kwargs)
    with pytest.raises(ArgumentError, match=match):
        make_llama().generate(**args)


def test_batch_and_prompt_limits():
    llama = make_llama()
    with pytest.raises(ArgumentError, match=r"prompts: got 4, expected 1 to max_batch_size \(3\)"):
        llama.generate([[1]] * 4, 2)
    with pytest.raises(ArgumentError, match=r"prompt 0: 41 tokens is longer than max_seq_len \(40\)"):
        llama.generate([[1] * 41], 2)
    with pytest.raises(ArgumentError, match="prompt 1: is empty"):
        llama.generate([[1], []], 2)


class CharTokenizer(StubTokenizer):
    def encode(self, s, bos, eos):
        return [1] * bos + [ord(c) for c in s] + [2] * eos


def test_llama2_chat_format():
    tok = CharTokenizer()
    dialog = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": " Hi "},
              {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye"}]
    ids = Llama2Chat().encode_dialog(tok, dialog)
    # strip() applies to the merged system + user text, so the user's leading space stays
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello. "
    assert ids == [1] + [ord(c) for c in first] + [2, 1] + [ord(c) for c in "[INST] Bye [/INST]"]
    with pytest.raises(ArgumentError, match="ending with 'user'"):
        Llama2Chat().encode_dialog(tok, dialog[:3])

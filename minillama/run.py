"""llama2.c's `run` program: its generate() and chat() loops, token by token.

Differences from Meta's generate() worth knowing (docs/generate.md has the full story):
- one token per forward call, prompt included, exactly as run.c does;
- `steps` counts the prompt's tokens too, and is capped at the model's seq_len;
- generation stops early when the model samples BOS (id 1), not EOS;
- pieces are printed through llama2.c's filter, which drops lone unprintable bytes, so the
  output is byte-identical to llama2.c's.
"""
import sys
import time

import numpy as np

from .errors import ArgumentError
from .ops import to_host

SYSTEM_TEMPLATE = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
USER_TEMPLATE = "[INST] {user} [/INST]"


def safe_piece(piece: bytes) -> bytes:
    """llama2.c's safe_printf filter: a piece that is one byte must be printable or space."""
    if len(piece) == 1 and not (0x20 <= piece[0] <= 0x7E or piece[0] in b"\t\n\v\f\r"):
        return b""
    return piece


def check_steps(steps, seq_len):
    """llama2.c caps steps at the model's context; 0 or fewer is an error here."""
    if not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ArgumentError(f"steps (-n): expected an integer > 0, got {steps!r}")
    return min(steps, seq_len)


def next_logits(model, token, pos):
    """Logits for one token at one position: (vocab_size,) on the host."""
    return to_host(model.forward(np.array([[token]]), pos)[0, -1])


def generate(model, tokenizer, sampler, prompt, steps, out=None, err=None):
    """llama2.c's generate(): stream a continuation of `prompt`; return the generated ids."""
    out = out or sys.stdout.buffer
    err = err or sys.stderr
    steps = check_steps(steps, model.params.max_seq_len)
    prompt_tokens = tokenizer.encode(prompt or "", bos=True, eos=False)
    if len(prompt_tokens) > steps:
        raise ArgumentError(f"prompt (-i): {len(prompt_tokens)} tokens do not fit in "
                            f"{steps} steps (-n)")
    start = None
    token, pos, generated = prompt_tokens[0], 0, []
    while pos < steps:
        logits = next_logits(model, token, pos)
        if pos < len(prompt_tokens) - 1:
            next_token = prompt_tokens[pos + 1]          # still forcing the prompt
        else:
            next_token = sampler.sample(logits)
            generated.append(next_token)
        pos += 1
        if next_token == tokenizer.bos_id:               # BOS marks the end of a story
            break
        out.write(safe_piece(tokenizer.decode_piece(token, next_token)))
        out.flush()
        token = next_token
        if start is None:
            start = time.perf_counter()                  # timing starts after the first token
    out.write(b"\n")
    out.flush()
    if pos > 1 and start is not None:
        elapsed = max(time.perf_counter() - start, 1e-9)
        print(f"achieved tok/s: {(pos - 1) / elapsed:f}", file=err)
    return generated


def read_line(prompt, inp, out):
    """Show `prompt`, read one line; None at end of input."""
    out.write(prompt.encode())
    out.flush()
    line = inp.readline()
    return None if line == "" else line.rstrip("\n")


def render_llama2(system, user, first_turn):
    if first_turn and system:
        return SYSTEM_TEMPLATE.format(system=system, user=user)
    return USER_TEMPLATE.format(user=user)


def chat(model, tokenizer, sampler, user_prompt, system_prompt, steps, inp=None, out=None,
         render=render_llama2):
    """llama2.c's chat(): alternate user turns (from -i, then stdin) and assistant replies,
    until `steps` positions are used or the input ends."""
    inp = inp or sys.stdin
    out = out or sys.stdout.buffer
    steps = check_steps(steps, model.params.max_seq_len)
    render = getattr(tokenizer, "render_chat_turn", render)
    eos = tokenizer.eos_id
    user_turn, pos, next_token = True, 0, None
    prompt_tokens, user_idx, system = [], 0, system_prompt
    while pos < steps:
        if user_turn:
            if pos == 0 and system is None:
                system = read_line("Enter system prompt (optional): ", inp, out) or ""
            if pos == 0 and user_prompt:
                user = user_prompt
            else:
                user = read_line("User: ", inp, out)
            if user is None:                              # end of input: a clean goodbye
                break
            prompt_tokens = tokenizer.encode(render(system, user, pos == 0), bos=True, eos=False)
            user_idx, user_turn = 0, False
            out.write(b"Assistant: ")
        if user_idx < len(prompt_tokens):
            token = prompt_tokens[user_idx]
            user_idx += 1
        else:
            token = next_token
            if token == eos:        # a sampled EOS ends the assistant's turn (not one in the
                user_turn = True    # prompt: ChatML closes every message with EOS, <|im_end|>)
        next_token = sampler.sample(next_logits(model, token, pos))
        pos += 1
        if user_idx >= len(prompt_tokens) and next_token != eos:
            out.write(safe_piece(tokenizer.decode_piece(token, next_token)))
            out.flush()
        if next_token == eos:
            out.write(b"\n")
    out.write(b"\n")
    out.flush()

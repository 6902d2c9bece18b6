"""llama2.c's `run` program: its generate() and chat() loops, token by token.

Differences from Meta's generate() worth knowing (docs/generate.md has the full story):
- one token per forward call, prompt included, exactly as run.c does;
- `steps` counts the prompt's tokens too, and is capped at the model's seq_len;
- generation stops early when the model samples BOS (id 1), not EOS;
- exact=True computes the logits in llama2.c's own order of operations (exact.ExactDecoder),
  so that a sampled run is run.c's (or runq.c's), token for token; by default the model's
  faster forward, whose logits differ from run.c's in the last bits;
- with llama2.c's tokenizer.bin, pieces are printed through llama2.c's filter, which drops
  lone unprintable bytes, so the output is byte-identical to llama2.c's. Other tokenizers
  (SentencePiece .model, a GGUF's byte-level BPE) print text through a StreamDecoder instead:
  a character split over byte tokens waits until it is whole, and nothing is dropped.
"""
import sys
import time

import numpy as np

from .checks import check_finite
from .errors import ArgumentError, check_positive_int
from .exact import decoder
from .ops import to_host
from .tokenizers.llama2c import Llama2cTokenizer
from .tokenizers.stream import StreamDecoder


def safe_piece(piece: bytes) -> bytes:
    """llama2.c's safe_printf filter: a piece that is one byte must be printable or space."""
    if len(piece) == 1 and not (0x20 <= piece[0] <= 0x7E or piece[0] in b"\t\n\v\f\r"):
        return b""
    return piece


class PieceWriter:
    """Prints each generated token as it comes (see the module docstring for the two ways).
    at_start: the first token printed starts the text (generate), or continues it (chat)."""

    def __init__(self, tokenizer, out, at_start=True):
        self.tokenizer, self.out = tokenizer, out
        self.stream = None if isinstance(tokenizer, Llama2cTokenizer) else \
            StreamDecoder(tokenizer, at_start)

    def write(self, prev_token, token):
        if self.stream is None:         # llama2.c: decode(prev, token), then safe_printf
            data = safe_piece(self.tokenizer.decode_piece(prev_token, token))
        else:                           # whole characters only; bad bytes become U+FFFD
            data = self.stream.feed(token).encode("utf-8")
        self.out.write(data)
        self.out.flush()

    def finish(self):
        """Print what a stream still holds: an unfinished character, as U+FFFDs."""
        if self.stream is not None:
            self.out.write(self.stream.flush().encode("utf-8"))


def check_steps(steps, seq_len):
    """llama2.c caps steps at the model's context; 0 or fewer is an error here."""
    return min(check_positive_int("steps (-n)", steps), seq_len)


def next_logits(forward, model, token, pos):
    """Logits for one token at one position: (vocab_size,) on the host, checked to be finite
    (a NaN would otherwise sample token 0 forever, silently). forward: exact.decoder(model, exact)."""
    tokens = np.array([[token]])
    logits = to_host(forward(tokens, pos)[0, -1])
    check_finite(logits, model, tokens, pos)
    return logits


def step_limit(steps, requested):
    """What capped the steps, in words: -n, or the model's context."""
    return (f"{steps} steps (-n)" if steps == requested else
            f"the model's max_seq_len ({steps} positions)")


def note_seq_len_cap(requested, steps, pos, err):
    """llama2.c silently caps -n at the model's context; say so when the cap ended the run."""
    if requested > steps and pos >= steps:
        print(f"minillama: note: stopped at the model's max_seq_len ({steps} positions, prompt "
              f"included); -n {requested} asked for more", file=err)


def generate(model, tokenizer, sampler, prompt, steps, out=None, err=None, exact=False):
    """llama2.c's generate(): stream a continuation of `prompt`; return the generated ids.
    exact: llama2.c's logits, bit for bit (see the module docstring)."""
    out = out or sys.stdout.buffer
    err = err or sys.stderr
    requested, steps = steps, check_steps(steps, model.params.max_seq_len)
    prompt_tokens = tokenizer.encode(prompt or "", bos=True, eos=False)
    if len(prompt_tokens) > steps:
        raise ArgumentError(f"prompt (-i): {len(prompt_tokens)} tokens do not fit in "
                            f"{step_limit(steps, requested)}")
    start = None
    token, pos, generated = prompt_tokens[0], 0, []
    writer = PieceWriter(tokenizer, out)
    if token != tokenizer.bos_id:       # a tokenizer without BOS: the loop below prints only
        # what follows each token, so print the first one here, as the start of the text
        writer.write(tokenizer.bos_id, token)
    forward = decoder(model, exact)
    while pos < steps:
        logits = next_logits(forward, model, token, pos)
        if pos < len(prompt_tokens) - 1:
            next_token = prompt_tokens[pos + 1]          # still forcing the prompt
        else:
            next_token = sampler.sample(logits)
            generated.append(next_token)
        pos += 1
        if next_token == tokenizer.bos_id:               # BOS marks the end of a story
            break
        writer.write(token, next_token)
        token = next_token
        if start is None:
            start = time.perf_counter()                  # timing starts after the first token
    writer.finish()
    out.write(b"\n")
    out.flush()
    if pos > 1 and start is not None:
        elapsed = max(time.perf_counter() - start, 1e-9)
        print(f"achieved tok/s: {(pos - 1) / elapsed:f}", file=err)
    note_seq_len_cap(requested, steps, pos, err)
    return generated


def read_line(prompt, inp, out):
    """Show `prompt`, read one line; None at end of input."""
    out.write(prompt.encode())
    out.flush()
    line = inp.readline()
    return None if line == "" else line.rstrip("\n")


def chat(model, tokenizer, sampler, user_prompt, system_prompt, steps, inp=None, out=None,
         err=None, ask_system=True, exact=False):
    """llama2.c's chat(): alternate user turns (from -i, then stdin) and assistant replies,
    until `steps` positions are used or the input ends. The tokenizer's chat format writes each
    turn: Llama 2's [INST] ... [/INST] as run.c does, one turn at a time, or the model's own
    chat template, which renders the whole dialog so far (tokenizers/chat.py, next_turn).
    ask_system: with no system_prompt, ask for one first (run.c always does; an empty answer
    means none, and a template's default system message, if it has one, applies). exact: logits
    in llama2.c's order of operations (exact.decoder)."""
    inp = inp or sys.stdin
    out = out or sys.stdout.buffer
    requested, steps = steps, check_steps(steps, model.params.max_seq_len)
    stop = tokenizer.stop_tokens        # EOS; for Llama 3 also <|eot_id|>, which ends a turn
    user_turn, pos, next_token = True, 0, None
    prompt_tokens, user_idx, system = [], 0, system_prompt
    dialog, fed, reply = [], [], []     # the messages; the ids in the KV cache; the reply so far
    writer = PieceWriter(tokenizer, out, at_start=False)
    forward = decoder(model, exact)
    while pos < steps:
        if user_turn:
            if not dialog and system is None and ask_system:
                system = read_line("Enter system prompt (optional): ", inp, out)
            if not dialog and user_prompt:
                user = user_prompt
            else:
                user = read_line("User: ", inp, out)
            if user is None:                              # end of input: a clean goodbye
                break
            if dialog:
                dialog.append({"role": "assistant", "content": tokenizer.decode(reply)})
            elif system:
                dialog.append({"role": "system", "content": system})
            dialog.append({"role": "user", "content": user})
            turn = tokenizer.chat.next_turn(tokenizer, dialog, fed)
            if not fed and steps == requested and len(turn.ids) > steps:
                # as generate() refuses a prompt longer than -n (when the model's context is
                # the limit, or a later turn overruns, note_seq_len_cap says so at the end)
                raise ArgumentError(f"chat turn: {len(turn.ids)} tokens (the message in its "
                                    f"chat format) do not fit in {steps} steps (-n)")
            pos, fed, prompt_tokens = turn.keep, fed[:turn.keep], turn.ids
            user_idx, user_turn, reply = 0, False, []
            out.write(b"Assistant: ")
        if user_idx < len(prompt_tokens):
            token = prompt_tokens[user_idx]
            user_idx += 1
        else:
            token = next_token
            if token in stop:       # a sampled EOS ends the assistant's turn (not one in the
                user_turn = True    # prompt: ChatML closes every message with EOS, <|im_end|>)
            else:
                reply.append(token)
        next_token = sampler.sample(next_logits(forward, model, token, pos))
        fed.append(token)
        pos += 1
        if user_idx >= len(prompt_tokens) and next_token not in stop:
            writer.write(token, next_token)
        if next_token in stop and user_idx >= len(prompt_tokens):
            writer.finish()             # the end of an answer (run.c also prints a newline for
            out.write(b"\n")            # an EOS predicted inside the user's prompt; we do not)
    writer.finish()
    out.write(b"\n")
    out.flush()
    note_seq_len_cap(requested, steps, pos, err or sys.stderr)

"""Meta's `llama/generation.py`, in NumPy: Llama.build, generate, text_completion, chat_completion.

`generate` follows Meta's loop line by line, with the same names (bsz, min_prompt_len,
total_len, tokens, prev_pos, cur_pos, eos_reached, input_text_mask), so the two can be read
side by side; docs/generate.md walks through it. Where this file differs from Meta's, a comment
says why.
"""
from typing import List, Optional

import numpy as np

from .checks import check_finite
from .errors import ArgumentError, GenerationError, check_positive_int, \
    check_tokenizer_path, shown
from .exact import decoder
from .ops import softmax, to_host
from .sampler import check_sampling_args, sample_top_p, scaled_logits
from .tokenizers.chat import B_INST, E_INST

SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
# Greedy steps a GPU decoder takes in one call (its greedy_steps) once every row is past its
# prompt: the host waits once per AHEAD tokens, while the next call's AHEAD steps, queued
# behind them, keep the GPU busy; at most 2 AHEAD - 1 steps past the end are wasted where all
# rows reach eos (docs/generate.md, "Steps ahead", "Steps queued").
AHEAD = 8
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def cross_entropy(logits, target, ignore_index):
    """-log softmax(logits)[target] per position, 0 where target == ignore_index.
    logits: (bsz, seqlen, vocab), target: (bsz, seqlen) -> (bsz, seqlen), like F.cross_entropy
    with reduction='none'."""
    logprobs = softmax(logits.astype(np.float32), log=True)    # (bsz, seqlen, vocab)
    safe = np.where(target == ignore_index, 0, target)
    picked = np.take_along_axis(logprobs, safe[..., None], axis=-1)[..., 0]
    return np.where(target == ignore_index, 0.0, -picked).astype(np.float32)


def greedy(last, model, tokens, start_pos):
    """argmax of each row of last (bsz, vocab), the logits of model.forward(tokens, start_pos)
    at their last position, checked as check_finite checks them. On the GPU the argmax runs
    there (as in Meta's generate), in one kernel (kernels.greedy_pick), and only the bsz ids
    come back, with a flag per row for "all finite", instead of bsz * vocab logits. Both
    argmaxes take the first of equal maxima, so the tokens are the same; sampling
    (temperature > 0) stays on the host, where its random draws are the CPU sampler's."""
    if model.ops.xp is np:
        check_finite(last, model, tokens, start_pos)
        return np.argmax(to_host(last), axis=-1)
    back = to_host(model.ops.greedy_pick(last))[None]            # (1, 2 bsz)
    return next(picked(back, last, model, tokens, start_pos, forward=None))


def picked(backs, last, model, tokens, start_pos, forward):
    """The ids of n greedy steps from tokens at start_pos, one (bsz,) array a step, as they
    are taken (a generator), from backs (n, 2 bsz), greedy_pick's answer [ids, flags] for
    each step (the step after fed the ids), and last (bsz, vocab), the last step's logits.
    Where a flag says a row held a logit that is not finite, check_finite raises when that
    step is taken, saying where: on last for the last step, on the step's logits made again
    by forward for an earlier one (a NaN in the weights comes back), or for the last where
    last is None (steps queued behind it wrote over it). A step never taken (the loop stopped
    at eos before it) raises nothing, as in a loop of one step a call."""
    bsz = backs.shape[1] // 2
    for j, back in enumerate(backs):
        if back[bsz:].any():
            step_last = last if j == len(backs) - 1 and last is not None \
                else forward(tokens, start_pos)[:, -1]
            check_finite(step_last, model, tokens, start_pos)    # raises, saying where
            raise GenerationError(f"the logits at position {start_pos + tokens.shape[1] - 1} "
                                  f"held a value that is not finite, and not when made again")
        ids = back[:bsz].astype(np.int64)
        yield ids
        start_pos, tokens = start_pos + tokens.shape[1], ids[:, None]          # (bsz, 1)


class Llama:
    @staticmethod
    def build(ckpt_dir, tokenizer_path=None, max_seq_len=None, max_batch_size=1, device="cpu",
              seed=1, kv_dtype="float32", exact=False, tensor_parallel=None,
              **load_options):
        """Load a checkpoint and its tokenizer. No process group, no NCCL: one process does it all.
        tokenizer_path may be None when the checkpoint carries its own tokenizer. kv_dtype:
        the KV cache's ("float32" or "float16"); exact: logits in llama2.c's order of operations
        (exact.ExactDecoder), CPU only; load_options go to open_checkpoint (dtype=, budget=).
        tensor_parallel=N: the model runs on N GPUs instead, joined by NCCL: this process is
        rank 0 on GPU 0 and keeps the tokenizer and the sampler, N - 1 worker processes run
        the other ranks (minillama/parallel/, docs/parallel.md); model.close() stops them."""
        if tensor_parallel is not None and exact:
            raise ArgumentError("exact: llama2.c's order of operations runs on the CPU, "
                                "not with tensor_parallel")
        from .devices import get_ops
        from .loading import build_model, open_checkpoint, read_checkpoint
        from .tokenizers import load_tokenizer
        if max_seq_len is not None:      # None: the checkpoint's own context length
            check_positive_int("max_seq_len", max_seq_len)
        check_positive_int("max_batch_size", max_batch_size)
        check_tokenizer_path("tokenizer_path", tokenizer_path)    # before any weight is read
        if tensor_parallel is None:
            ops = get_ops(device)        # fail early on a missing GPU, before reading weights
            ckpt = open_checkpoint(ckpt_dir, max_seq_len, max_batch_size, device=device,
                                   kv_dtype=kv_dtype, **load_options)   # checks the memory plan
        else:                            # the workers read their slices; here, the header
            ckpt = read_checkpoint(ckpt_dir, max_seq_len, max_batch_size)
        tokenizer_path = tokenizer_path or ckpt.tokenizer_path
        if tokenizer_path is None:
            raise ArgumentError(f"tokenizer_path: {ckpt_dir} carries no tokenizer; pass one")
        tokenizer = load_tokenizer(tokenizer_path, vocab_size=ckpt.params.vocab_size,
                                   header=ckpt.header)
        if tensor_parallel is None:
            return Llama(build_model(ckpt, ops, kv_dtype), tokenizer, seed, exact)
        from .parallel.workers import start
        return Llama(start(ckpt, tensor_parallel, kv_dtype=kv_dtype, **load_options), tokenizer,
                     seed)

    def __init__(self, model, tokenizer, seed=1, exact=False):
        self.model = model
        self.tokenizer = tokenizer
        self.exact = exact
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ArgumentError(f"seed: expected an integer >= 0, got {seed!r}")
        self.rng = np.random.default_rng(seed)    # torch.manual_seed(seed) in Meta's build
        # After generate(): which rows were cut short by max_seq_len (not by eos or max_gen_len).
        # Meta's return values have no place for it; the CLI reads it to say so.
        self.cut_at_max_seq_len = []

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False):
        params = self.model.params
        bsz = len(prompt_tokens)
        self._check_args(prompt_tokens, max_gen_len, temperature, top_p)

        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        pad_id = self.tokenizer.pad_id
        tokens = np.full((bsz, total_len), pad_id, dtype=np.int64)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = t
        if logprobs:
            token_logprobs = np.zeros(tokens.shape, dtype=np.float32)

        # Llama 2 stops at EOS; Llama 3 at any of several tokens (<|eot_id|> ends a chat turn)
        stop_tokens = np.array(self.tokenizer.stop_tokens, dtype=np.int64)

        prev_pos = 0
        eos_reached = np.array([False] * bsz)
        # Meta writes `tokens != pad_id`; from the lengths is the same when pad_id is -1 and
        # stays right for tokenizers whose pad id is a real token that a prompt may contain.
        input_text_mask = np.arange(total_len)[None, :] < np.array([len(t) for t in prompt_tokens])[:, None]
        if min_prompt_len == total_len and logprobs:
            # Nothing to generate: score the prompt. (Meta compares logits[i] with tokens[i]
            # here; the logits at i predict token i + 1, which is what we compare.)
            logits = to_host(self.model.forward(tokens, prev_pos))
            token_logprobs[:, 1:] = -cross_entropy(logits[:, :-1], tokens[:, 1:], pad_id)

        # model.forward, or a faster way its backend has to decode (the GPU's: one CUDA graph),
        # or with exact, llama2.c's order of operations
        forward = decoder(self.model, self.exact)
        # Greedy on the GPU: the backend's steps that also pick the tokens, so only the ids
        # come back (for one token a row, inside CUDA graphs: FusedDecoder.greedy_steps), and,
        # once no row has prompt left to feed in, AHEAD steps at a time, the host out of the
        # way, with the next call's steps queued behind them (`then`); the loop takes their
        # ids one position at a time. Not where the logits themselves are wanted (logprobs).
        greedy_steps = getattr(forward, "greedy_steps", None) \
            if temperature == 0 and not logprobs else None
        ahead = iter(())               # ids picked ahead of cur_pos, a (bsz,) array a position
        for cur_pos in range(min_prompt_len, total_len):
            if greedy_steps is not None:
                next_token = next(ahead, None)
                if next_token is None:
                    decoding = cur_pos >= max_prompt_len          # no prompt left to feed
                    n = min(AHEAD, total_len - cur_pos) if decoding else 1
                    then = min(AHEAD, total_len - cur_pos - n) if decoding else 0
                    backs, last = greedy_steps(tokens[:, prev_pos:cur_pos], prev_pos, n, then)
                    ahead = picked(backs, last, self.model, tokens[:, prev_pos:cur_pos], prev_pos,
                                   forward)
                    next_token = next(ahead)
            else:
                logits = forward(tokens[:, prev_pos:cur_pos], prev_pos)
                if temperature > 0:
                    last = to_host(logits[:, -1])                    # (bsz, vocab)
                    check_finite(last, self.model, tokens[:, prev_pos:cur_pos], prev_pos)
                    probs = softmax(scaled_logits(last, temperature), axis=-1)
                    next_token = sample_top_p(probs, top_p, self.rng)
                else:
                    next_token = greedy(logits[:, -1], self.model, tokens[:, prev_pos:cur_pos],
                                        prev_pos)

            next_token = next_token.reshape(-1)
            # only replace token if prompt has already been generated
            next_token = np.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -cross_entropy(
                    to_host(logits), tokens[:, prev_pos + 1 : cur_pos + 1], pad_id)
            eos_reached |= (~input_text_mask[:, cur_pos]) & np.isin(next_token, stop_tokens)
            prev_pos = cur_pos
            if all(eos_reached):
                break

        self.cut_at_max_seq_len = [not eos_reached[i] and len(t) + max_gen_len > total_len
                                   for i, t in enumerate(prompt_tokens)]
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            # cut to max gen len
            start = 0 if echo else len(prompt_tokens[i])
            toks = toks[start : len(prompt_tokens[i]) + max_gen_len]
            probs = None
            if logprobs:
                probs = token_logprobs[i][start : len(prompt_tokens[i]) + max_gen_len].tolist()
            # cut to after eos tok if any
            for stop_token in self.tokenizer.stop_tokens:
                if stop_token in toks:
                    eos_idx = toks.index(stop_token)
                    toks = toks[:eos_idx]
                    probs = probs[:eos_idx] if logprobs else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return (out_tokens, out_logprobs if logprobs else None)

    def _check_args(self, prompt_tokens, max_gen_len, temperature, top_p):
        """Meta asserts; we name the argument and the accepted range instead."""
        params = self.model.params
        check_sampling_args(temperature, top_p)
        if not isinstance(prompt_tokens, (list, tuple)) or not all(
                isinstance(t, (list, tuple, np.ndarray)) for t in prompt_tokens):
            raise ArgumentError("prompt_tokens: expected a list of token id lists")
        if not 1 <= len(prompt_tokens) <= params.max_batch_size:
            raise ArgumentError(f"prompts: got {len(prompt_tokens)}, expected 1 to "
                                f"max_batch_size ({params.max_batch_size})")
        if not isinstance(max_gen_len, (int, np.integer)) or max_gen_len < 0:
            raise ArgumentError(f"max_gen_len: expected an integer >= 0, got {max_gen_len!r}")
        for k, t in enumerate(prompt_tokens):
            if len(t) == 0:
                raise ArgumentError(f"prompt {k}: is empty (encode with bos=True to get at "
                                    f"least the BOS token)")
            if len(t) > params.max_seq_len:
                raise ArgumentError(f"prompt {k}: {len(t)} tokens is longer than max_seq_len "
                                    f"({params.max_seq_len})")
            if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in t):
                raise ArgumentError(f"prompt {k}: token ids must be integers, got "
                                    f"{[i for i in t if not isinstance(i, (int, np.integer))][:3]}")

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False,
                        echo: bool = False):
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        if not isinstance(prompts, (list, tuple)):
            raise ArgumentError(f"prompts: expected a list of strings, got {type(prompts).__name__}"
                                f"{'' if not isinstance(prompts, str) else ' (wrap one prompt in a list)'}")
        for k, x in enumerate(prompts):
            if not isinstance(x, str):
                raise ArgumentError(f"prompts: expected a list of strings, prompt {k} is "
                                    f"{type(x).__name__} {shown(x, limit=80)}")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens, max_gen_len=max_gen_len, temperature=temperature,
            top_p=top_p, logprobs=logprobs, echo=echo)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t),
                     "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": logprobs_i}
                    for t, logprobs_i in zip(generation_tokens, generation_logprobs)]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def chat_completion(self, dialogs, temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False):
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens, unsafe_requests = [], []
        check_dialogs(dialogs)
        for dialog in dialogs:
            unsafe_requests.append(
                any([tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog]))
            prompt_tokens.append(self.encode_dialog(dialog))
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens, max_gen_len=max_gen_len, temperature=temperature,
            top_p=top_p, logprobs=logprobs)
        results = []
        for i, t in enumerate(generation_tokens):
            content = UNSAFE_ERROR if unsafe_requests[i] else self.tokenizer.decode(t)
            result = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([x]) for x in t]
                result["logprobs"] = generation_logprobs[i]
            results.append(result)
        return results

    def encode_dialog(self, dialog):
        """Token ids for a dialog ending in a user turn, in the tokenizer's chat format: Llama 2's
        [INST] format, or the one a GGUF model's chat template names (tokenizers/chat.py)."""
        return self.tokenizer.chat.encode_dialog(self.tokenizer, dialog)


def check_dialogs(dialogs):
    """Each dialog a list of {"role": "system"|"user"|"assistant", "content": str} messages."""
    if not isinstance(dialogs, (list, tuple)):
        raise ArgumentError(f"dialogs: expected a list of dialogs, got {type(dialogs).__name__}")
    for k, dialog in enumerate(dialogs):
        if not isinstance(dialog, (list, tuple)):
            raise ArgumentError(f"dialog {k}: expected a list of messages, got "
                                f"{type(dialog).__name__} {shown(dialog, limit=80)}"
                                f"{' (wrap one dialog in a list)' if isinstance(dialog, dict) else ''}")
        for m in dialog:
            if isinstance(m, dict) and m.get("role") in ("ipython", "tool"):
                raise ArgumentError(f"dialog {k}: role {m['role']!r}: tool calls (Llama 3's "
                                    f"ipython role, <|python_tag|>, <|eom_id|>) are not supported")
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ArgumentError(f"dialog {k}: each message must be a dict with 'role' "
                                    f"('system', 'user' or 'assistant') and 'content' (a str), "
                                    f"got {shown(m, limit=80)}")


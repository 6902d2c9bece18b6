"""Soak test: one loaded model serves request after request (10,000+ tokens in all, over many
prompts and batch shapes), and nothing may leak or go non-finite. From the repository root:

    python -m tests.tools.soak                  stories260K from ../shared/models, 10,000 tokens
    python -m tests.tools.soak --tokens 50000 --model M.bin --tokenizer T.bin --device cuda

A request is one batch through Meta's `generate` (text_completion: 1 to max_batch_size prompts,
varied lengths, greedy or sampled, sometimes with log-probs) or one llama2.c `run` (its own
sampler and seed). After each request the process's memory is sampled: the resident set (RSS,
from /proc/self/statm) and the bytes tracemalloc traces (Python objects and NumPy buffers),
after a garbage collection. A warm-up first runs every batch shape once at full length, so
buffers that are allocated once (BLAS workspaces, the allocator's arenas) are in place; from
then on memory must stay flat: the level at the end within a margin of the level after the
warm-up, and no upward trend (least-squares slope x number of requests within the margin).
Every step's logits are checked finite by generate and run themselves (a NaN raises
GenerationError naming the layer); the soak also checks each token id and each log-prob.
Prints a report; exits 1 if a check fails.
"""
import argparse
import gc
import io
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np

from minillama.errors import MiniLlamaError

from . import MODELS

# Prompts of every kind a user sends: empty, whitespace, ordinary, non-ASCII (byte tokens),
# control characters, long ones that leave little room before max_seq_len.
PROMPTS = [
    "", " ", "\n\n", "Once upon a time", "Lily and Tom went to the park.", "The little dog",
    "One day, a girl named Sue found a", "He was sad because", "Tom", "x", "\u65e5\u672c\u306e\u732b",
    "caf\u00e9 na\u00efve \U0001F642", "tab\there\x00 and \x1b escape", "Once upon a time " * 20,
    "The sun was shining. The birds were singing. " * 6, "What is the largest animal?",
]
TRACED_MARGIN = 1 << 20        # bytes: what tracemalloc sees may drift this much, no more
RSS_MARGIN = 16 << 20          # bytes: the resident set may drift this much (allocator noise)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    request: int
    kind: str
    shape: str
    tokens: int
    rss: int
    traced: int


@dataclass
class Soak:
    samples: List[Sample] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    tokens: int = 0                 # generated, warm-up included
    seconds: float = 0.0
    warmup: int = 0                 # requests
    warmup_tokens: int = 0
    own_bytes: int = 0              # traced bytes held by this record's samples


def sample_memory(soak, request, kind, shape, n_tokens, trace):
    gc.collect()
    rss = rss_bytes()
    traced = tracemalloc.get_traced_memory()[0] if trace else 0
    soak.samples.append(Sample(request, kind, shape, n_tokens, rss, traced - soak.own_bytes))
    if trace:           # the samples themselves are traced too: that growth is not a leak
        soak.own_bytes += tracemalloc.get_traced_memory()[0] - traced


def check_tokens(soak, request, rows, n_words, logprobs=None):
    """Each generated id is a valid token; each log-prob is finite and at most 0."""
    for r, row in enumerate(rows):
        if any(not 0 <= t < n_words for t in row):
            soak.problems.append(f"request {request}: row {r} has a token outside the vocabulary")
        if logprobs is not None:
            lp = np.asarray(logprobs[r], np.float64)
            if not (np.isfinite(lp).all() and (lp <= 1e-5).all()):
                soak.problems.append(f"request {request}: row {r} has log-probs that are not "
                                     f"finite or exceed 0")


def batch_request(llama, prompts, rng, bsz, max_gen_len, temperature, top_p, logprobs):
    prompts = [prompts[i] for i in rng.integers(len(prompts), size=bsz)]
    tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    out, lps = llama.generate(tokens, max_gen_len, temperature=temperature, top_p=top_p,
                              logprobs=logprobs)
    for row in out:                     # decoding is part of serving a request
        llama.tokenizer.decode(row)
    return out, lps


def run_request(llama, prompts, rng, new_tokens, temperature, top_p):
    """llama2.c's run on a random prompt; steps = the prompt's length + new_tokens (so some
    runs ask past max_seq_len and are capped)."""
    from minillama.run import generate
    from minillama.sampler import Llama2cSampler
    prompt = prompts[rng.integers(len(prompts))]
    steps = len(llama.tokenizer.encode(prompt, bos=True, eos=False)) + new_tokens
    sampler = Llama2cSampler(llama.model.params.vocab_size, temperature, top_p,
                             int(rng.integers(1, 2**63)))
    out = io.BytesIO()
    ids = generate(llama.model, llama.tokenizer, sampler, prompt, steps, out=out,
                   err=io.StringIO())
    return [ids], None


def soak(llama, target_tokens=10000, seed=0, trace=True, log=None):
    """Serve requests until `target_tokens` tokens were generated; return a Soak record."""
    rng = np.random.default_rng(seed)
    p = llama.model.params
    record = Soak()
    # the prompts that leave room to generate (too long a prompt is refused, rightly)
    prompts = [x for x in PROMPTS
               if len(llama.tokenizer.encode(x, bos=True, eos=False)) < p.max_seq_len // 2]
    started_tracing = trace and not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    try:
        return _serve_until(llama, prompts, rng, record, target_tokens, trace, log)
    finally:
        if started_tracing:                 # leave the process as we found it
            tracemalloc.stop()


def _serve_until(llama, prompts, rng, record, target_tokens, trace, log):
    p = llama.model.params
    t0 = time.perf_counter()
    request = 0

    def serve(kind, shape, call):
        nonlocal request
        try:
            out, lps = call()
        except MiniLlamaError as e:     # a NaN, a cache overflow, a refused prompt: all bugs here
            record.problems.append(f"request {request} ({kind} {shape}): {e}")
            out, lps = [], None
        check_tokens(record, request, out, p.vocab_size, lps)
        n = sum(len(r) for r in out)
        record.tokens += n
        sample_memory(record, request, kind, shape, n, trace)
        request += 1
        if log and request % 25 == 0:
            log(f"  {request} requests, {record.tokens} tokens")

    # warm-up: every batch shape once, the largest at full length (its arrays are the largest
    # any request makes), and one run
    for bsz in range(1, p.max_batch_size + 1):
        gen_len = p.max_seq_len if bsz == p.max_batch_size else 4
        serve("generate", f"bsz {bsz}", lambda: batch_request(
            llama, prompts, rng, bsz, gen_len, 1.0, 0.9, True))
    serve("run", "bsz 1", lambda: run_request(llama, prompts, rng, p.max_seq_len, 1.0, 0.9))
    record.warmup, record.warmup_tokens = request, record.tokens
    while record.tokens - record.warmup_tokens < target_tokens:
        if rng.random() < 0.7:
            bsz = int(rng.integers(1, p.max_batch_size + 1))
            # mostly short answers (many requests), now and then one to max_seq_len
            gen_len = int(rng.integers(1, p.max_seq_len if rng.random() < 0.1 else 48))
            temperature = float(rng.choice([0.0, 0.6, 1.0]))
            top_p = float(rng.choice([0.5, 0.9, 1.0]))
            logprobs = bool(rng.random() < 0.3)
            serve("generate", f"bsz {bsz}", lambda: batch_request(
                llama, prompts, rng, bsz, gen_len, temperature, top_p, logprobs))
        else:
            new_tokens = int(rng.integers(1, p.max_seq_len if rng.random() < 0.2 else 48))
            temperature = float(rng.choice([0.0, 0.8, 1.0]))
            serve("run", "bsz 1", lambda: run_request(llama, prompts, rng, new_tokens,
                                                      temperature, 0.9))
    record.seconds = time.perf_counter() - t0
    check_flat(record, trace)
    return record


def trend(values):
    """Least-squares slope of values against their index (bytes per request)."""
    x = np.arange(len(values), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(values, np.float64), 1)[0]) if len(values) > 2 else 0.0


def check_flat(record, trace):
    after = record.samples[record.warmup:]
    if len(after) < 10:
        record.problems.append(f"only {len(after)} requests after the warm-up: too few to judge")
        return
    measures = [("rss", RSS_MARGIN)] + ([("traced", TRACED_MARGIN)] if trace else [])
    for name, margin in measures:
        values = [getattr(s, name) for s in after]
        base, end = np.median(values[:5]), np.median(values[-5:])
        drift = trend(values) * len(values)
        if end - base > margin or drift > margin:
            record.problems.append(
                f"{name} grows: {fmt(base)} after the warm-up, {fmt(end)} at the end, trend "
                f"{fmt(drift)} over {len(values)} requests (allowed {fmt(margin)})")


def fmt(n):
    return f"{n / (1 << 20):.2f} MiB"


def report(record, llama, model_path, trace):
    p = llama.model.params
    after = record.samples[record.warmup:]
    kinds = {}
    for s in record.samples:
        kinds.setdefault((s.kind, s.shape), [0, 0])
        kinds[(s.kind, s.shape)][0] += 1
        kinds[(s.kind, s.shape)][1] += s.tokens
    lines = [
        f"minillama soak: {model_path} on {llama.model.device}, max_seq_len {p.max_seq_len}, "
        f"max_batch_size {p.max_batch_size}",
        f"requests        {len(record.samples)} ({record.warmup} warm-up)",
        f"tokens          {record.tokens - record.warmup_tokens:,} generated after the warm-up "
        f"({record.tokens:,} in all) in {record.seconds:.1f} s "
        f"({record.tokens / max(record.seconds, 1e-9):,.0f} tok/s, memory sampling included)",
        "shapes          " + ", ".join(f"{k} {s}: {n} req/{t} tok"
                                       for (k, s), (n, t) in sorted(kinds.items())),
    ]
    for name, on in (("rss", True), ("traced", trace)):
        if not on:
            continue
        values = [getattr(s, name) for s in after] or [0]
        lines.append(f"{name:<16}after warm-up {fmt(np.median(values[:5]))}, end "
                     f"{fmt(np.median(values[-5:]))}, min {fmt(min(values))}, max "
                     f"{fmt(max(values))}, trend {trend(values):+.0f} bytes/request")
    lines.append(f"non-finite      {sum('logits hold' in m for m in record.problems)} "
                 f"(every step's logits checked)")
    lines.append("result          " + ("PASS" if not record.problems else
                                       f"FAIL: {len(record.problems)} problem(s)"))
    lines += [f"  {m}" for m in record.problems[:20]]
    return lines


def main(argv=None):
    from minillama.generation import Llama
    parser = argparse.ArgumentParser(prog="python -m tests.tools.soak",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=10000, help="tokens to generate (10000)")
    parser.add_argument("--model", default=str(MODELS / "stories260K.bin"))
    parser.add_argument("--tokenizer", default=None, help="default: tok512.bin beside --model, "
                        "or the model's own")
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-trace", dest="trace", action="store_false",
                        help="skip tracemalloc (faster; RSS only)")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens: expected an integer >= 1, got {args.tokens}")
    tokenizer = args.tokenizer
    if tokenizer is None and Path(args.model).with_name("tok512.bin").is_file() \
            and Path(args.model).name.startswith("stories260K"):
        tokenizer = str(Path(args.model).with_name("tok512.bin"))
    try:
        llama = Llama.build(args.model, tokenizer, args.max_seq_len, args.max_batch_size,
                            device=args.device, seed=args.seed)
    except MiniLlamaError as e:
        print(f"minillama soak: error: {e}", file=sys.stderr)
        return 2
    record = soak(llama, args.tokens, args.seed, args.trace,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    print("\n".join(report(record, llama, args.model, args.trace)))
    return 1 if record.problems else 0


if __name__ == "__main__":
    sys.exit(main())

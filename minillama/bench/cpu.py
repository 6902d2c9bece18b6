"""CPU decode speed: the NumPy model beside llama2.c's run.c and a PyTorch eager model.

    python -m minillama.bench cpu [--models 260K,15M,110M] [--steps N] [--shared DIR] [--profile]
                                  [--rounds N]

For each model shape it decodes `steps` tokens after a one-token prompt, at batch 1 and at
batch 32, first with minillama and then with minillama.bench.torch_reference in float32
(PyTorch eager, same weights, same KV-cache scheme), and prints tokens/s and the ratios.
minillama decodes through ops.decoder(model), as the generation loops do: at batch 1 that is
cpu_decode.CpuDecoder, and the "generic" column is model.forward for comparison. At batch 1
it also runs llama2.c's run.c, built here with gcc -Ofast -march=native -fopenmp
(cpu_llama2c.py), on the same weights written as a llama2.c file. --profile adds where the time
of one batch-1 step goes: each product's milliseconds and the bandwidth it reads its weight at,
beside the machine's copy bandwidth, for the generic forward and for CpuDecoder, and the
ceiling: CpuDecoder's products alone, as a step's time and tokens/s. --rounds N
times minillama's batch 1 and run.c in turn N times and prints the best of each: on a machine
others share, the best round is the one least disturbed.
stories260K is the real file from the shared folder's models/ when it is there (--shared, else
$MINILLAMA_SHARED, else ../shared from the working directory: see minillama/shared.py); the
other shapes, and 260K without the file, get random weights (speed does not depend on the values).
"""
import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..checkpoints.random import random_weights
from ..cpu_decode import CpuDecoder
from ..model import ModelArgs, Transformer
from ..ops import NumpyOps
from ..shared import shared_dir
from . import subset_of
from .cpu_llama2c import FLAGS, build_run_c, run_c_rate, write_legacy

SHAPES = {   # the TinyStories models (llama2.c's README), vocab 32000 but for 260K
    "260K": dict(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512,
                 max_seq_len=512),
    "15M": dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256),
    "42M": dict(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, vocab_size=32000,
                max_seq_len=1024),
    "110M": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, vocab_size=32000,
                 max_seq_len=1024),
}


def load(name, bsz, shared):
    """(ModelArgs, weights) of a shape: stories260K's real file from `shared` when it is there."""
    real = Path(shared) / "models" / "stories260K.bin"
    if name == "260K" and real.is_file():
        from ..checkpoints.llama2c import load_llama2c
        return load_llama2c(real, max_batch_size=bsz)
    p = ModelArgs(**SHAPES[name], max_batch_size=bsz)
    return p, random_weights(p, tied=True)                       # tied, as the stories models


def decode_rate(forward, bsz, steps):
    """Tokens per second over `steps` single-token forwards after a one-token prefill."""
    tokens = np.ones((bsz, 1), dtype=np.int64)
    forward(tokens, 0)
    start = time.perf_counter()
    for pos in range(1, steps + 1):
        forward(tokens, pos)
    return bsz * steps / (time.perf_counter() - start)


def calls_per_token(forward):
    """How many C-level calls (NumPy ufuncs, methods, builtins) one batch-1 decode step of
    forward(tokens, start_pos) makes: the Python overhead that dominates small models."""
    count = [0]

    def profiler(frame, event, arg):
        if event == "c_call":
            count[0] += 1
    tokens = np.ones((1, 1), dtype=np.int64)
    forward(tokens, 0)
    sys.setprofile(profiler)
    forward(tokens, 1)
    sys.setprofile(None)
    return count[0]


def torch_forward(p, w):
    try:
        import torch
    except ImportError:
        return None
    from .torch_reference import Reference
    ref = Reference(p, w, dtype=torch.float32)
    return lambda tokens, pos: ref.forward(torch.from_numpy(tokens), pos)


def llama2c_rate(name, steps, shared, run_c, folder):
    """run.c's batch-1 tokens/s on the shape's weights (the same as load's), or None."""
    tokenizer = Path(shared) / "models" / ("tok512.bin" if name == "260K" else "tokenizer.bin")
    if run_c is None or not tokenizer.is_file():
        return None
    p, w = load(name, 1, shared)
    path = os.path.join(folder, f"{name}.bin")
    write_legacy(path, p, w)
    rate = run_c_rate(run_c, path, str(tokenizer), steps)
    os.remove(path)
    return rate


def alternate(name, steps, rounds, shared, run_c, folder):
    """A line: minillama's batch-1 rate (through ops.decoder) and run.c's, measured in turn
    `rounds` times, each one's best, and the load average before and after."""
    p, w = load(name, 1, shared)
    model = Transformer(p, w)
    forward = model.ops.decoder(model)
    tokenizer = Path(shared) / "models" / ("tok512.bin" if name == "260K" else "tokenizer.bin")
    path = os.path.join(folder, f"{name}.bin")
    write_legacy(path, p, w)
    load_before, ours, theirs = os.getloadavg()[0], [], []
    for _ in range(rounds):
        ours.append(decode_rate(forward, 1, steps))
        if run_c and tokenizer.is_file():
            theirs.append(run_c_rate(run_c, path, str(tokenizer), steps) or float("nan"))
    os.remove(path)
    best_c = max(theirs, default=float("nan"))
    return (f"{name:>6}: numpy b1 {' '.join(f'{r:.1f}' for r in ours)}; llama2.c "
            f"{' '.join(f'{r:.1f}' for r in theirs)}; best {max(ours):.1f} / {best_c:.1f} = "
            f"{max(ours) / best_c:.2f}; load {load_before:.1f} -> {os.getloadavg()[0]:.1f}")


def measure(name, steps, shared, run_c, folder):
    row = {"model": name, "c1": llama2c_rate(name, steps, shared, run_c, folder)}
    for bsz in (1, 32):
        p, w = load(name, bsz, shared)
        model = Transformer(p, w)
        forward = model.ops.decoder(model)       # as the loops decode: CpuDecoder at batch 1
        row[f"np{bsz}"] = decode_rate(forward, bsz, steps)
        if bsz == 1:
            row["generic"] = decode_rate(model.forward, bsz, steps)
            row["calls"] = calls_per_token(forward)
        ref = torch_forward(p, w)
        row[f"pt{bsz}"] = decode_rate(ref, bsz, steps) if ref else float("nan")
    return row


# ----------------------------------------------------------------------------
# where the time of one step goes

class TimedOps(NumpyOps):
    """NumpyOps that add up the seconds of each call, by what it computes: each weight's
    products under its name, attention's products and softmax under theirs."""

    def __init__(self):
        self.seconds, self.calls, self.names = Counter(), Counter(), {}

    def name_weights(self, model):
        self.names = {id(model.output): "classifier"}
        for layer in model.layers:
            for name, w in layer_weights(layer):
                self.names[id(w)] = name

    def timed(self, name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[name] += time.perf_counter() - start
        self.calls[name] += 1
        return out

    def linear(self, x, w):
        return self.timed(self.names.get(id(w), "linear"), super().linear, x, w)

    def matmul(self, a, b):
        return self.timed("attention matmul", super().matmul, a, b)

    def softmax(self, x, start_pos=None):
        return self.timed("attention softmax", super().softmax, x, start_pos)


def layer_weights(layer):
    """(name, weight) of the four products of a layer."""
    return (("wqkv", layer.attention.wqkv), ("wo", layer.attention.wo),
            ("w13", layer.feed_forward.w13), ("w2", layer.feed_forward.w2))


def copy_bandwidth():
    """GB/s of copying 256 MiB in memory, bytes read plus bytes written: the machine's pace
    for a step that streams its weights from memory."""
    src = np.ones(1 << 26, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    start = time.perf_counter()
    for _ in range(4):
        np.copyto(dst, src)
    return 4 * 2 * src.nbytes / (time.perf_counter() - start) / 1e9


def profile_step(name, steps, shared):
    """Lines: the milliseconds of one batch-1 step by part, and each weight's read bandwidth."""
    p, w = load(name, 1, shared)
    ops = TimedOps()
    model = Transformer(p, w, ops)
    ops.name_weights(model)
    sizes = {"classifier": model.output.nbytes}        # each name's bytes, all layers'
    sizes.update((key, w.nbytes * p.n_layers) for key, w in layer_weights(model.layers[0]))
    tokens = np.ones((1, 1), dtype=np.int64)
    model.forward(tokens, 0)
    ops.seconds.clear()
    ops.calls.clear()
    start = time.perf_counter()
    for pos in range(1, steps + 1):
        model.forward(tokens, pos)
    total = (time.perf_counter() - start) / steps
    lines = [f"{name}: one batch-1 step, {total * 1e3:.2f} ms (average of {steps})"]
    for part, seconds in ops.seconds.most_common():
        per_step = seconds / steps
        rate = f"{sizes[part] / per_step / 1e9:6.1f} GB/s of weights" if part in sizes else ""
        lines.append(f"  {part:<18} {ops.calls[part] // steps:3d} calls {per_step * 1e3:7.3f} ms "
                     f"{per_step / total:6.1%}  {rate}")
    rest = total - sum(ops.seconds.values()) / steps
    lines.append(f"  {'everything else':<18}           {rest * 1e3:7.3f} ms {rest / total:6.1%}  "
                 f"(Python, norms, RoPE, SwiGLU, the cache)")
    return lines


PROFILE_ROUNDS = 3      # profile_decoder: the step and its products timed in turn, the best of each


def rest_line(total, alone):
    """profile_decoder's line for what the products (`alone` seconds a step) leave of the step
    (`total`); below zero where the two measurements disagree by more than that."""
    rest = total - alone
    what = "(Python, norms, RoPE, attention, SwiGLU, the cache)" if rest >= 0 else \
        "(below zero: the products alone were slower than in the step; the machine's noise)"
    return f"  {'everything else':<18} {rest * 1e3:7.3f} ms {rest / total:6.1%}  {what}"


def profile_decoder(name, steps, shared, rounds=PROFILE_ROUNDS):
    """Lines: one CpuDecoder step, then its products alone (the same products on the same
    buffers, one after the other with nothing between them). What the products leave of the
    step is Python and the elementwise work (norms, RoPE, attention, SwiGLU). The two are timed
    in turn, `rounds` times, and the best round of each is kept: timed once each, minutes
    apart in a busy machine's life, the products alone once took longer than the whole step."""
    p, w = load(name, 1, shared)
    step = CpuDecoder(Transformer(p, w))
    tokens = np.ones((1, 1), dtype=np.int64)
    step(tokens, 0)
    # (name, input, index of the weight in CpuDecoder.layer_views, output)
    products = (("wqkv", step.xn, 1, step.qkv), ("wo", step.att.reshape(-1), 2, step.y),
                ("w13", step.xn, 4, step.h13), ("w2", step.gate, 5, step.y))
    logits = np.empty(p.vocab_size, np.float32)

    def step_seconds():
        start = time.perf_counter()
        for pos in range(1, steps + 1):
            step(tokens, pos)
        return (time.perf_counter() - start) / steps

    def products_seconds():                 # each part's seconds a step
        seconds = Counter()
        for _ in range(steps):
            for views in step.layers:
                for part, x, i, out in products:
                    begin = time.perf_counter()
                    np.matmul(x, views[i], out=out)
                    seconds[part] += time.perf_counter() - begin
            begin = time.perf_counter()
            np.matmul(step.xn, step.output_t, out=logits)
            seconds["classifier"] += time.perf_counter() - begin
        return Counter({part: sec / steps for part, sec in seconds.items()})

    timed = [(step_seconds(), products_seconds()) for _ in range(rounds)]
    total = min(t for t, _ in timed)
    seconds = min((parts for _, parts in timed), key=lambda parts: sum(parts.values()))
    sizes = Counter(classifier=step.output_t.nbytes)
    for part, x, i, out in products:
        sizes[part] = step.layers[0][i].nbytes * p.n_layers      # bytes read, padding included
    lines = [f"{name}: one CpuDecoder step, {total * 1e3:.2f} ms (the best of {rounds} rounds "
             f"of {steps})"]
    for part, per_step in seconds.most_common():
        lines.append(f"  {part:<18} {per_step * 1e3:7.3f} ms {per_step / total:6.1%}  "
                     f"{sizes[part] / per_step / 1e9:6.1f} GB/s of weights")
    alone = sum(seconds.values())
    lines.append(rest_line(total, alone))
    # The step can be no faster than its products: NumPy's GEMVs reading these weights on this
    # machine, with nothing between them (issue 13's honest ceiling, printed beside the step)
    lines.append(f"  ceiling: the products alone, {alone * 1e3:.2f} ms a step, "
                 f"{1 / alone:.1f} tokens/s with nothing else")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillama.bench cpu")
    parser.add_argument("--models", type=subset_of(SHAPES, "a model shape"),
                        default=("260K", "15M", "110M"), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--shared", type=Path, default=None,
                        help="the shared folder whose models/stories260K.bin is measured "
                        "(default: $MINILLAMA_SHARED, else ../shared from the working directory)")
    parser.add_argument("--profile", action="store_true",
                        help="also show where the time of one batch-1 step goes")
    parser.add_argument("--rounds", type=int, default=0,
                        help="also time minillama's batch 1 and llama2.c in turn N times")
    args = parser.parse_args(argv)
    names = args.models
    if args.shared and not (args.shared / "models" / "stories260K.bin").is_file():
        parser.error(f"--shared: expected a folder with models/stories260K.bin, got {args.shared}")
    shared = args.shared or shared_dir()
    print(f"minillama CPU decode, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"{args.steps} steps after a 1-token prompt; tokens/s; load average "
          f"{os.getloadavg()[0]:.1f} (other work on the machine slows every column)")
    header = (f"{'model':>6} | {'numpy b1':>9} {'generic':>8} {'llama2.c':>9} {'np/c':>5} "
              f"{'torch b1':>9} "
              f"{'np/pt':>6} | {'numpy b32':>10} {'torch b32':>10} {'np/pt':>6} | {'b32/b1':>6} | "
              f"{'calls/tok':>9}")
    with tempfile.TemporaryDirectory() as folder:
        run_c = build_run_c(str(Path(shared) / "oracles" / "llama2c" / "run.c"), folder)
        print(f"llama2.c: run.c built with gcc {' '.join(FLAGS)}, {os.cpu_count()} OpenMP "
              f"threads" if run_c else "llama2.c: n/a (no gcc, or no run.c in the shared folder)")
        print(header)
        print("-" * len(header))
        for name in names:
            r = measure(name, args.steps, shared, run_c, folder)
            c1 = r["c1"] or float("nan")
            print(f"{name:>6} | {r['np1']:9.1f} {r['generic']:8.1f} {c1:9.1f} "
                  f"{r['np1'] / c1:5.2f} {r['pt1']:9.1f} "
                  f"{r['np1'] / r['pt1']:6.2f} | {r['np32']:10.1f} {r['pt32']:10.1f} "
                  f"{r['np32'] / r['pt32']:6.2f} | {r['np32'] / r['np1']:6.1f} | "
                  f"{r['calls']:9d}", flush=True)
        if args.rounds > 0:
            print(f"\nminillama (batch 1) and llama2.c in turn, {args.rounds} rounds, tokens/s:")
            for name in names:
                print(alternate(name, args.steps, args.rounds, shared, run_c, folder), flush=True)
    if args.profile:
        print(f"\nmemory copy: {copy_bandwidth():.1f} GB/s (read + write)")
        for name in names:
            print("\n".join(profile_step(name, args.steps, shared)), flush=True)
            print("\n".join(profile_decoder(name, args.steps, shared)), flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0

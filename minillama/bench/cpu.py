"""CPU decode speed: the NumPy model against a plain PyTorch eager model of the same weights.

    python -m minillama.bench cpu [--models 260K,15M,110M] [--steps N] [--shared DIR]

For each model shape it decodes `steps` tokens after a one-token prompt, at batch 1 and at
batch 32, first with minillama and then with minillama.bench.torch_reference in float32
(PyTorch eager, same weights, same KV-cache scheme), and prints tokens/s and the ratios.
stories260K is the real file from the shared folder's models/ when it is there (--shared, else
$MINILLAMA_SHARED, else ../shared from the working directory: see minillama/shared.py); the
other shapes, and 260K without the file, get random weights (speed does not depend on the values).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..checkpoints.random import random_weights
from ..model import ModelArgs, Transformer
from ..shared import shared_dir

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


def calls_per_token(model):
    """How many C-level calls (NumPy ufuncs, methods, builtins) one decode step makes:
    the Python overhead that dominates small models."""
    count = [0]

    def profiler(frame, event, arg):
        if event == "c_call":
            count[0] += 1
    tokens = np.ones((1, 1), dtype=np.int64)
    model.forward(tokens, 0)
    sys.setprofile(profiler)
    model.forward(tokens, 1)
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


def measure(name, steps, shared):
    row = {"model": name}
    for bsz in (1, 32):
        p, w = load(name, bsz, shared)
        model = Transformer(p, w)
        row[f"np{bsz}"] = decode_rate(model.forward, bsz, steps)
        if bsz == 1:
            row["calls"] = calls_per_token(model)
        ref = torch_forward(p, w)
        row[f"pt{bsz}"] = decode_rate(ref, bsz, steps) if ref else float("nan")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillama.bench cpu")
    parser.add_argument("--models", default="260K,15M,110M",
                        help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--shared", type=Path, default=None,
                        help="the shared folder whose models/stories260K.bin is measured "
                        "(default: $MINILLAMA_SHARED, else ../shared from the working directory)")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    for name in names:
        if name not in SHAPES:
            parser.error(f"--models: unknown {name!r}, expected some of {', '.join(SHAPES)}")
    if args.shared and not (args.shared / "models" / "stories260K.bin").is_file():
        parser.error(f"--shared: expected a folder with models/stories260K.bin, got {args.shared}")
    print(f"minillama CPU decode, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"{args.steps} steps after a 1-token prompt; tokens/s")
    header = (f"{'model':>6} | {'numpy b1':>9} {'torch b1':>9} {'np/pt':>6} | {'numpy b32':>10} "
              f"{'torch b32':>10} {'np/pt':>6} | {'b32/b1':>6} | {'calls/tok':>9}")
    print(header)
    print("-" * len(header))
    for name in names:
        r = measure(name, args.steps, args.shared or shared_dir())
        print(f"{name:>6} | {r['np1']:9.1f} {r['pt1']:9.1f} {r['np1'] / r['pt1']:6.2f} | "
              f"{r['np32']:10.1f} {r['pt32']:10.1f} {r['np32'] / r['pt32']:6.2f} | "
              f"{r['np32'] / r['np1']:6.1f} | {r['calls']:9d}", flush=True)
    return 0

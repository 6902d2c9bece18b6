"""attention_decode alone, by rows and block size (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/time_attention.py [--shape 7B] [--batches 1,2,4,8]
        [--positions 3,31] [--threads 128,256,512] [--max-seq-len 512]

One layer of the shape (random weights made on the GPU, profile_step.random_decoder), three
positions decoded, then FusedDecoder.attend launched on its own at each position and batch,
with the package's block (kernels.attention_threads) and with each --threads: us a launch, 20
launches in one CUDA graph (bench_mma.py's timed_us, the best of its replays, the launches one
after the other). What the ab_bounds.py "no attention" bound cannot say: whether a batch's
attention costs more than a row's by itself, or only beside the products around it.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step                                          # noqa: E402  (checkout first)
from ab_step import patched                                  # noqa: E402
from bench_mma import timed_us                               # noqa: E402

from minillama.cuda import fused as fused_module, require_cupy   # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7B")
    ap.add_argument("--dtype", default="q4_0")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--positions", default="3,31")
    ap.add_argument("--threads", default="128,256,512")
    ap.add_argument("--max-seq-len", type=int, default=512)
    a = ap.parse_args()
    cp = require_cupy()
    batches = [int(b) for b in a.batches.split(",")]
    forward, fused = profile_step.random_decoder(a.shape, a.dtype, max(batches), a.max_seq_len,
                                                  n_layers=1)
    cache_k, cache_v = fused.layers[0][6:8]
    rule = fused_module.attention_threads
    blocks = {"package": rule}
    blocks.update({str(t): (lambda t: lambda width, bsz, heads: t)(int(t))
                   for t in a.threads.split(",")})
    for bsz in batches:
        tokens = np.ones((bsz, 1), dtype=np.int64)
        for before in range(3):
            forward(tokens, before)
        for pos in (int(p) for p in a.positions.split(",")):
            fused.send_step(tokens, pos)
            row_ss = fused.qkv_ss[:bsz] if fused.defers_norms(bsz) else None
            cells = []
            for label, threads in blocks.items():
                with patched(fused_module, "attention_threads", threads):
                    grid = fused.attention_grid(bsz)
                    us = timed_us(cp, lambda _: fused.attend(bsz, fused.qkv[:bsz], cache_k, cache_v,
                                                             fused.att[:bsz], row_ss), [None])
                cells.append(f"{label} {us:.2f} (grid {grid[1]}, block {grid[2][0]})")
            print(f"{a.shape} {a.dtype} rows {bsz} at {pos}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""greedy_steps with the next call's steps queued behind each (`then`, the package's way, as
generate and the bench take them) against without (then=0): tokens/s of the bench's loop,
interleaved rounds (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_queue.py [q4_0 int8 ...]      # 7B formats, optional

The stories15M and stories110M shapes at 1 and 4 rows, 200 steps from position 0, 7 rounds;
then the Llama-2-7B shape in each format named, 1 and 8 rows, 32 steps, 5 rounds
(bench.timing.decode_rate with AHEAD steps a call, its second pass timed).

On an H200 (2026-11-30): stories15M 1.033x at one row, stories110M 1.029x, 4 rows 1.016x and
1.011x, the 7B shape 1.001x to 1.010x (docs/kernels.md, "Steps queued").
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:       # this checkout first
    sys.path.insert(0, str(ROOT))
from minillama.bench import gpu as bench_gpu, gpu7b     # noqa: E402
from minillama.bench.timing import decode_rate          # noqa: E402
from minillama.cuda import CudaOps, require_cupy        # noqa: E402
from minillama.generation import AHEAD                  # noqa: E402
from minillama.model import Transformer                 # noqa: E402


class NothingQueued:
    """A decoder whose greedy_steps never queue the next call (then=0)."""

    def __init__(self, forward):
        self.forward = forward

    def greedy_steps(self, tokens, pos, n, then=0):
        return self.forward.greedy_steps(tokens, pos, n, 0)


def ab(label, forward, bsz, steps, rounds):
    """Print the medians of `rounds` interleaved rounds, queued and not, and their ratio."""
    rates = {"queued": [], "not queued": []}
    for _ in range(rounds):
        rates["queued"].append(decode_rate(forward, bsz, steps, AHEAD))
        rates["not queued"].append(decode_rate(NothingQueued(forward), bsz, steps, AHEAD))
    q, n = (float(np.median(v)) for v in rates.values())
    print(f"{label}, {bsz} rows: queued {q:.1f} tokens/s, not queued {n:.1f}: {q / n:.3f}x",
          flush=True)


def main():
    bench_gpu.cp = require_cupy()
    for shape in ("15M", "110M"):
        ops = CudaOps()
        model = bench_gpu.random_model(shape, ops, 4)
        forward = ops.decoder(model)
        for bsz in (1, 4):
            ab(f"stories{shape}", forward, bsz, 200, 7)
        model = forward = ops = None
        gpu7b.release_gpu()
    for dtype in sys.argv[1:]:
        p = gpu7b.params(8, 512)
        ops = CudaOps()
        model = Transformer(p, gpu7b.RandomGpuWeights(p, dtype), ops)
        forward = ops.decoder(model)
        for bsz in (1, 8):
            ab(f"7B {dtype}", forward, bsz, 32, 5)
        model = forward = ops = None
        gpu7b.release_gpu()


if __name__ == "__main__":
    main()

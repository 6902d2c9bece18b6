"""How the GPU benchmarks time things: kernels by CUDA events, decoding by the wall clock.

    gpu_ms(fn)                       milliseconds per fn() call on the GPU, the median of repeats
    copy_bandwidth()                 GB/s of a 1 GiB device-to-device copy: the ceiling a
                                     memory-bound kernel (a GEMV, a decode step) is held against
    tflops(M, N, K, ms)              a product's rate
    decode_rate(forward, bsz, steps) greedy tokens/s of forward(tokens, start_pos) -> logits
    median_rate(run, tokens, sync)   tokens/s of a decode loop: the median of PASSES timed passes
    fmt(value, spec)                 a figure as printed: "n/a" where it could not be measured

Shared by gpu.py (the kernels and the TinyStories shapes) and gpu7b.py (the Llama-2-7B shape).
"""
import statistics
import time

import numpy as np

from ..cuda import require_cupy
from ..cuda.kernels import greedy_pick
from ..ops import softmax, to_host
from ..sampler import sample_top_p

# Timed passes of a decode loop; the figure is their median. One pass of a short decode is a
# short window (the 7B shape's 32 steps at batch 8: 76 ms), and a figure whose token goes
# through the host each step moved 3.5% between two runs timed that way. The median counts a
# stall of the host as one pass, not as the figure; it narrows the spread of such figures, it
# does not remove it (2 to 3% round to round: docs/benchmarks.md, thirty-fifth run).
PASSES = 5


def gpu_ms(fn, reps=20, warmup=3, inner=10):
    """Milliseconds per fn() call: the median over `reps` of CUDA-event time around `inner`
    calls in a row. Several calls per measurement keep the GPU's queue full, so the host's
    time to launch (tens of microseconds through Python) does not count as kernel time."""
    cp = require_cupy()
    for _ in range(warmup):
        fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / inner)
    return float(np.median(times))


def copy_bandwidth():
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    cp = require_cupy()
    n = 1 << 28
    src = cp.random.standard_normal(n, dtype=cp.float32)
    dst = cp.empty(n, dtype=cp.float32)
    ms = gpu_ms(lambda: dst.data.copy_from_device_async(src.data, src.nbytes), inner=3)
    return 2 * src.nbytes / ms / 1e6


def tflops(M, N, K, ms):
    return 2.0 * M * N * K / ms / 1e9


def decode_rate(forward, bsz, steps, ahead=1):
    """Tokens/s of greedy decoding, positions 0 .. steps-1, the median of PASSES passes after
    one that warms up (median_rate). The tokens go through the host as generate's greedy
    steps take them: forward.greedy_steps where the decoder has it (the picks inside the CUDA
    graph), `ahead` steps a call (generate's AHEAD once no prompt is left, the next call's
    queued behind each; a last, shorter call where steps is not a multiple), else one forward
    call a token, picked on the GPU by kernels.greedy_pick and copied back."""
    greedy_steps = getattr(forward, "greedy_steps", None)

    def next_tokens(tokens, pos, n):
        if greedy_steps is not None:          # with generate's next call queued behind
            then = min(ahead, steps - pos - n) if ahead > 1 else 0
            back = greedy_steps(tokens, pos, n, then)[0][-1]
        else:
            back = greedy_pick(forward(tokens, pos)[:, -1]).get()
        return back[:bsz].astype(np.int64).reshape(bsz, 1)

    def run():
        tokens = np.ones((bsz, 1), dtype=np.int64)
        for pos in range(0, steps, ahead if greedy_steps is not None else 1):
            tokens = next_tokens(tokens, pos, min(ahead, steps - pos))
    return median_rate(run, bsz * steps, device_sync)


def sampled_rate(forward, bsz, steps, temperature=0.6, top_p=0.9, seed=0):
    """Tokens/s of decoding with nucleus sampling as generate samples (Meta's defaults,
    temperature 0.6 and top-p 0.9): each step's last logits to the host, the softmax at the
    temperature and sample_top_p there, one forward call a token; positions 0 .. steps-1, timed
    as decode_rate."""
    rng = np.random.default_rng(seed)

    def run():
        tokens = np.ones((bsz, 1), dtype=np.int64)
        for pos in range(steps):
            last = to_host(forward(tokens, pos)[:, -1])                   # (bsz, vocab)
            probs = softmax(last / temperature, axis=-1)
            tokens = sample_top_p(probs, top_p, rng).reshape(bsz, 1)
    return median_rate(run, bsz * steps, device_sync)


def device_sync():
    require_cupy().cuda.Device().synchronize()


def median_rate(run, tokens, sync, passes=PASSES):
    """Tokens/s of run() producing `tokens` tokens: a first pass warms up (compiles, captures
    graphs), then `passes` passes are timed by the wall clock, each begun after sync() has
    waited for the device to finish the one before; the median of their rates."""
    run()
    rates = []
    for _ in range(passes):
        sync()
        start = time.perf_counter()
        run()
        sync()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)

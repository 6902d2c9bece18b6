"""Where one decode step's time goes, kernel by kernel (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/profile_step.py [--shape 7B] [--dtypes q4_0,int8,float16]
                                                    [--batches 1,8] [--layers N]

For each storage format it builds a model of the shape with random weights made on the GPU
(minillama.bench.gpu7b's RandomGpuWeights), decodes a few positions, then:
  - times the CUDA-graph replay alone (no host round trip), and with the token through the host
    as the benchmarks do, and the pieces in between (replay_ms: the launch call, a wait after
    each replay, the decoder's forward);
  - runs FusedDecoder.run eagerly with a CUDA event pair around every launch and prints the
    sum per kernel name, its share of the summed time, and the launches.
Eagerly the GPU often waits for Python between the two events (a launch from Python takes
longer than a small kernel), so the per-kernel times are upper bounds that rank the kernels,
not their cost: measured on an H200 their sum was 1.5 to 4 times the graph's whole step. The
graph replay is the step's time; kernels/dev/bench_mma.py times the products alone, in graphs.
"""
import argparse
import time
from collections import defaultdict

import numpy as np

from minillama.bench import gpu7b, torch_compiled
from minillama.cuda import CudaOps, require_cupy
from minillama.cuda.kernels import KERNELS
from minillama.model import Transformer


def timed_launches(fused, bsz, cp):
    """Per kernel name: [summed ms, launches] of one eager FusedDecoder.run(bsz)."""
    pairs, launch = [], KERNELS.launch

    def recording(name, grid, block, args, shared_mem=0):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        launch(name, grid, block, args, shared_mem=shared_mem)
        end.record()
        pairs.append((f"{name} {tuple(grid)}", start, end))
    KERNELS.launch = recording
    try:
        fused.run(bsz)
    finally:
        KERNELS.launch = launch
    cp.cuda.Device().synchronize()
    sums = defaultdict(lambda: [0.0, 0])
    for name, start, end in pairs:
        sums[name][0] += cp.cuda.get_elapsed_time(start, end)
        sums[name][1] += 1
    return sums


def replay_ms(forward, fused, bsz, cp, steps=20):
    """Per step, ms, the host's share taken apart one piece at a time:
    alone     graph replays back to back (the GPU's time: the next launch is queued before the
              last one ends);
    launch    the host's time inside graph.launch() (a replay of ~160 kernels is one call);
    synced    a replay, then a wait for it (+ the GPU's start and the host's wake-up);
    forward   forward(tokens, pos), then a wait (+ the decoder's Python, the token's copy in,
              the logits' copy out of the graph's buffer);
    host      forward, cp.argmax and .get() (+ one small kernel and the copy to the host): the
              loop bench/timing.py's decode_rate times."""
    tokens = np.ones((bsz, 1), dtype=np.int64)
    for pos in range(3):
        forward(tokens, pos)
    graph, sync = fused.graphs[bsz], cp.cuda.Device().synchronize
    sync()

    def per_step(body):
        t = time.perf_counter()
        for i in range(steps):
            body(i)
        sync()
        return 1000 * (time.perf_counter() - t) / steps
    launch_s = []

    def timed_launch(_):
        t = time.perf_counter()
        graph.launch()
        launch_s.append(time.perf_counter() - t)
    out = {"alone": per_step(timed_launch)}
    out["launch"] = 1000 * sorted(launch_s)[len(launch_s) // 2]
    out["synced"] = per_step(lambda _: (graph.launch(), sync()))
    out["forward"] = per_step(lambda i: (forward(tokens, 3 + i), sync()))
    state = {"tokens": tokens}

    def step(i):
        logits = forward(state["tokens"], 3 + i)
        state["tokens"] = cp.argmax(logits[:, -1], axis=-1).get().reshape(bsz, 1)
    out["host"] = per_step(step)
    return out


def profile(shape, dtype, batches, layers):
    cp = require_cupy()
    p = torch_compiled.model_args(shape, max(batches), 64, n_layers=layers)
    ops = CudaOps(persistent=False)      # FusedDecoder, the graph this tool takes apart
    model = Transformer(p, gpu7b.RandomGpuWeights(p, dtype), ops)
    forward = ops.decoder(model)
    fused = ops._decoders[model]
    nbytes = gpu7b.bytes_per_step(model, 1, 8)
    for bsz in batches:
        ms = replay_ms(forward, fused, bsz, cp)
        sums = timed_launches(fused, bsz, cp)
        total = sum(s for s, _ in sums.values())
        print(f"\n== {shape} {dtype} layers {p.n_layers} batch {bsz}: graph {ms['alone']:.3f} ms, "
              f"with host {ms['host']:.3f} ms, eager kernel sum {total:.3f} ms, "
              f"{nbytes / 1e9:.2f} GB/step -> {nbytes / ms['alone'] / 1e6:.0f} GB/s in the graph")
        print("  host, ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
        for name, (ms, n) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
            print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  x{n:<4d} {1000 * ms / n:8.2f} us  {name}")
    del model, forward, fused, ops
    gpu7b.release_gpu()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7B", choices=list(torch_compiled.SHAPES))
    ap.add_argument("--dtypes", default="q4_0,int8,float16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int)
    a = ap.parse_args()
    for dtype in a.dtypes.split(","):
        profile(a.shape, dtype, [int(b) for b in a.batches.split(",")], a.layers)


if __name__ == "__main__":
    main()

"""Where a tensor-parallel decode step's time goes (development tool, needs 2+ GPUs and NCCL).

    PYTHONPATH=. python kernels/dev/profile_tp.py [--gpus 2] [--layers 40] [--dtype float16]

bench/tp.py measures tokens/s as a user sees them: the parent sends each token down the
workers' pipes and rank 0 sends the logits back. This tool splits that time. Each of the N
processes builds its slices of the 13B-shaped random model (bench/tp.py's RandomJob), then
every rank, in step, times with CUDA events (the replays of a graph, no host in between):
  - step:     its ShardedFusedDecoder graph, the whole one-token step;
  - no join:  the same step recorded without the per-layer all-reduces (wrong numbers, the
              rank's own GEMVs and kernels alone);
  - joins:    the step's 2 per layer all-reduces of h (bsz, dim) alone, in one graph;
  - one all-reduce of h alone, replayed in a loop of graph launches.
and rank 0 prints them with the one-GPU FusedDecoder step of the whole model, built first.
Then the whole loop as bench/tp.py runs it (parent, pipes, workers), with rank 0 timing, per
step, its wait for the next message, the step up to the logits on the GPU queued, and the
logits' hand-off: what the parent and the pipes add is the rest.
"""
import time
from dataclasses import dataclass
import argparse
import multiprocessing
import os

import numpy as np

REPLAYS = 30


def timed(cp, launch, replays=REPLAYS):
    """ms per call of launch(), replayed back to back on the current stream."""
    launch()
    cp.cuda.get_current_stream().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(replays):
        launch()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / replays


def captured(cp, body):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        body()
        graph = stream.end_capture()
    return graph


def rank_main(rank, world, port, layers, dtype, results):
    from minillama.bench.tp import RandomJob, params_13b
    from minillama.cuda import CudaOps, require_cupy
    from minillama.parallel.fused import ShardedFusedDecoder
    from minillama.parallel.workers import NcclBackend
    cp = require_cupy()
    comm = NcclBackend(port=port).connect(rank, world)
    p = params_13b(layers)
    model = RandomJob(p, dtype).open(rank, world, CudaOps(), comm)
    tokens = np.array([[1]])

    class NoJoin(ShardedFusedDecoder):
        def join(self, h):
            pass
    out = {}
    for name, cls in (("step", ShardedFusedDecoder), ("no join", NoJoin)):
        fused = cls(model)
        fused(tokens, 0)                                  # eager, then captured
        fused(tokens, 1)
        out[name] = timed(cp, fused.graphs[1].launch)
        del fused
    h = cp.ones((1, p.dim), dtype=np.float32)
    joins = captured(cp, lambda: [comm.all_reduce(h) for _ in range(2 * layers)])
    out["joins"] = timed(cp, joins.launch)
    one = captured(cp, lambda: comm.all_reduce(h))
    out["one all-reduce"] = timed(cp, one.launch, 200)
    results.put((rank, out))


@dataclass
class TimedJob:
    """bench/tp.py's RandomJob, with rank 0's worker loop timed (patched in its process)."""
    params: object
    dtype: str
    steps: int

    def open(self, rank, world, ops, comm):
        from minillama.bench.tp import RandomJob
        from minillama.parallel import fused, workers
        model = RandomJob(self.params, self.dtype).open(rank, world, ops, comm)
        if rank == 0:
            marks = []
            call, put = fused.ShardedFusedDecoder.__call__, workers.LogitsHandoff.put

            def timed_call(self, *args):
                marks.append(["call", time.perf_counter()])
                out = call(self, *args)
                marks[-1].append(time.perf_counter())
                return out

            def timed_put(self, logits):
                start = time.perf_counter()
                out = put(self, logits)
                marks[-1] += [start, time.perf_counter()]
                if len(marks) == self_steps:
                    report(marks)
                return out
            self_steps = 2 * self.steps
            fused.ShardedFusedDecoder.__call__, workers.LogitsHandoff.put = timed_call, timed_put
        return model


def report(marks):
    """Rank 0's medians (us) over the second half of the steps, into profile_tp_rank0.txt."""
    rows = marks[len(marks) // 2:]
    cycle = np.median(np.diff([r[1] for r in rows])) * 1e6
    queue = np.median([r[2] - r[1] for r in rows]) * 1e6
    hand = np.median([r[4] - r[3] for r in rows]) * 1e6
    with open(os.path.join(os.environ.get("OUT", "."), "profile_tp_rank0.txt"), "w") as f:
        f.write(f"rank 0 per step: cycle {cycle:.0f} us = step queued {queue:.0f} + logits "
                f"hand-off (waits for the GPU) {hand:.0f} + the rest {cycle - queue - hand:.0f}\n")


def parent_loop(layers, dtype, world, steps=64):
    from minillama.bench.tp import decode_rate, params_13b
    from minillama.parallel.workers import TensorParallel
    p = params_13b(layers)
    with TensorParallel(p, TimedJob(p, dtype, steps), world) as tp:
        rate, _ = decode_rate(tp.forward, steps)
    return 1e3 / rate


def one_gpu(layers, dtype):
    from minillama.bench.tp import SeededGpuWeights, params_13b
    from minillama.cuda import CudaOps, require_cupy
    from minillama.cuda.fused import FusedDecoder
    from minillama.model import Transformer
    cp = require_cupy()
    p = params_13b(layers)
    model = Transformer(p, SeededGpuWeights(p, dtype), CudaOps())
    fused = FusedDecoder(model)
    tokens = np.array([[1]])
    fused(tokens, 0)
    fused(tokens, 1)
    ms = timed(cp, fused.graphs[1].launch)
    del fused, model
    return ms


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--ranks-only", action="store_true",
                        help="only the ranks' graph replays: no one-GPU model, no parent loop")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    one = float("nan")
    if not args.ranks_only:
        single = ctx.Queue()
        proc = ctx.Process(target=lambda_one, args=(args.layers, args.dtype, single))
        proc.start()
        one = single.get()
        proc.join()
    from minillama.parallel.comm import free_port
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args.gpus, port, args.layers, args.dtype,
                                                   results)) for r in range(args.gpus)]
    for proc in procs:
        proc.start()
    got = dict(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    print(f"13B shape, {args.layers} layers, {args.dtype}, batch 1, graph replays "
          f"(MINILLAMA_PDL={os.environ.get('MINILLAMA_PDL', '1')}, "
          f"NCCL_PROTO={os.environ.get('NCCL_PROTO', 'default')}, NCCL_GRAPH_MIXING_SUPPORT="
          f"{os.environ.get('NCCL_GRAPH_MIXING_SUPPORT', 'default')})")
    print(f"  one GPU, whole model      {one:7.3f} ms")
    for rank in sorted(got):
        line = "  ".join(f"{k} {v:7.3f} ms" for k, v in got[rank].items())
        print(f"  rank {rank}: {line}")
    if args.ranks_only:
        return
    step = parent_loop(args.layers, args.dtype, args.gpus)
    print(f"  the parent's loop (bench/tp.py's): {step:7.3f} ms per token")
    with open(os.path.join(os.environ.get("OUT", "."), "profile_tp_rank0.txt")) as f:
        print("  " + f.read().strip())


def lambda_one(layers, dtype, queue):
    queue.put(one_gpu(layers, dtype))


if __name__ == "__main__":
    main()

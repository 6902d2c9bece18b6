"""Where a tensor-parallel decode step's time goes (development tool, needs 2+ GPUs and NCCL).

    PYTHONPATH=. python kernels/dev/profile_tp.py [--gpus 2] [--layers 40] [--dtype float16]

bench/tp.py measures tokens/s as a user sees them: the parent, which is rank 0, sends each
token down the workers' pipes and runs its own step on GPU 0. This tool splits that time.
First N processes of its own each build their slices of the 13B-shaped random model
(bench/tp.py's RandomJob), then every rank, in step, times with CUDA events (the replays of a
graph, no host in between):
  - step:     its ShardedFusedDecoder graph, the whole one-token step;
  - no join:  the same step recorded without the per-layer all-reduces (wrong numbers, the
              rank's own GEMVs and kernels alone);
  - joins:    the step's 2 per layer all-reduces of h (bsz, dim) alone, in one graph;
  - one all-reduce of h alone, replayed in a loop of graph launches.
and rank 0 prints them with the one-GPU FusedDecoder step of the whole model, built first.
Then the whole loop as bench/tp.py runs it (the parent as rank 0, pipes, workers), the parent
timing, per step, rank 0's step up to its graph queued and its polling wait for GPU 0
(workers.wait_polling): what the host adds (the tokens sent, the logits copied, the argmax)
is the rest. (Before the parent was rank 0 this part timed a rank 0 worker's loop and its
shared-memory logits hand-off, both gone.)
"""
import time
from dataclasses import dataclass, field
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
    """bench/tp.py's RandomJob, with rank 0's step and its wait timed: rank 0 is the parent,
    so the patches (of ShardedFusedDecoder.__call__ and workers.wait_polling) live in this
    process, and the marks on this object; the workers load the plain job."""
    params: object
    dtype: str
    marks: list = field(default_factory=list)    # per step: [call start, end, wait start, end]

    def open(self, rank, world, ops, comm):
        from minillama.bench.tp import RandomJob
        model = RandomJob(self.params, self.dtype).open(rank, world, ops, comm)
        if rank == 0:
            self.patch()
        return model

    def patch(self):
        from minillama.parallel import fused, workers
        call, wait, marks = fused.ShardedFusedDecoder.__call__, workers.wait_polling, self.marks

        def timed_call(decoder, *args):
            marks.append([time.perf_counter()])
            out = call(decoder, *args)
            marks[-1].append(time.perf_counter())
            return out

        def timed_wait(*args, **kwargs):
            start = time.perf_counter()
            wait(*args, **kwargs)
            if marks and len(marks[-1]) == 2:       # a decode step's wait, not a prompt's
                marks[-1] += [start, time.perf_counter()]
        fused.ShardedFusedDecoder.__call__, workers.wait_polling = timed_call, timed_wait


def report(marks):
    """Rank 0's medians (us) over the second half of the steps (the timed pass)."""
    rows = [r for r in marks[len(marks) // 2:] if len(r) == 4]
    cycle = np.median(np.diff([r[0] for r in rows])) * 1e6
    queue = np.median([r[1] - r[0] for r in rows]) * 1e6
    wait = np.median([r[3] - r[2] for r in rows]) * 1e6
    return (f"rank 0 per step: cycle {cycle:.0f} us = step queued {queue:.0f} + polling wait "
            f"for GPU 0 {wait:.0f} + the rest {cycle - queue - wait:.0f}")


def parent_loop(layers, dtype, world, steps=64):
    """ms per token of bench/tp.py's loop, and rank 0's split of it."""
    from minillama.bench.tp import decode_rate, params_13b
    from minillama.parallel.workers import TensorParallel
    p = params_13b(layers)
    job = TimedJob(p, dtype)
    with TensorParallel(p, job, world) as tp:
        rate, _ = decode_rate(tp.forward, steps)
    return 1e3 / rate, report(job.marks)


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
    step, split = parent_loop(args.layers, args.dtype, args.gpus)
    print(f"  the parent's loop (bench/tp.py's): {step:7.3f} ms per token")
    print(f"  {split}")


def lambda_one(layers, dtype, queue):
    queue.put(one_gpu(layers, dtype))


if __name__ == "__main__":
    main()

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
import contextlib
import time
from collections import defaultdict

import numpy as np

from minillama.bench import gpu7b, torch_compiled
from minillama.cuda import CudaOps, require_cupy
from minillama.cuda.kernels import KERNELS, greedy_pick
from minillama.model import Transformer


def random_decoder(shape, dtype, max_batch_size=1, max_seq_len=64, n_layers=None):
    """A model of a named shape (torch_compiled.model_args) with random weights made on the GPU
    (gpu7b.RandomGpuWeights), decoded by FusedDecoder (CudaOps without the persistent kernel):
    (forward, fused), forward being ops.decoder(model), which holds the model (CudaOps holds
    its decoders by the model, weakly)."""
    p = torch_compiled.model_args(shape, max_batch_size, max_seq_len, n_layers=n_layers)
    ops = CudaOps(persistent=False)
    model = Transformer(p, gpu7b.RandomGpuWeights(p, dtype), ops)
    return ops.decoder(model), ops._decoders[model]


def timed_launches(fused, bsz, cp):
    """Per kernel name: [summed ms, launches] of one eager FusedDecoder.run(bsz)."""
    pairs, launch = [], KERNELS.launch

    def recording(name, grid, block, args, **kwargs):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        launch(name, grid, block, args, **kwargs)
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


def ms_per_step(body, sync, steps=20, warmup=0):
    """Milliseconds per call of body(i), i = 0 .. steps - 1, after `warmup` calls; one wait for
    the GPU before and after (a body that must wait every step waits itself)."""
    for i in range(warmup):
        body(i)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        body(i)
    sync()
    return 1000 * (time.perf_counter() - t) / steps


def captured(cp, record, programmatic=False):
    """A CUDA graph of what record(stream) launches, captured on a stream of its own (with
    programmatic launches where asked, as FusedDecoder captures one row)."""
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with stream, KERNELS.programmatic() if programmatic else contextlib.nullcontext():
        stream.begin_capture()
        try:
            record(stream)
        finally:
            graph = stream.end_capture()
    return graph


def replay_ms(forward, fused, bsz, cp, steps=20):
    """Per step, ms, the host's share taken apart one piece at a time:
    alone     graph replays back to back (the GPU's time: the next launch is queued before the
              last one ends);
    launch    the host's time inside graph.launch() (a replay of ~160 kernels is one call);
    synced    a replay, then a wait for it (+ the GPU's start and the host's wake-up);
    token in  the step's token and position copied in (send_step), a replay, a wait;
    logits out  a replay, the logits copied out of the graph's buffer, a wait;
    same pos  forward(tokens, 3), then a wait, every step at one position;
    forward   forward(tokens, pos), then a wait (+ the decoder's Python, the token's copy in,
              the logits' copy out of the graph's buffer);
    numpy     forward, the logits to the host (.get()) and np.argmax there (bench/tp.py's and
              the generate loop's way);
    host      forward, cp.argmax and .get() (+ one small kernel and the copy to the host);
    greedy_pick  forward, kernels.greedy_pick and .get(): generate's greedy step before
              FusedDecoder.greedy_steps;
    greedy_step  FusedDecoder.greedy_steps, one step: the token copied in by the graph's first
              node, the ids written in place by its last kernel (generate's step in a prompt);
    8 ahead   FusedDecoder.greedy_steps, 8 steps a call, each fed the one before's ids on the
              GPU, per step (generate's steps past the prompt, and decode_rate's)."""
    tokens = np.ones((bsz, 1), dtype=np.int64)
    for pos in range(3):
        forward(tokens, pos)
    graph, sync = fused.graphs[bsz], cp.cuda.Device().synchronize

    def per_step(body):
        return ms_per_step(body, sync, steps)
    launch_s = []

    def timed_launch(_):
        t = time.perf_counter()
        graph.launch()
        launch_s.append(time.perf_counter() - t)
    out = {"alone": per_step(timed_launch)}
    out["launch"] = 1000 * sorted(launch_s)[len(launch_s) // 2]
    out["synced"] = per_step(lambda _: (graph.launch(), sync()))
    out["token in"] = per_step(lambda i: (fused.send_step(tokens, 3 + i), graph.launch(), sync()))

    def logits_out(_):
        graph.launch()
        logits = cp.empty((bsz, 1, fused.p.vocab_size), dtype=np.float32)
        logits.data.copy_from_device_async(fused.logits.data, logits.nbytes)
        sync()
    out["logits out"] = per_step(logits_out)
    out["same pos"] = per_step(lambda i: (forward(tokens, 3), sync()))
    out["forward"] = per_step(lambda i: (forward(tokens, 3 + i), sync()))
    out["numpy"] = per_step(lambda i: np.argmax(forward(tokens, 3 + i).get()[:, -1], axis=-1))
    state = {"tokens": tokens}

    def step(i):
        logits = forward(state["tokens"], 3 + i)
        state["tokens"] = cp.argmax(logits[:, -1], axis=-1).get().reshape(bsz, 1)
    out["host"] = per_step(step)

    def pick(i):
        logits = forward(state["tokens"], 3 + i)
        state["tokens"] = greedy_pick(logits[:, -1]).get()[:bsz].reshape(bsz, 1)
    out["greedy_pick"] = per_step(pick)
    fused.greedy_steps(tokens, 3)                          # records its graph
    out["greedy_step"] = per_step(lambda i: fused.greedy_steps(tokens, 3 + i))
    fused.greedy_steps(tokens, 3, 8)
    out["8 ahead"] = ms_per_step(lambda i: fused.greedy_steps(tokens, 3 + 8 * (i % 2), 8), sync,
                                 steps) / 8
    return out


def io_in_graph_ms(fused, bsz, cp, steps=20):
    """Experiment: the step's copies inside its CUDA graph instead of beside it, ms per step
    with a wait after each (compare replay_ms's synced, token in, logits out, greedy_step):
    in graph  the token's copy from one page-locked row, the step, the logits' copy into a
              fixed buffer, all captured in one graph;
    token     only the token's copy captured with the step;
    logits    only the logits' copy captured with the step;
    copyto    the step's graph, then the logits copied by a kernel (cp.copyto), not a memcpy;
    pick in   greedy_pick in the graph, the token copied in beside it (pick_in_ms)."""
    sync = cp.cuda.Device().synchronize
    row = fused.step_host[0]
    out_buf = cp.empty((bsz, fused.p.vocab_size), dtype=np.float32)

    def capture(token, logits):
        def record(stream):
            if token:
                # (CuPy refuses H2D copies while capturing; the runtime records a memcpy node)
                cp.cuda.runtime.memcpyAsync(fused.step.data.ptr, row.ctypes.data, 4 * (1 + bsz),
                                            cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
            fused.run(bsz)
            if logits:
                out_buf.data.copy_from_device_async(fused.logits.data, out_buf.nbytes, stream)
        return captured(cp, record, programmatic=True)

    def per_step(graph, after=None):
        def body(i):
            row[0] = 3 + i
            graph.launch()
            if after:
                after()
            sync()
        return ms_per_step(body, sync, steps, warmup=3)
    row[1:1 + bsz] = 1
    out = {"in graph": per_step(capture(True, True)), "token": per_step(capture(True, False)),
           "logits": per_step(capture(False, True))}
    out["copyto"] = per_step(fused.graphs[bsz],
                             lambda: cp.copyto(out_buf, fused.logits[:bsz].reshape(out_buf.shape)))
    out.update(pick_in_ms(fused, bsz, cp))
    return out


def pick_in_ms(fused, bsz, cp):
    """Experiment: ms per step of the step's graph with greedy_pick captured at its end,
    writing the ids and flags straight into page-locked host memory, and the token still
    copied in beside it (send_step), a wait after each. greedy_step (replay_ms) is this with
    the token copied in by the graph too: FusedDecoder.greedy_steps' own graph of one step."""
    import cupyx
    from minillama.cuda.fused import device_address
    from minillama.cuda.kernels import GREEDY_THREADS, NO_STEP
    picks = cupyx.empty_pinned((2 * bsz,), dtype=np.int32)
    vocab = fused.p.vocab_size

    def record(stream):
        with KERNELS.programmatic():
            fused.run(bsz)
        KERNELS.launch("greedy_pick", (bsz,), (GREEDY_THREADS,),
                       (fused.logits[:bsz], np.int32(vocab), np.int32(vocab),
                        device_address(picks), np.int32(bsz), NO_STEP))
    tokens, sync = np.ones((bsz, 1), dtype=np.int64), cp.cuda.Device().synchronize
    try:
        graph = captured(cp, record)
        return {"pick in": ms_per_step(lambda i: (fused.send_step(tokens, 3 + i),
                                                  graph.launch(), sync()), sync, warmup=3)}
    except Exception as e:                      # e.g. memory the driver will not map
        print(f"  pick-in experiment failed: {type(e).__name__}: {e}")
        return {}


def in_family(name, family):
    """Whether kernel instance `name` is of `family`: attention_decode<4,float> of
    attention_decode, gemv_v3<8,8,1> of gemv, qgemv_v4<...> and qgemv_mma<...> of qgemv."""
    return name == family or name.startswith((family + "<", family + "_"))


def leave_out_ms(fused, bsz, cp, families=("attention_decode", "embed_tokens", "qgemv", "gemv")):
    """Each kernel family's share of the graph's time, found by leaving it out: ms per step of
    graphs replayed back to back, whole and without each family's launches (the buffers keep
    their last values, so the rest reads stale numbers at the same speed), and with that family
    alone. whole - without is what the family costs in place, its launch gaps included. (A batch
    step that defers its norms zeroes what its products add into in embed_tokens and qgemv_mma:
    left out, those buffers grow from replay to replay; the timing holds, the logits do not.)"""
    sync, launch = cp.cuda.Device().synchronize, KERNELS.launch

    def graph_ms(keep):
        def filtered(name, *args, **kwargs):
            if keep(name):
                launch(name, *args, **kwargs)
        KERNELS.launch = filtered
        try:
            graph = captured(cp, lambda stream: fused.run(bsz), programmatic=True)
        finally:
            KERNELS.launch = launch
        return ms_per_step(lambda i: graph.launch(), sync, 20, warmup=3)
    out = {"whole": graph_ms(lambda name: True)}
    for fam in families:
        out[f"without {fam}"] = graph_ms(lambda name: not in_family(name, fam))
        out[f"only {fam}"] = graph_ms(lambda name: in_family(name, fam))
    return out


def profile(shape, dtype, batches, layers, io=False):
    cp = require_cupy()
    forward, fused = random_decoder(shape, dtype, max(batches), n_layers=layers)  # the graph
    p, nbytes = fused.p, gpu7b.bytes_per_step(forward.model, 1, 8)     # this tool takes apart
    for bsz in batches:
        ms = replay_ms(forward, fused, bsz, cp)
        sums = timed_launches(fused, bsz, cp)
        total = sum(s for s, _ in sums.values())
        print(f"\n== {shape} {dtype} layers {p.n_layers} batch {bsz}: graph {ms['alone']:.3f} ms, "
              f"with host {ms['host']:.3f} ms, eager kernel sum {total:.3f} ms, "
              f"{nbytes / 1e9:.2f} GB/step -> {nbytes / ms['alone'] / 1e6:.0f} GB/s in the graph")
        print("  host, ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
        print("  left out, graph ms per step: " + ", ".join(
            f"{k} {v:.3f}" for k, v in leave_out_ms(fused, bsz, cp).items()))
        if io:
            io_ms = io_in_graph_ms(fused, bsz, cp)
            print("  copies in the graph, ms per step: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in io_ms.items()))
        for name, (ms, n) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
            print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  x{n:<4d} {1000 * ms / n:8.2f} us  {name}")
    del forward, fused
    gpu7b.release_gpu()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7B", choices=list(torch_compiled.SHAPES))
    ap.add_argument("--dtypes", default="q4_0,int8,float16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--io", action="store_true",
                    help="also time the step's copies captured in its graph (io_in_graph_ms)")
    a = ap.parse_args()
    for dtype in a.dtypes.split(","):
        profile(a.shape, dtype, [int(b) for b in a.batches.split(",")], a.layers, a.io)


if __name__ == "__main__":
    main()

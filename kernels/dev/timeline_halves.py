"""Where a one-row layer's time goes in the package's halves (kernels/halves.cu): %globaltimer
stamps of each block's steps in one replay of the step's graph (development tool, needs a GPU
of compute capability 9.0; issue 13).

    PYTHONPATH=. python kernels/dev/timeline_halves.py [--shape 110M] [--pos 3,60]

The package's source is compiled with stamps added at fixed places of attention_half and
feed_forward_wide (the text below, each anchor found exactly once; the package itself has
none): thread 0 of each block takes a record at its start, then writes the time after each
step (after a barrier of the block where the step's work is every warp's). The tool prints,
per step, the earliest, median and latest block in us after the launch before ended (its
latest block's last stamp), for one layer and as the median over the middle layers, then the
whole step's launches end to end.

It follows kernels/dev/timeline_layer.py of commit 1918caa, which did the same for the
prototypes the halves grew from.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:       # this checkout first
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step                                         # noqa: E402
from ab_step import patched                                 # noqa: E402
from minillama.bench import gpu7b                           # noqa: E402
from minillama.cuda import require_cupy, runtime            # noqa: E402
from minillama.cuda.kernels import KERNELS                  # noqa: E402

RECORDS, WIDTH = 4096, 16           # per module: blocks a replay, u64s a record

PRELUDE = """
__device__ unsigned long long* timeline_records;   // (RECORDS, WIDTH): the tool's buffer
__device__ unsigned int timeline_cursor;
__device__ __forceinline__ unsigned long long timeline_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// a block's record: [weight pointer, block, t0 (start), t1, ..]
#define STAMP_OPEN(weights) unsigned long long* stamp_rec = nullptr; \\
    if (threadIdx.x == 0 && timeline_records != nullptr) { \\
        stamp_rec = timeline_records + 16ull * atomicAdd(&timeline_cursor, 1u); \\
        stamp_rec[0] = (unsigned long long)(weights); \\
        stamp_rec[1] = blockIdx.y * gridDim.x + blockIdx.x; stamp_rec[2] = timeline_now(); }
#define STAMP(k) if (stamp_rec != nullptr) stamp_rec[2 + (k)] = timeline_now()
"""

ATTENTION = ["start", "x staged", "normed", "qkv pushed", "attended", "wo added"]
FEED_FORWARD = ["start", "x staged", "w13 summed", "w2 added"]
PHASES = {"attention": ATTENTION, "feed_forward": FEED_FORWARD}

EDITS = [   # (anchor, text after it) in halves.cu, in order (an anchor may hold an earlier text)
    ("    __shared__ __align__(16) WarpSoftmax parts;\n", "    STAMP_OPEN(wqkv);\n"),
    ("    wait_and_stage_x(X, xs, Z, dim);\n    float4 xn[P];\n", "    STAMP(1);\n"),
    ("    cluster_wait();                                 // every block has started: pushes "
     "may go\n", "    STAMP(2);\n"),
    ("    push_qkv<P, WARPS, R>(ws, xn, inv_rms, qkv, dim, head_dim);\n    cluster_arrive();\n"
     "    cluster_wait();\n", "    STAMP(3);\n"),
    ("    head_output<WARPS, R>(parts, rec, o, alone, head_dim);\n    __syncthreads();\n",
     "    STAMP(4);\n"),
    ("    add_wo_rows<WARPS, R>(wos, o, xs, Y, dim, head_dim);\n",
     "    __syncthreads();\n    STAMP(5);\n"),
    ("    __shared__ float sq[J];                         // each warp's share of sum x^2\n",
     "    STAMP_OPEN(w13);\n"),
    ("    wait_and_stage([&] { stage_x_normed(X, g, xs, xg, sq, dim); }, Z, dim);\n",
     "    STAMP(1);\n"),
    ("            sums[1] = fma4(w3[k4], xn, sums[1]);\n        }\n    }\n",
     "    __syncthreads();\n    STAMP(2);\n"),
    ("    STAMP(2);\n    gates_times_w2<J, P>(sums, eps, gate, r2, xs, Y, dim);\n",
     "    __syncthreads();\n    STAMP(3);\n"),
]


def stamped_source(source):
    """kernel_source() with the stamps: PRELUDE before halves.cu, the edits inside it."""
    head, marker, halves = source.partition('#line 1 "halves.cu"\n')
    halves, marker2, rest = halves.partition('#line 1 "persistent.cu"\n')
    for anchor, text in EDITS:
        assert halves.count(anchor) == 1, f"anchor not found once: {anchor!r}"
        halves = halves.replace(anchor, anchor + text)
    return head + marker + PRELUDE + halves + marker2 + rest


def set_global(cp, module, name, value, dtype):
    ptr = module.get_global(name)
    cp.ndarray((1,), dtype, ptr)[...] = value


def records(buffers):
    """{kind: (n, WIDTH) uint64 array} of the replay's records (the blocks that wrote one)."""
    out = {}
    for kind, buffer in buffers.items():
        recs = buffer.get()
        out[kind] = recs[recs[:, 2] > 0]
    return out


def offsets(recs, phases, t0):
    """(blocks, phases) us of each block's stamps after t0 (ns)."""
    return (recs[:, 2:2 + len(phases)].astype(np.int64) - t0) / 1000


def show(label, phases, recs, t0):
    cells = [f"{name} {col.min():6.2f} {np.median(col):6.2f} {col.max():6.2f}"
             for name, col in zip(phases, offsets(recs, phases, t0).T)]
    print(f"  {label:14s} " + " | ".join(cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="110M")
    ap.add_argument("--pos", default="3,60")
    ap.add_argument("--layer", type=int, default=5)
    a = ap.parse_args()
    cp = require_cupy()
    with patched(runtime, "kernel_source", lambda src=runtime.kernel_source(): stamped_source(src)):
        forward, dec = profile_step.random_decoder(a.shape, "float32", max_seq_len=1024)
        tokens = np.ones((1, 1), dtype=np.int64)
        for before in range(3):
            forward(tokens, before)
    plan = dec.halves
    assert plan.attention and plan.feed_forward and plan.feed_forward[2], \
        f"the tool stamps attention_half and feed_forward_wide; the plan is {plan}"
    groups = {"attention": f"attention_half{plan.attention[0]}",
              "feed_forward": f"feed_forward_half{plan.feed_forward[1]}"}
    buffers = {}
    for kind, group in groups.items():
        buffers[kind] = cp.zeros((RECORDS, WIDTH), dtype=np.uint64)
        set_global(cp, KERNELS.module(group), "timeline_records", buffers[kind].data.ptr, np.uint64)
    layer_of = {int(layer[1].data.ptr): ("attention", i) for i, layer in enumerate(dec.layers)}
    layer_of.update({int(layer[4].data.ptr): ("feed_forward", i)
                     for i, layer in enumerate(dec.layers)})
    print(f"stories{a.shape}, plan {plan}")
    for pos in map(int, a.pos.split(",")):
        dec.send_step(tokens, pos)
        dec.run(1)
        graph = profile_step.captured(cp, lambda s: dec.run(1), programmatic=True)
        for _ in range(20):
            graph.launch()
        for kind, group in groups.items():
            buffers[kind][...] = 0
            set_global(cp, KERNELS.module(group), "timeline_cursor", 0, np.uint32)
        graph.launch()
        cp.cuda.Device().synchronize()
        launches = {}                   # (layer, kind) -> its records
        for kind, recs in records(buffers).items():
            for w in np.unique(recs[:, 0]):
                launches[layer_of[int(w)][::-1]] = recs[recs[:, 0] == w]
        order = sorted(launches)        # (layer, "attention") before (layer, "feed_forward")
        ends = {key: int(launches[key][:, 2:].max()) for key in order}
        before = dict(zip(order[1:], order))        # each launch's launch before
        print(f"at position {pos}: us after the launch before ended (earliest, median, latest "
              f"block)")
        for key in order[1:]:
            if key[0] == a.layer:
                show(f"layer {key[0]} {key[1][:4]}", PHASES[key[1]], launches[key],
                     ends[before[key]])
        spans = np.diff([ends[k] for k in order]) / 1000
        print(f"  launch to launch, us (the latest block's last stamp): "
              + " ".join(f"{s:.2f}" for s in spans))
        for kind in ("attention", "feed_forward"):
            rows = [np.median(offsets(launches[k], PHASES[kind], ends[before[k]]), axis=0)
                    for k in order[1:] if k[1] == kind and 1 <= k[0] <= len(dec.layers) - 2]
            med = np.median(np.array(rows), axis=0)
            print(f"  {kind}, median block, median of the middle layers: " + " | ".join(
                f"{name} {v:.2f}" for name, v in zip(PHASES[kind], med)))
    forward = dec = None
    gpu7b.release_gpu()


if __name__ == "__main__":
    main()

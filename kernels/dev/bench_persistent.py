"""PersistentDecoder against FusedDecoder: GPU time of one decode step, per shape and batch.

    python kernels/dev/bench_persistent.py [--json PATH]

A development harness (llm.c dev/cuda style): the data behind the rule CudaOps.decoder uses to
choose between the two (docs/kernels.md, "One kernel per token"). For each shape (random float32
weights, a tied classifier as the stories models have) and batch, it checks that both decoders'
logits agree with the CPU path's on the first steps, then times a graph replay of each at
position 64 back to back (CUDA events, no host in the loop), and prints one table:
microseconds per step, and the bytes of weights a step reads over that time.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from minillama.bench.cpu import SHAPES                      # noqa: E402
from minillama.bench.timing import copy_bandwidth, gpu_ms   # noqa: E402
from minillama.checkpoints.random import random_weights     # noqa: E402
from minillama.cuda import CudaOps, require_cupy            # noqa: E402
from minillama.model import ModelArgs, Transformer          # noqa: E402
from minillama.ops import CPU                               # noqa: E402

RUNS = {   # shape -> (ModelArgs overrides, batches)
    "260K": ({}, (1, 8)),
    "15M": ({}, (1, 2, 4, 8)),
    "42M": ({}, (1, 8)),
    "110M": ({}, (1, 2, 4, 8)),
    "7B-4layers": (dict(dim=4096, hidden_dim=11008, n_layers=4, n_heads=32, vocab_size=32000,
                        max_seq_len=256), (1, 4)),
}


GRIDS = (16, 32, 66, 100)          # blocks of the persistent grid, beside one per SM


def step_us(decoder, bsz, pos=64):
    decoder(np.ones((bsz, 1), dtype=np.int64), pos)            # records the graph
    graph = decoder.graphs[bsz]
    return 1000 * gpu_ms(graph.launch, inner=20)


BARRIER_TEST = r"""
extern "C" __global__ void barriers(unsigned int* counter, int n) {
    unsigned int arrivals = 0;
    for (int i = 0; i < n; ++i) grid_sync(counter, arrivals);
}
"""


def barrier_us(cp, grid, n=1000):
    """Microseconds per grid_sync of persistent.cu alone, at `grid` blocks of 512 threads."""
    text = (ROOT / "kernels" / "persistent.cu").read_text()
    start = text.index("// ---- the grid-wide barrier")
    end = text.index("// ---- a stage's input vector")
    kernel = cp.RawModule(code=text[start:end] + BARRIER_TEST).get_function("barriers")
    counter = cp.zeros(1, dtype=np.uint32)

    def run():
        counter.fill(0)
        kernel((grid,), (512,), (counter, np.int32(n)))
    return 1000 * gpu_ms(run, reps=5, inner=3) / n


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    cp = require_cupy()
    copy = copy_bandwidth()
    for grid in (16, 66, 132):
        print(f"grid_sync alone, {grid} blocks: {barrier_us(cp, grid):.2f} us", flush=True)
    rows = []
    for shape, (over, batches) in RUNS.items():
        fields = {**SHAPES.get(shape, {}), **over}
        p = ModelArgs(**fields, max_batch_size=max(batches))
        w = random_weights(p, tied=True)
        decoders = {}
        for name, persistent in (("fused", False), ("persistent", True)):
            ops = CudaOps(persistent=persistent)
            model = Transformer(p, w, ops)
            ops.decoder(model)
            decoders[name] = ops._decoders[model]
            decoders[name].min_rows = 1         # time the kernel at one and eight rows too,
            decoders[name].min_dim = 0          # and at every width
            decoders[name].max_rows = 8
        cpu = Transformer(p, w, CPU) if p.dim < 4096 else None
        errs = []
        for pos in range(3):                 # agreement with the CPU on the first steps
            tok = np.full((2, 1), 5 + pos)
            ref = cpu.forward(tok, pos) if cpu else None
            outs = {name: d(tok, pos).get() for name, d in decoders.items()}
            if ref is not None:
                errs += [float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
                         for o in outs.values()]
        weight_bytes = sum(a.nbytes for a in (decoders["fused"].output,)) + sum(
            a.nbytes for layer in decoders["fused"].layers for a in layer[:6])
        for bsz in batches:
            row = dict(shape=shape, bsz=bsz, max_rel_err=max(errs) if errs else None,
                       weight_mb=weight_bytes / 1e6)
            for name, d in decoders.items():
                row[f"{name}_us"] = step_us(d, bsz)
                row[f"{name}_of_copy"] = weight_bytes / (row[f"{name}_us"] * 1e-6) / 1e9 / copy
            persistent = decoders["persistent"]
            for grid in GRIDS:              # fewer blocks: cheaper barriers, fewer loads
                persistent.grid, full = grid, persistent.grid
                persistent.graphs.pop(bsz, None)
                row[f"grid{grid}_us"] = step_us(persistent, bsz)
                persistent.grid = full
                persistent.graphs.pop(bsz, None)
            row["persistent_kind"] = type(decoders["persistent"]).__name__
            row["fits"] = decoders["persistent"].fits(bsz) if hasattr(
                decoders["persistent"], "fits") else None
            rows.append(row)
            err = "n/a" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}"
            print(f"{shape:11} bsz {bsz:2}  weights {row['weight_mb']:8.1f} MB  fused "
                  f"{row['fused_us']:8.1f} us ({row['fused_of_copy']:.2f} of copy)  persistent "
                  f"{row['persistent_us']:8.1f} us ({row['persistent_of_copy']:.2f})  "
                  f"[{row['persistent_kind']}, fits {row['fits']}]  err {err}  grids: " +
                  ", ".join(f"{g} {row[f'grid{g}_us']:.1f}" for g in GRIDS), flush=True)
        del decoders
        cp.get_default_memory_pool().free_all_blocks()
    print(f"copy bandwidth {copy:.0f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gbs=copy, rows=rows), indent=1))


if __name__ == "__main__":
    main()

"""Where a layer's time goes with attn_layer and mlp_decode (kernels/dev/attn_layer.cu, mlp.cu):
%globaltimer stamps of each block's phases in one replay of the step's graph (development
tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/timeline_layer.py [--shapes 15M,110M] [--pos 3,60]

Thread 0 of each block writes the time at each phase; the tool prints, for layer 2's two
launches, each phase's earliest, median and latest block, in us after the last block of layer
1's mlp_decode ended.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_mlp                                               # noqa: E402  (checkout first)
import profile_step                                         # noqa: E402
from ab_step import add_instances, patched                  # noqa: E402
from minillama.bench import gpu7b, torch_compiled           # noqa: E402
from minillama.cuda import CudaOps, fused, require_cupy     # noqa: E402
from minillama.model import Transformer                     # noqa: E402

ATTN_PHASES = ["entry", "waited", "x normed", "pushed", "barrier 1", "attended", "record",
               "barrier 2", "o", "wo added", "exit"]
MLP_PHASES = ["entry", "waited", "gate", "exit"]
RUNS = {"15M": ((8, 0), (8, 16, 1, 1)), "110M": ((16, 0), (8, 16, 1, 1))}


def show(name, phases, stamps, t0):
    per = stamps.reshape(-1, 16)
    print(f"  {name} ({per.shape[0]} blocks)")
    for k, label in enumerate(phases):
        col = per[:, k]
        col = col[col > 0]
        if col.size:
            us = (col.astype(np.int64) - t0) / 1000
            print(f"    {label:10s} {us.min():7.2f} {np.median(us):7.2f} {us.max():7.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="15M,110M")
    ap.add_argument("--pos", default="3,60")
    a = ap.parse_args()
    cp = require_cupy()
    ab_mlp.with_dev_source()
    add_instances("common", ab_mlp.instances())
    for shape in a.shapes.split(","):
        mlp, attn = RUNS[shape]
        p = torch_compiled.model_args(shape, 1, 1024)
        ops = CudaOps(persistent=False)
        model = Transformer(p, gpu7b.RandomGpuWeights(p, "float32"), ops)
        forward = ops.decoder(model)
        dec = ops._decoders[model]
        tokens = np.ones((1, 1), dtype=np.int64)
        for before in range(3):
            forward(tokens, before)
        blocks_attn, blocks_mlp = attn[0] * p.n_heads, p.hidden_dim // mlp[0]
        stamps = {1: (cp.zeros(16, dtype=np.uint64), cp.zeros(blocks_mlp * 16, dtype=np.uint64)),
                  2: (cp.zeros(blocks_attn * 16, dtype=np.uint64),
                      cp.zeros(blocks_mlp * 16, dtype=np.uint64))}
        stamps[1] = (np.uint64(0), stamps[1][1])
        for pos in map(int, a.pos.split(",")):
            with patched(fused.FusedDecoder, "run", ab_mlp.layer_run(mlp, attn, stamps)):
                dec.send_step(tokens, pos)
                dec.run(1)
                cp.cuda.Device().synchronize()
                graph = profile_step.captured(cp, lambda s: dec.run(1), programmatic=True)
            for _ in range(30):
                graph.launch()
            cp.cuda.Device().synchronize()
            before = stamps[1][1].get().reshape(-1, 16)
            t0 = int(before[:, 3].max())
            print(f"{shape} at {pos}: us after layer 1's mlp_decode ended")
            show("attn_layer", ATTN_PHASES, stamps[2][0].get(), t0)
            show("mlp_decode", MLP_PHASES, stamps[2][1].get(), t0)
        model = forward = dec = ops = None
        gpu7b.release_gpu()


if __name__ == "__main__":
    main()

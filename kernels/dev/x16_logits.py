"""What x in one float16 part does to a batch's logits (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/x16_logits.py [--shape 7B] [--dtypes q4_0,int8,float16]
                                                  [--bsz 8] [--steps 16]

For each storage format, a model of the shape with random weights made on the GPU
(minillama.bench.gpu7b's RandomGpuWeights) decodes `steps` greedy steps at batch `bsz` through
two decoders of the same weights: CudaOps(x16_batches=False) (x in two float16 parts on the
tensor cores) and CudaOps(x16_batches=True) (one part, qgemv_mma's x16, the default since
2026-12-02). Both are fed the two parts' greedy
tokens, the x16 decoder first each step, so that the cache row it writes is written again by
the other: each step reads the two parts' cache for the positions before it (the x16 decoder
its own row at the position), so what is measured is one step's error.
It prints the relative error of the x16 logits against the two parts' (norm of the difference
over the norm), median and largest over the steps, how many rows' greedy picks differ, and how
far apart the rows' own logits are (the two parts': norm of each step's rows less their mean,
over the norm; near 0 where the rows coincide).
The bench (python -m minillama.bench gpu --section 7b) times both.
RandomGpuWeights' q4_0 codes were uniform nibbles until 2026-12-02, -0.5 on average after the
offset of 8, which turned the residual stream into nearly a constant vector (docs/kernels.md,
"x in one part"), and q4_0's error (3.5e-5) understated what x16 costs a model; its nibbles
are now 1..15. The rows here are fed the same tokens, so their spread is ~1e-7 in every
format: it says the rows agree, not how far a step's logits move.
"""
import argparse

import numpy as np

from minillama.bench import gpu7b, torch_compiled
from minillama.cuda import CudaOps, require_cupy
from minillama.model import Transformer


def compare(shape, dtype, bsz, steps):
    """(relative error of the x16 logits against the two parts', rows whose picks differ, the
    rows' spread about their mean) per step of one model."""
    cp = require_cupy()
    p = torch_compiled.model_args(shape, bsz, steps + 1)
    model = Transformer(p, gpu7b.RandomGpuWeights(p, dtype), CudaOps())
    two = CudaOps(x16_batches=False).decoder(model)     # whatever MINILLAMA_X16_BATCHES says
    one = CudaOps(x16_batches=True).decoder(model)
    tokens, out = np.ones((bsz, 1), dtype=np.int64), []
    for pos in range(steps):
        x16 = one(tokens, pos)[:, -1].get().astype(np.float64)       # (bsz, vocab)
        exact = two(tokens, pos)[:, -1].get().astype(np.float64)     # cache row pos again
        err = np.linalg.norm(x16 - exact) / np.linalg.norm(exact)
        spread = np.linalg.norm(exact - exact.mean(0)) / np.linalg.norm(exact)
        out.append((err, int((x16.argmax(-1) != exact.argmax(-1)).sum()), spread))
        tokens = exact.argmax(-1).reshape(bsz, 1)
    del model, two, one                 # (the decoders hold the model)
    cp.get_default_memory_pool().free_all_blocks()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7B")
    ap.add_argument("--dtypes", default="q4_0,int8,float16")
    ap.add_argument("--bsz", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    for dtype in a.dtypes.split(","):
        rows = compare(a.shape, dtype, a.bsz, a.steps)
        errs, spreads = [r[0] for r in rows], [r[2] for r in rows]
        print(f"{a.shape} {dtype} batch {a.bsz}: x16 logits against two parts, relative error "
              f"median {np.median(errs):.1e}, largest {max(errs):.1e}; picks differing "
              f"{sum(r[1] for r in rows)} of {a.bsz * a.steps}; the rows' spread "
              f"{np.median(spreads):.1e}", flush=True)


if __name__ == "__main__":
    main()

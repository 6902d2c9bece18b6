"""What x in one float16 part does to a batch's logits (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/x16_logits.py [--shape 7B] [--dtypes q4_0,int8,float16]
                                                  [--bsz 8] [--steps 16]

For each storage format, a model of the shape with random weights made on the GPU
(minillama.bench.gpu7b's RandomGpuWeights) decodes `steps` greedy steps at batch `bsz` through
two decoders of the same weights: CudaOps() (x in two float16 parts on the tensor cores) and
CudaOps(x16_batches=True) (one part, qgemv_mma's x16). Both are fed the two parts' greedy
tokens, the x16 decoder first each step, so that the cache row it writes is written again by
the other and each decoder reads the two parts' cache: what is measured is one step's error.
It prints the relative error of the x16 logits against the two parts' (norm of the difference
over the norm), median and largest over the steps, and how many rows' greedy picks differ.
The bench (python -m minillama.bench gpu --section 7b) times both.
"""
import argparse

import numpy as np

from minillama.bench import gpu7b, torch_compiled
from minillama.cuda import CudaOps, require_cupy
from minillama.model import Transformer


def compare(shape, dtype, bsz, steps):
    """(relative error of the x16 logits against the two parts', rows whose picks differ) per
    step of one model."""
    cp = require_cupy()
    p = torch_compiled.model_args(shape, bsz, steps + 1)
    model = Transformer(p, gpu7b.RandomGpuWeights(p, dtype), CudaOps())
    two, one = CudaOps().decoder(model), CudaOps(x16_batches=True).decoder(model)
    tokens, out = np.ones((bsz, 1), dtype=np.int64), []
    for pos in range(steps):
        x16 = one(tokens, pos)[:, -1].get().astype(np.float64)       # (bsz, vocab)
        exact = two(tokens, pos)[:, -1].get().astype(np.float64)     # cache row pos again
        err = np.linalg.norm(x16 - exact) / np.linalg.norm(exact)
        out.append((err, int((x16.argmax(-1) != exact.argmax(-1)).sum())))
        tokens = exact.argmax(-1).reshape(bsz, 1)
    del model
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
        errs = [e for e, _ in rows]
        print(f"{a.shape} {dtype} batch {a.bsz}: x16 logits against two parts, relative error "
              f"median {np.median(errs):.1e}, largest {max(errs):.1e}; picks differing "
              f"{sum(d for _, d in rows)} of {a.bsz * a.steps}", flush=True)


if __name__ == "__main__":
    main()

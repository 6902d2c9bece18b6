"""qgemv_mma's launch plans, A/B on the whole 7B batch-8 step (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_mma_plan.py [--dtypes q4_0,int8] [--rounds 7]

kernels.qgemv_mma_plan takes, of every NR and count of slices, the fewest waves times a block's
work (docs/kernels.md, "One wave"). This tool builds a Llama-2-7B-shaped model (random weights
made on the GPU, minillama.bench.gpu7b), captures its batch-8 step's graph once with each plan
(the package's, the rule before it, and the package's with NR 1 only), checks the logits
against the first plan's, and replays the graphs in interleaved rounds: medians, ms a step.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step                 # noqa: E402  (puts the checkout first)
from minillama.bench import gpu7b, torch_compiled          # noqa: E402
from minillama.cuda import CudaOps, kernels, require_cupy  # noqa: E402
from minillama.cuda.kernels import MMA_MAX_SLICE, MMA_SPAN, cdiv     # noqa: E402
from minillama.model import Transformer                    # noqa: E402

RULE = kernels.qgemv_mma_plan


def plan_before(N, K, fmt, sms=None, nr=None, ks=None):
    """qgemv_mma's rule until 2026-11-30: about two blocks an SM, NR 2 only where 256-row tiles
    alone fill the SMs."""
    sms = sms or kernels.sm_count()
    nr = nr or (2 if cdiv(N, 256) >= sms else 1)
    tiles, spans = cdiv(N, 128 * nr), cdiv(K, MMA_SPAN[fmt])
    ks = max(int(ks or round(2 * sms / tiles)), cdiv(spans * MMA_SPAN[fmt], MMA_MAX_SLICE), 1)
    per_slice = cdiv(spans, min(ks, spans))
    return nr, cdiv(spans, per_slice), per_slice


def nr1_only(N, K, fmt, sms=None, nr=None, ks=None):
    """The package's rule with one 128-row tile a block (its search over the slices only)."""
    return RULE(N, K, fmt, sms, nr or 1, ks)


PLANS = {"rule": RULE, "before": plan_before, "nr1 only": nr1_only}


def ab(cp, dtype, rounds, bsz=8):
    sync = cp.cuda.Device().synchronize
    p = torch_compiled.model_args("7B", bsz, 64)
    ops = CudaOps(persistent=False)
    model = Transformer(p, gpu7b.RandomGpuWeights(p, dtype), ops)
    forward = ops.decoder(model)
    fused = ops._decoders[model]
    tokens = np.arange(1, bsz + 1, dtype=np.int64).reshape(bsz, 1)
    for pos in range(3):
        forward(tokens, pos)
    graphs, logits = {}, {}
    for label, plan in PLANS.items():
        kernels.qgemv_mma_plan = plan
        try:
            fused.send_step(tokens, 3)
            fused.run(bsz)                          # eager: workspaces, attributes
            sync()
            logits[label] = fused.logits[:bsz].get().copy()
            graphs[label] = profile_step.captured(cp, lambda s: fused.run(bsz), programmatic=True)
        finally:
            kernels.qgemv_mma_plan = RULE
    first = next(iter(logits.values()))
    for label, got in logits.items():
        diff = np.linalg.norm(got - first) / np.linalg.norm(first)
        print(f"7B {dtype} {label}: logits within {diff:.1e} of the first plan's, finite "
              f"{np.isfinite(got).all()}")
    times = {label: [] for label in graphs}
    for _ in range(rounds):
        for label, graph in graphs.items():
            times[label].append(profile_step.ms_per_step(lambda i: graph.launch(), sync, 10,
                                                         warmup=2))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"7B {dtype} batch {bsz}, graph ms (median of {rounds} rounds): "
          + ", ".join(f"{k} {v:.3f} ({med['before'] / v:.2f}x the rule before)"
                      for k, v in med.items()), flush=True)
    gpu7b.release_gpu()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="q4_0,int8")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    cp = require_cupy()
    for dtype in a.dtypes.split(","):
        ab(cp, dtype, a.rounds)


if __name__ == "__main__":
    main()

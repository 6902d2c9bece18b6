"""qgemv_mma's launch plans, A/B on the whole 7B batch-8 step (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_mma_plan.py [--dtypes q4_0,int8] [--rounds 7]

kernels.qgemv_mma_plan takes, of every NR and count of slices, the fewest waves times a block's
work (docs/kernels.md, "One wave"). This tool compares it with the rule before it and with its
own search at NR 1 only, on a Llama-2-7B-shaped model's batch-8 step (ab_step.py: the step's
graph captured per plan, logits checked, replays in interleaved rounds).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_step import ab_steps, patched                      # noqa: E402  (puts the checkout first)
from minillama.cuda import kernels, require_cupy           # noqa: E402
from minillama.cuda.kernels import MMA_MAX_SLICE, MMA_SPAN, cdiv     # noqa: E402

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="q4_0,int8")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    cp = require_cupy()
    variants = {label: lambda plan=plan: patched(kernels, "qgemv_mma_plan", plan)
                for label, plan in PLANS.items()}
    for dtype in a.dtypes.split(","):
        ab_steps(cp, "7B", dtype, [8], variants, a.rounds)


if __name__ == "__main__":
    main()

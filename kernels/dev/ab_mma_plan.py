"""qgemv_mma's launch plans, A/B on the whole 7B batch-8 step (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_mma_plan.py [--dtypes q4_0,int8] [--rounds 7]
        [--variants LABEL,...]

kernels.qgemv_mma_plan takes, of every NR and count of slices, the fewest waves times a block's
work (docs/kernels.md, "One wave"). This tool compares it with the rule before it, with its
own search at NR 1 only, and with qgemv_mma at three blocks an SM (B3: the launch bounds and
the plan's waves, half the loads in flight), on a Llama-2-7B-shaped model's batch-8 step
(ab_step.py: the step's graph captured per variant, logits checked, replays in interleaved
rounds). On an H200 (2026-11-30, --rounds 7, ms) the rule won: q4_0 4.2395, before 4.9271,
NR 1 only 4.7312, B3 4.5346; int8 4.9114, 5.6818, 5.4419, 5.4466 (docs/benchmarks.md,
fourteenth run). Those blocks had 8 warps, two an SM; the package's have 16, one an SM
(MMA_WARPS: tiles twice as tall, x staged by half as many blocks). "8 warps" is the block
before: on an H200 (2026-11-30, 5 rounds, ms) q4_0 2.6254 -> 2.5385 with 16 (1.03x), int8
3.4007 -> 3.3452 (1.02x), the logits bit for bit the same (docs/benchmarks.md, twenty-third run).
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_step import ab_steps, add_instances, arguments, patched   # noqa: E402  (checkout first)
from minillama.cuda import kernels, require_cupy           # noqa: E402
from minillama.cuda.kernels import GEMV_PROLOGUES, MMA_MAX_SLICE, MMA_SPAN, cdiv   # noqa: E402

RULE = kernels.qgemv_mma_plan


def plan_before(N, K, fmt, sms=None, nr=None, ks=None):
    """qgemv_mma's rule until 2026-11-30: about two blocks an SM, NR 2 only where 256-row tiles
    alone fill the SMs."""
    sms = sms or kernels.sm_count()
    nr = nr or (2 if cdiv(N, 256) >= sms else 1)
    tiles, spans = cdiv(N, kernels.mma_tile_rows(nr)), cdiv(K, MMA_SPAN[fmt])
    ks = max(int(ks or round(2 * sms / tiles)), cdiv(spans * MMA_SPAN[fmt], MMA_MAX_SLICE), 1)
    per_slice = cdiv(spans, min(ks, spans))
    return nr, cdiv(spans, per_slice), per_slice


def nr1_only(N, K, fmt, sms=None, nr=None, ks=None):
    """The package's rule with one 128-row tile a block (its search over the slices only)."""
    return RULE(N, K, fmt, sms, nr or 1, ks)


def chosen(pick, nr_set=None, ks_set=None):
    """The package's rule, but NR nr_set and ks_set slices for the matrices pick(N, K) names (with
    the norms deferred and the slices added by atomics, 2026-12-01, the rule's cost leaves out
    what a tile costs besides its work: x staged once per tile and slice, the atomics).
    Measured (H200, 2026-12-01, 7 rounds, ms a batch-8 step): q4_0 rule 2.2791, wo at NR 2
    0.97x, w2 at NR 2 1.00x, both 0.98x, wqkv 4 slices 0.99x, w2 6 slices 0.96x; int8 3.0916,
    0.98x, 1.01x, 0.99x, 0.98x, 0.95x. The rule stays."""
    def plan(N, K, fmt, sms=None, nr=None, ks=None):
        if pick(N, K) and nr is None and ks is None:
            return RULE(N, K, fmt, sms, nr_set, ks_set)
        return RULE(N, K, fmt, sms, nr, ks)
    return plan


def is_wo(N, K):
    return N == K


def is_w2(N, K):
    return K > N


def is_wqkv(N, K):
    return N == 3 * K


PLANS = {"rule": RULE, "before": plan_before, "nr1 only": nr1_only,
         "wo at NR 2": chosen(is_wo, nr_set=2), "w2 at NR 2": chosen(is_w2, nr_set=2),
         "wo and w2 at NR 2": chosen(lambda N, K: is_wo(N, K) or is_w2(N, K), nr_set=2),
         "wqkv 4 slices": chosen(is_wqkv, nr_set=2, ks_set=4),
         "w2 6 slices": chosen(is_w2, nr_set=1, ks_set=6)}
# qgemv_mma at three blocks of 8 warps an SM: the launch bounds' B and the plan's waves, half the loads
# in flight (at these U the q8_0 and q4_0 instances spill 0 to 32 bytes a thread, at the
# package's U of the time, 4 / 2, 108 to 232: ptxas -v's spill stores)
B3 = {"MMA_BLOCKS_PER_SM": 3, "MMA_WARPS": 8,
      "MMA_U": {fmt: {1: 2, 2: 1} for fmt in kernels.MMA_FORMATS}}
W8 = {"MMA_BLOCKS_PER_SM": 2, "MMA_WARPS": 8}     # the block until 2026-11-30
# More loads in flight at NR 1 (the 7B wo and w2 at 8 rows, 0.25 and 0.38 of the copy bandwidth
# under Nsight Compute, 2026-12-01, where the NR 2 launches reach 0.58): MMA_U's steps for one
# format's NR 1. None of these spill (ptxas -v, NVRTC 13 sm_90) but q4_0 U 3's 4 to 16 bytes.
LOADS = {f"{fmt} U {u} at NR 1": {"MMA_U": {**kernels.MMA_U, fmt: {**kernels.MMA_U[fmt], 1: u}}}
         for fmt, u in (("q4_0", 2), ("q4_0", 3), ("q8_0", 3), ("q8_0", 4))}


@contextlib.contextmanager
def settings(values):
    """kernels' module constants set to `values` inside the block."""
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(patched(kernels, name, value))
        yield


def register(values):
    """qgemv_mma's instances under `values`, compiled with their formats' groups."""
    with settings(values):
        for fmt in kernels.MMA_FORMATS:
            add_instances(fmt, [kernels._qgemv_mma_name(fmt, nr, pro) for nr in kernels.MMA_NR
                                for pro in GEMV_PROLOGUES.values()])


def main():
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--variants")              # the rule and these (comma-separated labels)
    known, sys.argv[1:] = extra.parse_known_args()
    only = known.variants
    dtypes, rounds = arguments(__doc__)
    cp = require_cupy()
    for values in (B3, W8, *LOADS.values()):
        register(values)
    variants = {label: lambda plan=plan: patched(kernels, "qgemv_mma_plan", plan)
                for label, plan in PLANS.items()}
    variants["3 blocks an SM, U halved"] = lambda: settings(B3)
    variants["8 warps, 2 blocks an SM"] = lambda: settings(W8)
    variants.update({label: lambda values=values: settings(values)
                     for label, values in LOADS.items()})
    if only:
        variants = {label: variants[label] for label in ["rule", *only.split(",")]}
    for dtype in dtypes:
        ab_steps(cp, "7B", dtype, [8], variants, rounds)


if __name__ == "__main__":
    main()

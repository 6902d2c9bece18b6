"""A one-row layer in two launches (halves.cu, FusedDecoder.run_halves) against five
(run_five), on the float32 TinyStories shapes at several positions (development tool, needs a
GPU of compute capability 9.0).

    PYTHONPATH=. python kernels/dev/ab_halves.py [--rounds 7] [--positions 3,60,200] [--tuning]

Beside the package's plan, each pair halves_plan chooses from (clusters of 8 or 4, the
feed-forward's rows in registers or shared memory: plan_of). ab_step.py's harness: the step's
graph captured per variant, logits checked against the first's, interleaved rounds, ms a
step. The prototypes it grew from (kernels/dev/attn_layer.cu,
mlp.cu, with their variants and a timeline of %globaltimer stamps) are in commit 1918caa.

On an H200 (2026-12-01): see docs/kernels.md, "A layer in two launches".
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_step import ab_steps, add_instances, patched       # noqa: E402  (checkout first)
from minillama.cuda import fused, kernels, require_cupy    # noqa: E402


def five_launches():
    """A variant: the one-row step as run_five, whatever the plan."""
    return patched(fused.FusedDecoder, "run_halves", lambda self: self.run_five(1))


@contextlib.contextmanager
def halves_with(warps=None, J=None):
    """A variant: attention_half with `warps` warps a block, feed_forward_half with J hidden
    units a block (the plan's where None; the instances added by main)."""
    with contextlib.ExitStack() as stack:
        if warps:
            stack.enter_context(patched(fused, "HALVES_WARPS", warps))
        if J:       # a property on the class reads before the instance's own attribute
            kernels.HalvesPlan.feed_forward = property(
                lambda plan: (J, plan.__dict__["feed_forward"][1], 0),
                lambda plan, value: plan.__dict__.__setitem__("feed_forward", value))
            stack.callback(delattr, kernels.HalvesPlan, "feed_forward")
        yield


TUNING = {"w8": dict(warps=8), "J8": dict(J=8), "w8 J8": dict(warps=8, J=8)}


@contextlib.contextmanager
def plan_of(R, wide):
    """A variant: halves_plan's pair (R, wide) whatever it would choose (a property on the
    class reads before the decoder's own attribute)."""
    fused.FusedDecoder.halves = property(lambda dec: kernels.halves_plan(
        dec.p.dim, dec.p.head_dim, dec.p.hidden_dim, n_heads=dec.p.n_heads, choose=(R, wide)))
    try:
        yield
    finally:
        del fused.FusedDecoder.halves


PLANS = {"R 8, registers": (8, False), "R 4, registers": (4, False), "R 8, wide": (8, True),
         "R 4, wide": (4, True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--positions", default="3,60,200")
    ap.add_argument("--shapes", default="15M,110M")
    ap.add_argument("--tuning", action="store_true",
                    help="also the halves with 8 warps an attention block and J 8, on the "
                    "plan's clusters: "
                    + ", ".join(TUNING))
    a = ap.parse_args()
    cp = require_cupy()
    variants = {"five launches": five_launches, "two (halves)": contextlib.nullcontext}
    variants.update({label: (lambda pair=pair: plan_of(*pair)) for label, pair in PLANS.items()})
    if a.tuning:
        for P in range(1, kernels.HALVES_MAX_P + 1):
            add_instances(f"attention_half{P}", [f"attention_half<{P},8,{R}>"
                                                 for R in kernels.HALVES_CLUSTERS])
        variants.update({label: (lambda kw=kw: halves_with(**kw)) for label, kw in TUNING.items()})
    for shape in a.shapes.split(","):
        for pos in map(int, a.positions.split(",")):
            ab_steps(cp, shape, "float32", [1], variants, rounds=a.rounds, max_seq_len=1024,
                     steps=20, pos=pos)


if __name__ == "__main__":
    main()

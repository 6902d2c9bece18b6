"""Bounds before building: what a whole decode step would gain (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_bounds.py [--rounds 7] [--only 7b,stories,batches,...]
        [--variants ...]

Two candidates, measured as bounds on the step they would change, before either is written:

- "plain norms": every normed product (wqkv, w13, the classifier) launched without its RMSNorm
  prologue. The logits are wrong (flagged as a mismatch, expected); the time is what a step
  would take if the sum of squares and its block-wide barrier cost nothing, the most a
  candidate that folds RMSNorm into the products' epilogue could save.
- "programmatic" and "ordinary": the graph captured with programmatic launches, or without,
  whatever FusedDecoder.programmatic says. Its rule, one row only, was measured before
  qgemv_mma's plan went to one wave (docs/kernels.md, "Between kernels" and "One wave"); this
  tool's first run (H200, 2026-11-30) found the 7B batch-8 step 5 to 8% faster with them, and
  the rule now takes them for batches of a model kept as stored.

And gemv's RMSNorm after the sums, once written ("late none", "late early", "late all":
kernels.GEMV_LATE_NORM): on the one-row float32 steps, the graph's gemv launches without it,
with it where W's first loads come before the wait, or on every one-row launch.

Each on the shapes where it matters (ab_step.py: one model per shape and storage, its graph
captured per variant, replays interleaved over rounds, medians, ms a step).
"""
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_step                                              # noqa: E402  (checkout first)
from ab_step import ab_steps, patched                       # noqa: E402
from minillama.cuda import fused, kernels, require_cupy     # noqa: E402

RUNS = {"7b": [("7B", "q4_0", (1, 8)), ("7B", "int8", (1, 8)), ("7B", "float16", (8,))],
        "stories": [("15M", "float32", (1, 8, 32)), ("110M", "float32", (1, 8, 32))],
        "batches": [("7B", "q4_0", (2, 4, 16, 32))],
        "large batches": [("7B", "int8", (16, 32)), ("7B", "float16", (16, 32))],
        "one row": [("15M", "float32", (1,)), ("110M", "float32", (1,))]}


def plain_norms():
    """FusedDecoder's products with their norm argument dropped (timing only)."""
    matvec = fused.matvec

    def without(x, w, **kwargs):
        kwargs.pop("norm", None)
        return matvec(x, w, **kwargs)
    return patched(fused, "matvec", without)


def captured(programmatic):
    """The graph captured with programmatic launches, or without, whatever the rule says."""
    return patched(ab_step, "capture_programmatic", lambda fused, bsz: programmatic)


VARIANTS = {"package": contextlib.nullcontext,
            "plain norms": plain_norms,
            "programmatic": lambda: captured(True),
            "ordinary": lambda: captured(False),
            # gemv's RMSNorm after the sums (GEMV_RMSNORM_LATE) on no launch, on the launches
            # with early loads of W (the package's), on every one-row launch
            "late none": lambda: patched(kernels, "GEMV_LATE_NORM", "none"),
            "late early": lambda: patched(kernels, "GEMV_LATE_NORM", "early"),
            "late all": lambda: patched(kernels, "GEMV_LATE_NORM", "all")}


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="7b,stories")
    ap.add_argument("--variants", default="package,plain norms,programmatic,ordinary")
    a = ap.parse_args()
    variants = {k: VARIANTS[k] for k in a.variants.split(",")}
    cp = require_cupy()
    for part in a.only.split(","):
        for shape, dtype, batches in RUNS[part]:
            ab_steps(cp, shape, dtype, batches, variants, rounds=a.rounds,
                     steps=20 if shape in ("15M", "110M") else 10)


if __name__ == "__main__":
    main()

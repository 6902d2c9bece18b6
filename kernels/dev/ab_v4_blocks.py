"""qgemv_v4 at more blocks an SM, A/B on the whole 7B one-row step (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_v4_blocks.py [--dtypes q4_0,int8] [--rounds 7]

Nsight Compute's full set on the 7B q4_0 step at one row (H200, 2026-11-30) put qgemv_v4's
normed launches, 58% of the step, at 113 registers a thread, two blocks an SM by its launch
bounds, 3.75 warps a scheduler and 0.87 of them eligible: the profile gemv_v3 had before it
went to three blocks an SM (docs/kernels.md, "One tile"). kernels.QGEMV_V4 gives qgemv_v4's
(NR, U, B): weight rows a warp, loads in flight, blocks an SM (its launch bounds and the grid).
This tool compiles the settings below beside the package's and compares the whole step with
each (ab_step.py: graphs captured per setting, logits checked, interleaved rounds). NVRTC sm_90
put the candidates at 64 to 80 registers, with at most 24 bytes of spills (q4_0 with RMSNorm:
1, 2, 3 and 2, 1, 3 none). A setting with another NR also moves the w2 products between v4 and
qgemv_v4s (qgemv_v4s_wins reads QGEMV_V4), so the step measures the pair.

On an H200 (2026-11-30, --rounds 7) the package's settings won: every candidate was slower, q4_0
0.74 to 0.95x and int8 0.87 to 0.96x the package's step (docs/benchmarks.md, fourteenth run).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_step import ab_steps, add_instances, arguments, patched   # noqa: E402  (checkout first)
from minillama.cuda import kernels, require_cupy            # noqa: E402
from minillama.cuda.kernels import GEMV_PROLOGUES, QGEMV_V4            # noqa: E402

# {storage (the bench's --dtype): (format, [(NR, U, B), ...])}; the package's setting first
SETTINGS = {"q4_0": ("q4_0", [QGEMV_V4["q4_0"], (1, 2, 3), (2, 1, 3), (2, 2, 3), (2, 1, 4)]),
            "int8": ("q8_0", [QGEMV_V4["q8_0"], (2, 2, 3), (1, 4, 3), (2, 2, 4), (1, 4, 4)])}


def register(fmt, settings):
    """qgemv_v4's instances of `settings`, compiled with the format's group."""
    names = []
    for setting in settings:
        with patched(QGEMV_V4, fmt, setting):
            names += [kernels._qgemv_v4_name(fmt, pro) for pro in GEMV_PROLOGUES.values()]
    add_instances(fmt, names)


def main():
    dtypes, rounds = arguments(__doc__)
    cp = require_cupy()
    for dtype in dtypes:                          # before any of the groups compiles
        register(*SETTINGS[dtype])
    for dtype in dtypes:
        fmt, settings = SETTINGS[dtype]
        variants = {"nr{} u{} b{}".format(*s): lambda s=s, fmt=fmt: patched(QGEMV_V4, fmt, s)
                    for s in settings}
        ab_steps(cp, "7B", dtype, [1], variants, rounds)


if __name__ == "__main__":
    main()

"""attention_decode's splits counted in the block's own chunk of keys against chunks of 128,
A/B on the whole 7B one-row step at fixed positions (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_attention_chunk.py [--dtypes q4_0,int8] [--rounds 7]

kernels.attention_splits gives one split of the cached keys per chunk of positions, the keys a
block takes in one round trip (kernels.attention_chunk). Until 2026-11-30 the host counted
chunks of 128 keys, 16 warps' worth, whatever the block; the 7B shape's blocks have 8 warps,
64 keys, so at max_seq_len 512 the host launched 4 splits where the kernel splits into as many
as 8. This tool runs the step with the package's rule and with chunks of 128 (ab_step.py:
graphs captured per rule, logits checked, interleaved rounds), at positions where the two
agree (3, 200: at most 4 chunks) and where they differ (300, 500).

On an H200 (2026-11-30, --rounds 7): the same to 0.4% up to 200; at 300 and 500 q4_0 1.013x
and 1.015x, int8 1.008x and 0.994x (docs/kernels.md, "Splits of the keys").
"""
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_step import ab_steps, arguments, patched           # noqa: E402  (checkout first)
from minillama.cuda import fused, kernels, require_cupy    # noqa: E402

POSITIONS = (3, 200, 300, 500)
MAX_SEQ_LEN = 512


def chunks_of(keys):
    """A variant: attention_splits counting chunks of `keys` positions."""
    rule = kernels.attention_splits
    return lambda: patched(fused, "attention_splits", lambda bsz, seq, chunk: rule(bsz, seq, keys))


def main():
    dtypes, rounds = arguments(__doc__)
    cp = require_cupy()
    # the package's rule first: it gives the most splits, and sizes the records they write
    variants = {"package": contextlib.nullcontext, "chunks of 128": chunks_of(128)}
    for dtype in dtypes:
        for pos in POSITIONS:
            ab_steps(cp, "7B", dtype, [1], variants, rounds, max_seq_len=MAX_SEQ_LEN, pos=pos)


if __name__ == "__main__":
    main()

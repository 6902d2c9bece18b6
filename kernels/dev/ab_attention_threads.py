"""attention_decode's block size on the whole 7B step, by rows and position (development tool,
needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_attention_threads.py [--dtypes q4_0,int8] [--rounds 7]
        [--batches 1,8] [--positions 3,31,200] [--threads 128] [--splits 2] [--keys 16]

kernels.attention_threads gives the 7B shape's attention 8 warps a block (a block a head and
row). time_attention.py found the kernel alone 1.31x as fast at 8 rows with 4 warps (H200,
2026-12-01); this tool asks whether the step shows it: the package's rule against each
--threads for every batch, at positions of a story's start (3, 31: the benchmark's steps run
0 .. 31) and of a longer context (200, where 4 warps take twice the chunks), max_seq_len 512
as the benchmark's (ab_step.py: graphs captured per rule, logits checked, interleaved rounds).
With --splits, each --threads also with the keys split over up to that many blocks at every
batch (kernels.attention_splits splits one row only), so that a smaller block keeps as many
keys in flight a head and row at long contexts. With --keys, each --threads also with that many
keys a warp takes at once (decode.cu's ATTN_LANE_FLOATS edited: 16 keys keep 4 warps' chunk at
64 keys, the 8-warp block's) at the batches above one row; the edit reaches the one-row
launches too (8 warps, 128 keys a chunk), and the launch bound drops to 256 threads so that
the longer chunk has the registers.
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_bounds                                             # noqa: E402  (checkout first)
from ab_step import ab_steps, patched                        # noqa: E402
from minillama.cuda import fused, kernels, require_cupy      # noqa: E402
from minillama.cuda.runtime import cdiv                      # noqa: E402

MAX_SEQ_LEN = 512


def block_of(threads, splits=None):
    """A variant: attention_decode's block of `threads`, and with `splits`, the keys of any
    batch split as one row's are, over up to `splits` blocks."""
    rule = kernels.attention_splits

    def split_rule(bsz, max_seq_len, chunk):     # (the kernel splits from 3 chunks on)
        return rule(bsz, max_seq_len, chunk) if bsz == 1 else min(splits, cdiv(max_seq_len, chunk))

    @contextlib.contextmanager
    def variant():
        with patched(fused, "attention_threads", lambda width, bsz, heads: threads), \
                patched(fused, "attention_splits", rule if splits is None else split_rule):
            yield
    return variant


def keys_a_warp(threads, keys):
    """A variant: attention_decode's block of `threads` at batches above one row, each warp
    taking `keys` keys a chunk (float4 pieces, head_dim 128: a lane's floats are 4 a key)."""
    lane_floats = 4 * keys
    name = f"{keys} keys a warp"
    ab_bounds.SOURCE_BOUNDS[name] = [
        ("constexpr int ATTN_LANE_FLOATS = 32;",
         f"constexpr int ATTN_LANE_FLOATS = {lane_floats};   // EDITED"),
        ("    return width == 4 ? ATTN_WARPS * 32 : 256;", "    return 256;   // EDITED")]
    rule = kernels.attention_threads

    @contextlib.contextmanager
    def variant():
        with ab_bounds.edited_source(name), \
                patched(kernels, "ATTENTION_LANE_FLOATS", lane_floats), \
                patched(fused, "attention_threads",
                        lambda width, bsz, heads: rule(width, bsz, heads) if bsz == 1 else threads):
            yield
    return variant


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="q4_0,int8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--positions", default="3,31,200")
    ap.add_argument("--threads", default="128")
    ap.add_argument("--splits", default="")
    ap.add_argument("--keys", default="")
    a = ap.parse_args()
    cp = require_cupy()
    variants = {"package": contextlib.nullcontext}
    for t in a.threads.split(","):
        variants[f"{t} threads"] = block_of(int(t))
        for s in filter(None, a.splits.split(",")):
            variants[f"{t} threads, {s} splits"] = block_of(int(t), int(s))
        for k in filter(None, a.keys.split(",")):
            variants[f"{t} threads, {k} keys a warp"] = keys_a_warp(int(t), int(k))
    batches = [int(b) for b in a.batches.split(",")]
    for dtype in a.dtypes.split(","):
        for pos in (int(p) for p in a.positions.split(",")):
            ab_steps(cp, "7B", dtype, batches, variants, a.rounds, max_seq_len=MAX_SEQ_LEN, pos=pos)


if __name__ == "__main__":
    main()

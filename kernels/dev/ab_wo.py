"""Attention and wo in one launch (attention_decode_wo, FusedDecoder.fuses_wo) against the two
launches, A/B on the whole one-row step of the float32 story shapes (development tool, needs a
GPU).

    PYTHONPATH=. python kernels/dev/ab_wo.py [--shapes 15M,110M] [--rounds 7]

FusedDecoder.FUSE_WO off is the step
as it was: attention_decode, then wo's gemv adding into h, then w13's gemv. On, each head's
block multiplies its output by wo's columns of that head (the slice copied into shared
memory before the wait), and w13's gemv adds the heads' products to h on its way in, writing
the sum as the next residual (docs/kernels.md, "Attention and wo in one launch"). ab_step.py
captures each variant's graph, checks its logits against the first's, and replays them in
interleaved rounds, at positions 3 and 200 (the 110M shape's context is 1024: at 200 one
split of the keys; 15M's 256: one split).
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_step import ab_steps, patched                      # noqa: E402  (checkout first)
from minillama.cuda import fused, require_cupy             # noqa: E402

POSITIONS = (3, 200)


def attention_wo_alone(self, bsz):
    """FusedDecoder.run with attention_decode_wo in place of attention_decode and everything
    else as the two launches have it (wo's gemv, w13's plain gemv; the heads' products written
    and not read): what the kernel's own extra work costs, apart from gemv's PARTS."""
    from minillama.cuda.fused import CACHE_TYPES, KERNELS, i32, matvec
    from minillama.cuda.kernels import attention_wo_smem
    import numpy as np
    p = self.p
    nh, nkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
    h, qkv, att, h13, wo_parts = (a[:bsz] for a in (self.h, self.qkv, self.att, self.h13,
                                                     self.wo_parts))
    eps, scale = p.norm_eps, np.float32(1.0 / np.sqrt(hd))
    width, grid, block = self.attention_grid(bsz)
    self.embed(bsz, h)
    for attn_norm, wqkv, wo, ffn_norm, w13, w2, cache_k, cache_v in self.layers:
        matvec(h, wqkv, out=qkv, norm=attn_norm, eps=eps)
        KERNELS.launch(f"attention_decode_wo<{width},{CACHE_TYPES[cache_k.dtype.name]}>", grid,
                       block, (qkv, self.step, self.freqs_cos, self.freqs_sin, cache_k, cache_v,
                               att, i32(nh), i32(nkv), i32(hd), i32(p.max_seq_len), scale,
                               self.split_parts, self.arrivals, wo, wo_parts, i32(p.dim)),
                       shared_mem=attention_wo_smem(p.dim, hd))
        matvec(att, wo, out=h, accumulate=True)
        matvec(h, w13, out=h13, norm=ffn_norm, eps=eps)
        matvec(h13, w2, out=h, accumulate=True, swiglu=True)
    self.classify(bsz, h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="15M,110M")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    shapes, rounds = a.shapes.split(","), a.rounds
    cp = require_cupy()
    variants = {"two launches": lambda: patched(fused.FusedDecoder, "FUSE_WO", False),
                "one launch": contextlib.nullcontext,
                "attention_decode_wo alone": lambda: patched(fused.FusedDecoder, "run",
                                                             attention_wo_alone)}
    for shape in shapes:
        max_seq_len = {"15M": 256}.get(shape, 1024)
        for pos in POSITIONS:
            ab_steps(cp, shape, "float32", [1], variants, rounds, max_seq_len=max_seq_len,
                     pos=pos)


if __name__ == "__main__":
    main()

"""The feed-forward block in one launch (kernels/dev/mlp.cu's mlp_decode, w2's partial sums
added by float atomics) against the package's two (w13's gemv, then w2's), on the one-row
float32 steps of the TinyStories shapes (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_mlp.py [--rounds 7] [--positions 3,200]

ab_step.py's harness: a graph per variant, logits checked against the package's, interleaved
rounds, ms a step. The variant's step keeps three residual buffers in turn (mlp_decode reads
one, adds into the next, which must be zero, and zeroes the third for the next layer), so it
needs n_layers % 3 == 0 (stories15M 6, stories110M 12).
"""
import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_step import ab_steps, add_instances, patched       # noqa: E402  (checkout first)
from minillama.cuda import fused, require_cupy, runtime    # noqa: E402
from minillama.cuda.kernels import CACHE_TYPES, KERNELS    # noqa: E402
from minillama.cuda.runtime import i32                     # noqa: E402

SHAPES = {"15M": 288, "110M": 768}                       # their dims
# variants per shape: (label, (J, ADD) of mlp_decode or None, (R, warps, min blocks, alone
# chunks) of attn_layer or None)
ALWAYS = 1 << 30
VARIANTS = {"15M": [("mlp J8", (8, 0), None), ("mlp J16", (16, 0), None),
                    ("attn R8 alone1 + mlp J8", (8, 0), (8, 16, 1, 1)),
                    ("attn R8w8 alone1 + mlp J8", (8, 0), (8, 8, 1, 1)),
                    ("attn R4 alone1 + mlp J8", (8, 0), (4, 16, 1, 1))],
            "110M": [("mlp J16", (16, 0), None), ("mlp J8", (8, 0), None),
                     ("attn R8 alone1 + mlp J16", (16, 0), (8, 16, 1, 1)),
                     ("attn R8w8 alone1 + mlp J16", (16, 0), (8, 8, 1, 1))]}


def with_dev_source():
    source = runtime.kernel_source
    here = Path(__file__).resolve().parent
    extra = "".join(f'\n#line 1 "dev/{n}"\n' + (here / n).read_text(encoding="utf-8")
                    for n in ("mlp.cu", "attn_layer.cu"))
    runtime.kernel_source = lambda: source() + extra


def instances():
    names = []
    for shape, variants in VARIANTS.items():
        P = -(-SHAPES[shape] // 128)
        for _, mlp, attn in variants:
            if mlp:
                names.append(f"mlp_decode<{mlp[0]},{P},{mlp[1]}>")
            if attn:
                names.append(f"attn_layer<{attn[0]},{P},{attn[1]},{attn[2]}>")
    return names


def layer_run(mlp, attn, stamps=None):
    """FusedDecoder.run for one row: the attention half as attn_layer<R, P, warps> where attn
    is (R, warps), the feed-forward half as mlp_decode<J, P> where J, else the package's
    launches. Three residual buffers in turn: each new launch reads one, adds into the next
    (zero) and zeroes the third, so the count of such launches a step must be a multiple of 3."""
    def run(self, bsz):
        assert bsz == 1
        p = self.p
        P = -(-p.dim // 128)
        if not hasattr(self, "rot"):
            self.rot = [self.h, self.cp.zeros_like(self.h), self.cp.zeros_like(self.h)]
        B = [b[:1] for b in self.rot]
        qkv, att = self.qkv[:1], self.att[:1]
        width, grid, block = self.attention_grid(1)
        scale = np.float32(1.0 / np.sqrt(p.head_dim))
        eps = np.float32(p.norm_eps)
        i = 0
        null = np.uint64(0)
        self.embed(1, B[0])
        for layer, (attn_norm, wqkv, wo, ffn_norm, w13, w2, cache_k, cache_v) in enumerate(self.layers):
            st = (stamps or {}).get(layer, (null, null))
            if attn:
                R, warps, minb, alone = attn
                S, DR = p.head_dim // R, p.dim // R
                floats = 3 * S * p.dim + DR * p.head_dim + 5 * p.head_dim + 4 + p.dim
                KERNELS.launch(f"attn_layer<{R},{P},{warps},{minb}>", (R, p.n_heads), (32 * warps,),
                               (B[i % 3], attn_norm, eps, wqkv, wo, self.step, self.freqs_cos,
                                self.freqs_sin, cache_k, cache_v, B[(i + 1) % 3],
                                B[(i + 2) % 3], i32(p.dim), i32(p.n_heads), i32(p.n_kv_heads),
                                i32(p.head_dim), i32(p.max_seq_len), scale, i32(alone),
                                st[0]),
                               shared_mem=4 * floats)
                i += 1
            else:
                h = B[i % 3]
                fused.matvec(h, wqkv, out=qkv, norm=attn_norm, eps=p.norm_eps)
                KERNELS.launch(f"attention_decode<{width},{CACHE_TYPES[cache_k.dtype.name]}>",
                               grid, block,
                               (qkv, self.step, self.freqs_cos, self.freqs_sin, cache_k,
                                cache_v, att, i32(p.n_heads), i32(p.n_kv_heads),
                                i32(p.head_dim), i32(p.max_seq_len), scale, self.split_parts,
                                self.arrivals))
                fused.matvec(att, wo, out=h, accumulate=True)
            if mlp:
                J, add = mlp
                KERNELS.launch(f"mlp_decode<{J},{P},{add}>", (p.hidden_dim // J,), (32 * J,),
                               (B[i % 3], ffn_norm, eps, w13, w2, B[(i + 1) % 3],
                                B[(i + 2) % 3], i32(p.dim), i32(p.hidden_dim), st[1]))
                i += 1
            else:
                h = B[i % 3]
                fused.matvec(h, w13, out=self.h13[:1], norm=ffn_norm, eps=p.norm_eps)
                fused.matvec(self.h13[:1], w2, out=h, accumulate=True, swiglu=True)
        assert i % 3 == 0, "the next step's first launch adds into B[1]: zeroed by the last"
        self.classify(1, B[0])
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--positions", default="3,200")
    ap.add_argument("--shapes", default="15M,110M")
    a = ap.parse_args()
    cp = require_cupy()
    with_dev_source()
    add_instances("common", instances())
    for shape in a.shapes.split(","):
        variants = {"package": contextlib.nullcontext}
        for label, mlp, attn in VARIANTS[shape]:
            variants[label] = (lambda mlp=mlp, attn=attn:
                               patched(fused.FusedDecoder, "run", layer_run(mlp, attn)))
        for pos in map(int, a.positions.split(",")):
            ab_steps(cp, shape, "float32", [1], variants, rounds=a.rounds, max_seq_len=1024,
                     steps=20, pos=pos)


if __name__ == "__main__":
    main()

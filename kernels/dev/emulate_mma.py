"""Replay qgemv_mma's data movement on the CPU (no GPU): which lane loads which chunk, the quad
transpose, how each format's unit fills the A fragments, how x is staged as B fragments, and
mma.m16n8k16's fragment layout (the PTX ISA's table), for one 16-row tile per format. The
product assembled from the fragments must equal the dequantized W @ x.

    python kernels/dev/emulate_mma.py

It checks our reading of the layouts, not the hardware: the GPU run (tests/test_cuda_mma.py)
is the test. Values are kept as float64 here (the bfloat16 parts of x are exact on the GPU).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minillama.formats import Packed, dequantize, quantize      # noqa: E402

WEIGHTS = {"f16": 8, "bf16": 8, "q8_0": 16, "q4_0": 32}
UNITS = {"f16": 1, "bf16": 1, "q8_0": 2, "q4_0": 4}
Q4ORDER = {"f16": False, "bf16": False, "q8_0": False, "q4_0": True}


def chunks_of(w):
    """(N, K / WEIGHTS, 4) uint32: the 16-byte chunks of each row as 4 little-endian words."""
    main = w.planes.get("data", w.planes.get("qs"))
    return np.ascontiguousarray(main).view(np.uint8).reshape(w.shape[0], -1, 16).view("<u4")


def half_pair(word, fmt):
    """Two 16-bit values of a word as floats, low half first."""
    lo, hi = np.uint16(word & 0xFFFF), np.uint16(word >> 16)
    if fmt == "f16":
        return [float(np.array(v, np.uint16).view(np.float16)) for v in (lo, hi)]
    return [float(np.array(np.uint32(v) << 16, np.uint32).view(np.float32)) for v in (lo, hi)]


def q4_pair(word):                      # MmaQ4_0::pair: nibbles at bits 0-3 and 16-19, minus 8
    return [float((word & 0xF)) - 8, float((word >> 16) & 0xF) - 8]


def q8_pairs(word):                     # MmaQ8_0::pairs: (b0, b1), (b2, b3) as signed bytes
    b = [int((word >> (8 * i)) & 0xFF) for i in range(4)]
    b = [v - 256 if v >= 128 else v for v in b]
    return [float(b[0]), float(b[1])], [float(b[2]), float(b[3])]


def quad_transpose(words):
    """words[t] = 4 words of lane t -> lane t holds word t of every lane's chunk."""
    return [[words[c][t] for c in range(4)] for t in range(4)]


def unit_fragments(fmt, g_words, e_words, u):
    """A fragments of unit u's two mma's for one lane: a[m][r] = two floats, r = 0..3 as
    a0 (row g, slots 2t, 2t+1), a1 (row g+8, same), a2 (row g, 2t+8, 2t+9), a3 (row g+8)."""
    a = []
    for m in range(2):
        if fmt in ("f16", "bf16"):
            a.append([half_pair(g_words[2 * m], fmt), half_pair(e_words[2 * m], fmt),
                      half_pair(g_words[2 * m + 1], fmt), half_pair(e_words[2 * m + 1], fmt)])
        elif fmt == "q8_0":
            g01, g23 = q8_pairs(g_words[2 * u + m])
            e01, e23 = q8_pairs(e_words[2 * u + m])
            a.append([g01, e01, g23, e23])
        else:
            sh = 4 * m
            a.append([q4_pair(g_words[u] >> sh), q4_pair(e_words[u] >> sh),
                      q4_pair(g_words[u] >> (sh + 8)), q4_pair(e_words[u] >> (sh + 8))])
    return a


def x_base(fmt, m, t):                  # mma_x_base
    return 8 * t + 4 * m if UNITS[fmt] == 1 else 16 * m + 4 * t


def b_fragments(fmt, x, row, unit, t):
    """B fragments of the staged x for lane t, x row `row`, global unit: b[m][j] = 2 floats."""
    b = []
    for m in range(2):
        k0 = 32 * unit + x_base(fmt, m, t)
        pair = []
        for j in range(2):
            e0, e1 = (j, j + 2) if Q4ORDER[fmt] else (2 * j, 2 * j + 1)
            pair.append([x[row, k0 + e0] if k0 + e0 < x.shape[1] else 0.0,
                         x[row, k0 + e1] if k0 + e1 < x.shape[1] else 0.0])
        b.append(pair)
    return b


def mma(c, a, b):
    """c (16, 8) += A (16, 16) B (16, 8) from the 32 lanes' fragments a[lane] (4 pairs),
    b[lane] (2 pairs), as mma.m16n8k16's table places them."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        (a0, a1, a2, a3), (b0, b1) = a[lane], b[lane]
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a0, a1
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a2, a3
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b0, b1
    c += A @ B


def tile(fmt, w, x):
    """y (8, 16) for rows 0..15 of w, as one warp computes it."""
    ch = chunks_of(w)
    K = w.shape[1]
    span = 4 * WEIGHTS[fmt]
    nb = K // 32
    d = np.asarray(w.planes["d"], np.float32) if "d" in w.planes else None
    acc = np.zeros((16, 8))
    for step in range((K + span - 1) // span):
        lanes = {}
        for g in range(8):
            rows = []
            for h in range(2):
                quad = [ch[g + 8 * h, 4 * step + t] if 4 * step + t < ch.shape[1]
                        else np.zeros(4, "<u4") for t in range(4)]
                rows.append(quad_transpose(quad) if d is not None else quad)
            for t in range(4):
                lanes[(g, t)] = (list(rows[0][t]), list(rows[1][t]))
        for u in range(UNITS[fmt]):
            unit = step * UNITS[fmt] + u
            part = np.zeros((16, 8))
            frags = {k: unit_fragments(fmt, *v, u) for k, v in lanes.items()}
            for m in range(2):
                a = [frags[(lane // 4, lane % 4)][m] for lane in range(32)]
                b = [b_fragments(fmt, x, lane // 4, unit, lane % 4)[m] for lane in range(32)]
                mma(part if d is not None else acc, a, b)
            if d is not None:
                blk = (4 * step * WEIGHTS[fmt] + 32 * u) // 32 if fmt == "q4_0" else \
                    step * 2 + u
                if blk < nb:
                    scale = np.concatenate([d[0:8, blk], d[8:16, blk]])[:, None]
                    acc += scale * part
    return acc.T


def main():
    rng = np.random.default_rng(0)
    for fmt in ("f16", "bf16", "q8_0", "q4_0"):
        for K in (96, 160, 256):
            w32 = rng.standard_normal((16, K)).astype(np.float32)
            if fmt == "f16":
                w = Packed("f16", (16, K), {"data": w32.astype(np.float16)})
            elif fmt == "bf16":
                w = Packed("bf16", (16, K), {"data": (w32.view(np.uint32) >> 16).astype(np.uint16)})
            elif fmt == "q8_0":
                w = quantize(w32, "q8_0")
            else:
                w = quantize(w32, "q4_0")
            x = rng.standard_normal((8, K))
            want = x @ dequantize(w).astype(np.float64).T
            got = tile(fmt, w, x)
            err = np.abs(got - want).max() / np.abs(want).max()
            print(f"{fmt:5s} K={K:4d}  max rel err {err:.2e}  {'ok' if err < 1e-6 else 'WRONG'}")


if __name__ == "__main__":
    main()

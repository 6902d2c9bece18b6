"""Replay qgemv_i8's data movement and integer arithmetic on the CPU (no GPU): x staged per unit
of 32 positions as three signed 8-bit digits in the k order each format's lanes read, each lane's
loads of the weights (q8_0 bytes 8t .. 8t+7 of a block, q4_0 bytes 4t .. 4t+3), its A fragment,
mma.m16n8k32's fragment layout for 8-bit integers (the PTX ISA's table), the int32 sums, the
offset's share and the float32 combination, for one 16-row tile and 8 rows of x per format. The
product must agree with float64 of the dequantized W @ x, every integer must fit in int32.

    python kernels/dev/emulate_i8.py

It checks our reading of the layouts, not the hardware: the GPU run (kernels/dev/bench_variants.py
--only i8) is the test. The candidate is qgemv_i8 in kernels/dev/variants.cu.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minillama.formats import dequantize, quantize      # noqa: E402

BYTES = {"q8_0": 8, "q4_0": 4}           # a lane's load per block and weight row
ROW_BYTES = {"q8_0": 32, "q4_0": 16}     # a block's bytes in a row
OFFSET = {"q8_0": 0, "q4_0": 8}
MAGIC = 0x4B400000                       # I8_MAGIC: the bits of 1.5 2^23


def lane_half(fmt, p):
    """I8Q8_0 / I8Q4_0's lane_of, half_of: where position p of a block meets the B fragment."""
    return (p // 8, p // 4 % 2) if fmt == "q8_0" else (p % 16 // 4, p // 16)


def stage_unit(fmt, v):
    """i8_stage_unit for 32 values: words[k][t][h] (4 signed bytes each), meta (the offset's
    shares, 2^-s), as the kernel computes them (float32 scaling, round to nearest even)."""
    v = v.astype(np.float32)
    mx = np.float32(np.abs(v).max())
    e = int((mx.view(np.uint32) >> 23) & 0xFF) - 126
    s = min(22 - e, 126)
    xi = np.rint(v.astype(np.float64) * 2.0 ** s).astype(np.int64)       # exact: a power of 2
    assert np.abs(xi).max() < 2 ** 22
    p0 = ((xi & 0xFF) ^ 0x80) - 0x80
    rest = (xi - p0) >> 8
    p1 = ((rest & 0xFF) ^ 0x80) - 0x80
    p2 = (rest - p1) >> 8
    digits = [p0, p1, p2]
    assert (p0 + 256 * p1 + 65536 * p2 == xi).all()
    words = np.zeros((3, 4, 2, 4), np.int64)          # [digit][lane t][half][byte]
    for p in range(32):
        t, h = lane_half(fmt, p)
        for k in range(3):
            words[k, t, h, p % 4] = digits[k][p]
    T = [int(d.sum()) for d in digits]
    meta = (OFFSET[fmt] * (256 * T[1] + T[0]), MAGIC - OFFSET[fmt] * T[2], 2.0 ** -s)
    return words, meta


def lane_load(fmt, codes_row, block, t):
    """The lane's bytes of one block of one weight row (uint8)."""
    start = block * ROW_BYTES[fmt] + BYTES[fmt] * t
    return codes_row[start:start + BYTES[fmt]]


def frag(fmt, g_bytes, e_bytes):
    """F::frag as 4 registers of 4 integers each: a0 (row g, slots 4t..), a1 (row g+8, slots
    4t..), a2 (row g, 16 + 4t..), a3 (row g+8, 16 + 4t..)."""
    if fmt == "q8_0":                                  # signed bytes, words 0 and 1
        sg, se = g_bytes.view(np.int8).astype(np.int64), e_bytes.view(np.int8).astype(np.int64)
        return [sg[:4], se[:4], sg[4:], se[4:]]
    lo = lambda b: (b & 0x0F).astype(np.int64)         # unsigned nibbles, low then high
    hi = lambda b: (b >> 4).astype(np.int64)
    return [lo(g_bytes), lo(e_bytes), hi(g_bytes), hi(e_bytes)]


def mma_k32(a, b):
    """C (16, 8) int = A (16, 32) B (32, 8) from the 32 lanes' fragments, as mma.m16n8k32's
    table places 8-bit integers: a[lane] 4 registers, b[lane] 2 (each 4 integers)."""
    A, B = np.zeros((16, 32), np.int64), np.zeros((32, 8), np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 4 * t:4 * t + 4], A[g + 8, 4 * t:4 * t + 4] = a[lane][0], a[lane][1]
        A[g, 16 + 4 * t:20 + 4 * t], A[g + 8, 16 + 4 * t:20 + 4 * t] = a[lane][2], a[lane][3]
        B[4 * t:4 * t + 4, g], B[16 + 4 * t:20 + 4 * t, g] = b[lane][0], b[lane][1]
    C = A @ B
    assert np.abs(C).max() < 2 ** 31
    return C


def tile(fmt, w, x):
    """y (8, 16) for weight rows 0..15 and x rows 0..7, as one warp computes it (NR = 1)."""
    codes = np.ascontiguousarray(w.planes["qs"]).view(np.uint8).reshape(w.shape[0], -1)
    d = np.asarray(w.planes["d"]).view(np.float16).astype(np.float32).reshape(w.shape[0], -1)
    nb = w.shape[1] // 32
    acc = np.zeros((16, 8), np.float32)
    for blk in range(nb):
        staged = [stage_unit(fmt, x[r, 32 * blk:32 * blk + 32]) for r in range(8)]
        a = [frag(fmt, lane_load(fmt, codes[lane // 4], blk, lane % 4),
                  lane_load(fmt, codes[lane // 4 + 8], blk, lane % 4)) for lane in range(32)]
        S = [mma_k32(a, [[staged[lane // 4][0][k, lane % 4, 0],
                          staged[lane // 4][0][k, lane % 4, 1]] for lane in range(32)])
             for k in range(3)]                                     # (16, 8) per digit
        for n in range(16):
            for m in range(8):
                off_lo, magic_hi, scale = staged[m][1]
                lo = S[1][n, m] * 256 + S[0][n, m] - off_lo          # exact in int32
                assert abs(lo) < 2 ** 31
                if OFFSET[fmt]:                                      # the magic: bits to float
                    assert abs(S[2][n, m] + magic_hi - MAGIC) < 2 ** 22
                    bits = np.array(S[2][n, m] + magic_hi, np.int64).astype(np.uint32)
                    hi = np.float32(bits.view(np.float32) - np.float32(12582912.0))
                    assert hi == S[2][n, m] - (MAGIC - magic_hi)     # exact
                else:
                    hi = np.float32(S[2][n, m])
                v = np.float32(hi * np.float32(65536) + np.float32(lo))
                acc[n, m] = np.float32(np.float32(d[n, blk] * np.float32(scale)) * v + acc[n, m])
    return acc.T


def main():
    rng = np.random.default_rng(0)
    ok = True
    for fmt in ("q8_0", "q4_0"):
        for K in (32, 96, 256):
            w = quantize(rng.standard_normal((16, K)).astype(np.float32), fmt)
            for name, x in (("normal", rng.standard_normal((8, K))),
                            ("80 binades", rng.standard_normal((8, K))
                             * 2.0 ** rng.integers(-40, 40, (8, K)))):
                x = x.astype(np.float32)
                if name == "80 binades" and K > 32:
                    x[:, 32:64] = 0.0                          # a unit of zeros
                want = x.astype(np.float64) @ dequantize(w).astype(np.float64).T
                got = tile(fmt, w, x)
                err = np.linalg.norm(got - want) / np.linalg.norm(want)
                ok = ok and err < 1e-6
                print(f"{fmt:5s} K={K:4d} x {name:10s}  rel err {err:.2e}  "
                      f"{'ok' if err < 1e-6 else 'WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

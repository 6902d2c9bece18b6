"""Replay the index arithmetic of gemm_v5, gemm_v6, qgemv, qgemv_tc, qgemv_v3, qgemv_k and gemv_v3
on the CPU, for machines without a GPU.

    python kernels/dev/emulate.py

Which thread copies which 16 bytes where (the swizzle), which addresses the 32 lanes hand to
ldmatrix and what each lane receives, how mma.m16n8k16's register fragments map to matrix
elements (the PTX ISA's tables), which lane of qgemv writes which output, and how qgemv_k
unpacks the bits of each k-quant super-block (its format structs' shifts and masks, in
Python): all written out element by element in Python, the product assembled from the
fragments and compared with NumPy. qgemv_v3's cp.async pipeline (variants.cu) is replayed copy
by copy: each held in flight until the wait that guarantees it, every slot byte read checked
against the copy that wrote it. It checks our reading of the layouts and the kernels'
indexing, not the hardware: a run on the GPU (check_formats.py, bench_variants.py,
tests/test_cuda_kquants.py) is still the test. Slow on purpose, so sizes are small.
qgemv_tc (variants.cu) is replayed whole: its loads, the quad transpose through shared memory
and ldmatrix, the k permutation, the TF32 fragments of mma.m16n8k8 (operands truncated to TF32
as the tensor cores read them), the per-block scales, the split over k and the stores.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_formats as cf      # noqa: E402  (its random planes; it puts the checkout on sys.path)
from minillama.cuda import kernels      # noqa: E402  (the wrappers' tables)
from minillama import formats      # noqa: E402
from minillama.formats import dequantize      # noqa: E402


def swizzle(r, kc):             # matmul.cu: v5_swizzle
    return r * 64 + ((kc ^ ((r >> 1) & 3)) << 4)


def ldmatrix_x4(smem, addrs):
    """ldmatrix.m8n8.x4.b16: lanes 8i .. 8i+7 give the 8 row addresses of matrix i; lane T
    receives, from each matrix, the two 16-bit values at row T / 4, columns 2 (T % 4) + 0, 1."""
    regs = np.zeros((32, 4, 2), np.float16)
    for i in range(4):
        rows = [smem[addrs[8 * i + j]:addrs[8 * i + j] + 16].view(np.float16) for j in range(8)]
        for lane in range(32):
            regs[lane, i] = rows[lane // 4][2 * (lane % 4):2 * (lane % 4) + 2]
    return regs


def mma_16816(a, b):
    """D = A B for fragments a (32 lanes x 4 regs x 2) and b (32 x 2 x 2), as the PTX ISA lays
    them out (g = lane / 4, t = lane % 4); returns D's fragment (32 x 4)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane, 0], a[lane, 1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[lane, 2], a[lane, 3]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b[lane, 0], b[lane, 1]
    D = A @ B
    return np.array([[D[l // 4, 2 * (l % 4)], D[l // 4, 2 * (l % 4) + 1],
                      D[l // 4 + 8, 2 * (l % 4)], D[l // 4 + 8, 2 * (l % 4) + 1]]
                     for l in range(32)])


def gemm_v5_block(A, W, BM, BN):
    """Block (0, 0) of gemm_v5 on float16 A (M, K) and W (N, K), following the kernel's loops."""
    (M, K), N, BK = A.shape, W.shape[0], 32
    WM, WN = BM // 2, BN // 4
    MI, NI = WM // 16, WN // 8
    acc = np.zeros((8, 32, MI, NI, 4))
    for t in range(-(-K // BK)):
        sa, sw = np.zeros(BM * 64, np.uint8), np.zeros(BN * 64, np.uint8)
        for tid in range(256):                       # load_a, load_w (cp.async, zero-fill)
            for tile, src, rows, count in ((sa, A, M, BM), (sw, W, N, BN)):
                for i in range(count * 4 // 256):
                    c = tid + i * 256
                    r, kc, k = c >> 2, c & 3, t * BK + (c & 3) * 8
                    if r < rows and k < K:
                        tile[swizzle(r, kc):swizzle(r, kc) + 16] = src[r, k:k + 8].view(np.uint8)
        for warp in range(8):
            wm, wn = warp // 4, warp % 4
            for kk in range(BK // 16):
                a = [ldmatrix_x4(sa, [swizzle(wm * WM + i * 16 + (l & 15), 2 * kk + (l >> 4))
                                      for l in range(32)]) for i in range(MI)]
                b = {}
                for j in range(0, NI, 2):
                    r = ldmatrix_x4(sw, [swizzle(wn * WN + j * 8 + (l & 7) + ((l >> 4) << 3),
                                                 2 * kk + ((l >> 3) & 1)) for l in range(32)])
                    b[j], b[j + 1] = r[:, 0:2], r[:, 2:4]
                for i in range(MI):
                    for j in range(NI):
                        acc[warp, :, i, j] += mma_16816(a[i], b[j])
    C = np.full((M, N), np.nan)
    for warp in range(8):                            # the epilogue's stores
        wm, wn = warp // 4, warp % 4
        for lane in range(32):
            for i in range(MI):
                for j in range(NI):
                    for half in range(2):
                        m = wm * WM + i * 16 + (lane >> 2) + 8 * half
                        n = wn * WN + j * 8 + 2 * (lane & 3)
                        for e in range(2):
                            if m < M and n + e < N:
                                C[m, n + e] = acc[warp, lane, i, j, 2 * half + e]
    return C


def v6_tile(b, tiles_m, tiles_n, group=16):      # matmul.cu: v6_tile (V6_GROUP = 16)
    per_group = group * tiles_n
    first = b // per_group * group
    rows = min(tiles_m - first, group)
    return first + b % per_group % rows, b % per_group // rows


def gemm_v6_block(A, W, BM, BN, STAGES, packed, b=0):
    """Block b of gemm_v6 on float16 A (M, K) and W (N, K), following the kernel's loops: the
    stages counted as the kernel counts them, fragments double-buffered, and every copy landing
    at once when issued (so a buffer overwritten before its last read, or read before its tile
    was written, gives a wrong product). packed: W goes through the registers (fetch_w, then
    store_w a tile later), its values standing for the unpacked ones."""
    (M, K), N, BK, KSTEPS = A.shape, W.shape[0], 32, 2
    WARPS_N, WARPS = BN // 64, BM * BN // (64 * 64)
    tm, tn = v6_tile(b, -(-M // BM), -(-N // BN))
    m0, n0, T = tm * BM, tn * BN, -(-K // BK)
    stages = [(np.zeros(BM * 64, np.uint8), np.zeros(BN * 64, np.uint8)) for _ in range(STAGES)]
    held = None                                  # the packed tile waiting in registers

    def copy(tile, src, rows, row0, count, t):   # load_a, load_w: cp.async, zero-fill
        for c in range(count * 4):
            r, kc, k = c >> 2, c & 3, t * BK + (c & 3) * 8
            chunk = src[row0 + r, k:k + 8] if row0 + r < rows and k < K else np.zeros(8, np.float16)
            tile[swizzle(r, kc):swizzle(r, kc) + 16] = chunk.view(np.uint8)

    def load_a(s, t):
        copy(stages[s][0], A, M, m0, BM, t)

    def store_w(s, t):
        copy(stages[s][1], W, N, n0, BN, t)

    def frags(s, kk, wm, wn):
        sa, sw = stages[s]
        a = [ldmatrix_x4(sa, [swizzle(wm * 64 + i * 16 + (l & 15), 2 * kk + (l >> 4))
                              for l in range(32)]) for i in range(4)]
        bf = {}
        for j in range(0, 8, 2):
            r = ldmatrix_x4(sw, [swizzle(wn * 64 + j * 8 + (l & 7) + ((l >> 4) << 3),
                                         2 * kk + ((l >> 3) & 1)) for l in range(32)])
            bf[j], bf[j + 1] = r[:, 0:2], r[:, 2:4]
        return a, bf

    acc = np.zeros((WARPS, 32, 4, 8, 4))
    for s in range(STAGES - 1):                  # the prologue
        if s < T:
            load_a(s, s)
            if not packed:
                store_w(s, s)
            elif s < STAGES - 2:
                store_w(s, s)
            else:
                held = s
    buf = {w: [frags(0, 0, w // WARPS_N, w % WARPS_N), None] for w in range(WARPS)}
    s_cur = 0
    for t in range(T):
        nxt = t + STAGES - 1
        s_next = STAGES - 1 if s_cur == 0 else s_cur - 1
        s_after = 0 if s_cur + 1 == STAGES else s_cur + 1
        for kk in range(KSTEPS):
            cur = kk & 1
            for w in range(WARPS):               # fragments of the next k-step
                if kk + 1 < KSTEPS:
                    buf[w][cur ^ 1] = frags(s_cur, kk + 1, w // WARPS_N, w % WARPS_N)
                elif t + 1 < T:
                    buf[w][cur ^ 1] = frags(s_after, 0, w // WARPS_N, w % WARPS_N)
            if kk == 0 and nxt < T:
                load_a(s_next, nxt)
                if not packed:
                    store_w(s_next, nxt)
            for w in range(WARPS):
                a, bf = buf[w][cur]
                for i in range(4):
                    for j in range(8):
                        acc[w, :, i, j] += mma_16816(a[i], bf[j])
            if kk == KSTEPS - 2 and packed:
                if nxt - 1 < T:
                    assert held == nxt - 1
                    store_w(STAGES - 1 if s_next == 0 else s_next - 1, held)
                if nxt < T:
                    held = nxt
        s_cur = s_after
    C = np.full((M, N), np.nan)
    for w in range(WARPS):                       # the epilogue, 32 rows at a time, 32 x 72
        wm, wn = w // WARPS_N, w % WARPS_N
        for part in range(2):
            patch = np.full((32, 72), np.nan)
            for lane in range(32):
                for i in range(2):
                    for j in range(8):
                        for half in range(2):
                            r, c = i * 16 + (lane >> 2) + 8 * half, j * 8 + 2 * (lane & 3)
                            patch[r, c:c + 2] = acc[w, lane, 2 * part + i, j, 2 * half:2 * half + 2]
            for lane in range(32):
                col = 4 * (lane & 15)
                for r in range(lane >> 4, 32, 2):
                    m, n = m0 + wm * 64 + 32 * part + r, n0 + wn * 64 + col
                    for e in range(4):
                        if m < M and n + e < N:
                            C[m, n + e] = patch[r, col + e]
    return C, (m0, n0)


def qgemv_launch(x, w, smem, blocks):
    """qgemv's loops over blocks, rows of x, chunks of k, tiles and lanes; the weights of each
    16-byte load come from the NumPy dequantizer (the unpacking is checked in check_formats)."""
    fmt, (N, K), (M, _) = w.format, w.shape, x.shape
    WEIGHTS = kernels.QGEMV_WEIGHTS[fmt]
    PIECES = WEIGHTS // 4
    ROWS = next(r for r in kernels.QGEMV_ROWS if r >= min(M, kernels.QGEMV_ROWS[-1]))
    NR = 4 if ROWS >= 4 else 2
    step = 32 * WEIGHTS
    kc = K if ROWS * K * 4 <= smem else max(step, smem // (ROWS * 4) // step * step)
    grid = min(-(-N // (8 * NR)), blocks)
    Wf = dequantize(w)
    Y = np.full((M, N), np.nan)
    for block in range(grid):
        for m0 in range(0, M, ROWS):
            for k0 in range(0, K, kc):
                CH, len4 = min(kc, K - k0) // WEIGHTS, min(kc, K - k0) // 4
                xs = np.zeros((ROWS * PIECES * CH, 4))
                for i in range(ROWS * len4):          # staging, piece-major
                    r, k4 = i // len4, i % len4
                    if m0 + r < M:
                        xs[(r * PIECES + k4 % PIECES) * CH + k4 // PIECES] = \
                            x[m0 + r, k0 + 4 * k4:k0 + 4 * k4 + 4]
                for warp in range(8):
                    for n0 in range((block * 8 + warp) * NR, N, grid * 8 * NR):
                        acc = np.zeros((NR, ROWS))    # the warp's sum over lanes
                        for lane in range(32):
                            for c in range(lane, CH, 32):
                                for j in range(NR):
                                    n = min(n0 + j, N - 1)
                                    wl = Wf[n, k0 + c * WEIGHTS:k0 + (c + 1) * WEIGHTS]
                                    for p in range(PIECES):
                                        for r in range(ROWS):
                                            acc[j, r] += wl[4 * p:4 * p + 4] @ \
                                                xs[(r * PIECES + p) * CH + c]
                        shift = 5 - (NR * ROWS).bit_length() + 1     # qgemv_warp_sums
                        for lane in range(0, 32, 1 << shift):
                            j, r = (lane >> shift) // ROWS, (lane >> shift) % ROWS
                            if n0 + j < N and m0 + r < M:
                                Y[m0 + r, n0 + j] = (Y[m0 + r, n0 + j] if k0 else 0) + acc[j, r]
    return Y


# ----------------------------------------------------------------------------
# qgemv_tc (variants.cu): the quad transpose through ldmatrix, the k permutation, the TF32
# fragments and the per-block scales, lane by lane

TC = {"f16": (8, 2, 8), "q8_0": (16, 4, 16), "q4_0": (32, 8, 16)}     # WEIGHTS, E, XPAD


def tf32(v):
    """What the tensor core reads of a float32 operand: its low 13 mantissa bits cleared."""
    return (np.asarray(v, np.float32).view(np.uint32) & 0xFFFFE000).view(np.float32)


def ldmatrix_words(smem, addrs):
    """ldmatrix.x4 as 32-bit words: lane T receives word T % 4 of row T / 4 of each matrix."""
    words = np.zeros((32, 4), np.uint32)
    for i in range(4):
        for lane in range(32):
            a = addrs[8 * i + lane // 4] + 4 * (lane % 4)
            words[lane, i] = smem[a:a + 4].view(np.uint32)[0]
    return words


def tc_words(fmt, w):
    """variants.cu's Tc*::words: the E weights (codes, or 16-bit values) of one word."""
    w = int(w)
    if fmt == "f16":
        return np.array([w & 0xFFFF, w >> 16], np.uint16).view(np.float16).astype(np.float64)
    if fmt == "q8_0":
        return np.array([(w >> (8 * e)) & 0xFF for e in range(4)], np.uint8).view(np.int8) \
            .astype(np.float64)
    return np.array([((w >> (8 * e)) & 0xF) - 8 for e in range(4)]
                    + [((w >> (8 * e + 4)) & 0xF) - 8 for e in range(4)], np.float64)


def mma_tf32(c, a, b):
    """mma.m16n8k8 (TF32): c (32, 4) += A B from a (32, 4), b (32, 2) in the PTX ISA's layout."""
    A, B = np.zeros((16, 8)), np.zeros((8, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4] = tf32(a[lane]).astype(np.float64)
        B[t, g], B[t + 4, g] = tf32(b[lane]).astype(np.float64)
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        c[lane] += [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]


def qgemv_tc_launch(x, w, smem, blocks, ks, nb_max=4):
    """qgemv_tc's loops, with bench_variants.run_tc's choice of NB and kc."""
    fmt, (N, K), (M, _) = w.format, w.shape, x.shape
    W, E, XPAD = TC[fmt]
    SPAN = 4 * W
    nb = next((b for b in (1, 2, 4) if 8 * b >= M and b <= nb_max), nb_max)
    ROWS = 8 * nb
    bytes_for = lambda kc: 2 * ROWS * (-(-kc // SPAN) * SPAN + XPAD) * 4
    kc = K if bytes_for(K) <= smem else max(SPAN, (smem // (8 * ROWS) - XPAD) // SPAN * SPAN)
    XS = -(-kc // SPAN) * SPAN + XPAD
    raw = (w.data.view(np.uint8) if fmt == "f16" else w.qs.view(np.uint8)).reshape(N, -1)
    d = None if fmt == "f16" else w.d.astype(np.float64)
    tpb = 8 // ks
    grid = min(-(-(-(-N // 16)) // tpb), blocks)
    Y = np.full((M, N), np.nan)
    for block in range(grid):
        for m0 in range(0, M, ROWS):
            for k0 in range(0, K, kc):
                ln = min(kc, K - k0)
                groups = -(-ln // SPAN)
                first = k0 // W
                xv = np.zeros((ROWS, XS), np.float32)
                rows = min(ROWS, M - m0)
                xv[:rows, :ln] = x[m0:m0 + rows, k0:k0 + ln]
                xhi = tf32(xv)
                xlo = (xv - xhi).astype(np.float32)
                tile_step = grid * tpb * 16
                n_base = block * tpb * 16
                while n_base < N:
                    accs = {}
                    for warp in range(8):
                        n0, slice_ = n_base + (warp // ks) * 16, warp % ks
                        acc = np.zeros((32, nb, 4))
                        if n0 < N:
                            for cg in range(slice_, groups, ks):
                                sm = np.zeros(1024, np.uint8)
                                da, db = np.zeros((32, 4)), np.zeros((32, 4))
                                for lane in range(32):
                                    g, t = lane // 4, lane % 4
                                    ra, rb = min(n0 + g, N - 1), min(n0 + 8 + g, N - 1)
                                    c = 4 * cg + t
                                    for r, row in ((g, ra), (g + 8, rb)):
                                        if c * W < ln:
                                            a = swizzle(r, t)
                                            sm[a:a + 16] = raw[row, 16 * (first + c):16 * (first + c) + 16]
                                    for i in range(4):
                                        ci = 4 * cg + i
                                        if d is not None and ci * W < ln:
                                            blk = (k0 + ci * W) // 32
                                            da[lane, i], db[lane, i] = d[ra, blk], d[rb, blk]
                                wa = ldmatrix_words(sm, [swizzle(l & 7, l >> 3) for l in range(32)])
                                wb = ldmatrix_words(sm, [swizzle(8 + (l & 7), l >> 3) for l in range(32)])
                                for i in range(4):
                                    va = [tc_words(fmt, wa[l, i]) for l in range(32)]
                                    vb = [tc_words(fmt, wb[l, i]) for l in range(32)]
                                    kb = (4 * cg + i) * W
                                    for b in range(nb):
                                        part = np.zeros((32, 4))
                                        for s in range(E // 2):
                                            a = np.array([[va[l][2 * s], vb[l][2 * s], va[l][2 * s + 1],
                                                           vb[l][2 * s + 1]] for l in range(32)])
                                            pos = [(2 * (l % 4) if E == 2 else
                                                    [4 * (l % 4) + e for e in range(4)] +
                                                    [16 + 4 * (l % 4) + e for e in range(4)]) for l in range(32)]
                                            for plane in (xhi, xlo):
                                                bv = np.zeros((32, 2), np.float32)
                                                for l in range(32):
                                                    row = plane[8 * b + l // 4]
                                                    if E == 2:
                                                        bv[l] = row[kb + pos[l] + 0], row[kb + pos[l] + 1]
                                                    else:
                                                        bv[l] = row[kb + pos[l][2 * s]], row[kb + pos[l][2 * s + 1]]
                                                mma_tf32(part, a, bv)
                                        if d is None:
                                            acc[:, b] += part
                                        else:
                                            acc[:, b, :2] += da[:, i:i + 1] * part[:, :2]
                                            acc[:, b, 2:] += db[:, i:i + 1] * part[:, 2:]
                        accs[warp] = (n0, slice_, acc)
                    for warp, (n0, slice_, acc) in accs.items():
                        if slice_ or n0 >= N:
                            continue
                        for s in range(1, ks):
                            acc = acc + accs[warp + s][2]
                        for lane in range(32):
                            g, t = lane // 4, lane % 4
                            for b in range(nb):
                                for e in range(4):
                                    m, n = m0 + 8 * b + 2 * t + (e & 1), n0 + g + 8 * (e >> 1)
                                    if m < M and n < N:
                                        Y[m, n] = (Y[m, n] if k0 else 0) + acc[lane, b, e]
                    n_base += tile_step
    return Y


# ----------------------------------------------------------------------------
# qgemv_k.cu: the k-quants, bit by bit (the unpacking too: qgemv_k has no NumPy twin of it)

def word(b16, i):
    """Word i of a 16-byte load (little-endian), as q_word."""
    return int.from_bytes(bytes(b16[4 * i:4 * i + 4]), "little")


def k4_scale_min(s, j):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


class KFmt:
    """FmtQ2_K .. FmtQ6_K of qgemv_k.cu, line for line."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.pieces, self.runs, self.h_pieces, self.min, self.bias = {
            "q2_k": (4, 4, 0, True, 0), "q3_k": (4, 4, 2, False, 4), "q4_k": (8, 2, 0, True, 0),
            "q5_k": (8, 2, 2, True, 0), "q6_k": (8, 2, 4, False, 32)}[fmt]

    def first(self, p, run):
        if self.fmt == "q6_k":
            return 128 * (p >> 2) + 64 * run + 32 * ((p >> 1) & 1) + 16 * (p & 1)
        if self.fmt in ("q2_k", "q3_k"):
            return 128 * (p >> 1) + 32 * run + 16 * (p & 1)
        return 64 * (p >> 1) + 32 * run + 16 * (p & 1)

    def h_piece(self, p):
        return 2 * (p >> 2) + (p & 1) if self.fmt == "q6_k" else p & 1

    def codes(self, q, h, p, run):
        if self.fmt in ("q2_k", "q3_k"):
            c = [(word(q, j) >> (2 * run)) & 0x03030303 for j in range(4)]
        else:
            c = [(word(q, j) >> (4 * run)) & 0x0F0F0F0F for j in range(4)]
        if self.fmt == "q3_k":
            bit = self.first(p, run) // 32
            c = [c[j] | (((word(h, j) >> bit) & 0x01010101) << 2) for j in range(4)]
        elif self.fmt == "q5_k":
            sub = self.first(p, run) // 32
            c = [c[j] | (((word(h, j) >> sub) & 0x01010101) << 4) for j in range(4)]
        elif self.fmt == "q6_k":
            i = ((p >> 1) & 1) + 2 * run
            c = [c[j] | (((word(h, j) >> (2 * i)) & 0x03030303) << 4) for j in range(4)]
        return c

    def scale(self, s, d, dmin, p, run):
        i = self.first(p, run) // 16                      # the sub-block of 16
        if self.fmt == "q6_k":
            return d * np.float32(np.int8(np.uint8(s[i]))), np.float32(0)
        if self.fmt == "q2_k":
            return d * np.float32(s[i] & 15), dmin * np.float32(s[i] >> 4)
        if self.fmt == "q3_k":
            low, high = (s[i & 7] >> (4 * (i >> 3))) & 15, (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3
            return d * np.float32(int(low | (high << 4)) - 32), np.float32(0)
        sc, m = k4_scale_min(s, self.first(p, run) // 32)
        return d * np.float32(sc), dmin * np.float32(m)

    def weights(self, c, ds, dm):
        """qk_weights: the 4 code bytes of c, less the bias (exact in float16), scaled: the
        product is exact in float32 and the subtraction rounds once, as fmaf."""
        codes = [np.float32(((c >> (8 * e)) & 0xFF) - self.bias) for e in range(4)]
        return [code * ds - dm if self.min else code * ds for code in codes]

    def piece(self, w, blk, p):
        """QkPiece::load, then the 32 or 64 weights of piece p of super-block blk (flat, rows * nb),
        as {offset in the super-block: weight}."""
        planes = {k: a.reshape(-1, *a.shape[2:]) for k, a in w.planes.items()}
        q = planes["ql" if self.fmt == "q6_k" else "qs"][blk][16 * p:16 * p + 16]
        high = planes["hmask" if self.fmt == "q3_k" else "qh"] if self.h_pieces else None
        h = high[blk][16 * self.h_piece(p):][:16] if self.h_pieces else q
        s = planes["scales"][blk].view(np.uint8)
        d = planes["d"][blk].astype(np.float32)
        dmin = planes["dmin"][blk].astype(np.float32) if self.min else np.float32(0)
        out = {}
        for run in range(self.runs):
            c = self.codes(q, h, p, run)
            ds, dm = self.scale(s, d, dmin, p, run)
            for f in range(4):
                for e, v in enumerate(self.weights(c[f], ds, dm)):
                    out[self.first(p, run) + 4 * f + e] = v
        return out


def qgemv_k_launch(x, w, smem, blocks):
    """qgemv_k's loops over blocks, rows of x, chunks of k, tiles, lanes and pieces; every weight
    unpacked from the planes' bits as the kernel does. Returns y and the weights as the kernel
    saw them (each one seen, with the same bits, wherever its row is multiplied)."""
    F, (N, K), (M, _) = KFmt(w.format), w.shape, x.shape
    ROWS = next(r for r in kernels.QGEMV_ROWS if r >= min(M, kernels.QGEMV_ROWS[-1]))
    NR = 4 if ROWS >= 4 else 2
    kc = K if ROWS * K * 4 <= smem else max(256, smem // (ROWS * 4) // 256 * 256)
    grid, nb = min(-(-N // (8 * NR)), blocks), K // 256
    Y, seen = np.full((M, N), np.nan), np.full((N, K), np.nan, np.float32)
    for block in range(grid):
        for m0 in range(0, M, ROWS):
            for k0 in range(0, K, kc):
                F4 = 4 * F.runs
                CH = min(kc, K - k0) // (4 * F4)
                xs = np.zeros((ROWS * F4 * CH, 4))
                for i in range(ROWS * F4 * CH):        # staging, piece-major
                    r, f, g = i // (F4 * CH), i // CH % F4, i % CH
                    k = k0 + 256 * (g // F.pieces) + F.first(g % F.pieces, f // 4) + 4 * (f % 4)
                    if m0 + r < M:
                        xs[i] = x[m0 + r, k:k + 4]
                for warp in range(8):
                    for n0 in range((block * 8 + warp) * NR, N, grid * 8 * NR):
                        acc = np.zeros((NR, ROWS))    # the warp's sums over lanes
                        for lane in range(32):
                            for g in range(lane, CH, 32):
                                b, p = k0 // 256 + g // F.pieces, g % F.pieces
                                for j in range(NR):
                                    n = min(n0 + j, N - 1)
                                    wl = F.piece(w, n * nb + b, p)
                                    for t, v in wl.items():
                                        assert np.isnan(seen[n, 256 * b + t]) or \
                                            seen[n, 256 * b + t] == v
                                        seen[n, 256 * b + t] = v
                                    for run in range(F.runs):
                                        for f in range(4):
                                            wv = [wl[F.first(p, run) + 4 * f + e] for e in range(4)]
                                            for r in range(ROWS):
                                                acc[j, r] += np.dot(wv, xs[(r * F4 + 4 * run + f) * CH + g])
                        for i in range(NR * ROWS):    # lane i % 32 writes
                            j, r = i // ROWS, i % ROWS
                            if n0 + j < N and m0 + r < M:
                                Y[m0 + r, n0 + j] = (Y[m0 + r, n0 + j] if k0 else 0) + acc[j, r]
    return Y, seen


def kquant_to_f16(w):
    """kquant_to_f16: one thread a piece, every weight written once, rounded to float16."""
    F, (N, K) = KFmt(w.format), w.shape
    out = np.full((N, K), np.nan, np.float16)
    pieces = K // 256 * F.pieces                           # a row's
    for g in range(N * pieces):
        n, b, p = g // pieces, g % pieces // F.pieces, g % F.pieces
        for t, v in F.piece(w, n * (K // 256) + b, p).items():
            assert np.isnan(out[n, 256 * b + t])
            out[n, 256 * b + t] = np.float16(v)
    return out


def random_kquant(fmt, rows, cols, rng):
    """Random super-blocks of `fmt`: every bit of the codes and integer scales random, d and
    dmin over a few octaves, both signs (not a quantized matrix)."""
    nbytes = formats.bytes_for(fmt, (rows, cols))
    w = formats.from_gguf(np.zeros(nbytes, np.uint8), fmt, (rows, cols))
    for name, a in w.planes.items():
        if a.dtype == np.float16:
            a[...] = rng.uniform(0.5, 2, a.shape) * 2.0 ** rng.integers(-12, -4, a.shape) \
                * rng.choice([-1, 1], a.shape)
        else:
            a[...] = rng.integers(0, 256, a.shape).astype(np.uint8).view(a.dtype)
    return w


# ----------------------------------------------------------------------------
# gemv_v3 (gemv_batch.cu): the grid, the slices of k and their chunks, the lanes' walk, which
# lane writes which output, and split-K's counters, with the blocks run in a random order

def gemv_v3_launch(x, w, plan, y0=None, norm=None, swiglu=False, eps=1e-5, rng=None):
    """gemv_v3 on float64 x (M, K) (M, 2K with swiglu) and w (N, K) for a gemv_v3_plan tuple;
    y0: add into it (accumulate). Returns (Y, how many times each output was written)."""
    rows, nr, S, kc, blocks_x = plan
    (N, K), M = w.shape, x.shape[0]
    K4, tile, kc4 = K // 4, 8 * nr, kc // 4
    per, tiles = -(-K4 // S), -(-N // (8 * nr))
    assert S == 1 or blocks_x == tiles, "split-K takes one tile per block"
    if swiglu:
        xp = x[:, :K] / (1 + np.exp(-x[:, :K])) * x[:, K:]
    elif norm is not None:
        xp = x / np.sqrt((x * x).mean(1, keepdims=True) + eps) * norm
    else:
        xp = x
    Y = np.full((M, N), np.nan) if y0 is None else y0.copy()
    writes = np.zeros((M, N), int)
    partial = np.full((S, M, N), np.nan)
    grid = (blocks_x, -(-M // rows), S)
    counters = np.zeros(grid[0] * grid[1], int)
    blocks = [(bx, by, bz) for bz in range(S) for by in range(grid[1]) for bx in range(grid[0])]
    (rng or np.random.default_rng()).shuffle(blocks)
    for bx, by, s in blocks:
        m0, kb = by * rows, s * per
        ke = min(K4, kb + per)
        resident, xs, stagings = ke - kb <= kc4, {}, 0
        for t in range(bx, tiles, blocks_x):            # the block's tiles
            acc = np.zeros((8, 32, nr * rows))          # [warp, lane, j * rows + r]
            for c0 in range(kb, ke, kc4):
                length = min(kc4, ke - c0)
                if not resident or t == bx:             # the staging loop
                    stagings += 1
                    xs = np.zeros((rows * length, 4))
                    for i in range(rows * length):
                        r, k4 = i // length, i % length
                        if m0 + r < M:
                            xs[r * length + k4] = xp[m0 + r, 4 * (c0 + k4):4 * (c0 + k4) + 4]
                for warp in range(8):
                    n0 = t * tile + warp * nr
                    if n0 >= N:
                        continue
                    for lane in range(32):
                        for k4 in range(lane, length, 32):
                            for j in range(nr):
                                k = 4 * (c0 + k4)
                                wv = w[n0 + j, k:k + 4] if n0 + j < N else np.zeros(4)
                                for r in range(rows):
                                    acc[warp, lane, j * rows + r] += wv @ xs[r * length + k4]
            for warp in range(8):
                n0 = t * tile + warp * nr
                for g in range(nr * rows // 32):        # qgemv_warp_sums<32>: lane l, value l
                    for lane in range(32):
                        idx = g * 32 + lane
                        m, n = m0 + idx % rows, n0 + idx // rows
                        if m < M and n < N:
                            total = acc[warp, :, idx].sum()
                            if S == 1:
                                Y[m, n] = Y[m, n] + total if y0 is not None else total
                                writes[m, n] += 1
                            else:
                                partial[s, m, n] = total
        walked = len(range(bx, tiles, blocks_x))
        assert stagings == (-(-(ke - kb) // kc4) if resident else walked * -(-(ke - kb) // kc4))
        if S == 1:
            continue
        c = by * grid[0] + bx
        counters[c] += 1
        if counters[c] != S:
            continue
        for i in range(rows * tile):                    # the last block adds the slices
            m, n = m0 + i // tile, bx * tile + i % tile
            if m < M and n < N:
                total = sum(partial[u, m, n] for u in range(S))
                Y[m, n] = Y[m, n] + total if y0 is not None else total
                writes[m, n] += 1
        counters[c] = 0
    assert not counters.any(), "a counter was left non-zero"
    return Y, writes


def check_gemv_v3_plan(rng, M, N, K, plan):
    """One plan of gemv_v3 on (M, N, K), every prologue and accumulate: each output written
    once, the sums NumPy's."""
    x, w = rng.standard_normal((M, K)), rng.standard_normal((N, K))
    y0, g = rng.standard_normal((M, N)), 1 + 0.1 * rng.standard_normal(K)
    h = rng.standard_normal((M, 2 * K))
    for kw, ref in (({}, x @ w.T), ({"y0": y0}, y0 + x @ w.T),
                    ({"norm": g}, x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-5) * g @ w.T),
                    ({"swiglu": True}, (h[:, :K] / (1 + np.exp(-h[:, :K])) * h[:, K:]) @ w.T)):
        Y, writes = gemv_v3_launch(h if "swiglu" in kw else x, w, plan, rng=rng, **kw)
        assert (writes == 1).all(), (M, N, K, plan, kw.keys())
        assert np.abs(Y - ref).max() < 1e-9 * np.abs(ref).max(), (M, N, K, plan)


def check_gemv_v3(rng):
    # (9, 33, 3104): a slice longer than a chunk of 8 rows (768 float4s), so x is staged
    # chunk by chunk, again for every tile a block walks
    for M, N, K in ((8, 37, 72), (13, 70, 300), (32, 20, 1032), (40, 9, 260), (3, 17, 8),
                    (40, 150, 40), (32, 40, 1032), (9, 33, 3104)):
        for sms in (1, 132):                           # tiles walked by few blocks; split-K
            check_gemv_v3_plan(rng, M, N, K, kernels.gemv_v3_plan(M, N, K, sms=sms))
        print(f"gemv_v3 M {M} N {N} K {K}, plans {kernels.gemv_v3_plan(M, N, K, sms=1)} and "
              f"{kernels.gemv_v3_plan(M, N, K, sms=132)}: every output written once, sums "
              f"match NumPy")
    # plans no rule takes on these sizes: short chunks (x staged again per chunk and per tile
    # walked), slices of several chunks, a last chunk or slice cut short; and the 64-accumulator
    # tiles kernels/dev/ab_f32tiles.py compiles
    M, N, K = 13, 70, 300
    tiles = {(rows, nr): -(-N // (8 * nr)) for rows, nr in ((8, 4), (16, 4), (32, 2), (8, 8))}
    for rows, nr, S, kc, walk in ((8, 4, 1, 64, 1), (8, 4, 1, 128, 2), (8, 4, 2, 64, 0),
                                  (8, 4, 3, 36, 0), (16, 4, 1, 64, 1), (32, 2, 2, 64, 0),
                                  (8, 8, 1, 128, 1)):
        plan = (rows, nr, S, kc, walk or tiles[rows, nr])
        check_gemv_v3_plan(rng, M, N, K, plan)
        print(f"gemv_v3 M {M} N {N} K {K}, plan {plan}: every output written once, sums match "
              f"NumPy")


# ----------------------------------------------------------------------------
# qgemv_v3 (variants.cu): each warp's cp.async pipeline, lane by lane. Every copy is held in
# flight from its issue until the cp_async_wait that guarantees it (the latest it may land);
# a read of a slot byte that a copy still in flight targets is a race and fails, and so does a
# byte read that was not written for this step, or written twice, or from the wrong source.

V3 = {"f16": (8, 0), "q8_0": (16, 2), "q4_0": (32, 1)}     # WEIGHTS, LOADS_PER_BLOCK
ZEROS = -(1 << 62)          # a slot byte's source: zero-filled (cp.async with 0 bytes)


def scale_byte(b):
    """A slot byte's source when it is byte b of the scale plane (code bytes: b itself)."""
    return -1 - b


def v3_decode(fmt, b):
    """The 16-byte load b (uint8) as its weights in k order (the order of F::piece's pieces
    p and elements e: weight 4 p + e), codes before the scale."""
    if fmt == "f16":
        return b.view(np.float16).astype(np.float64)
    if fmt == "q8_0":
        return b.view(np.int8).astype(np.float64)
    t = np.arange(32)
    return ((b[t % 16] >> (4 * (t // 16))) & 15).astype(np.float64) - 8


def qgemv_v3_launch(x, w, nr, stages, warps, blocks):
    """qgemv_v3 on float64 x (K,) and a Packed w (N, K), grid as bench_variants.run_v3 with
    `blocks` blocks resident. Returns y, the copies of each 16-byte load (N, CH) and of each
    scale (N nb), and the writes of each output."""
    fmt, (N, K) = w.format, w.shape
    W, LPB = V3[fmt]
    CH, nb, PIECES = K // W, K // 32, W // 4
    S, tiles = -(-CH // 32), -(-N // nr)
    SB = 32 // LPB if LPB else 0                          # scales per row and slice
    SP = 2 * SB // 16 + 1 if LPB else 0                   # v3_spieces
    CODES, SLOT = nr * 512, nr * 512 + nr * SP * 16       # v3_slot_bytes
    codes = (w.data if fmt == "f16" else w.qs).view(np.uint8).reshape(N, CH * 16)
    scales = w.d.view(np.uint8).reshape(-1) if LPB else None      # the plane, flat (N nb 2)
    xs = np.zeros((PIECES * CH, 4))                       # the staging, piece-major
    for k4 in range(K // 4):
        xs[k4 % PIECES * CH + k4 // PIECES] = x[4 * k4:4 * k4 + 4]
    grid = min(-(-tiles // warps), blocks)
    all_warps = grid * warps
    y, writes = np.full(N, np.nan), np.zeros(N, int)
    code_copies, scale_copies = np.zeros((N, CH), int), np.zeros(N * nb, int)
    for block in range(grid):
        for warp in range(warps):
            gw = block * warps + warp
            steps = ((tiles - 1 - gw) // all_warps + 1) * S if gw < tiles else 0
            smem = np.zeros(stages * SLOT, np.uint8)
            src = np.full(stages * SLOT, -1, np.int64)    # what each slot byte holds: the
            step_of = np.full(stages * SLOT, -1)          # source byte, the step it was copied
            count = np.zeros(stages * SLOT, int)          # for, and how often for that step
            groups = []                                   # committed groups: [copies]
            at_issue = [0, gw * nr]                       # the kernel's (is, in0)

            def issue(i):
                group = []
                if i < steps:
                    s, n0 = at_issue
                    assert (s, n0) == (i % S, (gw + i // S * all_warps) * nr)
                    slot = i % stages * SLOT
                    for lane in range(32):
                        c = 32 * s + lane
                        for j in range(nr):
                            ok = n0 + j < N and c < CH
                            dst = slot + 512 * j + 16 * lane
                            group.append((dst, 16, ("q", n0 + j, c) if ok else None, i))
                            if ok:
                                code_copies[n0 + j, c] += 1
                        for t in range(lane, nr * SP, 32) if LPB else ():
                            j, h = t // SP, t % SP
                            g0 = (n0 + j) * nb + s * SB
                            end, a = g0 + min(SB, nb - s * SB), (g0 & ~7) + 8 * h
                            if n0 + j < N and a < end:
                                size = min(16, 2 * (N * nb - a))
                                group.append((slot + CODES + 16 * t, size, ("d", a), i))
                                scale_copies[a:a + size // 2] += 1
                    at_issue[:] = [0, n0 + all_warps * nr] if s + 1 == S else [s + 1, n0]
                groups.append(group)                      # cp_async_commit

            def land(copy):
                dst, size, what, i = copy
                data, whence = np.zeros(16, np.uint8), np.full(16, ZEROS)   # zero-filled
                if what is not None and what[0] == "q":
                    data = codes[what[1], 16 * what[2]:16 * what[2] + 16]
                    whence = what[1] * CH * 16 + 16 * what[2] + np.arange(16)
                elif what is not None:                    # bytes past `size`: zeros
                    data[:size] = scales[2 * what[1]:2 * what[1] + size]
                    whence[:size] = scale_byte(2 * what[1] + np.arange(size))
                for b in range(16):
                    if step_of[dst + b] != i:
                        count[dst + b] = 0
                    smem[dst + b], src[dst + b], step_of[dst + b] = data[b], whence[b], i
                    count[dst + b] += 1

            def wait(pending):                            # cp_async_wait<pending>
                while len(groups) > pending:
                    for copy in groups.pop(0):
                        land(copy)

            def read(at, size, i, want):
                in_flight = [c for g in groups for c in g if c[0] < at + size and at < c[0] + 16]
                assert not in_flight, ("race", fmt, N, K, i, at)
                assert (step_of[at:at + size] == i).all() and (count[at:at + size] == 1).all(), \
                    ("stale or twice-written slot bytes", fmt, N, K, i, at)
                assert (src[at:at + size] == want).all(), ("wrong source", fmt, N, K, i, at)
                return smem[at:at + size]

            for i in range(stages - 1):
                issue(i)
            acc = np.zeros((32, nr))
            s, n0 = 0, gw * nr
            for i in range(steps):
                wait(stages - 2)
                issue(i + stages - 1)
                slot = i % stages * SLOT
                if s == 0:
                    acc[:] = 0
                for lane in range(32):
                    c = 32 * s + lane
                    if c >= CH:
                        continue
                    for j in range(nr):
                        n = n0 + j
                        want = n * CH * 16 + 16 * c + np.arange(16) if n < N else ZEROS
                        q = read(slot + 512 * j + 16 * lane, 16, i, want)
                        wv = v3_decode(fmt, q)
                        part = sum(wv[4 * p:4 * p + 4] @ xs[p * CH + c] for p in range(PIECES))
                        if LPB and n < N:
                            g0 = n * nb + s * SB
                            at = (g0 & 7) + lane // LPB
                            g = g0 + lane // LPB
                            b = read(slot + CODES + 16 * SP * j + 2 * at, 2, i,
                                     scale_byte(2 * g + np.arange(2)))
                            acc[lane, j] += float(b.view(np.float16)[0]) * part
                        elif not LPB:
                            acc[lane, j] += part
                if s == S - 1:
                    for j in range(nr):
                        if n0 + j < N:
                            y[n0 + j] = acc[:, j].sum()
                            writes[n0 + j] += 1
                s, n0 = (0, n0 + all_warps * nr) if s + 1 == S else (s + 1, n0)
            wait(0)
    return y, code_copies, scale_copies, writes


def check_qgemv_v3(rng):
    for fmt in ("q4_0", "q8_0", "f16"):
        for N, K, (nr, stages, warps, blocks) in (
                (37, 32, (4, 3, 2, 2)), (70, 96, (4, 4, 2, 3)), (13, 4096, (4, 3, 1, 2)),
                (9, 11008, (4, 4, 2, 1)), (21, 96, (8, 3, 1, 2)), (11, 4128, (8, 6, 2, 1))):
            w = cf.random_packed(fmt, N, K, rng)
            x = rng.standard_normal(K)
            y, code_copies, scale_copies, writes = qgemv_v3_launch(x, w, nr, stages, warps,
                                                                   blocks)
            ref = dequantize(w).astype(np.float64) @ x
            err = np.abs(y - ref).max() / np.abs(ref).max()
            assert (writes == 1).all() and err < 1e-5, (fmt, N, K, err)
            assert (code_copies == 1).all(), (fmt, N, K)
            extra = ""
            if fmt != "f16":
                assert (scale_copies >= 1).all(), (fmt, N, K)
                if K // 32 % 8 == 0:
                    assert (scale_copies == 1).all(), (fmt, N, K)
                else:       # a row's scales start off a 16-byte piece: pieces shared
                    extra = f"; rows' scales off 16 bytes: each scale copied 1 to " \
                            f"{scale_copies.max()} times"
            print(f"qgemv_v3 {fmt} N {N} K {K} (nr {nr}, {stages} stages, {warps} warps, "
                  f"{blocks} blocks): every load copied once into the slot it is read from, "
                  f"no read races a copy, every output written once, error {err:.0e}{extra}")


def main():
    rng = np.random.default_rng(0)
    check_qgemv_v3(rng)
    check_gemv_v3(rng)
    M, N, K = 70, 150, 72
    A = rng.standard_normal((M, K)).astype(np.float16)
    W = rng.standard_normal((N, K)).astype(np.float16)
    ref = A.astype(np.float64) @ W.astype(np.float64).T
    for bm, bn, _ in kernels.GEMM_V5_CONFIGS.values():
        C = gemm_v5_block(A, W, bm, bn)
        n = min(N, bn)
        err = np.abs(C[:, :n] - ref[:, :n]).max()
        assert err < 1e-9 and not np.isnan(C[:, :n]).any(), (bm, bn, err)
        print(f"gemm_v5 {bm}x{bn}: block (0, 0) matches NumPy")
    for tiles_m, tiles_n in ((32, 16), (37, 5), (3, 40), (1, 1)):
        seen = sorted(v6_tile(b, tiles_m, tiles_n) for b in range(tiles_m * tiles_n))
        assert seen == [(i, j) for i in range(tiles_m) for j in range(tiles_n)]
    print("gemm_v6: v6_tile visits every tile once")
    for (bm, bn, stages), packed, (M, N, K), b in (
            ((128, 256, 4), False, (70, 150, 72), 0), ((256, 128, 3), False, (300, 130, 136), 1),
            ((128, 128, 4), False, (150, 300, 104), 3), ((128, 128, 4), True, (150, 300, 96), 2),
            ((128, 256, 3), True, (130, 20, 160), 1), ((256, 128, 4), True, (40, 150, 32), 0),
            ((128, 256, 4), True, (20, 300, 224), 1)):
        A = rng.standard_normal((M, K)).astype(np.float16)
        W = rng.standard_normal((N, K)).astype(np.float16)
        ref = A.astype(np.float64) @ W.astype(np.float64).T
        C, (m0, n0) = gemm_v6_block(A, W, bm, bn, stages, packed, b)
        part = (slice(m0, min(M, m0 + bm)), slice(n0, min(N, n0 + bn)))
        err = np.abs(C[part] - ref[part]).max()
        assert err < 1e-9 and not np.isnan(C[part]).any(), (bm, bn, stages, packed, err)
        assert np.isnan(np.delete(np.delete(C, np.r_[part[0]], 0), np.r_[part[1]], 1)).all()
        print(f"gemm_v6 {bm}x{bn}x{stages}{' packed' if packed else ''} {M}x{N}x{K}: block {b} "
              f"(tile at {m0}, {n0}) matches NumPy")
    for fmt in ("f16", "q8_0", "q4_1"):
        for M, N, K, smem in ((3, 37, 96, 96 << 10), (9, 70, 2080, 4096), (1, 150, 1024, 1)):
            w = cf.random_packed(fmt, N, K, rng)
            x = rng.standard_normal((M, K))
            Y = qgemv_launch(x, w, smem, blocks=6)
            ref = x @ dequantize(w).astype(np.float64).T
            assert not np.isnan(Y).any() and np.abs(Y - ref).max() < 1e-9 * np.abs(ref).max()
        print(f"qgemv {fmt}: every output written once, sums match NumPy")
    for fmt in ("q4_0", "q8_0", "f16"):
        for M, N, K, smem, ks in ((11, 37, 288, 1 << 20, 2), (3, 20, 96, 1, 8), (17, 16, 160, 1 << 20, 1)):
            w = cf.random_packed(fmt, N, K, rng)
            x = rng.standard_normal((M, K)).astype(np.float32)
            Y = qgemv_tc_launch(x, w, smem, blocks=3, ks=ks)
            ref = x.astype(np.float64) @ dequantize(w).astype(np.float64).T
            err = np.linalg.norm(Y - ref) / np.linalg.norm(ref)
            assert not np.isnan(Y).any() and err < 1e-5, (fmt, M, N, K, err)
        print(f"qgemv_tc {fmt}: fragments, transpose and scales match NumPy (error {err:.1e})")
    for fmt in kernels.QGEMV_K_PLANES:
        for M, N, K, smem in ((3, 37, 512, 96 << 10), (9, 21, 768, 4096), (1, 70, 256, 1)):
            w = random_kquant(fmt, N, K, rng)
            x = rng.standard_normal((M, K))
            Y, seen = qgemv_k_launch(x, w, smem, blocks=3)
            ref = dequantize(w)
            assert np.array_equal(seen.view(np.uint32), ref.view(np.uint32)), fmt
            ref = x @ ref.astype(np.float64).T
            assert not np.isnan(Y).any() and np.abs(Y - ref).max() < 1e-9 * np.abs(ref).max()
        with np.errstate(over="ignore"):
            assert np.array_equal(kquant_to_f16(w).view(np.uint16),
                                  dequantize(w).astype(np.float16).view(np.uint16))
        print(f"qgemv_k {fmt}: every weight unpacked with the reference's bits, every output "
              f"written once, sums match NumPy; kquant_to_f16 too")


if __name__ == "__main__":
    main()

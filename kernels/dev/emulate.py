"""Replay the index arithmetic of gemm_v5 and qgemv on the CPU, for machines without a GPU.

    python kernels/dev/emulate.py

Which thread copies which 16 bytes where (the swizzle), which addresses the 32 lanes hand to
ldmatrix and what each lane receives, how mma.m16n8k16's register fragments map to matrix
elements (the PTX ISA's tables), and which lane of qgemv writes which output: all written out
element by element in Python, the product assembled from the fragments and compared with NumPy.
It checks our reading of the layouts and the kernels' indexing, not the hardware: a run on the
GPU (check_formats.py) is still the test. Slow on purpose, so sizes are small.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_formats as cf      # noqa: E402  (its random planes; it puts the checkout on sys.path)
from minillama.cuda import kernels      # noqa: E402  (the wrappers' tables)
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


def main():
    rng = np.random.default_rng(0)
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
    for fmt in ("f16", "q8_0", "q4_1"):
        for M, N, K, smem in ((3, 37, 96, 96 << 10), (9, 70, 2080, 4096), (1, 150, 1024, 1)):
            w = cf.random_packed(fmt, N, K, rng)
            x = rng.standard_normal((M, K))
            Y = qgemv_launch(x, w, smem, blocks=6)
            ref = x @ dequantize(w).astype(np.float64).T
            assert not np.isnan(Y).any() and np.abs(Y - ref).max() < 1e-9 * np.abs(ref).max()
        print(f"qgemv {fmt}: every output written once, sums match NumPy")


if __name__ == "__main__":
    main()

// GEMV on weights kept as stored: float16, bfloat16, and the GGUF block formats Q8_0, Q4_0, Q4_1.
//
//     y[m, n] = sum_k x[m, k] W[n, k]        x: (M, K) float32,  W: (N, K) packed,  y: (M, N) float32
//
// The next lesson after gemv (matmul.cu). There, a weight is a float: 4 bytes, one FMA. Here a
// weight is 16 bits, or 8.5, or 4.5 (a 4-bit code plus its block's share of a float16 scale),
// and it has to become the float the reference computes before it can meet x. Three things
// change:
//
// 1. Bytes per weight fall 2x (f16), 3.8x (q8_0) or 7.1x (q4_0), so the time to stream W falls
//    with them, but the work per weight does not: each one still needs an FMA per row of x, plus
//    now its unpacking. At 4.2 TB/s a q4_0 matrix arrives at ~29 weights per clock per SM, and an
//    SM issues 128 lane-instructions per clock: about 4.4 instructions per weight, all included,
//    before the GPU is waiting on arithmetic instead of memory. So the unpacking is written with
//    bit tricks (below), x comes from shared memory, and every x value loaded into a register is
//    used by several weight rows (NR rows per warp).
//
// 2. The scale is a second load. Blocks of 32 weights share one float16 scale d (and a min m for
//    q4_1), kept in planes of their own beside the packed codes (the layout of
//    docs/kernels.md): the codes are 16-byte aligned, so a lane reads a whole q4 block (32
//    weights) with one 16-byte load; in GGUF's interleaved 18-byte blocks no load of 16 bytes
//    would ever be aligned. The 2-byte scale load is issued with the codes, before either is
//    used, so the two latencies overlap; the 32 lanes of a warp read 32 consecutive scales,
//    one 64-byte piece, so it costs an instruction, not a memory transaction per lane.
//
// 3. Nibbles unpack with a magic number. Byte j of a q4 block holds code j in its low 4 bits and
//    code j + 16 in its high 4 bits. OR-ing 4 bits into the mantissa of the float16 1024.0
//    (0x6400) makes the float16 1024 + code, exactly, with no conversion instruction:
//
//        word  = bytes b0 b1 b2 b3 of the block           (codes 0..3 low, 16..19 high)
//        (word & 0x000F000F) | 0x64006400  = half2(1024 + code0, 1024 + code2)
//        ((word >> 8) & 0x000F000F) | 0x64006400 = half2(1024 + code1, 1024 + code3)
//        (word & 0x00F000F0) | 0x64006400  = half2(1024 + 16 code16, 1024 + 16 code18)
//
//    one subtraction (or one FMA by 1/16 for the high nibbles) in float16x2 leaves code - 8 for
//    two weights at once, exact (small integers are exact in float16). q8_0 does the same with
//    whole bytes: flipping the sign bit (b ^ 0x80 = b + 128) and placing the byte under 0x64 with
//    a byte permute gives 1024 + 128 + b. Then each code widens to float32 and is multiplied by
//    its scale in float32: code * d is exact there (at most 8 + 11 significant bits), and for
//    q4_1 fmaf(code, d, m) rounds once, as NumPy's code * d + m does. So the kernel multiplies
//    x by exactly the weights the NumPy reference dequantizes, and accumulates in float32.
//
// Layout of the work. A block of 256 threads (8 warps) first writes the rows of x it needs into
// shared memory, after the prologue (RMSNorm or SwiGLU, as gemv: GEMV_PLAIN, GEMV_RMSNORM,
// GEMV_SWIGLU), so the prologue runs once per block instead of once per weight row. Then each
// warp takes NR consecutive weight rows at a time (a "tile"); lane l reads 16-byte pieces
// l, l + 32, l + 64, ... of each of the NR rows (coalesced: a warp reads 512 contiguous bytes
// of a row per load), unpacks them, and multiplies them with the matching x, which it reads from
// shared memory stored piece-major so that the 32 lanes read 32 consecutive float4s (no bank
// conflicts):
//
//     xs[(r * PIECES + p) * CH + c] = x[r, c * WEIGHTS + 4 p .. + 3]
//         r: row of x,  c: 16-byte load along the row (CH per chunk),  p: its p-th float4
//
// The grid is small (a few blocks per SM), and each block walks over many tiles, so x is staged
// once per block, not once per tile. A warp keeps its next batch of weight loads in flight
// while it computes on the current one, across the end of a tile too (QBatch), and its very
// first loads are issued before x is staged. Rows of x come ROWS at a time; with more than ROWS rows the
// block repeats the walk (the second pass finds its weight rows in L2 where they fit). When
// ROWS rows of x do not fit the shared memory the caller grants (`kc` floats per row), K is
// walked in chunks, and each chunk's sums are added into y: still every element is written by
// one lane, in a fixed order.
//
// The formats are traits: WEIGHTS (weights per 16-byte load), the loads that share a scale, and
// `piece`, which turns float4 number p of a 16-byte load into float32 weights before the scale.
//
// The versions, in the order of the lesson: qgemv (above: float16 magic), qgemv_v2 (float32
// magic, the scale once per load; one row of x, and float32 batches), qgemv_v4 (at the end of
// the file: one row of x on q4_0 and q8_0 with the products in integers, dp4a over exact 8-bit
// digits of x), qgemv_v4s (last: v4 split over k, for a long row of few weight rows).
// kernels.qgemv's rule says which runs.
// Compiled as one module after reduce.cu (block_sum, FULL_MASK) and matmul.cu (gemv_x4, the
// GEMV_* prologues, the float16 helpers).


// ---------------------------------------------------------------------------------------------
// Helpers. The float16 arithmetic (f16_lo, f16x2_sub, byte_perm, the HALF2_* magic numbers) is
// shared with gemm_v5 and lives in matmul.cu.

// Word i (0..3) of a 16-byte load; i is a compile-time constant after unrolling.
__device__ __forceinline__ unsigned int q_word(const uint4& q, int i) {
    return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}

// A 16-byte load that bypasses L1: each weight is read once, so it should not evict x.
// L2_FETCH 128: L2 fetches the whole 128-byte line from memory, not only the sectors asked for
// (PTX's .level::prefetch_size). qgemv_mma's loads take 64 bytes of each of 8 rows, the next
// step's the 64 after them, so one trip to memory serves two steps: batch-8 steps of the 7B
// shape 1.046x (float16) and 1.014x (int8), q4_0 even; 256 bytes lost (H200, 2026-11-30,
// docs/kernels.md "Asking L2 ahead"). qgemv's one-row loads, 512 contiguous bytes a
// warp, measured even with it and do without.
template <int L2_FETCH = 0>
__device__ __forceinline__ uint4 q_load16(const uint4* p) {
    static_assert(L2_FETCH == 0 || L2_FETCH == 128, "q_load16: L2_FETCH 0 or 128");
    uint4 v;
    if (L2_FETCH == 128)
        asm("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// A weight's float16 scale (or min), raw, read-only; L2_FETCH as q_load16's.
template <int L2_FETCH = 0>
__device__ __forceinline__ unsigned short q_scale(const unsigned short* p) {
    static_assert(L2_FETCH == 0 || L2_FETCH == 128, "q_scale: L2_FETCH 0 or 128");
    if (L2_FETCH == 0) return __ldg(p);
    unsigned short v;
    asm("ld.global.nc.L2::128B.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// ---------------------------------------------------------------------------------------------
// The formats. `piece(q, p, v)`: float4 number p of 16-byte load q, as float32 weights before
// the scale. Word i of a load is bytes 4i .. 4i + 3 (little-endian).

// float16: 8 weights per load, no scale.
struct FmtF16 {
    static constexpr int WEIGHTS = 8, LOADS_PER_BLOCK = 0;
    static constexpr bool MIN = false;
    static __device__ __forceinline__ void piece(const uint4& q, int p, float* v) {
        const unsigned int a = q_word(q, 2 * p), b = q_word(q, 2 * p + 1);
        v[0] = f16_lo(a); v[1] = f16_hi(a); v[2] = f16_lo(b); v[3] = f16_hi(b);
    }
};

// bfloat16: the top half of a float32, so widening is a shift (or a mask, for the high half).
struct FmtBF16 {
    static constexpr int WEIGHTS = 8, LOADS_PER_BLOCK = 0;
    static constexpr bool MIN = false;
    static __device__ __forceinline__ void piece(const uint4& q, int p, float* v) {
        const unsigned int a = q_word(q, 2 * p), b = q_word(q, 2 * p + 1);
        v[0] = __uint_as_float(a << 16); v[1] = __uint_as_float(a & 0xFFFF0000u);
        v[2] = __uint_as_float(b << 16); v[3] = __uint_as_float(b & 0xFFFF0000u);
    }
};

// Q8_0: 32 int8 codes per block, so a load is half a block (16 weights); w = code * d.
struct FmtQ8_0 {
    static constexpr int WEIGHTS = 16, LOADS_PER_BLOCK = 2;
    static constexpr bool MIN = false;
    static __device__ __forceinline__ void piece(const uint4& q, int p, float* v) {
        const unsigned int u = q_word(q, p) ^ 0x80808080u;          // b + 128, as unsigned bytes
        // bytes (u0, 0x64, u1, 0x64) = half2(1024 + u0, 1024 + u1); minus 1152 = (b0, b1)
        const unsigned int h01 = f16x2_sub(byte_perm(u, 0x64646464u, 0x4140), HALF2_1152);
        const unsigned int h23 = f16x2_sub(byte_perm(u, 0x64646464u, 0x4342), HALF2_1152);
        v[0] = f16_lo(h01); v[1] = f16_hi(h01); v[2] = f16_lo(h23); v[3] = f16_hi(h23);
    }
};

// Q4_0 and Q4_1: one load is one block of 32 nibbles. Pieces 0..3 are the low nibbles of words
// 0..3 (codes 4p .. 4p + 3), pieces 4..7 the high nibbles (codes 16 + 4(p - 4) ..).
// Q4_0 subtracts 8 here (w = (code - 8) d); Q4_1 keeps the code (w = code d + m).
template <bool MIN_>
struct FmtQ4 {
    static constexpr int WEIGHTS = 32, LOADS_PER_BLOCK = 1;
    static constexpr bool MIN = MIN_;
    static __device__ __forceinline__ void piece(const uint4& q, int p, float* v) {
        const unsigned int w = q_word(q, p & 3);
        unsigned int a, b;                    // half2(code 0, code 2), half2(code 1, code 3)
        if (p < 4) {
            a = q4_low_pair<MIN>(w);
            b = q4_low_pair<MIN>(w >> 8);
        } else {                              // (1024 + 16 code) / 16 - 64 (- 8)
            a = q4_high_pair<MIN>(w);
            b = q4_high_pair<MIN>(w >> 8);
        }
        v[0] = f16_lo(a); v[1] = f16_lo(b); v[2] = f16_hi(a); v[3] = f16_hi(b);
    }
};
typedef FmtQ4<false> FmtQ4_0;
typedef FmtQ4<true> FmtQ4_1;


// ---------------------------------------------------------------------------------------------
// The kernel. Arguments: the planes of W as raw bits (qs: codes, or the float16/bfloat16
// weights; d: scales; mn: mins, or any pointer when unused), `kc`: floats of each row of x that
// fit the shared memory at once (K, or a multiple of 32 * WEIGHTS). Dynamic shared memory:
// ROWS * kc floats. Grid: (blocks), any number; block: 256 threads.

template <int ROWS>
__device__ __forceinline__ void qgemv_inv_rms(const float* __restrict__ X, int m0, int M, int ldx,
                                              int K, float eps, float* inv_rms) {
    // 1 / sqrt(mean(x^2) + eps) of rows m0 .. m0 + ROWS - 1, in every thread (as gemv): every
    // row's loads, then one block reduction for all of them
    __shared__ float scratch[32 * ROWS];
    float ss[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        ss[r] = m0 + r < M ? thread_sum_squares(X + (size_t)(m0 + r) * ldx, K, threadIdx.x,
                                                blockDim.x)
                           : 0.0f;
    block_reduce_rows<SumOp, ROWS>(ss, scratch);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) inv_rms[r] = 1.0f / sqrtf(ss[r] / K + eps);
}

// inv_rms[r] for a row r known only at run time: indexing a register array by it would move
// the array to local memory, so each element is compared with r instead (unrolled selects).
template <int ROWS>
__device__ __forceinline__ float row_inv_rms(const float (&inv_rms)[ROWS], int r) {
    float inv = 1.0f;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) inv = rr == r ? inv_rms[rr] : inv;
    return inv;
}

// ROWS rows of x from m0, values k0 .. k0 + len - 1 (normed or gated as PRO says), staged in
// dynamic shared memory piece-major as float32 for v1 and v2, so that the 32 lanes of a warp
// read 32 consecutive float4s (PIECES = WEIGHTS / 4 float4s of x per 16-byte load of weights):
//     xs[(r * PIECES + p) * CH + c] = x[r, c * WEIGHTS + 4 p .. + 3]
template <class F, int ROWS, int PRO>
__device__ __forceinline__ void qgemv_stage_pieces(const float* __restrict__ X, int m0, int M,
                                                   int ldx, int K, int k0, int len, int CH,
                                                   const float (&inv_rms)[ROWS],
                                                   const float* __restrict__ norm_w) {
    constexpr int PIECES = F::WEIGHTS / 4;
    extern __shared__ float4 qgemv_xs[];
    const int len4 = len / 4;
    for (int i = threadIdx.x; i < ROWS * len4; i += blockDim.x) {
        const int r = i / len4, k4 = i % len4;
        const float inv = row_inv_rms(inv_rms, r);
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (m0 + r < M)
            v = gemv_x4<PRO>(X + (size_t)(m0 + r) * ldx, k0 / 4 + k4, K, norm_w, inv);
        qgemv_xs[(r * PIECES + k4 % PIECES) * CH + k4 / PIECES] = v;
    }
}

// Sums each of V values (V a power of two, at most 32) over the 32 lanes of a warp, with
// V - 1 + log2(32 / V) shuffles instead of V warp_sum's of 5 each. At each step a lane keeps
// half of its values and sends the other half to its partner (lane ^ o), which keeps the other
// half: after log2(V) steps every lane holds one value, summed over 32 / V lanes, and the plain
// butterfly finishes it. Lane l ends with the total of value l >> (5 - log2(V)).
template <int V>
__device__ __forceinline__ float qgemv_warp_sums(float (&v)[V]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int s = 0; s < 5; ++s) {
        const int o = 16 >> s, n = V >> (s + 1);      // n: values kept after this step
        if (n >= 1) {
            const bool upper = lane & o;
#pragma unroll
            for (int i = 0; i < V / 2; ++i) {         // (a constant trip count unrolls first)
                if (i < n) {
                    const float send = upper ? v[i] : v[i + n];
                    const float keep = upper ? v[i + n] : v[i];
                    v[i] = keep + __shfl_xor_sync(FULL_MASK, send, o);
                }
            }
        } else {
            v[0] += __shfl_xor_sync(FULL_MASK, v[0], o);
        }
    }
    return v[0];
}

// A batch of loads: for U consecutive steps c0, c0 + 32, ... of one lane along the rows
// n0 .. n0 + NR - 1 of W, the 16-byte loads and their scales. A warp keeps the next batch in
// flight while it computes on the current one, also across the end of a tile.
template <class F, int NR, int U>
struct QBatch {
    uint4 q[U][NR];
    unsigned int dm[U][NR];        // the float16 scale (low half) and min (high half), raw

    __device__ __forceinline__ void fetch(const uint4* __restrict__ qs,
                                          const unsigned short* __restrict__ ds,
                                          const unsigned short* __restrict__ ms, int n0, int N,
                                          int c0, int CH, int first, int loads_per_row, int nb) {
        constexpr int LPB = F::LOADS_PER_BLOCK > 0 ? F::LOADS_PER_BLOCK : 1;
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int j = 0; j < NR; ++j) {
                const int n = min(n0 + j, N - 1);           // rows past N: read, never written
                const int c = c0 + 32 * u;                  // past the chunk: not read
                dm[u][j] = 0;
                if (c < CH) {
                    q[u][j] = q_load16(qs + (size_t)n * loads_per_row + first + c);
                    if (F::LOADS_PER_BLOCK > 0) {
                        const size_t blk = (size_t)n * nb + (first + c) / LPB;
                        dm[u][j] = q_scale(ds + blk);
                        if (F::MIN) dm[u][j] |= (unsigned int)q_scale(ms + blk) << 16;
                    }
                }
            }
    }
};

template <class F, int ROWS, int PRO>
__global__ void __launch_bounds__(256, ROWS >= 8 ? 1 : 2)
qgemv(const float* __restrict__ X, const uint4* __restrict__ qs,
      const unsigned short* __restrict__ d, const unsigned short* __restrict__ mn,
      float* __restrict__ Y, int M, int N, int K, int accumulate,
      const float* __restrict__ norm_w, float eps, int kc) {
    constexpr int NR = ROWS >= 4 ? 4 : 2;         // weight rows per warp: each x float4 used NR times
    // Steps per batch: with 1 row of x the time goes to memory, so a batch is 4 steps (8 loads
    // of 16 bytes per lane); with more rows the FMAs take over and registers are short.
    constexpr int U = ROWS == 1 ? 4 : ROWS == 2 ? 2 : 1;
    constexpr int PIECES = F::WEIGHTS / 4;        // float4s of x per 16-byte load
    constexpr bool SCALED = F::LOADS_PER_BLOCK > 0;
    extern __shared__ float4 qgemv_xs[];          // (ROWS, PIECES, CH) float4s, CH = kc / WEIGHTS
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K;   // row length of X
    const int loads_per_row = K / F::WEIGHTS;         // 16-byte loads per row of W
    const int nb = K / 32;                            // scale blocks per row of W
    const int tile_step = gridDim.x * warps * NR;     // from one tile of this warp to the next
    const int n_first = (blockIdx.x * warps + warp) * NR;     // this warp's first tile

    // The first loads do not depend on x: issue them before the block reduces and stages x,
    // so that their latency hides behind that work.
    QBatch<F, NR, U> next;
    bool fetched = n_first < N;
    if (fetched) next.fetch(qs, d, mn, n_first, N, lane, min(kc, K) / F::WEIGHTS, 0, loads_per_row, nb);
    grid_launch_dependents();
    grid_dependency_wait();            // (reduce.cu) the weights are ours; x is the last kernel's

    for (int m0 = 0; m0 < M; m0 += ROWS) {            // ROWS rows of x at a time
        float inv_rms[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) inv_rms[r] = 1.0f;
        if (PRO == GEMV_RMSNORM) qgemv_inv_rms<ROWS>(X, m0, M, ldx, K, eps, inv_rms);

        for (int k0 = 0; k0 < K; k0 += kc) {          // chunks of k that fit shared memory
            const int len = min(kc, K - k0), CH = len / F::WEIGHTS;
            const int first = k0 / F::WEIGHTS;        // the chunk's first 16-byte load in a row
            if (!fetched && n_first < N)
                next.fetch(qs, d, mn, n_first, N, lane, CH, first, loads_per_row, nb);
            fetched = false;
            __syncthreads();                          // the last chunk's readers are done
            qgemv_stage_pieces<F, ROWS, PRO>(X, m0, M, ldx, K, k0, len, CH, inv_rms, norm_w);
            __syncthreads();

            for (int n0 = n_first; n0 < N; n0 += tile_step) {
                float acc[NR * ROWS];                 // acc[j * ROWS + r]: y[m0 + r, n0 + j]
#pragma unroll
                for (int i = 0; i < NR * ROWS; ++i) acc[i] = 0.0f;

                for (int c0 = lane; c0 < CH; c0 += 32 * U) {
                    const QBatch<F, NR, U> cur = next;
                    // the loads after these: further along this tile, or the next tile's first
                    const bool same = c0 + 32 * U < CH;
                    const int n_next = same ? n0 : n0 + tile_step;
                    if (n_next < N)
                        next.fetch(qs, d, mn, n_next, N, same ? c0 + 32 * U : lane, CH, first,
                                   loads_per_row, nb);
#pragma unroll
                    for (int u = 0; u < U; ++u) {
                        const int c = c0 + 32 * u;
                        if (c >= CH) break;
#pragma unroll
                        for (int p = 0; p < PIECES; ++p) {
                            float4 xv[ROWS];
#pragma unroll
                            for (int r = 0; r < ROWS; ++r) xv[r] = qgemv_xs[(r * PIECES + p) * CH + c];
#pragma unroll
                            for (int j = 0; j < NR; ++j) {
                                float w[4];
                                F::piece(cur.q[u][j], p, w);
                                const float dj = f16_lo(cur.dm[u][j]), mj = f16_hi(cur.dm[u][j]);
#pragma unroll
                                for (int e = 0; e < 4; ++e)     // the weight the reference computes
                                    if (SCALED) w[e] = F::MIN ? fmaf(w[e], dj, mj) : w[e] * dj;
#pragma unroll
                                for (int r = 0; r < ROWS; ++r) {
                                    float& a = acc[j * ROWS + r];
                                    a = fmaf(w[0], xv[r].x, a);
                                    a = fmaf(w[1], xv[r].y, a);
                                    a = fmaf(w[2], xv[r].z, a);
                                    a = fmaf(w[3], xv[r].w, a);
                                }
                            }
                        }
                    }
                }

                // the NR * ROWS sums over the warp; lane (j ROWS + r) << SHIFT has y[m0 + r, n0 + j]
                constexpr int SHIFT = NR * ROWS == 32 ? 0 : NR * ROWS == 16 ? 1 : NR * ROWS == 4 ? 3 : 4;
                const float mine = qgemv_warp_sums<NR * ROWS>(acc);
                const int j = (lane >> SHIFT) / ROWS, r = (lane >> SHIFT) % ROWS;
                if (lane % (1 << SHIFT) == 0 && n0 + j < N && m0 + r < M) {
                    float* y = Y + (size_t)(m0 + r) * N + n0 + j;
                    *y = (k0 > 0 || accumulate) ? *y + mine : mine;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// qgemv_v2<F, ROWS, PRO, NR, U>: the next version. v1 spends ~5 instructions per q4_0 weight
// (float16 magic, widening, scale), over the 4.4 that the copy bandwidth leaves (see above), so
// a q4_0 matrix at batch 1 streamed at 0.3-0.47 of the copy bandwidth. v2 changes the inner step
// and nothing else (the walk, the staging of x, QBatch are v1's):
//   - codes become float32 directly, by a float32 magic number (below): two instructions per
//     nibble, no widening;
//   - the scale is applied once per 16-byte load (16 or 32 weights), not once per weight;
//   - NR (weight rows per warp) and U (16-byte loads in flight per row) are template parameters,
//     and ROWS goes up to 32, with a float32 format (V2F32): the same kernel is the batched float32
//     GEMV of issue 13, reading each weight once per 32 rows of x where gemv reads it once per 8.
// Measured on an H200 (docs/kernels.md, "qgemv v2 and the batches"): at batch 1 v2 (NR 2, U 4)
// is never slower than v1 and 1.1-1.3x faster on q4_0 and q8_0; at batch 8 and 32 of the block
// formats it is not faster (the FMAs per weight, 8 or 32, are the bound, not the unpacking), so
// kernels.qgemv launched v2 for one row of x and v1 for more (for one row of q4_0 and q8_0,
// qgemv_v4 at the end of this file has since taken over). For float32 weights, at 8 rows and
// more, v2 (ROWS up to 32, NR 4, U 1) is 1.5-3.6x faster than gemv on matrices with many rows;
// kernels.gemv's rule says which.
//
// 1. Codes to float32 without conversion instructions.
//
// qgemv (v1) turns codes into float16 with the 0x6400 magic, then each float16 into a float32
// (one instruction per weight), then multiplies by the scale (one more). Here the magic is the
// float32 2^23 = 0x4B000000, whose unit in the last place is 1: OR-ing a code c shifted left by
// s bits (s + 4 <= 23) into its mantissa gives the float 2^23 + c 2^s exactly, and one FFMA by
// 2^-s minus (2^(23-s) + 8) leaves c - 8 exactly (for q4_1 minus 2^(23-s): c). So a nibble costs
// one LOP3 ((w & mask) | magic) and one FFMA, a q8_0 byte one PRMT (the byte under 0x4B) and one
// FADD. The scale is then applied once per 16-byte load instead of once per weight:
//
//     sum_k (c_k - 8) d x_k = d * sum_k (c_k - 8) x_k                              q4_0, q8_0
//     sum_k (c_k d + m) x_k = d * sum_k c_k x_k + m * sum_k x_k                    q4_1
//
// The sums are over the 32 (q4) or 16 (q8_0: half a block) weights of one load, in float32.
// The reference's weights are (c - 8) d rounded to float32 (exact: at most 8 + 11 bits) and
// fl(c d + m); the factored sums differ from float32 sums of those only by float32 rounding,
// so the 1e-5 bound against float64 is unchanged (tests/test_cuda_formats.py checks it).

#define F32_MAGIC 0x4B000000u         // the float 2^23

template <unsigned int MASK>
__device__ __forceinline__ float magic_code(unsigned int w, float scale, float bias) {
    // ((w & MASK) | 2^23) * scale - bias: MASK selects bits s .. s + 3, scale = 2^-s
    return fmaf(__uint_as_float(and_or<MASK, F32_MAGIC>(w)), scale, -bias);
}

struct V2F32 {                        // issue 13: float32 weights, 4 per load
    static constexpr int WEIGHTS = 4, LOADS_PER_BLOCK = 0;
    static constexpr bool MIN = false;
    static __device__ __forceinline__ void piece(const uint4& q, int, float* v) {
        v[0] = __uint_as_float(q.x); v[1] = __uint_as_float(q.y);
        v[2] = __uint_as_float(q.z); v[3] = __uint_as_float(q.w);
    }
};
typedef FmtF16 V2F16;                 // the 16-bit formats are v1's (one widening each)
typedef FmtBF16 V2BF16;

struct V2Q8_0 {                       // w = code * d; piece p: bytes 4p .. 4p + 3 as codes
    static constexpr int WEIGHTS = 16, LOADS_PER_BLOCK = 2;
    static constexpr bool MIN = false;
    static __device__ __forceinline__ void piece(const uint4& q, int p, float* v) {
        const unsigned int u = q_word(q, p) ^ 0x80808080u;     // b + 128, as unsigned bytes
#pragma unroll
        for (int e = 0; e < 4; ++e)   // bytes (u_e, 0, 0, 0x4B) = 2^23 + 128 + b
            v[e] = __uint_as_float(byte_perm(u, F32_MAGIC, 0x7440u | e)) - 8388736.0f;
    }
};

// piece p < 4: the low nibbles of word p (codes 4p .. 4p + 3, bits 0, 8, 16, 24); p >= 4: the
// high nibbles of word p - 4 (codes 16 + 4(p - 4) .., bits 4, 12, 20, 28). Bits 20 and up do
// not fit under the magic, so they are taken from w >> 12.
template <bool MIN_>
struct V2Q4 {
    static constexpr int WEIGHTS = 32, LOADS_PER_BLOCK = 1;
    static constexpr bool MIN = MIN_;
    static __device__ __forceinline__ void piece(const uint4& q, int p, float* v) {
        const unsigned int w = q_word(q, p & 3), w2 = w >> 12;
        const float o = MIN ? 0.0f : 8.0f;
        if (p < 4) {
            v[0] = magic_code<0x0000000Fu>(w, 1.0f, 8388608.0f + o);
            v[1] = magic_code<0x00000F00u>(w, 1.0f / 256, 32768.0f + o);
            v[2] = magic_code<0x000F0000u>(w, 1.0f / 65536, 128.0f + o);
            v[3] = magic_code<0x0000F000u>(w2, 1.0f / 4096, 2048.0f + o);     // bits 24..27
        } else {
            v[0] = magic_code<0x000000F0u>(w, 1.0f / 16, 524288.0f + o);
            v[1] = magic_code<0x0000F000u>(w, 1.0f / 4096, 2048.0f + o);
            v[2] = magic_code<0x00000F00u>(w2, 1.0f / 256, 32768.0f + o);     // bits 20..23
            v[3] = magic_code<0x000F0000u>(w2, 1.0f / 65536, 128.0f + o);     // bits 28..31
        }
    }
};
typedef V2Q4<false> V2Q4_0;
typedef V2Q4<true> V2Q4_1;

// One tile of a warp: its NR weight rows from n0 along the chunk's CH loads (the lane's loads
// lane, lane + 32 U, ..), each batch taken from `next` while the one after it is fetched:
// further along this tile, or the first of the warp's next tile (n0 + tile_step, where that is
// below row_end), so that loads stay in flight across the tile's end. Step::multiply adds each
// load times x into acc.
template <class F, int NR, int U, int V, class Step>
__device__ __forceinline__ void qgemv_tile(QBatch<F, NR, U>& next, const uint4* __restrict__ qs,
                                           const unsigned short* __restrict__ d,
                                           const unsigned short* __restrict__ mn, int n0,
                                           int tile_step, int row_end, int N, int CH, int first,
                                           int loads_per_row, int nb, float (&acc)[V]) {
    const int lane = threadIdx.x % 32;
    for (int c0 = lane; c0 < CH; c0 += 32 * U) {
        const QBatch<F, NR, U> cur = next;
        const bool same = c0 + 32 * U < CH;
        const int n_next = same ? n0 : n0 + tile_step;
        if (n_next < row_end)
            next.fetch(qs, d, mn, n_next, N, same ? c0 + 32 * U : lane, CH, first,
                       loads_per_row, nb);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c >= CH) break;
            Step::multiply(cur, u, c, CH, acc);
        }
    }
}

// The walk of qgemv_v2 and qgemv_v4, qgemv's (x staged in shared memory once per block and
// chunk of k, a warp on NR weight rows at a time, QBatch prefetching across tiles, K in chunks),
// with what a version changes as a policy, Step:
//   Step::stage(X, m0, M, ldx, K, k0, len, CH, inv_rms, norm_w)   ROWS rows of x from m0, values
//       k0 .. k0 + len - 1, into dynamic shared memory, in the version's own layout;
//   Step::multiply(cur, u, c, CH, acc)   the inner step: load u of QBatch cur (lane's 16-byte
//       load c of the chunk, for the NR rows) times x, added into acc[j * ROWS + r].
// ROWS * NR accumulators, reduced over the warp 32 at a time.
template <class F, int ROWS, int PRO, int NR, int U, class Step>
__device__ __forceinline__ void qgemv_walk(const float* __restrict__ X, const uint4* __restrict__ qs,
                                           const unsigned short* __restrict__ d,
                                           const unsigned short* __restrict__ mn,
                                           float* __restrict__ Y, int M, int N, int K,
                                           int accumulate, const float* __restrict__ norm_w,
                                           float eps, int kc) {
    constexpr int V = NR * ROWS;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K;
    const int loads_per_row = K / F::WEIGHTS;
    const int nb = K / 32;
    const int tile_step = gridDim.x * warps * NR;
    const int n_first = (blockIdx.x * warps + warp) * NR;

    QBatch<F, NR, U> next;
    bool fetched = n_first < N;
    if (fetched) next.fetch(qs, d, mn, n_first, N, lane, min(kc, K) / F::WEIGHTS, 0, loads_per_row, nb);
    grid_launch_dependents();
    grid_dependency_wait();            // (reduce.cu) the weights are ours; x is the last kernel's

    // RMSNorm after the sums (Step::LATE_NORM, V4Step's) where the row is one chunk, so that
    // each output is written once; else inv_rms first, as the other steps do
    constexpr bool LATE_STEP = Step::LATE_NORM && PRO == GEMV_RMSNORM;
    const bool late = LATE_STEP && kc >= K;
    for (int m0 = 0; m0 < M; m0 += ROWS) {
        float inv_rms[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) inv_rms[r] = 1.0f;
        if (PRO == GEMV_RMSNORM && !late) qgemv_inv_rms<ROWS>(X, m0, M, ldx, K, eps, inv_rms);

        for (int k0 = 0; k0 < K; k0 += kc) {
            const int len = min(kc, K - k0), CH = len / F::WEIGHTS;
            const int first = k0 / F::WEIGHTS;
            if (!fetched && n_first < N)
                next.fetch(qs, d, mn, n_first, N, lane, CH, first, loads_per_row, nb);
            fetched = false;
            __syncthreads();
            Step::stage(X, m0, M, ldx, K, k0, len, CH, inv_rms, norm_w);
            __syncthreads();
            float late_inv = 1.0f;
            if constexpr (LATE_STEP) {
                if (late) late_inv = Step::late_inv_rms(CH, K, eps);
            }

            for (int n0 = n_first; n0 < N; n0 += tile_step) {
                float acc[V];                             // acc[j * ROWS + r]
#pragma unroll
                for (int i = 0; i < V; ++i) acc[i] = 0.0f;

                qgemv_tile<F, NR, U, V, Step>(next, qs, d, mn, n0, tile_step, N, N, CH, first,
                                              loads_per_row, nb, acc);

                // the V sums over the warp, 32 (or all V) at a time; see qgemv
#pragma unroll
                for (int g = 0; g < (V + 31) / 32; ++g) {
                    constexpr int W = V < 32 ? V : 32;
                    constexpr int SHIFT = W == 32 ? 0 : W == 16 ? 1 : W == 8 ? 2 : W == 4 ? 3 : W == 2 ? 4 : 5;
                    float part[W];
#pragma unroll
                    for (int i = 0; i < W; ++i) part[i] = acc[g * 32 + i];
                    const float mine = qgemv_warp_sums<W>(part);
                    const int idx = g * 32 + (lane >> SHIFT), j = idx / ROWS, r = idx % ROWS;
                    if (lane % (1 << SHIFT) == 0 && n0 + j < N && m0 + r < M) {
                        float* y = Y + (size_t)(m0 + r) * N + n0 + j;
                        const float v = LATE_STEP ? mine * late_inv : mine;
                        *y = (k0 > 0 || accumulate) ? *y + v : v;
                    }
                }
            }
        }
    }
}

// v2's step: x staged piece-major as float32, so that the 32 lanes read 32 consecutive float4s,
//     xs[(r * PIECES + p) * CH + c] = x[r, c * WEIGHTS + 4 p .. + 3]
// and for each 16-byte load, per (weight row j, x row r), a partial sum of code * x, then one
// FFMA by the scale (and one by the min) into the accumulator. Unscaled formats accumulate
// directly.
template <class F, int ROWS, int PRO, int NR, int U>
struct V2Step {
    static constexpr bool LATE_NORM = false;     // (V4Step's)
    static constexpr int PIECES = F::WEIGHTS / 4;
    static constexpr bool SCALED = F::LOADS_PER_BLOCK > 0;
    static constexpr int V = NR * ROWS;

    static __device__ __forceinline__ void stage(const float* __restrict__ X, int m0, int M,
                                                 int ldx, int K, int k0, int len, int CH,
                                                 const float (&inv_rms)[ROWS],
                                                 const float* __restrict__ norm_w) {
        qgemv_stage_pieces<F, ROWS, PRO>(X, m0, M, ldx, K, k0, len, CH, inv_rms, norm_w);
    }

    static __device__ __forceinline__ void multiply(const QBatch<F, NR, U>& cur, int u, int c,
                                                    int CH, float (&acc)[V]) {
        extern __shared__ float4 qgemv_xs[];
        if (SCALED) {
            float part[V], xsum[ROWS];
#pragma unroll
            for (int i = 0; i < V; ++i) part[i] = 0.0f;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) xsum[r] = 0.0f;
#pragma unroll
            for (int p = 0; p < PIECES; ++p) {
                float w[NR][4];
#pragma unroll
                for (int j = 0; j < NR; ++j) F::piece(cur.q[u][j], p, w[j]);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float4 xv = qgemv_xs[(r * PIECES + p) * CH + c];
                    if (F::MIN) xsum[r] += (xv.x + xv.y) + (xv.z + xv.w);
#pragma unroll
                    for (int j = 0; j < NR; ++j) {
                        float& a = part[j * ROWS + r];
                        a = fmaf(w[j][0], xv.x, a);
                        a = fmaf(w[j][1], xv.y, a);
                        a = fmaf(w[j][2], xv.z, a);
                        a = fmaf(w[j][3], xv.w, a);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < NR; ++j) {
                const float dj = f16_lo(cur.dm[u][j]), mj = f16_hi(cur.dm[u][j]);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    float& a = acc[j * ROWS + r];
                    a = fmaf(dj, part[j * ROWS + r], a);
                    if (F::MIN) a = fmaf(mj, xsum[r], a);
                }
            }
        } else {
#pragma unroll
            for (int p = 0; p < PIECES; ++p) {
                float w[NR][4];
#pragma unroll
                for (int j = 0; j < NR; ++j) F::piece(cur.q[u][j], p, w[j]);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float4 xv = qgemv_xs[(r * PIECES + p) * CH + c];
#pragma unroll
                    for (int j = 0; j < NR; ++j) {
                        float& a = acc[j * ROWS + r];
                        a = fmaf(w[j][0], xv.x, a);
                        a = fmaf(w[j][1], xv.y, a);
                        a = fmaf(w[j][2], xv.z, a);
                        a = fmaf(w[j][3], xv.w, a);
                    }
                }
            }
        }
    }
};

// Two blocks per SM (128 registers a thread) only where that does not spill: few rows of x
// and at most 8 loads in flight; kernels.qgemv_v2 sizes the grid by the same rule.
template <class F, int ROWS, int PRO, int NR, int U>
__global__ void __launch_bounds__(256, ROWS >= 8 || NR * U >= 16 ? 1 : 2)
qgemv_v2(const float* __restrict__ X, const uint4* __restrict__ qs,
         const unsigned short* __restrict__ d, const unsigned short* __restrict__ mn,
         float* __restrict__ Y, int M, int N, int K, int accumulate,
         const float* __restrict__ norm_w, float eps, int kc) {
    qgemv_walk<F, ROWS, PRO, NR, U, V2Step<F, ROWS, PRO, NR, U>>(X, qs, d, mn, Y, M, N, K,
                                                                  accumulate, norm_w, eps, kc);
}


// ---------------------------------------------------------------------------------------------
// qgemv_v4<F, PRO, NR, U, B>: batch 1 in integers (issue 10).
//
// v2 spends ~3.1 instructions per q4_0 weight (LOP3 and FFMA to decode it, FFMA to multiply);
// at the copy bandwidth an H200 issues ~4.4 per weight, and v2 streams q4_0 at ~0.5 of it. A
// candidate that moved the loads through shared memory (kernels/dev/variants.cu, qgemv_v3) was
// slower (0.41 to 0.45 against v2's 0.50, H200, 2026-11-29): it added instructions. So v4 takes away instructions: the products
// become integer, four per instruction (dp4a: four 8-bit products added into a 32-bit sum), as
// llama.cpp's MMVQ kernels do. llama.cpp rounds x to 8 bits for that (its q8_1), which the 1e-5
// bound of the float32 GEMV does not allow. v4 keeps the bits of x:
//
//   - x is cut into units, the values one 16-byte load meets (32 for q4_0, 16 for q8_0). A
//     unit is scaled by a power of two 2^s that puts its largest |x| into [2^21, 2^22) and
//     rounded to integers xi: its largest values keep 22 bits (float32 keeps 24), and any
//     value's rounding error is at most 2^-22 of the unit's largest, as a float32 sum's rounding
//     is relative to its largest terms. (2^-s must stay a normal float, so s stops at 126: a
//     unit whose largest |x| is under 2^-104 keeps fewer bits. Activations are nowhere near.);
//   - xi is cut into three signed 8-bit digits, xi = p2 2^16 + p1 2^8 + p0 (p0, p1 in
//     [-128, 127], |p2| <= 64), staged in shared memory four to a word, once per block, with
//     T_k = sum of the unit's digits p_k and 2^-s;
//   - a load's sums S_k = sum_e c_e p_k,e are three dp4a chains over its words, exact in int32
//     (|S_k| < 32 x 128 x 128). q4_0's nibbles go in unsigned (c = code, no "- 8" per weight)
//     and the offset comes off in integers, S_k - 8 T_k: still exact;
//   - the load's value, d 2^-s (S_2 2^16 + S_1 2^8 + S_0), is two float32 roundings of an
//     exact integer, FFMA'd into the accumulator as v2's per-load sums are.
//
// Per 32 q4_0 weights of a row: 24 dp4a, 12 to unpack the nibbles (AND; SHR and AND), ~10 for
// the offsets, the conversions and the scales: ~1.4 instructions a weight. q8_0's codes are
// signed bytes already: 12 dp4a and ~8 more per 16 weights.
//
// Measured on an H200 (kernels/dev/bench_variants.py, 2026-11-30; docs/kernels.md): the
// Llama-2-7B matrices of one token in 1541 us for q4_0 (0.57 of the copy bandwidth; v2 1792 us,
// 0.49) and 2064 us for q8_0 (0.81; v2 2143 us), at NR, U = 2, 2 (q4_0) and 2, 4 (q8_0).
// Accuracy: 2e-7 to 4e-7 of float64 on the checks' sizes (v2: ~1.5e-7).
//
// The walk is v2's at one row of x (qgemv_walk: QBatch's loads in flight across tiles, K in
// chunks of kc); V4Step is what changes, the staging of x and the inner step. x that is not finite gives a NaN scale, so
// the rows it meets come out NaN (a float32 product would give an infinity or a NaN: not finite
// either way; never a silent integer).
//
// Arguments: qs the codes, d the float16 scales, Y (N) float32, one row of x (K floats, or 2K
// for the SwiGLU prologue), K % 32 == 0; kc (a multiple of 32 F::WEIGHTS, or K) values of x
// staged at a time in (3 XU + 1) x 16 bytes per unit of dynamic shared memory (3.5 bytes a
// value for q4_0, 4 for q8_0), then a float per unit and, for q4_0's pairs, their scratch
// (kernels._v4_staged_bytes, v4_pair_scratch). Block: 256 threads; grid: any.

// A unit of x as integers (v4_stage_pairs, v4_stage; kernels/dev/variants.cu's qgemv_i8): the
// shift s that puts the unit's largest |x|, mx = m 2^e with m in [0.5, 1) (e from the exponent
// bits; 0 and subnormals: e = -126), into [2^21, 2^22); at most 126, so that 2^s and 2^-s are
// normal floats, exact factors
__device__ __forceinline__ int v4_shift(float mx) {
    const int e = (int)((__float_as_uint(mx) >> 23) & 0xFF) - 126;
    return min(22 - e, 126);
}

// 2^e for e in [-126, 127], from its exponent bits (here and in qgemv_mma.cu)
__device__ __forceinline__ float pow2(int e) {
    return __uint_as_float((unsigned int)(127 + e) << 23);
}

// What a unit's sums are scaled by: 2^-s, or NaN where the unit held a value not finite.
// (2^-s written out, not pow2(-s): with that, two qgemv_v4s instances compiled to other SASS.)
__device__ __forceinline__ float v4_unscale(int s, bool finite) {
    return finite ? __uint_as_float((unsigned int)(127 - s) << 23) : __uint_as_float(0x7FC00000u);
}

// xi = d2 2^16 + d1 2^8 + d0, three signed 8-bit digits in [-128, 127] (|xi| <= 2^22), as the
// low three bytes of one word, byte k being d_k in two's complement. With 128 added to every
// digit they are plain bytes, which carry as any number's do: u = xi + 0x808080 has byte k =
// d_k + 128 (and stays in [0, 2^24)); flipping each byte's top bit takes the 128 off again.
// Two instructions a value, then PRMT to gather the bytes; shifting the digits out of xi one
// by one took ~9 instructions a value more (the one-row RMSNorm launch's SASS, 2026-11-30).
__device__ __forceinline__ unsigned int v4_digit_bytes(int xi) {
    return ((unsigned int)xi + 0x808080u) ^ 0x808080u;
}

__device__ __forceinline__ int dp4a_u8s8(unsigned int a, unsigned int b, int c) {
    int d;                                       // c + sum of 4 unsigned bytes x signed bytes
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ int dp4a_s8s8(unsigned int a, unsigned int b, int c) {
    int d;                                       // c + sum of 4 signed bytes x signed bytes
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// A format's load: its WEIGHTS values, XU uint4s of x digits per digit plane, the code offset
// taken off in integers, and dot(q, xp) = sum_e c_e p_e over the load for one digit plane xp.
struct V4Q4_0 {        // one block of 32: word i, low nibbles codes 4i .. 4i + 3, high 16 + 4i ..
    static constexpr int WEIGHTS = 32, LOADS_PER_BLOCK = 1, XU = 2, OFFSET = 8;
    static constexpr bool MIN = false;
    static __device__ __forceinline__ int dot(const uint4& q, const uint4* xp) {
        int s = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned int w = q_word(q, i);
            s = dp4a_u8s8(w & 0x0F0F0F0Fu, q_word(xp[0], i), s);
            s = dp4a_u8s8((w >> 4) & 0x0F0F0F0Fu, q_word(xp[1], i), s);
        }
        return s;
    }
};

struct V4Q8_0 {        // half a block: 16 signed codes, 4 to a word
    static constexpr int WEIGHTS = 16, LOADS_PER_BLOCK = 2, XU = 1, OFFSET = 0;
    static constexpr bool MIN = false;
    static __device__ __forceinline__ int dot(const uint4& q, const uint4* xp) {
        int s = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) s = dp4a_s8s8(q_word(q, i), q_word(xp[0], i), s);
        return s;
    }
};

// gemv_x4 with x (and the SwiGLU gate) read through L2 (__ldcg, not read-only): x is the
// previous kernel's output, and ptxas keeps these loads after grid_dependency_wait
// (qgemv_v4s's comment, below); the norm's weights, never written, read-only. raw: x itself,
// for its sum of squares.
template <int PRO>
__device__ __forceinline__ float4 v4_x4(const float* __restrict__ xr, int k4, int K,
                                         const float* __restrict__ norm_w, float inv_rms,
                                         float4& raw) {
    raw = __ldcg(reinterpret_cast<const float4*>(xr) + k4);
    float4 other = raw;
    if (PRO == GEMV_RMSNORM) other = __ldg(reinterpret_cast<const float4*>(norm_w) + k4);
    if (PRO == GEMV_SWIGLU) other = __ldcg(reinterpret_cast<const float4*>(xr + K) + k4);
    return gemv_prologue4<PRO>(raw, other, inv_rms);
}

// x up rounded to the nearest integer (ties to even), for |x up| < 2^22 as a unit's values are:
// 1.5 2^23 + x up lies in (2^23, 2^24), where a float's unit in the last place is 1, so one FFMA
// rounds x up exactly as __float2int_rn(x * up) does (x up is exact: up is a power of two), and
// the integer is the float's bits less 1.5 2^23's. An F2I (a quarter of the FFMA's rate on
// sm_90) and an FMUL a value become one FFMA; the integer's bias and v4_digit_bytes's add fold
// into one IADD.
__device__ __forceinline__ int v4_round(float x, float up) {
    return __float_as_int(fmaf(x, up, 12582912.0f)) - 0x4B400000;
}

// Four values of a unit, times its 2^s (up), as three signed 8-bit digits each (v4_digit_bytes):
// value b's digit k in byte b of w[k] (byte k of the four values gathered by __byte_perm, PRMT),
// and every digit added into the unit's sums T[k] (dp4a of a word with four ones). A unit
// holding a value that is not finite gets digits that mean nothing: its scale is NaN
// (v4_unscale), which makes every sum that meets it NaN whatever the digits are.
__device__ __forceinline__ void v4_digit_words(float4 v, float up, unsigned int (&w)[3],
                                               int (&T)[3]) {
    const float xv[4] = {v.x, v.y, v.z, v.w};
    unsigned int u[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) u[b] = v4_digit_bytes(v4_round(xv[b], up));
    // bytes 0 and 1 of values 0, 1 and of 2, 3 interleaved (u0.0 u1.0 u0.1 u1.1), then split
    const unsigned int lo01 = __byte_perm(u[0], u[1], 0x5140), lo23 = __byte_perm(u[2], u[3], 0x5140);
    w[0] = __byte_perm(lo01, lo23, 0x5410);
    w[1] = __byte_perm(lo01, lo23, 0x7632);
    w[2] = __byte_perm(__byte_perm(u[0], u[1], 0x0062), __byte_perm(u[2], u[3], 0x0062), 0x5410);
#pragma unroll
    for (int k = 0; k < 3; ++k) T[k] = dp4a_s8s8(w[k], 0x01010101u, T[k]);
}

// The largest |x| of four values, as bits: a float's magnitude bits order as the magnitudes do,
// and inf and NaN order above every finite value, so one maximum also says whether a unit is
// all finite (below 0x7F800000).
__device__ __forceinline__ unsigned int abs_bits_max4(float4 v) {
    const unsigned int m = 0x7FFFFFFFu;
    return max(max(__float_as_uint(v.x) & m, __float_as_uint(v.y) & m),
               max(__float_as_uint(v.z) & m, __float_as_uint(v.w) & m));
}

// Where a warp's float4 g of its chunk sits in v4_stage_pairs's scratch: g with its low bits
// turned by which eighth of the chunk it is in, so that neither the chunk's 32 consecutive
// stores nor the pairs' reads (8 lanes at a time for 16-byte accesses: four units, two halves
// each) meet two lanes in one bank. N4: a unit's float4s (8 or 4).
template <int N4>
__device__ __forceinline__ int v4_swizzle(int g) { return g ^ ((g >> 3) & (N4 / 2 - 1)); }

// Units 0 .. CH - 1 of a slice (values k0 + c WEIGHTS ..) in v4's layout, two lanes a unit.
// A warp takes 16 units at a time. It loads them as the row lies, 32 consecutive float4s a
// load (x through L2, __ldcg; the norm's weights or the SwiGLU gate beside them), all of a
// lane's loads in flight at once (4 for q4_0, 2 for q8_0), applies the prologue, and passes
// the values through its part of `scratch` (shared memory), so that lanes 2c and 2c + 1 then
// hold unit c's first and second half. The unit's maximum, digit sums and, with RMSNorm, sum
// of squares are one shuffle each between the two (T_0 and T_1 in one word: |T_k| <= 32 x 128
// over a unit); each lane writes its half of every digit plane, lane 2c the unit's (T, 2^-s)
// and unit_ss[c], the sum of the unit's x^2 (each half's float4s in order, then the halves
// added). With RMSNorm the digits are those of x * inv_rms * norm_w. The scratch: each warp's
// 16 N4 float4s, then as many floats of x^2 (kernels.v4_pair_scratch's bytes).
//
// Until 2026-11-30 a unit had WEIGHTS / 4 lanes of one float4 each (q4_0: 8), a thread took
// four units' float4s, and each took the unit's reductions over 8 lanes: 23 shuffles a float4,
// 92 a thread, of ~700 instructions before the loop in the 7B normed launch (nvdisasm). The
// pairs without the scratch (a lane loading its own half, every other float4) spent half the
// instructions but were slower (7B q4_0 one-row step 0.96x): each of their loads met 16 lines
// of 128 bytes where the row's order meets 4 (docs/kernels.md, "x's staging in pairs").
template <class F, int PRO>
__device__ __forceinline__ void v4_stage_pairs(const float* __restrict__ X, int K, int k0, int CH,
                                               float4* scratch,
                                               const float* __restrict__ norm_w = nullptr,
                                               float inv_rms = 1.0f, float* unit_ss = nullptr) {
    extern __shared__ uint4 v4_xs[];
    constexpr int N4 = F::WEIGHTS / 4, HALF = N4 / 2, CHUNK = 16 * N4;
    static_assert(N4 == 8 || N4 == 4, "a unit's float4s in two halves of 4 or 2");
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n4 = CH * N4;
    float4* ex = scratch + warp * CHUNK;                                  // (16 N4) float4s
    float* sq = reinterpret_cast<float*>(scratch + blockDim.x / 32 * CHUNK) + warp * CHUNK;
    for (int base = 0; base < 2 * CH; base += blockDim.x) {        // the same for the whole block
        const int g0 = (base / 2 + 16 * warp) * N4;                 // the chunk's first float4
#pragma unroll
        for (int j = 0; j < HALF; ++j) {                            // in the row's order
            const int g = 32 * j + lane;
            float4 raw = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const float4 e = g0 + g < n4 ? v4_x4<PRO>(X, k0 / 4 + g0 + g, K, norm_w, inv_rms, raw) : raw;
            ex[v4_swizzle<N4>(g)] = e;
            if (PRO == GEMV_RMSNORM) sq[g] = sum_squares4(raw);
        }
        __syncwarp();
        const int c = base / 2 + 16 * warp + lane / 2, h = lane % 2;   // unit c, half h
        const int first = (lane / 2) * N4 + h * HALF;                  // the half's first float4
        float4 v[HALF];
#pragma unroll
        for (int j = 0; j < HALF; ++j) v[j] = ex[v4_swizzle<N4>(first + j)];
        float ss = 0.0f;
        if (PRO == GEMV_RMSNORM) {
            float q[HALF];
            if (HALF == 4) *reinterpret_cast<float4*>(q) = *reinterpret_cast<const float4*>(sq + first);
            else *reinterpret_cast<float2*>(q) = *reinterpret_cast<const float2*>(sq + first);
#pragma unroll
            for (int j = 0; j < HALF; ++j) ss += q[j];
        }
        __syncwarp();                                  // the chunk read before the next one
        unsigned int big = 0;
#pragma unroll
        for (int j = 0; j < HALF; ++j) big = max(big, abs_bits_max4(v[j]));
        big = max(big, __shfl_xor_sync(FULL_MASK, big, 1));             // the unit's other half
        const int s = v4_shift(__uint_as_float(big));
        unsigned int w[3][HALF];
        int T[3] = {0, 0, 0};
#pragma unroll
        for (int j = 0; j < HALF; ++j) {
            unsigned int wj[3];
            v4_digit_words(v[j], pow2(s), wj, T);
#pragma unroll
            for (int k = 0; k < 3; ++k) w[k][j] = wj[k];
        }
        int t01 = (int)((unsigned int)T[0] + ((unsigned int)T[1] << 16));
        t01 += __shfl_xor_sync(FULL_MASK, t01, 1);
        T[2] += __shfl_xor_sync(FULL_MASK, T[2], 1);
        if (PRO == GEMV_RMSNORM) ss += __shfl_xor_sync(FULL_MASK, ss, 1);
        if (c >= CH) continue;
#pragma unroll
        for (int k = 0; k < 3; ++k) {          // q4_0: plane 2k + h, all 4 words; q8_0: plane k, words 2h, 2h + 1
            if (HALF == 4)
                v4_xs[(k * F::XU + h) * CH + c] = make_uint4(w[k][0], w[k][1], w[k][2], w[k][3]);
            else
                reinterpret_cast<uint2*>(v4_xs)[(k * CH + c) * 2 + h] = make_uint2(w[k][0], w[k][1]);
        }
        if (h == 0) {
            const int T0 = (int)((unsigned int)t01 << 16) >> 16, T1 = (t01 - T0) >> 16;
            const float scale = v4_unscale(s, big < 0x7F800000u);
            v4_xs[3 * F::XU * CH + c] = make_uint4(T0, T1, T[2], __float_as_uint(scale));
            if (PRO == GEMV_RMSNORM) unit_ss[c] = ss;
        }
    }
}

// Where v4's staged units end in shared memory, in uint4s: the digit planes and (T, 2^-s) of CH
// units, then CH floats (unit_ss, with RMSNorm), rounded up; v4_stage_pairs's scratch follows.
template <class F>
__device__ __forceinline__ int v4_staged_end(int CH) { return (3 * F::XU + 1) * CH + (CH + 3) / 4; }

// Unit c of x (F::WEIGHTS values from float4 k4 of row xr, after the prologue) as digits:
// plane k * XU + u of xs holds word 4u .. 4u + 3 of digit k; plane 3 XU holds (T_0, T_1, T_2,
// 2^-s). Planes are CH uint4s apart, so the lanes of a warp read consecutive uint4s. Returns,
// with RMSNorm, the sum of the unit's x^2 before the prologue (for V4Step's late norm), else 0.
template <class F, int PRO>
__device__ __forceinline__ float v4_stage(const float* __restrict__ xr, int k4, int K,
                                          const float* __restrict__ norm_w, float inv,
                                          uint4* xs, int CH, int c) {
    constexpr int N4 = F::WEIGHTS / 4;
    float4 v[N4];
    float ss = 0.0f;
    unsigned int big = 0;                            // the largest |x|'s bits (abs_bits_max4)
#pragma unroll
    for (int i = 0; i < N4; ++i) {
        v[i] = gemv_x4<PRO>(xr, k4 + i, K, norm_w, inv);
        if (PRO == GEMV_RMSNORM)                     // the same loads: x itself, squared
            ss += sum_squares4(gemv_x4<GEMV_PLAIN>(xr, k4 + i, K, norm_w, inv));
        big = max(big, abs_bits_max4(v[i]));
    }
    const int s = v4_shift(__uint_as_float(big));
    const float up = pow2(s);
    unsigned int words[3][N4];
    int T[3] = {0, 0, 0};
#pragma unroll
    for (int i = 0; i < N4; ++i) {
        unsigned int w[3];
        v4_digit_words(v[i], up, w, T);
#pragma unroll
        for (int k = 0; k < 3; ++k) words[k][i] = w[k];
    }
#pragma unroll
    for (int k = 0; k < 3; ++k)
#pragma unroll
        for (int u = 0; u < F::XU; ++u)
            xs[(k * F::XU + u) * CH + c] = make_uint4(words[k][4 * u], words[k][4 * u + 1],
                                                      words[k][4 * u + 2], words[k][4 * u + 3]);
    const float scale = v4_unscale(s, big < 0x7F800000u);
    xs[3 * F::XU * CH + c] = make_uint4(T[0], T[1], T[2], __float_as_uint(scale));
    return ss;
}

// How v4 stages x: a thread per unit (v4_stage), or two lanes a unit (v4_stage_pairs). A
// Llama row of 4096 values is 128 units of q4_0, so a thread per unit left half of the 256
// threads idle, each of the others with 32 values to turn into digits one after the other; in
// lanes (8 a unit, until 2026-11-30) the 7B q4_0 one-row step was 1.03x as fast, and in pairs
// every thread has 16 values and one shuffle of each sum. q8_0's 256 units of 16 keep every
// thread busy with a thread per unit; its 7B one-row step was 0.98x with lanes (and a first,
// since reverted change to the split's sums beside it; not measured apart), so it keeps it.
template <class F>
__host__ __device__ constexpr bool V4_PAIRS() { return F::WEIGHTS == 32; }

// v4's step (ROWS = 1): x staged per unit as its digits (V4_PAIRS says how), and for each
// 16-byte load the three dp4a sums per weight row, the offset, one float32 value and one FFMA
// by d 2^-s.
//
// RMSNorm after the sums (LATE_NORM; qgemv_walk takes it where the whole row is one chunk):
// the digits are those of x * norm_w, the unit's sum of x^2 goes beside its digits (after the
// planes, a float per unit), and each warp turns the units' sums into inv_rms after the stage's
// barrier and multiplies its outputs by it, y = inv_rms sum_k W x norm_w (qgemv_mma's order).
// The walk then has no sum of squares of its own before the stage: one round trip to x and the
// stage's barrier, where it had two round trips and three barriers (the bound that made it
// worth writing: every normed product without its RMSNorm, 0.158 ms of a 1.616 ms 7B q4_0 step,
// kernels/dev/ab_bounds.py, H200, 2026-11-30).
template <class F, int PRO, int NR, int U>
struct V4Step {
    static constexpr int META = 3 * F::XU;       // the digit planes, then (T, 2^-s)
    static constexpr bool LATE_NORM = true;

    static __device__ __forceinline__ void stage(const float* __restrict__ X, int, int, int,
                                                 int K, int k0, int, int CH,
                                                 const float (&inv_rms)[1],
                                                 const float* __restrict__ norm_w) {
        extern __shared__ uint4 v4_xs[];
        float* unit_ss = reinterpret_cast<float*>(v4_xs + (META + 1) * CH);
        if (V4_PAIRS<F>()) {
            float4* scratch = reinterpret_cast<float4*>(v4_xs + v4_staged_end<F>(CH));
            v4_stage_pairs<F, PRO>(X, K, k0, CH, scratch, norm_w, inv_rms[0], unit_ss);
            return;
        }
        for (int c = threadIdx.x; c < CH; c += blockDim.x) {
            const float ss = v4_stage<F, PRO>(X, (k0 + c * F::WEIGHTS) / 4, K, norm_w,
                                              inv_rms[0], v4_xs, CH, c);
            if (PRO == GEMV_RMSNORM) unit_ss[c] = ss;
        }
    }

    // 1 / sqrt(mean(x^2) + eps) from the units' sums, in every lane of the warp (after the
    // stage's barrier; the same order in every warp)
    static __device__ __forceinline__ float late_inv_rms(int CH, int K, float eps) {
        extern __shared__ uint4 v4_xs[];
        const float* unit_ss = reinterpret_cast<const float*>(v4_xs + (META + 1) * CH);
        float ss = 0.0f;
        for (int c = threadIdx.x % 32; c < CH; c += 32) ss += unit_ss[c];
        return 1.0f / sqrtf(warp_sum(ss) / K + eps);
    }

    static __device__ __forceinline__ void multiply(const QBatch<F, NR, U>& cur, int u, int c,
                                                    int CH, float (&acc)[NR]) {
        extern __shared__ uint4 v4_xs[];
        uint4 xp[META];
#pragma unroll
        for (int p = 0; p < META; ++p) xp[p] = v4_xs[p * CH + c];   // for the NR rows
        const uint4 meta = v4_xs[META * CH + c];
        const float xscale = __uint_as_float(meta.w);
#pragma unroll
        for (int j = 0; j < NR; ++j) {
            int S[3];
#pragma unroll
            for (int k = 0; k < 3; ++k)
                S[k] = F::dot(cur.q[u][j], xp + k * F::XU) - F::OFFSET * (int)q_word(meta, k);
            const float v = fmaf((float)S[2], 65536.0f, fmaf((float)S[1], 256.0f, (float)S[0]));
            acc[j] = fmaf(f16_lo(cur.dm[u][j]) * xscale, v, acc[j]);
        }
    }
};

// B: blocks an SM, the launch bounds' (kernels.QGEMV_V4 gives it, and sizes the grid by it);
// the registers a thread may take follow (B 2: 128; kernels/dev/ab_v4_blocks.py compares B).
template <class F, int PRO, int NR, int U, int B>
__global__ void __launch_bounds__(256, B)
qgemv_v4(const float* __restrict__ X, const uint4* __restrict__ qs,
         const unsigned short* __restrict__ d, float* __restrict__ Y, int N, int K,
         int accumulate, const float* __restrict__ norm_w, float eps, int kc) {
    qgemv_walk<F, 1, PRO, NR, U, V4Step<F, PRO, NR, U>>(X, qs, d, d, Y, 1, N, K, accumulate,
                                                         norm_w, eps, kc);
}


// ---------------------------------------------------------------------------------------------
// qgemv_v4s<F, PRO, NR, U>: qgemv_v4 split over k, for the short matrices (issue 10).
//
// v4's grid is what fits at once (B blocks per SM: 2) or one block per 8 NR rows, whichever is
// fewer: on the 7B w2 (4096 x 11008) that is 256 blocks of 16 rows, under a wave, one tile per
// warp. Every block stages all of x (11008 values: a maximum, a scaling and three digits each),
// and each staged value meets only 16 weight rows; the staging comes before any product, and a
// warp has nothing of its own to overlap it with but its first batch of loads. v4s keeps v4's
// arithmetic (V4Step::multiply, unchanged) and divides the work differently:
//
//   - A split over k. The grid is (tiles, ks): block (t, s) takes rows t R .. t R + R - 1 and
//     slice s of the row's 16-byte loads (slice_loads of them, a multiple of 32, so that a
//     warp's 32 lanes sweep it whole, or the whole row when that is shorter). It stages only
//     its slice of x, so with ks slices a block's rows R can be ks times more at the same number
//     of blocks (kernels.qgemv_v4s_plan: the fewest multiple of 8 NR that keeps tiles x ks
//     within 2 blocks per SM), and each staged value meets R rows. Its warps walk the block's
//     tiles of NR rows, 8 NR apart, QBatch's loads in flight across a tile's end (qgemv_tile, as
//     qgemv_walk's).
//   - With any_order (and accumulate: FusedDecoder's w2 unless deterministic), each slice adds
//     its sums into y by atomics, in the order the slices end (qgemv_mma's any_order). Else
//     the partial sums, one per slice and row, go to a workspace (ks, N); the block that
//     finishes a tile last (a counter per tile: atomicAdd after a __threadfence, reset by that
//     block, so that a CUDA graph can replay the launch) adds the ks slices in slice order and
//     writes y (adding to it with accumulate): the same float sum whichever block is last,
//     deterministic, as qgemv_mma's split and gemv_v3's. With ks = 1 it writes y directly.
//   - x staged in pairs of lanes (v4_stage_pairs, above). One thread a whole unit (32 values of
//     q4_0, 16 of q8_0), v4's first staging, would leave 192 of 256 threads idle on a slice of
//     64 loads. Here a unit is two consecutive lanes: the unit's maximum and its digit sums
//     T_k are one shuffle each, and each lane writes its own words of each digit plane, in
//     v4's layout (so V4Step::multiply reads it unchanged). v4 stages its whole row of q4_0 the
//     same way. (Until 2026-11-30 a unit was WEIGHTS / 4 lanes of one float4 each.)
//   - Programmatic launch: only the weights' first batch is loaded before grid_dependency_wait.
//     x (and the SwiGLU gate) is read through L2 (__ldcg), not read-only, so that ptxas keeps
//     those loads after the wait; the workspace, the counters and y are touched only after it
//     too, so the next launch's early loads (weights, never written) race nothing, and the
//     counter a block resets is not counted again before this grid has ended.
//
// Measured on an H200 (kernels/dev/bench_variants.py --prologues, 2026-11-30), us a launch with
// the decode step's prologue and accumulate, (fraction of the copy bandwidth):
//     7B w2 (4096 x 11008, SwiGLU)  q4_0: v4 16.93 (0.36), v4s 12.26 (0.50) at NR 4, U 1, ks 8
//                                   q8_0: v4 18.28 (0.63), v4s 16.04 (0.71) at NR 8, U 1, ks 8
//     7B wo (4096 x 4096, plain)    q4_0: v4 6.69 (0.34), v4s 6.53 (0.35) at NR 4, U 1, ks 1
//                                   q8_0: v4 7.39 (0.58), v4s 7.74 (0.55) at NR 2, U 4, ks 1
// so kernels.qgemv launches it on w2-like shapes only (kernels.qgemv_v4s_wins).
//
// Prologues: GEMV_PLAIN and GEMV_SWIGLU. GEMV_RMSNORM needs the whole row's sum of squares,
// which a slice does not see: the rule leaves it to v4.
//
// Arguments: X one row (K floats, 2K with SwiGLU), qs and d the codes and float16 scales,
// Y (N) float32; rows_per_block a multiple of 8 NR; slice_loads 16-byte loads of a row per
// slice (gridDim.y = cdiv(K / WEIGHTS, slice_loads), no empty slice); partial: ks N floats;
// counters: gridDim.x ints, zero before the launch and after it. Block 256 threads; dynamic
// shared memory min(slice_loads, K / WEIGHTS) (3 XU + 1) 16 bytes.

// Where a block's slice of x comes from, a policy of v4s_walk: Source::stage(K, first, CH)
// writes units first .. first + CH - 1 of the row into v4_xs. Here, from x itself (the
// development candidates of kernels/dev/variants.cu copy digits staged beforehand instead).
template <class F, int PRO>
struct V4SFromX {
    const float* X;
    __device__ __forceinline__ void stage(int K, int first, int CH) const {
        extern __shared__ uint4 v4_xs[];
        float4* scratch = reinterpret_cast<float4*>(v4_xs + v4_staged_end<F>(CH));
        v4_stage_pairs<F, PRO>(X, K, first * F::WEIGHTS, CH, scratch);
    }
};

template <class F, int PRO, int NR, int U, class Source>
__device__ __forceinline__ void v4s_walk(const Source& src, const uint4* __restrict__ qs,
                                         const unsigned short* __restrict__ d,
                                         float* __restrict__ Y, int N, int K, int accumulate,
                                         int rows_per_block, int slice_loads,
                                         float* __restrict__ partial, int* __restrict__ counters,
                                         int any_order) {
    static_assert(PRO != GEMV_RMSNORM, "a slice of k cannot see its row's RMS");
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int tile = blockIdx.x, ks = gridDim.y, slice = blockIdx.y;
    const int loads_per_row = K / F::WEIGHTS, nb = K / 32;
    const int first = slice * slice_loads;                      // the slice's first load of a row
    const int CH = min(slice_loads, loads_per_row - first);     // its loads per row
    const int row0 = tile * rows_per_block, row_end = min(N, row0 + rows_per_block);
    const int tile_step = warps * NR;                           // a warp's tiles, 8 NR rows apart
    const int n_first = row0 + warp * NR;

    // The first loads do not depend on x: issued before the wait, as in v4.
    QBatch<F, NR, U> next;
    if (n_first < row_end) next.fetch(qs, d, d, n_first, N, lane, CH, first, loads_per_row, nb);
    grid_launch_dependents();
    grid_dependency_wait();            // (reduce.cu) the weights are ours; x is the last kernel's

    src.stage(K, first, CH);
    __syncthreads();

    for (int n0 = n_first; n0 < row_end; n0 += tile_step) {
        float acc[NR];
#pragma unroll
        for (int j = 0; j < NR; ++j) acc[j] = 0.0f;
        qgemv_tile<F, NR, U, NR, V4Step<F, PRO, NR, U>>(next, qs, d, d, n0, tile_step, row_end,
                                                        N, CH, first, loads_per_row, nb, acc);
        // the NR sums over the warp; lane j << SHIFT holds row n0 + j's (qgemv_warp_sums)
        constexpr int SHIFT = NR == 8 ? 2 : NR == 4 ? 3 : NR == 2 ? 4 : 5;
        const float total = qgemv_warp_sums<NR>(acc);
        const int n = n0 + (lane >> SHIFT);
        if (lane % (1 << SHIFT) == 0 && n < N) {
            if (ks == 1) Y[n] = accumulate ? Y[n] + total : total;
            else if (any_order) atomicAdd(Y + n, total);         // (accumulate: the caller's)
            else partial[(size_t)slice * N + n] = total;
        }
    }
    // The last block of this tile adds the ks slices, in slice order (reduce.cu), four
    // slices' loads in flight at once and y's value (with accumulate) beside them: one wait
    // for L2 after the count, where y's read after the sums took a second.
    if (ks == 1 || any_order || !split_last_block(counters + tile, ks)) return;
    for (int n = row0 + threadIdx.x; n < row_end; n += blockDim.x) {
        const float y = accumulate ? Y[n] : 0.0f;
        float v = 0.0f;
#pragma unroll 4
        for (int s = 0; s < ks; ++s) v += __ldcg(partial + (size_t)s * N + n);
        Y[n] = accumulate ? y + v : v;
    }
}

template <class F, int PRO, int NR, int U>
__global__ void __launch_bounds__(256, 2)
qgemv_v4s(const float* __restrict__ X, const uint4* __restrict__ qs,
          const unsigned short* __restrict__ d, float* __restrict__ Y, int N, int K,
          int accumulate, int rows_per_block, int slice_loads, float* __restrict__ partial,
          int* __restrict__ counters, int any_order) {
    v4s_walk<F, PRO, NR, U>(V4SFromX<F, PRO>{X}, qs, d, Y, N, K, accumulate, rows_per_block,
                            slice_loads, partial, counters, any_order);
}

// GEMV on the GGUF k-quants Q2_K .. Q6_K, read as stored: qgemv's job for super-blocks of 256.
//
//     y[m, n] = sum_k x[m, k] W[n, k]        x: (M, K) float32,  W: (N, K) packed,  y: (M, N) float32
//
// The lesson after qgemv (qgemv.cu). There a block of 32 weights has one float16 scale, read
// beside its codes. A k-quant super-block of 256 weights has two levels of scales
// (minillama/formats/kquants.py draws the bytes): a float16 d (and dmin) for the super-block,
// and a 4-, 6- or 8-bit integer scale (and min) per sub-block of 16 or 32 weights. So the scale
// costs fewer bytes (Q4_K: 0.5 bits a weight, as Q4_0's one float16 per 32, but with an offset
// per sub-block as Q4_1, which spends 1.0), and more instructions: a lane unpacks its sub-block's
// integer scales from their bytes and multiplies them by d once per 16 weights, before the
// weights meet x. The weight is then, in float32, exactly what the NumPy reference computes:
//
//     w = fmaf(code, d * sc, -(dmin * m))      Q2_K, Q4_K, Q5_K   (d * sc and dmin * m exact)
//     w = code * (d * sc)                      Q3_K, Q6_K         (signed codes; exact)
//
// Pieces. The low bits of a super-block's codes are 128 bytes (qs of Q4_K and Q5_K, ql of Q6_K)
// or 64 (qs of Q2_K and Q3_K): 8 or 4 aligned loads of 16 bytes, PIECES. Piece p holds RUNS
// runs of 16 consecutive weights, one per nibble (4-bit codes: 2 runs, 32 weights) or per pair
// of bits (2-bit codes: 4 runs, 64 weights) of its bytes; `first(p, run)` is where a run starts
// in the super-block:
//
//     Q4_K, Q5_K   first = 64 (p / 2) + 32 run + 16 (p % 2)        sub-block of 32: first / 32
//     Q6_K         first = 128 (p / 4) + 64 run + 32 (p / 2 % 2) + 16 (p % 2)
//     Q2_K, Q3_K   first = 128 (p / 2) + 32 run + 16 (p % 2)        sub-blocks of 16: first / 16
//
// The high bits (Q5_K's fifth, Q6_K's two, Q3_K's third) come from a second 16-byte load, qh or
// hmask: the 16 bytes that sit over the same 16 positions. Codes become floats as in qgemv: the
// code bytes go under the float16 1024.0 with one byte permute, and one half2 subtraction
// leaves the code (Q6_K: code - 32, Q3_K: code - 4), exact.
//
// Layout of the work, as qgemv's: a block of 256 threads stages ROWS rows of x (after the
// RMSNorm or SwiGLU prologue, GEMV_PLAIN / GEMV_RMSNORM / GEMV_SWIGLU of matmul.cu) in shared
// memory, piece-major so that 32 lanes reading the same float4 of 32 consecutive pieces read
// 32 consecutive float4s (F4 = 4 RUNS float4s a piece):
//
//     xs[(r * F4 + f) * CH + g] = x[r, 256 (g / PIECES) + first(g % PIECES, f / 4) + 4 (f % 4) ..]
//         r: row of x,  g: piece along the chunk (CH of them),  f: float4 of the piece
//
// then each warp takes NR weight rows at a time; lane l takes pieces l, l + 32, ... of each,
// and the warp sums its NR * ROWS dot products with shuffles. K too long for shared memory is
// walked in chunks of whole super-blocks, each chunk's sums added into y.
//
// kquant_to_f16 dequantizes a whole matrix to float16 with the same arithmetic (then rounded
// to nearest), for gemm_v5 (matmul.cu) to multiply a prompt on the tensor cores.
// Compiled after reduce.cu (block_sum, warp_sum), matmul.cu (gemv_x4, the GEMV_* prologues,
// f16_lo, f16_hi, f16_to_f32, f16x2_sub, byte_perm, HALF2_1024, round_to_16bit) and qgemv.cu
// (q_word, q_load16).


// ---------------------------------------------------------------------------------------------
// Helpers

// q_word, q_load16 and q_scale (a word of a 16-byte load; a load that bypasses L1; a raw
// float16 scale) are qgemv.cu's.

// Sub-block j's 6-bit scale and min of Q4_K / Q5_K, from the super-block's 12 bytes `s`:
// bytes 0..3 hold sc[0..3] (and bits 4..5 of sc[4..7] on top), bytes 4..7 m[0..3] (and bits
// 4..5 of m[4..7]), bytes 8..11 the low 4 bits of sc[4..7] and, above them, of m[4..7].
__device__ __forceinline__ void k4_scale_min(const unsigned char* __restrict__ s, int j,
                                             float& sc, float& m) {
    if (j < 4) {
        sc = (float)(__ldg(s + j) & 63);
        m = (float)(__ldg(s + j + 4) & 63);
    } else {
        const int low = __ldg(s + j + 4);
        sc = (float)((low & 15) | ((__ldg(s + j - 4) >> 6) << 4));
        m = (float)((low >> 4) | ((__ldg(s + j) >> 6) << 4));
    }
}


// ---------------------------------------------------------------------------------------------
// The formats. `codes(q, h, p, run, c)`: the 16 codes of run `run` of piece p as bytes, 4 words
// (byte i of word j: weight first(p, run) + 4 j + i). `scale(...)`: that run's d * sc and
// dmin * m. PIECES, RUNS: 16-byte loads of low bits per super-block, runs of 16 per load;
// H_PIECES: 16-byte loads of high bits per super-block (0: none); S_BYTES: bytes of integer
// scales per super-block; BIAS: half2 subtracted from 1024 + code.

struct FmtQ4_K {
    static constexpr int PIECES = 8, RUNS = 2, H_PIECES = 0, S_BYTES = 12;
    static constexpr bool MIN = true;
    static constexpr unsigned int BIAS = HALF2_1024;                  // codes 0..15
    static __device__ __forceinline__ int first(int p, int run) {
        return 64 * (p >> 1) + 32 * run + 16 * (p & 1);
    }
    static __device__ __forceinline__ int h_piece(int p) { return 0; }
    static __device__ __forceinline__ void codes(const uint4& q, const uint4& h, int p, int run,
                                                 unsigned int* c) {
#pragma unroll
        for (int j = 0; j < 4; ++j) c[j] = (q_word(q, j) >> (4 * run)) & 0x0F0F0F0Fu;
    }
    static __device__ __forceinline__ void scale(const unsigned char* __restrict__ s, float d,
                                                 float dmin, int p, int run, float& ds, float& dm) {
        float sc, m;
        k4_scale_min(s, first(p, run) / 32, sc, m);
        ds = d * sc;
        dm = dmin * m;
    }
};

// Q5_K: Q4_K's nibbles and scales, and a fifth bit: bit `sub-block` of qh[l] belongs to weight
// l of each sub-block of 32, so the 16 bytes over positions 16 (p % 2) .. + 15 serve piece p.
struct FmtQ5_K : FmtQ4_K {
    static constexpr int H_PIECES = 2;
    static __device__ __forceinline__ int h_piece(int p) { return p & 1; }
    static __device__ __forceinline__ void codes(const uint4& q, const uint4& h, int p, int run,
                                                 unsigned int* c) {
        const int sub = first(p, run) / 32;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            c[j] = ((q_word(q, j) >> (4 * run)) & 0x0F0F0F0Fu)
                 | (((q_word(h, j) >> sub) & 0x01010101u) << 4);
    }
};

// Q6_K: per half of 128 weights, 64 bytes of ql and 32 of qh; weight 32 i + l of the half has
// its low 4 bits in ql[32 (i % 2) + l] (the high nibble for i >= 2) and its high 2 bits at bit
// 2 i of qh[l]. With p = 4 half + 2 a + e: run 0 is i = a, run 1 is i = a + 2; l = 16 e + 0..15.
// Signed 8-bit scales, one per 16 weights; code - 32.
struct FmtQ6_K {
    static constexpr int PIECES = 8, RUNS = 2, H_PIECES = 4, S_BYTES = 16;
    static constexpr bool MIN = false;
    static constexpr unsigned int BIAS = 0x64206420u;                 // 1024 + 32: code - 32
    static __device__ __forceinline__ int first(int p, int run) {
        return 128 * (p >> 2) + 64 * run + 32 * ((p >> 1) & 1) + 16 * (p & 1);
    }
    static __device__ __forceinline__ int h_piece(int p) { return 2 * (p >> 2) + (p & 1); }
    static __device__ __forceinline__ void codes(const uint4& q, const uint4& h, int p, int run,
                                                 unsigned int* c) {
        const int i = ((p >> 1) & 1) + 2 * run;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            c[j] = ((q_word(q, j) >> (4 * run)) & 0x0F0F0F0Fu)
                 | (((q_word(h, j) >> (2 * i)) & 0x03030303u) << 4);
    }
    static __device__ __forceinline__ void scale(const unsigned char* __restrict__ s, float d,
                                                 float dmin, int p, int run, float& ds, float& dm) {
        ds = d * (float)(signed char)__ldg(s + first(p, run) / 16);
        dm = 0.0f;
    }
};

// Q2_K: per half of 128 weights, 32 bytes of qs; weight 32 j + l of the half is bits 2 j of
// qs[l], so piece p = 2 half + e holds l = 16 e + 0..15 of the 4 runs j. Each sub-block of 16
// has a byte: a 4-bit scale (low) and a 4-bit min (high).
struct FmtQ2_K {
    static constexpr int PIECES = 4, RUNS = 4, H_PIECES = 0, S_BYTES = 16;
    static constexpr bool MIN = true;
    static constexpr unsigned int BIAS = HALF2_1024;                  // codes 0..3
    static __device__ __forceinline__ int first(int p, int run) {
        return 128 * (p >> 1) + 32 * run + 16 * (p & 1);
    }
    static __device__ __forceinline__ int h_piece(int p) { return 0; }
    static __device__ __forceinline__ void codes(const uint4& q, const uint4& h, int p, int run,
                                                 unsigned int* c) {
#pragma unroll
        for (int j = 0; j < 4; ++j) c[j] = (q_word(q, j) >> (2 * run)) & 0x03030303u;
    }
    static __device__ __forceinline__ void scale(const unsigned char* __restrict__ s, float d,
                                                 float dmin, int p, int run, float& ds, float& dm) {
        const int b = __ldg(s + first(p, run) / 16);
        ds = d * (float)(b & 15);
        dm = dmin * (float)(b >> 4);
    }
};

// Q3_K: Q2_K's low 2 bits, and a third from hmask: bit (weight / 32) of hmask[l] for weight
// l of each 32, 1 meaning "no offset": code = low | high << 2, minus 4. Sixteen 6-bit scales
// minus 32 in 12 bytes: scale i has its low 4 bits in byte i % 8 (nibble i / 8) and its high 2
// bits in byte 8 + i % 4 (bits 2 (i / 4)).
struct FmtQ3_K {
    static constexpr int PIECES = 4, RUNS = 4, H_PIECES = 2, S_BYTES = 12;
    static constexpr bool MIN = false;
    static constexpr unsigned int BIAS = 0x64046404u;                 // 1024 + 4: code - 4
    static __device__ __forceinline__ int first(int p, int run) { return FmtQ2_K::first(p, run); }
    static __device__ __forceinline__ int h_piece(int p) { return p & 1; }
    static __device__ __forceinline__ void codes(const uint4& q, const uint4& h, int p, int run,
                                                 unsigned int* c) {
        const int bit = first(p, run) / 32;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            c[j] = ((q_word(q, j) >> (2 * run)) & 0x03030303u)
                 | (((q_word(h, j) >> bit) & 0x01010101u) << 2);
    }
    static __device__ __forceinline__ void scale(const unsigned char* __restrict__ s, float d,
                                                 float dmin, int p, int run, float& ds, float& dm) {
        const int i = first(p, run) / 16;
        const int low = (__ldg(s + (i & 7)) >> (4 * (i >> 3))) & 15;
        const int high = (__ldg(s + 8 + (i & 3)) >> (2 * (i >> 2))) & 3;
        ds = d * (float)((low | (high << 4)) - 32);
        dm = 0.0f;
    }
};

// The 4 weights in the bytes of code word c, as the reference computes them.
template <class F>
__device__ __forceinline__ void qk_weights(unsigned int c, float ds, float dm, float* w) {
    const unsigned int a = f16x2_sub(byte_perm(c, 0x64646464u, 0x4140), F::BIAS);   // bytes 0, 1
    const unsigned int b = f16x2_sub(byte_perm(c, 0x64646464u, 0x4342), F::BIAS);   // bytes 2, 3
    const float code[4] = {f16_lo(a), f16_hi(a), f16_lo(b), f16_hi(b)};
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = F::MIN ? fmaf(code[e], ds, -dm) : code[e] * ds;
}

// One piece of one weight row, loaded: its codes, high bits and the super-block's scales.
template <class F>
struct QkPiece {
    uint4 q, h;
    float d, dmin;
    const unsigned char* s;

    __device__ __forceinline__ void load(const uint4* __restrict__ qs, const uint4* __restrict__ qh,
                                         const unsigned char* __restrict__ sc,
                                         const unsigned short* __restrict__ dp,
                                         const unsigned short* __restrict__ dminp,
                                         size_t blk, int p) {
        q = q_load16(qs + blk * F::PIECES + p);
        h = F::H_PIECES ? q_load16(qh + blk * F::H_PIECES + F::h_piece(p)) : q;
        d = f16_to_f32(q_scale(dp + blk));
        dmin = F::MIN ? f16_to_f32(q_scale(dminp + blk)) : 0.0f;
        s = sc + blk * F::S_BYTES;
    }
};


// ---------------------------------------------------------------------------------------------
// The GEMV. Arguments: the planes of W (qs: qs or ql; qh: qh, or any pointer for Q4_K; sc: the
// integer scales; d, dmin: float16 bits, dmin any pointer for Q6_K), `kc`: floats of each row
// of x that fit the shared memory at once (K, or a multiple of 256). Dynamic shared memory:
// ROWS * kc floats. Grid: any number of blocks; block: 256 threads.

template <class F, int ROWS, int PRO>
__global__ void __launch_bounds__(256)
qgemv_k(const float* __restrict__ X, const uint4* __restrict__ qs, const uint4* __restrict__ qh,
        const unsigned char* __restrict__ sc, const unsigned short* __restrict__ d,
        const unsigned short* __restrict__ dmin, float* __restrict__ Y, int M, int N, int K,
        int accumulate, const float* __restrict__ norm_w, float eps, int kc) {
    constexpr int NR = ROWS >= 4 ? 4 : 2;         // weight rows per warp: each x float4 used NR times
    constexpr int F4 = 4 * F::RUNS;               // float4s of x per piece
    extern __shared__ float4 qgemv_k_xs[];        // (ROWS, F4, CH) float4s, CH = kc / (4 F4)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K;   // row length of X
    const int nb = K / 256;                           // super-blocks per row of W
    const int tile_step = gridDim.x * warps * NR;
    const int n_first = (blockIdx.x * warps + warp) * NR;
    grid_launch_dependents();
    grid_dependency_wait();                           // (reduce.cu) x is the last kernel's

    for (int m0 = 0; m0 < M; m0 += ROWS) {            // ROWS rows of x at a time
        float inv_rms[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) inv_rms[r] = 1.0f;
        if (PRO == GEMV_RMSNORM) qgemv_inv_rms<ROWS>(X, m0, M, ldx, K, eps, inv_rms);  // qgemv.cu

        for (int k0 = 0; k0 < K; k0 += kc) {          // chunks of whole super-blocks
            const int CH = min(kc, K - k0) / (4 * F4);     // pieces in the chunk
            __syncthreads();                          // the last chunk's readers are done
            for (int i = threadIdx.x; i < ROWS * F4 * CH; i += blockDim.x) {
                const int r = i / (F4 * CH), f = i / CH % F4, g = i % CH;
                const int k = k0 + 256 * (g / F::PIECES) + F::first(g % F::PIECES, f / 4)
                            + 4 * (f % 4);
                const float inv = row_inv_rms(inv_rms, r);     // (qgemv.cu)
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (m0 + r < M) v = gemv_x4<PRO>(X + (size_t)(m0 + r) * ldx, k / 4, K, norm_w, inv);
                qgemv_k_xs[i] = v;                    // i = (r * F4 + f) * CH + g
            }
            __syncthreads();

            for (int n0 = n_first; n0 < N; n0 += tile_step) {
                float acc[NR * ROWS];                 // acc[j * ROWS + r]: y[m0 + r, n0 + j]
#pragma unroll
                for (int i = 0; i < NR * ROWS; ++i) acc[i] = 0.0f;
                for (int g = lane; g < CH; g += 32) {
                    const int b = k0 / 256 + g / F::PIECES, p = g % F::PIECES;   // super-block, piece
                    QkPiece<F> w[NR];
#pragma unroll
                    for (int j = 0; j < NR; ++j)      // rows past N: read, never written
                        w[j].load(qs, qh, sc, d, dmin, (size_t)min(n0 + j, N - 1) * nb + b, p);
#pragma unroll
                    for (int run = 0; run < F::RUNS; ++run) {
                        unsigned int c[NR][4];
                        float ds[NR], dm[NR];
#pragma unroll
                        for (int j = 0; j < NR; ++j) {
                            F::codes(w[j].q, w[j].h, p, run, c[j]);
                            F::scale(w[j].s, w[j].d, w[j].dmin, p, run, ds[j], dm[j]);
                        }
#pragma unroll
                        for (int f = 0; f < 4; ++f) {
                            float4 xv[ROWS];
#pragma unroll
                            for (int r = 0; r < ROWS; ++r)
                                xv[r] = qgemv_k_xs[(r * F4 + 4 * run + f) * CH + g];
#pragma unroll
                            for (int j = 0; j < NR; ++j) {
                                float wv[4];
                                qk_weights<F>(c[j][f], ds[j], dm[j], wv);
#pragma unroll
                                for (int r = 0; r < ROWS; ++r) {
                                    float& a = acc[j * ROWS + r];
                                    a = fmaf(wv[0], xv[r].x, a);
                                    a = fmaf(wv[1], xv[r].y, a);
                                    a = fmaf(wv[2], xv[r].z, a);
                                    a = fmaf(wv[3], xv[r].w, a);
                                }
                            }
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < NR * ROWS; ++i) {  // lane i % 32 writes y[m0 + r, n0 + j]
                    const float total = warp_sum(acc[i]);
                    const int j = i / ROWS, r = i % ROWS;
                    if (lane == i % 32 && n0 + j < N && m0 + r < M) {
                        float* y = Y + (size_t)(m0 + r) * N + n0 + j;
                        *y = (k0 > 0 || accumulate) ? *y + total : total;
                    }
                }
            }
        }
    }
}

// W (N, K) dequantized to float16 bits, out (N, K): one thread a piece (32 or 64 weights), computed
// as qgemv_k computes them, then rounded to nearest (beyond 65504: inf, as NumPy's cast).
template <class F>
__global__ void kquant_to_f16(const uint4* __restrict__ qs, const uint4* __restrict__ qh,
                              const unsigned char* __restrict__ sc,
                              const unsigned short* __restrict__ d,
                              const unsigned short* __restrict__ dmin,
                              unsigned short* __restrict__ out, int N, int K) {
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;   // piece of W
    const int pieces = K / 256 * F::PIECES;                                 // a row's
    if (g >= (long long)N * pieces) return;
    const int n = (int)(g / pieces), b = (int)(g % pieces) / F::PIECES, p = (int)(g % F::PIECES);
    QkPiece<F> w;
    w.load(qs, qh, sc, d, dmin, (size_t)n * (K / 256) + b, p);
#pragma unroll
    for (int run = 0; run < F::RUNS; ++run) {
        unsigned int c[4];
        float ds, dm;
        F::codes(w.q, w.h, p, run, c);
        F::scale(w.s, w.d, w.dmin, p, run, ds, dm);
        unsigned int* o = reinterpret_cast<unsigned int*>(out + (size_t)n * K + 256 * b
                                                          + F::first(p, run));
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            float wv[4];
            qk_weights<F>(c[f], ds, dm, wv);
            o[2 * f] = round_to_16bit<false>(wv[0]) | ((unsigned int)round_to_16bit<false>(wv[1]) << 16);
            o[2 * f + 1] = round_to_16bit<false>(wv[2]) | ((unsigned int)round_to_16bit<false>(wv[3]) << 16);
        }
    }
}

// Candidate next version of qgemv for batches (issue 10), compiled only by
// kernels/dev/bench_variants.py after the package's kernels/*.cu (it uses their helpers: q_word,
// qgemv_inv_rms, gemv_x4, byte_perm, f16_lo, the GEMV_* prologues, and qgemv_v2's F32_MAGIC and
// magic_code from qgemv.cu). Nothing here is launched by minillama: measured on an H200
// (docs/kernels.md, "qgemv v2 and the batches"), it loses to qgemv v1 at every batch.
//
//   qgemv_tc<F, NB>                 batches of 1..8 NB rows on the tensor cores: mma.sync
//       m16n8k8 in TF32 with the weights' codes as the A operand (exact in TF32) and x split
//       into a TF32 "hi" and "lo" part (two mma's), so the products keep ~22 bits of x and the
//       sums are float32: the 1e-5 bound of the float32 GEMV still holds.
//
// (qgemv_v2, the other candidate of the same GPU run, won at batch 1 and for float32 batches:
// it moved to kernels/qgemv.cu.)


// ---------------------------------------------------------------------------------------------
// 2. Batches on the tensor cores, keeping the float32 GEMV's accuracy: qgemv_tc<F, NB, PRO>.
//
// With 8 rows of x, v1 and v2 spend 8 float32 FMAs per weight; a q4_0 weight arrives every
// 4.4 instructions, so batch 8 is bound by arithmetic. mma.sync.m16n8k8 in TF32 does 16 x 8 x 8
// multiply-adds per warp instruction. TF32 keeps 11 significant bits, which is enough for the
// weights' codes (q4: c - 8, q8: c, exact), float16 and bfloat16 values (exact), but not for x:
// x is split as x = hi + lo, hi = x with its low 13 mantissa bits cleared (exact in TF32) and
// lo = x - hi (exact in float32, |lo| < 2^-10 |x|, of which TF32 keeps 11 bits), and each tile is
// multiplied twice, by hi and by lo. The products are exact and summed in float32; what is lost
// is lo's rounding, ~2^-21 of x: the same 1e-5 bound as the float32 GEMV. The scale is applied
// per block as in v2: an mma chain over one block's k into a zeroed fragment, then one FFMA by
// d per output into the accumulator. So the weights are the A operand (16 rows of W per warp
// tile), the batch is the N = 8 side (NB groups of 8 rows), and nothing is reduced over lanes.
//
// The catch is the fragment layout: lane (g, t) = (lane / 4, lane % 4) supplies A[g][t],
// A[g + 8][t], A[g][t + 4], A[g + 8][t + 4], and the 4 lanes of a quad share each mma's k, so
// in one mma the four must hold weights of the same block (one scale). A lane's natural load
// (16 bytes of one row) is a whole block for q4. So each lane loads 16 bytes of chunks
// 4 cg + t of rows n0 + g and n0 + 8 + g, the warp stores them to shared memory (swizzled as
// gemm_v5's tiles), and two ldmatrix.x4 hand lane (g, t) word t of each of the 4 chunks: the
// 4 x 4 transpose of the quad's words, one instruction per 4 words. Word t of a chunk holds
// weights at chunk positions E(t) (f16: 2t, 2t + 1; q8: 4t .. 4t + 3; q4: 4t .. 4t + 3 and
// 16 + 4t .. 16 + 4t + 3); mma step s takes the pair (2s, 2s + 1) of them as k-slots t and
// t + 4, and x at the same positions as B. The order of k inside an mma does not matter, as
// long as A and B agree.
//
// Split over k: a tile of 16 rows is small (N / 16 tiles), so KS warps of a block share one tile
// (chunk groups interleaved), and their fragments are added in a fixed order in shared memory.
// x is staged once per block as hi and lo planes, rows padded so the lanes' 8- or 16-byte
// reads hit distinct banks (row stride = 8 or 16 mod 32 words).

struct TcF16 {
    static constexpr int WEIGHTS = 8, E = 2, XPAD = 8;
    static constexpr bool SCALED = false;
    static __device__ __forceinline__ void words(unsigned int w, float* v) {
        v[0] = f16_lo(w); v[1] = f16_hi(w);
    }
};
struct TcBF16 {
    static constexpr int WEIGHTS = 8, E = 2, XPAD = 8;
    static constexpr bool SCALED = false;
    static __device__ __forceinline__ void words(unsigned int w, float* v) {
        v[0] = __uint_as_float(w << 16); v[1] = __uint_as_float(w & 0xFFFF0000u);
    }
};
struct TcQ8_0 {
    static constexpr int WEIGHTS = 16, E = 4, XPAD = 16;
    static constexpr bool SCALED = true;
    static __device__ __forceinline__ void words(unsigned int w, float* v) {
        const unsigned int u = w ^ 0x80808080u;
#pragma unroll
        for (int e = 0; e < 4; ++e)
            v[e] = __uint_as_float(byte_perm(u, F32_MAGIC, 0x7440u | e)) - 8388736.0f;
    }
};
struct TcQ4_0 {
    static constexpr int WEIGHTS = 32, E = 8, XPAD = 16;
    static constexpr bool SCALED = true;
    static __device__ __forceinline__ void words(unsigned int w, float* v) {
        const unsigned int w2 = w >> 12;
        v[0] = magic_code<0x0000000Fu>(w, 1.0f, 8388616.0f);
        v[1] = magic_code<0x00000F00u>(w, 1.0f / 256, 32776.0f);
        v[2] = magic_code<0x000F0000u>(w, 1.0f / 65536, 136.0f);
        v[3] = magic_code<0x0000F000u>(w2, 1.0f / 4096, 2056.0f);
        v[4] = magic_code<0x000000F0u>(w, 1.0f / 16, 524296.0f);
        v[5] = magic_code<0x0000F000u>(w, 1.0f / 4096, 2056.0f);
        v[6] = magic_code<0x00000F00u>(w2, 1.0f / 256, 32776.0f);
        v[7] = magic_code<0x000F0000u>(w2, 1.0f / 65536, 136.0f);
    }
};

__device__ __forceinline__ void mma_tf32(float (&c)[4], const float (&a)[4], float b0, float b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])),
                   "r"(__float_as_uint(a[2])), "r"(__float_as_uint(a[3])),
                   "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}

__device__ __forceinline__ float tf32_hi(float x) {
    return __uint_as_float(__float_as_uint(x) & 0xFFFFE000u);
}

// The loads of U chunk groups cg0, cg0 + KS, ...: 16 bytes of rows ra and rb (lane t's chunk of
// each group) and, for the block formats, the raw float16 scales of all 4 chunks of each group
// (0 past the end of the staged chunk, so the zero codes read there add nothing).
template <class F, int U>
struct TcLoads {
    uint4 qa[U], qb[U];
    unsigned short sa[U][4], sb[U][4];

    __device__ __forceinline__ void fetch(const uint4* __restrict__ qs,
                                          const unsigned short* __restrict__ d, int ra, int rb,
                                          int cg0, int KS, int groups, int len, int k0, int first,
                                          int loads_per_row, int nb_row, int t) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int cg = cg0 + u * KS, c = 4 * cg + t;
            qa[u] = qb[u] = make_uint4(0, 0, 0, 0);
            if (cg < groups && c * F::WEIGHTS < len) {
                qa[u] = q_load16(qs + (size_t)ra * loads_per_row + first + c);
                qb[u] = q_load16(qs + (size_t)rb * loads_per_row + first + c);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int ci = 4 * cg + i;
                sa[u][i] = sb[u][i] = 0;
                if (F::SCALED && cg < groups && ci * F::WEIGHTS < len) {
                    const int blk = (k0 + ci * F::WEIGHTS) / 32;
                    sa[u][i] = __ldg(d + (size_t)ra * nb_row + blk);
                    sb[u][i] = __ldg(d + (size_t)rb * nb_row + blk);
                }
            }
        }
    }
};

// One chunk group of a warp's tile: the quad transpose through shared memory, then per chunk
// the mma's (hi and lo) of the NB batch groups, scaled into acc. xh, xl: row g of the staged
// hi and lo planes at the group's first position; rows 8 b + g are b * 8 * XS further.
template <class F, int NB>
__device__ __forceinline__ void tc_group(const uint4& qa, const uint4& qb,
                                         const unsigned short (&sa)[4],
                                         const unsigned short (&sb)[4], unsigned int wsm,
                                         int lane, const float* xh0, const float* xl0, int XS,
                                         float (&acc)[NB][4]) {
    const int g = lane / 4, t = lane % 4;
    __syncwarp();                                 // the previous group's ldmatrix are done
    st_shared16(wsm + v5_swizzle(g, t), qa);
    st_shared16(wsm + v5_swizzle(g + 8, t), qb);
    __syncwarp();
    unsigned int wa[4], wb[4];                    // word t of chunks 0..3, rows g and g + 8
    ldmatrix_x4(wa, wsm + v5_swizzle(lane & 7, lane >> 3));
    ldmatrix_x4(wb, wsm + v5_swizzle(8 + (lane & 7), lane >> 3));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float va[F::E], vb[F::E];
        F::words(wa[i], va);
        F::words(wb[i], vb);
        float part[NB][4];
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[b][e] = 0.0f;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const float* hr = xh0 + 8 * b * XS + i * F::WEIGHTS;
            const float* lr = xl0 + 8 * b * XS + i * F::WEIGHTS;
            float xh[8], xl[8];                   // x at this lane's positions E(t)
            if (F::E == 2) {
                const float2 a = *reinterpret_cast<const float2*>(hr + 2 * t);
                const float2 l = *reinterpret_cast<const float2*>(lr + 2 * t);
                xh[0] = a.x; xh[1] = a.y; xl[0] = l.x; xl[1] = l.y;
            } else {
#pragma unroll
                for (int h = 0; h < F::E / 4; ++h) {
                    const float4 a = *reinterpret_cast<const float4*>(hr + 4 * t + 16 * h);
                    const float4 l = *reinterpret_cast<const float4*>(lr + 4 * t + 16 * h);
                    xh[4 * h] = a.x; xh[4 * h + 1] = a.y; xh[4 * h + 2] = a.z; xh[4 * h + 3] = a.w;
                    xl[4 * h] = l.x; xl[4 * h + 1] = l.y; xl[4 * h + 2] = l.z; xl[4 * h + 3] = l.w;
                }
            }
#pragma unroll
            for (int s = 0; s < F::E / 2; ++s) {  // k-slots t, t + 4 = positions 2s, 2s + 1
                const float a[4] = {va[2 * s], vb[2 * s], va[2 * s + 1], vb[2 * s + 1]};
                if (F::SCALED) {
                    mma_tf32(part[b], a, xh[2 * s], xh[2 * s + 1]);
                    mma_tf32(part[b], a, xl[2 * s], xl[2 * s + 1]);
                } else {
                    mma_tf32(acc[b], a, xh[2 * s], xh[2 * s + 1]);
                    mma_tf32(acc[b], a, xl[2 * s], xl[2 * s + 1]);
                }
            }
        }
        if (F::SCALED) {
            const float da = f16_to_f32(sa[i]), db = f16_to_f32(sb[i]);
#pragma unroll
            for (int b = 0; b < NB; ++b) {
                acc[b][0] = fmaf(da, part[b][0], acc[b][0]);
                acc[b][1] = fmaf(da, part[b][1], acc[b][1]);
                acc[b][2] = fmaf(db, part[b][2], acc[b][2]);
                acc[b][3] = fmaf(db, part[b][3], acc[b][3]);
            }
        }
    }
}

// Grid: any number of blocks of 256 threads; KS in {1, 2, 4, 8} warps per tile of 16 rows.
// kc: floats of each row of x per shared-memory chunk (K, or a multiple of 4 * WEIGHTS).
// Dynamic shared memory: 2 * 8 NB * XS floats, XS = round_up(kc, 4 * WEIGHTS) + F::XPAD.
// U: chunk groups in flight per warp.
template <class F, int NB, int PRO, int U>
__global__ void __launch_bounds__(256, 1)
qgemv_tc(const float* __restrict__ X, const uint4* __restrict__ qs,
         const unsigned short* __restrict__ d, float* __restrict__ Y, int M, int N, int K,
         int accumulate, const float* __restrict__ norm_w, float eps, int kc, int KS) {
    constexpr int ROWS = 8 * NB, SPAN = 4 * F::WEIGHTS;        // x rows; weights per group
    extern __shared__ __align__(16) float tc_x[];              // hi: (ROWS, XS), then lo
    __shared__ __align__(16) unsigned char tc_w[8][16 * 64];   // per warp: 16 rows x 4 chunks
    __shared__ float tc_red[8][NB * 4][32];                    // per warp: its fragments
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int slice = warp % KS, tiles_per_block = 8 / KS;
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K;
    const int loads_per_row = K / F::WEIGHTS, nb_row = K / 32;
    const int XS = (kc + SPAN - 1) / SPAN * SPAN + F::XPAD;
    float* xhi = tc_x;
    float* xlo = tc_x + ROWS * XS;
    const unsigned int wsm = smem_addr(tc_w[warp]);

    for (int m0 = 0; m0 < M; m0 += ROWS) {
        float inv_rms[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) inv_rms[r] = 1.0f;
        if (PRO == GEMV_RMSNORM) qgemv_inv_rms<ROWS>(X, m0, M, ldx, K, eps, inv_rms);

        for (int k0 = 0; k0 < K; k0 += kc) {
            const int len = min(kc, K - k0), len4 = len / 4;
            const int groups = (len + SPAN - 1) / SPAN, padded4 = groups * SPAN / 4;
            const int first = k0 / F::WEIGHTS;               // the chunk's first 16-byte load
            __syncthreads();
            for (int i = threadIdx.x; i < ROWS * padded4; i += blockDim.x) {
                const int r = i / padded4, k4 = i % padded4;
                float inv = 1.0f;
#pragma unroll
                for (int rr = 0; rr < ROWS; ++rr) inv = rr == r ? inv_rms[rr] : inv;
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (m0 + r < M && k4 < len4)
                    v = gemv_x4<PRO>(X + (size_t)(m0 + r) * ldx, k0 / 4 + k4, K, norm_w, inv);
                const float4 h = make_float4(tf32_hi(v.x), tf32_hi(v.y), tf32_hi(v.z), tf32_hi(v.w));
                reinterpret_cast<float4*>(xhi + r * XS)[k4] = h;
                reinterpret_cast<float4*>(xlo + r * XS)[k4] =
                    make_float4(v.x - h.x, v.y - h.y, v.z - h.z, v.w - h.w);
            }
            __syncthreads();

            const int tile_step = gridDim.x * tiles_per_block * 16;
            for (int n0 = (blockIdx.x * tiles_per_block + warp / KS) * 16; ; n0 += tile_step) {
                // every warp of the block runs the same number of passes (the barrier below)
                const int n_base = n0 - (warp / KS) * 16;      // the block's first tile
                if (n_base >= N) break;
                float acc[NB][4];
#pragma unroll
                for (int b = 0; b < NB; ++b)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[b][e] = 0.0f;
                const int ra = min(n0 + g, N - 1), rb = min(n0 + 8 + g, N - 1);
                if (n0 < N) {
                    // U chunk groups of this slice in flight while the previous U are used
                    TcLoads<F, U> next;
                    next.fetch(qs, d, ra, rb, slice, KS, groups, len, k0, first, loads_per_row,
                               nb_row, t);
                    for (int cg0 = slice; cg0 < groups; cg0 += U * KS) {
                        const TcLoads<F, U> cur = next;
                        if (cg0 + U * KS < groups)
                            next.fetch(qs, d, ra, rb, cg0 + U * KS, KS, groups, len, k0, first,
                                       loads_per_row, nb_row, t);
#pragma unroll
                        for (int u = 0; u < U; ++u) {
                            const int cg = cg0 + u * KS;
                            if (cg >= groups) break;
                            tc_group<F, NB>(cur.qa[u], cur.qb[u], cur.sa[u], cur.sb[u], wsm, lane,
                                            xhi + g * XS + 4 * cg * F::WEIGHTS,
                                            xlo + g * XS + 4 * cg * F::WEIGHTS, XS, acc);
                        }
                    }
                }
                // the KS slices of a tile, added in slice order by slice 0
                if (KS > 1) {
#pragma unroll
                    for (int b = 0; b < NB; ++b)
#pragma unroll
                        for (int e = 0; e < 4; ++e) tc_red[warp][4 * b + e][lane] = acc[b][e];
                    __syncthreads();
                    if (slice == 0)
                        for (int s = 1; s < KS; ++s)
#pragma unroll
                            for (int b = 0; b < NB; ++b)
#pragma unroll
                                for (int e = 0; e < 4; ++e) acc[b][e] += tc_red[warp + s][4 * b + e][lane];
                    __syncthreads();
                }
                if (slice == 0 && n0 < N) {
                    // fragment: acc[b][0, 1] = y[batch 8b + 2t, 2t + 1][row n0 + g], [2, 3]: row + 8
#pragma unroll
                    for (int b = 0; b < NB; ++b)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int m = m0 + 8 * b + 2 * t + (e & 1), n = n0 + g + 8 * (e >> 1);
                            if (m < M && n < N) {
                                float* y = Y + (size_t)m * N + n;
                                *y = (k0 > 0 || accumulate) ? *y + acc[b][e] : acc[b][e];
                            }
                        }
                }
            }
        }
    }
}

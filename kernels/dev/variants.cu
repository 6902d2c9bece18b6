// Candidate next versions of qgemv (issue 10), compiled only by
// kernels/dev/bench_variants.py after the package's kernels/*.cu (it uses their helpers: q_word,
// qgemv_inv_rms, gemv_x4, byte_perm, f16_lo, the GEMV_* prologues, qgemv_v2's F32_MAGIC,
// magic_code and format structs, qgemv_warp_sums from qgemv.cu, the cp.async wrappers of
// matmul.cu). Nothing here is launched by minillama: measured on an H200 (docs/kernels.md,
// "qgemv v2 and the batches"), qgemv_tc loses to qgemv v1 at every batch.
//
//   qgemv_tc<F, NB>                 batches of 1..8 NB rows on the tensor cores: mma.sync
//       m16n8k8 in TF32 with the weights' codes as the A operand (exact in TF32) and x split
//       into a TF32 "hi" and "lo" part (two mma's), so the products keep ~22 bits of x and the
//       sums are float32: the 1e-5 bound of the float32 GEMV still holds.
//   qgemv_v3<F, NR, STAGES>         batch 1 (q4_0, q8_0, f16): v2's unpacking, the weights and
//       their scales streamed through a per-warp cp.async pipeline in shared memory instead of
//       registers, so that many KiB are in flight per SM (issue 10). Measured on an H200
//       (2026-11-29): slower than v2, 0.41 to 0.45 of the copy bandwidth on q4_0 against 0.50.
//   qgemv_i8<F, NR, U>              batches of q8_0 / q4_0 on the tensor cores in integers
//       (mma.sync m16n8k32, x in qgemv_v4's 8-bit digits, no quad transpose), qgemv_mma's
//       successor if it won: measured on an H200 (2026-11-30), correct (5.4e-7) and not faster
//       than qgemv_mma at 8 rows (section 4 below; docs/kernels.md).
//   qgemv_v4s_pre<F, NR, U>         the package's qgemv_v4s (v4 split over k, kernels/qgemv.cu)
//       with x's digits staged once per step (v4_digits) instead of by every block (section 5).
//
// (qgemv_v2, the other candidate of the same GPU run, won at batch 1 and for float32 batches:
// it moved to kernels/qgemv.cu; so did qgemv_v4, batch 1 with the products in integers, which
// won over v2 on q4_0 and q8_0, and qgemv_v4s, v4 split over k, which won on w2 (H200,
// 2026-11-30): bench_variants.py instantiates all three from there.)


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
                const float inv = row_inv_rms(inv_rms, r);      // (qgemv.cu)
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


// ---------------------------------------------------------------------------------------------
// 3. Batch 1 through a cp.async pipeline: qgemv_v3<F, NR, STAGES> (issue 10).
//
// qgemv_v2 streams q4_0 at batch 1 at ~0.5 of the copy bandwidth with ~3.1 instructions per
// weight, under the 4.4 the bandwidth leaves: it waits on memory. Its loads go to registers, so
// a lane holds at most U x NR = 8 loads of 16 bytes, and it issues the next batch only when it
// takes the current one (one batch in flight while it computes, none while it waits). More
// loads per lane lost to register pressure. v3 keeps v2's arithmetic (F::piece of V2Q4_0,
// V2Q8_0, V2F16: the float32 magic, the scale once per 16-byte load) and moves the waiting
// weights from registers to shared memory, as gemm_v5 does with its tiles:
//
// The work. A warp owns NR consecutive rows of W at a time (a tile; tiles of the grid's warps
// interleaved: tile gw, gw + warps in the grid, ...). A tile is walked in slices of 32 16-byte
// loads per row (1024 q4_0 weights, 512 q8_0, 256 f16): lane l takes load 32 s + l of every row
// of slice s, so the lanes read 512 contiguous bytes per row, and a row's sum is reduced over the
// warp once, at the end of the tile (qgemv_warp_sums). A slice with its NR rows is one pipeline
// step; a warp's steps run over its tiles without a break, so the next tile's first slices are in
// flight while the last ones of this tile are used.
//
// The pipeline. Each warp has its own STAGES slots in shared memory (no __syncthreads after x is
// staged: warps never wait for each other). A slot holds a step's codes (NR x 512 bytes: lane l
// copies load 32 s + l of each row to byte 16 l of the row's 512, with cp.async, and reads back
// only its own bytes) and the scales of those loads (the float16 plane, read by every lane, so a
// __syncwarp follows each cp_async_wait). Step i is issued STAGES - 1 steps ahead: wait until
// step i has landed (cp_async_wait<STAGES - 2>), __syncwarp (every lane's copies of step i are
// visible, every lane is done with step i - 1), copy step i + STAGES - 1 into step i - 1's slot,
// then unpack and multiply step i. Loads past the row or past N are zero-filled (bytes = 0);
// rows past N are multiplied (zero codes by whatever scale the slot holds) but never written.
//
// The scales are copied in 16-byte pieces: cp.async copies 4, 8 or 16 aligned bytes, and a
// row's scales start at byte 2 nb (nb = K / 32) of the plane. When nb % 8 == 0 (K % 256 == 0:
// every Llama matrix) a slice's 32 (q4_0) or 16 (q8_0) scales are 4 or 2 whole pieces, each
// copied once. Otherwise the slice's first piece starts below it (rounded down to 16 bytes) and
// its first and last pieces are shared with the neighbouring slice or row, copied for both: one
// extra piece per row and slice at most (SPIECES = the pieces + 1 slots per row).
//
// In flight, at the launch shapes bench_variants.py times (q4_0, NR = 4): a step is 2 KiB of
// codes and 256 bytes of scales, a slot 2368 bytes. 8 warps x 3 stages: 57 KiB of slots and
// 4 K bytes of x per block: two blocks per SM up to K = 11008 (202 KiB), so 16 warps x 2 steps
// x 2.3 KiB = 74 KiB in flight per SM, against v2's 64 KiB at best and ~32 KiB that 4.2 TB/s at
// ~1 us of latency needs; 4 stages (8 warps: one block per SM at K = 11008) or 4 warps and more
// stages are the other shapes timed. Registers (NVRTC for sm_90, ptxas): q4_0 127 to 128 (the
// launch bounds' cap for two blocks of 256; ptxas keeps a step's unpacked pieces and x float4s
// in flight), q8_0 70 to 80, f16 54 to 64; no spills in any of the 12 instances. So two blocks
// of 8 warps per SM, where the shared memory allows, or four of 4 warps.
//
// The x side. x is staged once per block, piece-major as v2 (a lane's float4 of piece p of load
// c at xs[p CH + c]: 32 lanes read 512 contiguous bytes, no bank conflicts), and each float4 of
// x read is used by the NR rows of the tile. Shared-memory bytes per weight byte: x (32 floats
// per 16 bytes of q4_0 codes, over NR = 4 rows) 2, the codes written by cp.async and read back
// 1 + 1, the scales ~0.25: ~4.3 bytes per byte of q4_0 (q8_0: ~3.2). At the copy bandwidth
// (4.2 TB/s over 132 SMs at 1.98 GHz: 16 bytes per clock per SM) that is ~70 bytes per clock
// per SM, about half the H200's 128; NR = 2 would be ~100, too near it, which is why the tile
// is 4 rows (8 is timed too).
//
// What to expect: the tall matrices (w13, the classifier, wqkv) streamed near the copy
// bandwidth, say 0.7 to 0.8 for q4_0 (a step of 4 rows is 478 PTX instructions for 128
// weights, 3.7 per weight: 3 for the magic and the FMA, the rest addresses, scales and copies;
// under the 4.4 budget, with less margin than v2's ~3.1, but the loads no longer wait for the
// unpacking); w2 and wo (4096 rows:
// 1024 tiles, at most one per warp) stay short of that: their time is a few steps per warp,
// mostly the first loads' latency and the block's staging of x, so 0.45 to 0.6. The Llama-2-7B
// decode weighted by bytes: ~0.65 for q4_0, ~0.75 for q8_0. Not measured yet.
//
// Arguments: qs the codes (f16: the values), d the float16 scales (any pointer for f16), both
// 16-byte aligned (CuPy's allocations are), Y (N) float32; one row of x (K floats), K % 32 == 0,
// K up to what the shared memory leaves (~39000 at 8 warps x 4 stages; every Llama K fits).
// Block: 32 x warps threads (warps <= 8); grid: any number of blocks; dynamic shared memory:
// 4 K + warps x STAGES x v3_slot_bytes<F, NR>() bytes.

template <class F>
__host__ __device__ constexpr int v3_spieces() {        // 16-byte scale pieces per row and slice
    return F::LOADS_PER_BLOCK > 0 ? 32 / F::LOADS_PER_BLOCK * 2 / 16 + 1 : 0;
}

template <class F, int NR>
__host__ __device__ constexpr int v3_slot_bytes() {     // one step: the codes, then the scales
    return NR * 512 + NR * v3_spieces<F>() * 16;
}

template <class F, int NR, int STAGES>
__global__ void __launch_bounds__(256, 2)
qgemv_v3(const float* __restrict__ X, const uint4* __restrict__ qs,
         const unsigned short* __restrict__ d, float* __restrict__ Y, int N, int K,
         int accumulate) {
    static_assert(!F::MIN, "qgemv_v3 reads no mins (q4_1)");
    static_assert(STAGES >= 2 && (NR & (NR - 1)) == 0 && NR <= 32, "STAGES >= 2, NR a power of 2");
    constexpr bool SCALED = F::LOADS_PER_BLOCK > 0;
    constexpr int PIECES = F::WEIGHTS / 4;          // float4s of x per 16-byte load
    constexpr int LPB = SCALED ? F::LOADS_PER_BLOCK : 1;      // 16-byte loads per scale
    constexpr int SB = 32 / LPB;                    // scales per row and slice (if SCALED)
    constexpr int SPIECES = v3_spieces<F>(), CODES = NR * 512, SLOT = v3_slot_bytes<F, NR>();
    constexpr int SPIECES_ = SPIECES > 0 ? SPIECES : 1;          // (a divisor when SCALED)
    extern __shared__ float4 v3_smem[];             // x: (PIECES, CH) float4s; then the slots
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int CH = K / F::WEIGHTS;                  // 16-byte loads per row
    const int S = (CH + 31) / 32;                   // slices per row
    const int nb = K / 32;                          // scales per row
    const int tiles = (N + NR - 1) / NR;
    const int gw = blockIdx.x * warps + warp, all_warps = gridDim.x * warps;
    const int steps = gw < tiles ? ((tiles - 1 - gw) / all_warps + 1) * S : 0;
    float4* xs = v3_smem;
    unsigned char* slots = reinterpret_cast<unsigned char*>(v3_smem + K / 4) + warp * STAGES * SLOT;
    const unsigned int slots_sm = smem_addr(slots);
    const size_t n_scales = (size_t)N * nb;

    // Step i is slice i % S of this warp's tile number i / S (rows n0 .. n0 + NR - 1), counted
    // as it goes (no divisions by S): (is, in0) for the next step to issue.
    int is = 0, in0 = gw * NR;
    auto issue = [&](int i) {
        if (i < steps) {
            const int s = is, n0 = in0, c = 32 * s + lane;
            const unsigned int slot = slots_sm + i % STAGES * SLOT;
#pragma unroll
            for (int j = 0; j < NR; ++j) {
                const bool ok = n0 + j < N && c < CH;
                cp_async16(slot + 512 * j + 16 * lane, ok ? qs + (size_t)(n0 + j) * CH + c : qs,
                           ok ? 16 : 0);
            }
            if (SCALED)
                for (int t = lane; t < NR * SPIECES; t += 32) {
                    const int j = t / SPIECES_, h = t % SPIECES_;
                    const size_t g0 = (size_t)(n0 + j) * nb + s * SB;        // the slice's first
                    const size_t end = g0 + min(SB, nb - s * SB);
                    const size_t a = (g0 & ~(size_t)7) + 8 * h;               // this piece's first
                    if (n0 + j < N && a < end)
                        cp_async16(slot + CODES + 16 * t, d + a,
                                   (int)min((size_t)16, 2 * (n_scales - a)));
                }
            if (++is == S) { is = 0; in0 += all_warps * NR; }
        }
        cp_async_commit();                          // (empty groups too: the count stays fixed)
    };

    // The first steps do not depend on x: in flight while the block stages it.
    for (int i = 0; i < STAGES - 1; ++i) issue(i);
    grid_launch_dependents();
    grid_dependency_wait();            // (reduce.cu) the weights are ours; x is the last kernel's
    for (int k4 = threadIdx.x; k4 < K / 4; k4 += blockDim.x)
        xs[k4 % PIECES * CH + k4 / PIECES] = gemv_x4<GEMV_PLAIN>(X, k4, K, X, 1.0f);
    __syncthreads();

    float acc[NR] = {};
    for (int i = 0, s = 0, n0 = gw * NR; i < steps; ++i) {
        cp_async_wait<STAGES - 2>();                // step i has landed (this lane's copies)
        __syncwarp();                               // ... and every lane's; step i - 1 is done
        issue(i + STAGES - 1);
        const int c = 32 * s + lane;
        const unsigned char* slot = slots + i % STAGES * SLOT;
        if (s == 0) {
#pragma unroll
            for (int j = 0; j < NR; ++j) acc[j] = 0.0f;
        }
        if (c < CH) {
            uint4 q[NR];
#pragma unroll
            for (int j = 0; j < NR; ++j)           // this lane's own copies
                q[j] = *reinterpret_cast<const uint4*>(slot + 512 * j + 16 * lane);
            float part[NR];
#pragma unroll
            for (int j = 0; j < NR; ++j) part[j] = 0.0f;
#pragma unroll
            for (int p = 0; p < PIECES; ++p) {
                const float4 xv = xs[p * CH + c];  // used by the NR rows
#pragma unroll
                for (int j = 0; j < NR; ++j) {
                    float w[4];
                    F::piece(q[j], p, w);
                    part[j] = fmaf(w[0], xv.x, part[j]);
                    part[j] = fmaf(w[1], xv.y, part[j]);
                    part[j] = fmaf(w[2], xv.z, part[j]);
                    part[j] = fmaf(w[3], xv.w, part[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < NR; ++j) {
                if (SCALED) {   // scale g0 + lane / LPB of the row, in the piece rounded down
                    const size_t g0 = (size_t)(n0 + j) * nb + s * SB;
                    const int at = (int)(g0 & 7) + lane / LPB;
                    const unsigned short* sc =
                        reinterpret_cast<const unsigned short*>(slot + CODES + 16 * SPIECES * j);
                    acc[j] = fmaf(f16_to_f32(sc[at]), part[j], acc[j]);
                } else {
                    acc[j] += part[j];
                }
            }
        }
        if (s == S - 1) {                           // the tile's last slice: its NR sums
            constexpr int SHIFT = NR == 32 ? 0 : NR == 16 ? 1 : NR == 8 ? 2 : NR == 4 ? 3
                                : NR == 2 ? 4 : 5;
            const float mine = qgemv_warp_sums<NR>(acc);
            const int j = lane >> SHIFT;            // lane (j << SHIFT) holds row n0 + j
            if (lane % (1 << SHIFT) == 0 && n0 + j < N)
                Y[n0 + j] = accumulate ? Y[n0 + j] + mine : mine;
        }
        if (++s == S) { s = 0; n0 += all_warps * NR; }
    }
    cp_async_wait<0>();                             // (only empty groups are left)
}


// ---------------------------------------------------------------------------------------------
// 4. Batches in integers on the tensor cores: qgemv_i8<F, NR, U> (issue 10). A CANDIDATE: it
// compiles for sm_90 without spills and its fragment layout is replayed on the CPU
// (kernels/dev/emulate_i8.py). Measured on an H200 (2026-11-30): correct, and not faster than
// qgemv_mma on any 7B matrix at 8 rows but q8_0's wo (15.8 against 16.1 us).
//
// What bounds qgemv_mma at 8 rows, from its SASS (kernels/dev/sass_loop.py; docs/kernels.md,
// "What bounds qgemv_mma at 8 rows, from the SASS"): not the mma's and not the loads in flight
// of its loop, but (1) the fixed work of each block, which every block repeats before its first
// mma: x staged as float16 parts after 8 block-wide maxima (16 barriers) and up to 8 round trips
// to L2, while only the first pass of weights is in flight, against a loop of only 1 to 8 passes
// per block; (2) the loop's instructions and latencies: q4_0 spends 125 per 512 bytes of codes
// (one 16-byte load of each lane) against ~143 that the copy bandwidth leaves (q8_0: 75 against
// ~135), 12 SEL and 4 SHFL of them the quad transpose, 66 the unpacking to float16. qgemv_i8
// takes on the first part and the transpose; its loop is shorter for q8_0 (55 to 65) but longer
// for q4_0 (133 to 140: each 16-byte block needs its int32 sums turned into float per output):
//
// - x as qgemv_v4 stages it, per unit of 32 positions and row: scaled by its own power of two
//   (the largest |x| into [2^21, 2^22)), rounded, written as three signed 8-bit digits, with
//   the digits' sums T_k and 2^-s. No block-wide maximum, so one barrier; each thread's 32
//   values are 8 float4 loads in flight at once.
// - mma.sync.m16n8k32 in integers (.s8.s8 for q8_0's codes, .u8.s8 for q4_0's nibbles; the
//   offset 8 comes off as S_k - 8 T_k, as in v4): one mma per digit and block, sums exact in
//   int32, so nothing is converted to float16 and nothing rounds inside the tensor cores.
// - No transpose: the fragment of m16n8k32 gives lane t of a quad k-slots 4t .. 4t+3 and
//   16 + 4t .. 16 + 4t+3 of one block, 8 codes per row. So the lane loads exactly those: q8_0
//   bytes 8t .. 8t+7 of the block (8-byte loads: word 0 to slots 4t.., word 1 to 16 + 4t..,
//   x staged in that order), q4_0 bytes 4t .. 4t+3 (4-byte loads: its low nibbles are codes
//   4t .. 4t+3, its high nibbles 16 + 4t ..: the natural order). A quad reads the block's 32
//   (or 16) contiguous bytes; the loads are narrower, the instructions fewer.
// - Per block and output: lo = S_1 256 + S_0 (exact in int32), v = S_2 65536 + lo in two
//   float32 roundings (v4's), acc += d 2^-s v. For q4_0, S_2 becomes a float by the 1.5 2^23
//   magic with its offset: one conversion (I2FP) per output, not two.
//
// Grid (tiles, ks) and the k split as qgemv_mma's (slices of whole blocks, the last block of a
// tile adding the slices in order); a slice at most I8_MAX_BLOCKS blocks (its x: 112 bytes a
// block and row, 58 KiB at 64 blocks). No prologue. Block 256 threads. Dynamic shared memory:
// i8_smem_bytes(blocks per slice).

#define I8_MAX_BLOCKS 64
#define I8_MAGIC 0x4B400000         // the bits of 1.5 2^23: + k (|k| < 2^22) is 1.5 2^23 + k

__device__ __forceinline__ void mma_i8(int (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                                       unsigned int b1, bool a_unsigned) {
    if (a_unsigned)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A format: BYTES of a block's row per lane (the load), ROW_BYTES per 32 positions, the offset,
// word(p): which of the lane's k-slot words (t = word % 4 .. as below) position p of a block
// lands in, and frag(): the A fragment from the lane's loads of rows g and g + 8.
struct I8Q8_0 {        // lane t: bytes 8t .. 8t+7 = codes 8t .. 8t+7, words (slots 4t.., 16+4t..)
    static constexpr int BYTES = 8, ROW_BYTES = 32, OFFSET = 0;
    static constexpr bool UNSIGNED = false;
    typedef uint2 Load;
    static __device__ __forceinline__ Load load(const unsigned char* p) {
        uint2 v;
        asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
        return v;
    }
    static __device__ __forceinline__ Load zero() { return make_uint2(0, 0); }
    // position p (0..31) of a block -> (lane t, half h: b0 or b1)
    static __device__ __forceinline__ int lane_of(int p) { return p / 8; }
    static __device__ __forceinline__ int half_of(int p) { return p / 4 % 2; }
    static __device__ __forceinline__ void frag(const Load& g, const Load& e, unsigned int (&a)[4]) {
        a[0] = g.x; a[1] = e.x; a[2] = g.y; a[3] = e.y;
    }
};

struct I8Q4_0 {        // lane t: bytes 4t .. 4t+3: low nibbles codes 4t.., high 16 + 4t..
    static constexpr int BYTES = 4, ROW_BYTES = 16, OFFSET = 8;
    static constexpr bool UNSIGNED = true;
    typedef unsigned int Load;
    static __device__ __forceinline__ Load load(const unsigned char* p) {
        unsigned int v;
        asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
        return v;
    }
    static __device__ __forceinline__ Load zero() { return 0u; }
    static __device__ __forceinline__ int lane_of(int p) { return p % 16 / 4; }
    static __device__ __forceinline__ int half_of(int p) { return p / 16; }
    static __device__ __forceinline__ void frag(const Load& g, const Load& e, unsigned int (&a)[4]) {
        a[0] = g & 0x0F0F0F0Fu; a[1] = e & 0x0F0F0F0Fu;
        a[2] = (g >> 4) & 0x0F0F0F0Fu; a[3] = (e >> 4) & 0x0F0F0F0Fu;
    }
};

// x in shared memory, per row r (8) and block u of the slice, rows `stride` (odd) blocks apart:
// digits 0 and 1 as uint4 (b0, b1 of digit 0, b0, b1 of digit 1) per lane t, digit 2 as uint2,
// and the offset's share of the sums with 2^-s (i8_stage_unit).
struct I8X {
    uint4* d01;     // [(r stride + u) 4 + t]
    uint2* d2;      // [(r stride + u) 4 + t]
    uint4* meta;    // [r stride + u]
};

__host__ __device__ constexpr int i8_stride(int blocks) { return blocks | 1; }

__host__ __device__ constexpr int i8_smem_bytes(int blocks) {
    return MMA_ROWS * i8_stride(blocks) * (4 * 16 + 4 * 8 + 16);
}

__device__ __forceinline__ I8X i8_x(unsigned char* smem, int stride) {
    I8X x;
    x.d01 = reinterpret_cast<uint4*>(smem);
    x.d2 = reinterpret_cast<uint2*>(x.d01 + MMA_ROWS * stride * 4);
    x.meta = reinterpret_cast<uint4*>(x.d2 + MMA_ROWS * stride * 4);
    return x;
}

// Row r, block u of the slice (positions k0 .. k0 + 31): its 32 values of x as digits, placed
// where F's lanes read them (v4_unit_lane's arithmetic; a row past M is zeros). x is the previous
// kernel's output: read through L2 (__ldcg), not read-only, so that ptxas keeps the loads after
// grid_dependency_wait (kernels/dev/wait_order.py).
template <class F>
__device__ void i8_stage_unit(const float* __restrict__ X, int m, int M, int K, int k0,
                              const I8X& xs, int r, int u, int stride) {
    float v[32];
    const float4* x4s = reinterpret_cast<const float4*>(X + (size_t)m * K + k0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float4 x4 = m < M ? __ldcg(x4s + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        v[4 * i] = x4.x; v[4 * i + 1] = x4.y; v[4 * i + 2] = x4.z; v[4 * i + 3] = x4.w;
    }
    float mx = 0.0f;
    bool finite = true;
#pragma unroll
    for (int p = 0; p < 32; ++p) { mx = fmaxf(mx, fabsf(v[p])); finite = finite && isfinite(v[p]); }
    const int s = v4_shift(mx);
    const float up = pow2(s);
    unsigned int w[3][4][2];                       // [digit][lane t][half]
    int T[3] = {0, 0, 0};
#pragma unroll
    for (int q = 0; q < 8; ++q) {                  // 4 values a word, one (lane, half) each
        unsigned int word[3];
        v4_digit_words(make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]),
                       up, word, T);
#pragma unroll
        for (int k = 0; k < 3; ++k) w[k][F::lane_of(4 * q)][F::half_of(4 * q)] = word[k];
    }
    const int at = r * stride + u;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        xs.d01[at * 4 + t] = make_uint4(w[0][t][0], w[0][t][1], w[1][t][0], w[1][t][1]);
        xs.d2[at * 4 + t] = make_uint2(w[2][t][0], w[2][t][1]);
    }
    const float scale = v4_unscale(s, finite);
    // The offset's share of the sums, taken off per output: OFFSET (256 T_1 + T_0) from
    // 256 S_1 + S_0; and from S_2, OFFSET T_2 with the float32 magic 1.5 2^23 added, so that the
    // sum's bits are 1.5 2^23 + S_2 - OFFSET T_2 as a float (|S_2| < 2^19, exact): the integer
    // add q4_0 needs anyway and one float add instead of a conversion (q8_0, with no offset,
    // converts S_2).
    xs.meta[at] = make_uint4(F::OFFSET * (256 * T[1] + T[0]), I8_MAGIC - F::OFFSET * T[2], 0u,
                             __float_as_uint(scale));
}

// The weights of U blocks of one lane: rows g and g + 8 of each tile j, and their scales
// (row g in the low half, g + 8 in the high half); zeros past the slice or N.
template <class F, int NR, int U>
struct I8Loads {
    typename F::Load q[U][NR][2];
    unsigned int d[U][NR];

    __device__ __forceinline__ void fetch(const unsigned char* __restrict__ qs,
                                          const unsigned short* __restrict__ ds, int row0, int N,
                                          int b0, int b_end, int nb, int g, int t) {
#pragma unroll
        for (int j = 0; j < NR; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int n = min(row0 + 16 * j + 8 * h + g, N - 1);   // past N: never written
                // one address per row, the U blocks at constant offsets from it
                const unsigned char* row = qs + ((size_t)n * nb + b0) * F::ROW_BYTES + F::BYTES * t;
                const unsigned short* dn = ds + (size_t)n * nb + b0;
#pragma unroll
                for (int s = 0; s < U; ++s) {
                    if (h == 0) d[s][j] = 0;
                    q[s][j][h] = F::zero();
                    if (b0 + s < b_end) {
                        q[s][j][h] = F::load(row + s * F::ROW_BYTES);
                        d[s][j] |= (unsigned int)__ldg(dn + s) << (16 * h);
                    }
                }
            }
    }
};

template <class F, int NR, int U>
__global__ void __launch_bounds__(256, 2)
qgemv_i8(const float* __restrict__ X, const unsigned char* __restrict__ qs,
         const unsigned short* __restrict__ d, float* __restrict__ Y, int M, int N, int K,
         int accumulate, float* __restrict__ scratch, int* __restrict__ counters) {
    extern __shared__ __align__(16) unsigned char i8_smem[];
    __shared__ int i8_last;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, ks = gridDim.y, slice = blockIdx.y;
    const int nb = K / 32, per_slice = (nb + ks - 1) / ks;
    const int b_begin = slice * per_slice, b_end = min(nb, b_begin + per_slice);
    const int blocks = max(b_end - b_begin, 0), stride = i8_stride(blocks);
    const int row0 = tile * 128 * NR + warp * 16 * NR;
    const I8X xs = i8_x(i8_smem, stride);
    float* partial = scratch;                                   // (ks, M, N)

    I8Loads<F, NR, U> next;
    next.fetch(qs, d, row0, N, b_begin, b_end, nb, g, t);       // before x is staged
    grid_launch_dependents();
    grid_dependency_wait();

    for (int m0 = 0; m0 < M; m0 += MMA_ROWS) {
        __syncthreads();                                        // the last pass's readers are done
        for (int i = threadIdx.x; i < MMA_ROWS * blocks; i += blockDim.x)
            i8_stage_unit<F>(X, m0 + i / blocks, M, K, 32 * (b_begin + i % blocks), xs,
                             i / blocks, i % blocks, stride);
        __syncthreads();
        if (m0 > 0) next.fetch(qs, d, row0, N, b_begin, b_end, nb, g, t);

        float acc[NR][4] = {};
        for (int b0 = b_begin; b0 < b_end; b0 += U) {
            const I8Loads<F, NR, U> cur = next;
            if (b0 + U < b_end) next.fetch(qs, d, row0, N, b0 + U, b_end, nb, g, t);
#pragma unroll
            for (int s = 0; s < U; ++s) {
                if (b0 + s >= b_end) break;
                const int u = b0 + s - b_begin;
                const uint4 x01 = xs.d01[(g * stride + u) * 4 + t];    // shared by the tiles
                const uint2 x2 = xs.d2[(g * stride + u) * 4 + t];
                const uint4 meta[2] = {xs.meta[2 * t * stride + u], xs.meta[(2 * t + 1) * stride + u]};
#pragma unroll
                for (int j = 0; j < NR; ++j) {
                    unsigned int a[4];
                    F::frag(cur.q[s][j][0], cur.q[s][j][1], a);
                    int S[3][4] = {};
                    mma_i8(S[0], a, x01.x, x01.y, F::UNSIGNED);
                    mma_i8(S[1], a, x01.z, x01.w, F::UNSIGNED);
                    mma_i8(S[2], a, x2.x, x2.y, F::UNSIGNED);
                    const float dw[2] = {f16_lo(cur.d[s][j]), f16_hi(cur.d[s][j])};
                    // fragment: S[k][e] is weight row g + 8 (e >> 1), x row 2t + (e & 1)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const uint4& mt = meta[e & 1];
                        const int lo = S[1][e] * 256 + (F::OFFSET ? S[0][e] - (int)mt.x : S[0][e]);
                        const float hi = F::OFFSET ? __int_as_float(S[2][e] + (int)mt.y) - 12582912.0f
                                                   : (float)S[2][e];
                        const float v = fmaf(hi, 65536.0f, (float)lo);   // v4's 2 roundings
                        acc[j][e] = fmaf(dw[e >> 1] * __uint_as_float(mt.w), v, acc[j][e]);
                    }
                }
            }
        }

#pragma unroll
        for (int j = 0; j < NR; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + 2 * t + (e & 1), n = row0 + 16 * j + g + 8 * (e >> 1);
                if (m >= M || n >= N) continue;
                if (ks == 1) Y[(size_t)m * N + n] = accumulate ? Y[(size_t)m * N + n] + acc[j][e] : acc[j][e];
                else partial[((size_t)slice * M + m) * N + n] = acc[j][e];
            }
    }
    if (ks == 1) return;

    // The last block of this tile adds the ks slices, in slice order (qgemv_mma's way).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        i8_last = atomicAdd(counters + tile, 1) == ks - 1;
        if (i8_last) counters[tile] = 0;
    }
    __syncthreads();
    if (!i8_last) return;
    __threadfence();
    const int rows = min(128 * NR, N - tile * 128 * NR);
    for (int i = threadIdx.x; i < M * rows; i += blockDim.x) {
        const int m = i / rows, n = tile * 128 * NR + i % rows;
        float v = 0.0f;
        for (int s = 0; s < ks; ++s) v += __ldcg(partial + ((size_t)s * M + m) * N + n);
        Y[(size_t)m * N + n] = accumulate ? Y[(size_t)m * N + n] + v : v;
    }
}


// ---------------------------------------------------------------------------------------------
// 5. qgemv_v4s with x's digits staged once per step: qgemv_v4s_pre (issue 10). A CANDIDATE.
//
// qgemv_v4s (v4 split over k) won on w2 and moved to kernels/qgemv.cu, where its comment has the
// design and the figures; bench_variants.py's splitk family times the package's kernel in more
// (NR, U, ks) than the rule launches. What stays here is the other candidate: x's digits staged
// once per step instead of by every block. v4_digits<F, PRO> turns one row of x (after the
// prologue) into v4's units for the whole row, in global memory: digit planes of
// L = K / WEIGHTS uint4s, then L (T, 2^-s); one float4 a thread, v4_unit_lane's arithmetic
// (the same digits as v4_stage_pairs's). qgemv_v4s_pre then copies its slice's units into shared
// memory (plain 16-byte copies through L2, no arithmetic) instead of staging them: the
// package's v4s_walk with the source V4SFromDigits. Launched as a pair here it costs a launch
// more; the figure it is for is the GEMV alone, what it would take if the kernel before it (the
// attention's output for wo, w13's SwiGLU for w2) wrote the digits as it writes x.

// (qgemv.cu's staging until 2026-11-30, v4_stage_lanes's: kept for v4_digits, below.)
// Lane q of a unit's N4 = WEIGHTS / 4 lanes: its 4 values v of unit c (the unit's arithmetic on
// them, the unit's maximum, finiteness and digit sums by shuffles within the group), written
// as word q of each digit plane and, by lane 0, the unit's (T, 2^-s). Every lane of the warp
// calls it (the shuffles); `mine` false: zeros, nothing written.
template <class F>
__device__ __forceinline__ void v4_unit_lane(float4 v, bool mine, int c, int q, int CH,
                                              uint4* xs) {
    constexpr int N4 = F::WEIGHTS / 4;
    float mx = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    int finite = isfinite(v.x) && isfinite(v.y) && isfinite(v.z) && isfinite(v.w);
#pragma unroll
    for (int o = N4 / 2; o > 0; o /= 2) {               // over the unit's lanes
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));
        finite &= __shfl_xor_sync(FULL_MASK, finite, o);
    }
    const int s = v4_shift(mx);
    unsigned int w[3];
    int T[3] = {0, 0, 0};
    v4_digit_words(v, pow2(s), w, T);
#pragma unroll
    for (int o = N4 / 2; o > 0; o /= 2)
#pragma unroll
        for (int k = 0; k < 3; ++k) T[k] += __shfl_xor_sync(FULL_MASK, T[k], o);
    if (!mine) return;
    unsigned int* words = reinterpret_cast<unsigned int*>(xs);
#pragma unroll
    for (int k = 0; k < 3; ++k)                         // plane k XU + q / 4, word q % 4
        words[((k * F::XU + q / 4) * CH + c) * 4 + q % 4] = w[k];
    const float scale = v4_unscale(s, finite);
    if (q == 0) xs[3 * F::XU * CH + c] = make_uint4(T[0], T[1], T[2], __float_as_uint(scale));
}

#define V4_ROUNDS 4                     // v4s_copy's uint4s a thread in flight

// The slice's units copied from digits staged for the whole row: planes of L = K / WEIGHTS
// uint4s, the slice's CH of each at `first`.
template <class F>
__device__ __forceinline__ void v4s_copy(const uint4* __restrict__ digits, int L, int first,
                                         int CH) {
    extern __shared__ uint4 v4_xs[];
    const int n = (3 * F::XU + 1) * CH;
    for (int base = 0; base < n; base += V4_ROUNDS * blockDim.x) {
        uint4 v[V4_ROUNDS];                            // all in flight, then stored
#pragma unroll
        for (int r = 0; r < V4_ROUNDS; ++r) {
            const int i = base + r * blockDim.x + threadIdx.x;
            if (i < n) v[r] = __ldcg(digits + (size_t)(i / CH) * L + first + i % CH);
        }
#pragma unroll
        for (int r = 0; r < V4_ROUNDS; ++r) {
            const int i = base + r * blockDim.x + threadIdx.x;
            if (i < n) v4_xs[i] = v[r];                 // plane i / CH, unit i % CH
        }
    }
}

template <class F>
struct V4SFromDigits {                                  // a source of v4s_walk (qgemv.cu)
    const uint4* digits;
    __device__ __forceinline__ void stage(int K, int first, int CH) const {
        v4s_copy<F>(digits, K / F::WEIGHTS, first, CH);
    }
};

template <class F, int PRO>
__global__ void __launch_bounds__(256)
v4_digits(const float* __restrict__ X, int K, uint4* __restrict__ digits) {
    constexpr int N4 = F::WEIGHTS / 4;
    const int L = K / F::WEIGHTS, i = blockIdx.x * blockDim.x + threadIdx.x;
    grid_launch_dependents();
    grid_dependency_wait();
    const bool mine = i < L * N4;
    float4 raw = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float4 v = mine ? v4_x4<PRO>(X, i, K, nullptr, 1.0f, raw) : raw;
    v4_unit_lane<F>(v, mine, i / N4, i % N4, L, digits);
}

template <class F, int NR, int U>
__global__ void __launch_bounds__(256, 2)
qgemv_v4s_pre(const uint4* __restrict__ digits, const uint4* __restrict__ qs,
              const unsigned short* __restrict__ d, float* __restrict__ Y, int N, int K,
              int accumulate, int rows_per_block, int slice_loads, float* __restrict__ partial,
              int* __restrict__ counters) {
    v4s_walk<F, GEMV_PLAIN, NR, U>(V4SFromDigits<F>{digits}, qs, d, Y, N, K, accumulate,
                                   rows_per_block, slice_loads, partial, counters, 0);
}


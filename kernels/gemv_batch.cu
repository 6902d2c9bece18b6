// gemv_v3: the float32 product of a decode step at batch 8 to 64 (issue 13).
//
//     y[m, n] = sum_k x[m, k] W[n, k]        x: (M, K) activations, W: (N, K) as nn.Linear
//
// with gemv's prologues (RMSNorm, SwiGLU, matmul.cu) and `accumulate`. The earlier versions:
//
//   v1  gemv (matmul.cu)       one warp per output row, 8 rows of x per pass: W is read once per
//                              8 rows of x, 4 times at batch 32
//   v2  qgemv_v2 (qgemv.cu)    x staged in shared memory, a warp on 4 rows of W and 32 rows of x:
//                              128 accumulators a thread (~240 registers, 8 warps per SM), N / 32
//                              blocks (27 to 128 for the stories matrices, on 132 SMs), and an
//                              RMSNorm prologue that reduces one row of x after another, each
//                              with two barriers
//
// At 32 rows the work is small (stories110M's w13: 100 M FMAs, ~3 us at the FMA peak) and v1 and
// v2 took 40 to 70 us: their grids are too small, a warp's work too long. v3:
//
//   - x rows in shared memory, each W float4 read once from global memory for all ROWS rows.
//     A warp owns NR rows of W and ROWS rows of x, NR * ROWS = 32 or 64 accumulators a thread;
//     its lanes walk k, a float4 each, so its loads of W are 512 contiguous bytes and its
//     reads of x from shared memory are conflict-free. The package launches one tile shape,
//     8 rows of x by 4 of W (kernels.GEMV_V3_TILES), 32 rows of x as four blocks: the step
//     waits on memory (Nsight Compute: 2 to 4 warps a scheduler with 64 accumulators, one or
//     two blocks an SM), and 32 accumulators fit three blocks an SM, each with less x to
//     stage and less work in its chain. Measured against 8 x 8, 16 x 4 and 32 x 2 (64
//     accumulators), 32 x 1 and 16 x 2 by kernels/dev/ab_f32tiles.py: docs/kernels.md;
//   - a block is 8 warps, 8 NR rows of W (a "tile"); blockIdx.y takes the next ROWS rows of x.
//     A tall matrix (the classifier: 1000 tiles) gets a grid of what fits on the GPU at once,
//     each block walking tiles blockIdx.x, + gridDim.x, ..: where its slice of x fits shared
//     memory whole it is staged once for all of them, not once per tile;
//   - split-K across blocks (blockIdx.z, S slices of k) where N gives too few tiles to cover
//     the SMs (stories' wo and w2: N = 288 or 768). Each block writes its partial sums to a
//     workspace; the last block of a tile to finish (an atomic counter) adds the S partials
//     in the order s = 0, 1, .., S - 1 and writes y: the same sum whichever block is last, so
//     the result is deterministic. It then sets the counter back to 0 for the next launch
//     (a CUDA graph replays the same workspace and counters);
//   - the RMSNorm prologue computes its ROWS inverse RMSs with all 8 warps at once (a warp per
//     row, float4 loads), not one row after another.
//
// Arithmetic: float32 FMAs of x (after the prologue, with model.py's formulas) by W, in k order
// per lane, then a fixed tree over lanes, warps' slices and S. tests/test_cuda.py checks it
// against float64 (1e-5 relative). Needs K % 4 == 0 and 16-byte aligned x, W and norm (float4
// loads); kernels.gemv sends everything else to v1. Compiled after qgemv.cu (its warp sums).

// Blocks an SM, by registers (kernels.gemv_v3_blocks_per_sm sizes the grid by the same rule):
// with 64 accumulators two with ROWS 32 (at most 128 registers a thread), one with more rows of
// W per warp (~190 registers, 8 NR float4 loads); with 32 accumulators three (at most 80).
// At 80, ptxas -v (kernels/dev/nvrtc_build.py) reports spills for 8 x 4: with no prologue and
// with SwiGLU three accumulators live in local memory through the k loop (SASS, CUDA 13 NVRTC:
// 4 local loads and 3 stores a pass of two float4 steps, beside 8 LDG.128, 16 LDS.128 and 256
// FFMA), with RMSNorm only outside it. The A/B that chose the tile ran with them.
template <int ROWS, int NR>
__host__ __device__ constexpr int gemv_v3_min_blocks() { return NR * ROWS == 32 ? 3 : ROWS == 32 ? 2 : 1; }

template <int ROWS, int NR, int PRO>
__global__ void __launch_bounds__(256, (gemv_v3_min_blocks<ROWS, NR>()))
gemv_v3(const float* __restrict__ X, const float* __restrict__ W, float* __restrict__ Y,
        int M, int N, int K, int accumulate, const float* __restrict__ norm_w, float eps,
        int kc, float* __restrict__ partial, int* __restrict__ counters) {
    constexpr int V = NR * ROWS, WARPS = 8, TILE = WARPS * NR;
    static_assert(V == 64 || V == 32, "a warp holds 32 or 64 accumulators: rounds of qgemv_warp_sums<32>");
    extern __shared__ float4 gemv_v3_xs[];                 // (ROWS, kc / 4): x after the prologue
    __shared__ float inv_rms_s[ROWS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, m0 = blockIdx.y * ROWS;
    const int S = gridDim.z, s = blockIdx.z;
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K;        // row length of X
    const int K4 = K / 4, per = (K4 + S - 1) / S;          // float4s of k: all, and per slice
    const int kb = s * per, ke = min(K4, kb + per);        // this block's slice [kb, ke)
    grid_launch_dependents();
    grid_dependency_wait();                                // (reduce.cu) x is the last kernel's

    if (PRO == GEMV_RMSNORM) {            // warp w: rows w, w + 8, ..: 1 / sqrt(mean(x^2) + eps)
        // reduce.cu's thread_sum_squares, a warp on a row: float4 loads in flight, through L2
        // (__ldcg), each summed (x^2 + y^2) + (z^2 + w^2); the float32 sum goes in another order
        // than model.py's, within tests/test_cuda.py's 1e-5 of float64
        for (int r = warp; r < ROWS; r += WARPS) {
            float ss = m0 + r < M ? thread_sum_squares(X + (size_t)(m0 + r) * ldx, K, lane, 32)
                                  : 0.0f;
            ss = warp_sum(ss);
            if (lane == 0) inv_rms_s[r] = 1.0f / sqrtf(ss / K + eps);
        }
        __syncthreads();
    }

    const int kc4 = kc / 4, tiles = (N + TILE - 1) / TILE;
    const bool resident = ke - kb <= kc4;                  // the slice in one chunk: staged once
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {     // tiles of 8 NR rows of W
        const int n0 = tile * TILE + warp * NR;
        // the warp's rows of W, n0 .. n0 + NR - 1 (those past N read as zeros, never written)
        const float4* w4 = reinterpret_cast<const float4*>(W) + (size_t)min(n0, N - 1) * K4;
        float acc[V];                                  // acc[j * ROWS + r]: y[m0 + r, n0 + j]
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0.0f;

        for (int c0 = kb; c0 < ke; c0 += kc4) {                // chunks of the slice that fit smem
            const int len = min(kc4, ke - c0);
            if (!resident || tile == blockIdx.x) {             // (the same for the whole block)
                __syncthreads();                               // the last chunk's readers are done
#pragma unroll 4
                for (int i = threadIdx.x; i < ROWS * len; i += blockDim.x) {   // loads in flight
                    const int r = i / len, k4 = i % len;
                    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    if (m0 + r < M)
                        v = gemv_x4<PRO>(X + (size_t)(m0 + r) * ldx, c0 + k4, K, norm_w,
                                         PRO == GEMV_RMSNORM ? inv_rms_s[r] : 1.0f);
                    gemv_v3_xs[r * len + k4] = v;
                }
                __syncthreads();
            }
            if (n0 < N) {
#pragma unroll 2
                for (int k4 = lane; k4 < len; k4 += 32) {
                    float4 wv[NR];
#pragma unroll
                    for (int j = 0; j < NR; ++j)
                        wv[j] = n0 + j < N ? __ldg(w4 + (size_t)j * K4 + c0 + k4)
                                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const float4 xv = gemv_v3_xs[r * len + k4];
#pragma unroll
                        for (int j = 0; j < NR; ++j) {
                            float& a = acc[j * ROWS + r];
                            a = fmaf(wv[j].x, xv.x, a);
                            a = fmaf(wv[j].y, xv.y, a);
                            a = fmaf(wv[j].z, xv.z, a);
                            a = fmaf(wv[j].w, xv.w, a);
                        }
                    }
                }
            }
        }

        // the V sums over the warp, 32 at a time: lane l ends with value g * 32 + l
#pragma unroll
        for (int g = 0; g < V / 32; ++g) {
            float part[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) part[i] = acc[g * 32 + i];
            const float mine = qgemv_warp_sums<32>(part);
            const int idx = g * 32 + lane, j = idx / ROWS, r = idx % ROWS;
            const int m = m0 + r, n = n0 + j;
            if (m < M && n < N) {
                if (S == 1) {
                    float* y = Y + (size_t)m * N + n;
                    *y = accumulate ? *y + mine : mine;
                } else {
                    partial[((size_t)s * M + m) * N + n] = mine;
                }
            }
        }
    }                                                      // next tile
    if (S == 1) return;

    // split-K (one tile per block: kernels.py launches gridDim.x = tiles where S > 1): the
    // last block of this tile to arrive adds the S slices, in slice order (reduce.cu)
    if (!split_last_block(counters + blockIdx.y * gridDim.x + blockIdx.x, S)) return;
    for (int i = threadIdx.x; i < ROWS * TILE; i += blockDim.x) {
        const int m = m0 + i / TILE, n = blockIdx.x * TILE + i % TILE;
        if (m >= M || n >= N) continue;
        float total = 0.0f;
        for (int t = 0; t < S; ++t) total += __ldcg(partial + ((size_t)t * M + m) * N + n);
        float* y = Y + (size_t)m * N + n;
        *y = accumulate ? *y + total : total;
    }
}

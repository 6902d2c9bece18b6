// Matrix products for the model: C = A @ W^T, and the batched products of attention.
//
// A linear layer stores its weight like nn.Linear, row-major W (N, K) = (out, in), and computes
//
//     C[m, n] = sum_k A[m, k] * W[n, k]        A: (M, K) activations, C: (M, N)
//
// Both operands run along k in memory, so no kernel here ever transposes W: each one reads W
// as stored, row n of W being the n-th output's weights.
//
// The SGEMM kernels come in four numbered versions, each correct on its own (tests/test_cuda.py
// checks all four against float64) and timed by `python -m minillama.bench gpu`; the numbers are
// in docs/kernels.md. Version 4 is the one the model uses for prefill and batches; the GEMV
// kernel at the end is the one it uses to decode a token (a few rows of A).
//
//   v1  naive           one thread per C element, reading A and W from global memory
//   v2  tiled           32 x 32 tiles staged in shared memory: each element read once per tile
//   v3  register-blocked  128 x 128 tiles, each thread owns an 8 x 8 block of C in registers
//   v4  v3 + 16-byte loads, a bank-conflict-free thread layout, and double buffering
//
// Every version handles any M, N, K (edges are zero-padded on load and masked on store).
// Compiled as one module after reduce.cu (see minillama/cuda.py).


// ---------------------------------------------------------------------------------------------
// v1: naive. Thread (m, n) walks the whole k axis.
//
// Per multiply-add it loads two floats from global memory: 8 bytes per 2 FLOP, so it is bound by
// memory traffic long before arithmetic. Worse, the 32 threads of a warp have consecutive n, so
// they read W[n, k] for 32 rows n that are K floats apart: 32 separate memory sectors for one
// warp-wide load (uncoalesced). A[m, k] is the same address for the whole warp (a broadcast).

extern "C" __global__ void sgemm_v1_naive(const float* __restrict__ A, const float* __restrict__ W,
                                          float* __restrict__ C, int M, int N, int K) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const int m = blockIdx.y * blockDim.y + threadIdx.y;
    if (m >= M || n >= N) return;
    const float* a = A + (size_t)m * K;
    const float* w = W + (size_t)n * K;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += a[k] * w[k];
    C[(size_t)m * N + n] = acc;
}


// ---------------------------------------------------------------------------------------------
// v2: shared-memory tiles. A 32 x 32 block of threads computes a 32 x 32 tile of C:
//
//               k0 .. k0+31                          k0 .. k0+31
//           +---------------+                    +---------------+
//   m0..+31 |  As (32x32)   |            n0..+31 |  Ws (32x32)   |
//           +---------------+                    +---------------+
//                 A                                     W
//
//   C[m0 + ty, n0 + tx] += sum_k As[ty][k] * Ws[tx][k]    for each k-tile
//
// Each tile element is loaded from global memory once and then read 32 times from shared memory,
// so global traffic drops 32x. Threads with consecutive tx load consecutive k: coalesced.
// The +1 column of padding puts Ws[tx][k] for tx = 0..31 in 32 different banks (row stride 33
// words); without it all 32 threads would hit the same bank and serialize.

#define V2_TILE 32

extern "C" __global__ void sgemm_v2_tiled(const float* __restrict__ A, const float* __restrict__ W,
                                          float* __restrict__ C, int M, int N, int K) {
    __shared__ float As[V2_TILE][V2_TILE + 1];     // As[m][k]
    __shared__ float Ws[V2_TILE][V2_TILE + 1];     // Ws[n][k]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int m = blockIdx.y * V2_TILE + ty;       // the C element this thread computes
    const int n = blockIdx.x * V2_TILE + tx;
    const int w_row = blockIdx.x * V2_TILE + ty;   // the W row this thread helps load
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += V2_TILE) {
        const int k = k0 + tx;
        As[ty][tx] = (m < M && k < K) ? A[(size_t)m * K + k] : 0.0f;
        Ws[ty][tx] = (w_row < N && k < K) ? W[(size_t)w_row * K + k] : 0.0f;
        __syncthreads();                           // the tile is complete
#pragma unroll
        for (int kk = 0; kk < V2_TILE; ++kk) acc += As[ty][kk] * Ws[tx][kk];
        __syncthreads();                           // everyone is done before it is overwritten
    }
    if (m < M && n < N) C[(size_t)m * N + n] = acc;
}


// ---------------------------------------------------------------------------------------------
// v3: register blocking. v2 still does one shared-memory load per multiply-add (As is a
// broadcast, Ws is not). Here a block of 256 threads computes a 128 x 128 tile of C, and each
// thread an 8 x 8 sub-block of it, held in 64 registers:
//
//     for each k in the tile:   a[0..7] = As[k][rows],  b[0..7] = Ws[k][cols]     16 loads
//                               acc[i][j] += a[i] * b[j]                          64 FMAs
//
// an outer product: 4 FMAs per shared-memory load instead of 1. The tiles are stored transposed
// (As[k][m], Ws[k][n]) so a thread's 8 consecutive rows are 8 consecutive words. Each 128 x 8
// tile is 1024 floats, 4 per thread; consecutive threads load consecutive k of one row.
// Global traffic per FLOP falls with the tile size: each loaded float now feeds 128 FMAs.

#define V3_BM 128
#define V3_BN 128
#define V3_BK 8
#define V3_TM 8
#define V3_TN 8

extern "C" __global__ void __launch_bounds__(256)
sgemm_v3_regblock(const float* __restrict__ A, const float* __restrict__ W,
                  float* __restrict__ C, int M, int N, int K) {
    // Padding rows to 132 words spreads the transposed stores over all 32 banks.
    __shared__ float As[V3_BK][V3_BM + 4];
    __shared__ float Ws[V3_BK][V3_BN + 4];
    const int tid = threadIdx.x;
    const int tx = tid % (V3_BN / V3_TN), ty = tid / (V3_BN / V3_TN);     // 16 x 16 threads
    const int m0 = blockIdx.y * V3_BM, n0 = blockIdx.x * V3_BN;

    float acc[V3_TM][V3_TN];
#pragma unroll
    for (int i = 0; i < V3_TM; ++i)
#pragma unroll
        for (int j = 0; j < V3_TN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += V3_BK) {
#pragma unroll
        for (int l = 0; l < V3_BM * V3_BK / 256; ++l) {
            const int idx = tid + l * 256, r = idx / V3_BK, k = idx % V3_BK;
            As[k][r] = (m0 + r < M && k0 + k < K) ? A[(size_t)(m0 + r) * K + k0 + k] : 0.0f;
            Ws[k][r] = (n0 + r < N && k0 + k < K) ? W[(size_t)(n0 + r) * K + k0 + k] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < V3_BK; ++k) {
            float a[V3_TM], b[V3_TN];
#pragma unroll
            for (int i = 0; i < V3_TM; ++i) a[i] = As[k][ty * V3_TM + i];
#pragma unroll
            for (int j = 0; j < V3_TN; ++j) b[j] = Ws[k][tx * V3_TN + j];
#pragma unroll
            for (int i = 0; i < V3_TM; ++i)
#pragma unroll
                for (int j = 0; j < V3_TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < V3_TM; ++i) {
        const int m = m0 + ty * V3_TM + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < V3_TN; ++j) {
            const int n = n0 + tx * V3_TN + j;
            if (n < N) C[(size_t)m * N + n] = acc[i][j];
        }
    }
}


// ---------------------------------------------------------------------------------------------
// v4: what v3 leaves on the table.
//
// 1. Wide loads. With VEC (K and N multiples of 4, 16-byte aligned pointers) every global load
//    and store moves a float4: a quarter of the instructions. The general case (VEC = false)
//    reads the same float4 element by element, with bounds checks.
// 2. Conflict-free fragment reads. In v3 thread tx reads Ws[k][8 tx .. 8 tx + 7]: the 16 tx of
//    a warp hit addresses 8 words apart, four threads to a bank. Here a thread's 8 columns are
//    two groups of 4, 4 TX words apart:
//
//        cols of thread tx:  4 tx .. 4 tx + 3   and   4 TX + 4 tx .. 4 TX + 4 tx + 3
//
//    so a warp's float4 reads of one group cover one contiguous run of words (likewise rows).
// 3. Double buffering. Two shared-memory tiles: while the block multiplies tile t, the next
//    tile's global loads are in flight into registers; they are stored to the other buffer after
//    the math, and one barrier per tile separates the phases.
//
//            load t+1 -> regs    |  FMAs on smem[t % 2]  |  regs -> smem[(t+1) % 2]  | sync
//
// Template parameters: block tile BM x BN x BK, thread tile TM x TN (multiples of 4),
// MIN_BLOCKS resident blocks per SM asked of the register allocator, VEC as above.

template <bool VEC>
__device__ __forceinline__ float4 load_k4(const float* __restrict__ X, int row, int rows, int k,
                                          int K) {
    // X[row, k .. k+3] of a (rows, K) row-major matrix; zeros outside it.
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (row >= rows) return v;
    const float* p = X + (size_t)row * K + k;
    if (VEC) {
        if (k < K) v = *reinterpret_cast<const float4*>(p);     // K % 4 == 0: all 4 or none
    } else {
        if (k + 0 < K) v.x = p[0];
        if (k + 1 < K) v.y = p[1];
        if (k + 2 < K) v.z = p[2];
        if (k + 3 < K) v.w = p[3];
    }
    return v;
}

template <int BM, int BN, int BK, int TM, int TN, int MIN_BLOCKS, bool VEC>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), MIN_BLOCKS)
sgemm_v4(const float* __restrict__ A, const float* __restrict__ W, float* __restrict__ C,
         int M, int N, int K) {
    constexpr int TX = BN / TN, TY = BM / TM, THREADS = TX * TY;
    constexpr int KQ = BK / 4;                                  // float4s along k per tile row
    constexpr int A_LOADS = (BM * KQ + THREADS - 1) / THREADS;  // float4 loads per thread
    constexpr int W_LOADS = (BN * KQ + THREADS - 1) / THREADS;
    static_assert(TM % 4 == 0 && TN % 4 == 0 && BK % 4 == 0, "tiles are made of float4s");

    __shared__ __align__(16) float As[2][BK][BM + 4];          // As[buf][k][m]
    __shared__ __align__(16) float Ws[2][BK][BN + 4];          // Ws[buf][k][n]

    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    float4 a_reg[A_LOADS], w_reg[W_LOADS];                      // the next tile, in flight
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    // Load the (BM x BK) tile of A and the (BN x BK) tile of W at k0 into registers.
    auto load_tiles = [&](int k0) {
#pragma unroll
        for (int l = 0; l < A_LOADS; ++l) {
            const int idx = tid + l * THREADS, r = idx / KQ, kq = (idx % KQ) * 4;
            a_reg[l] = idx < BM * KQ ? load_k4<VEC>(A, m0 + r, M, k0 + kq, K)
                                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int l = 0; l < W_LOADS; ++l) {
            const int idx = tid + l * THREADS, r = idx / KQ, kq = (idx % KQ) * 4;
            w_reg[l] = idx < BN * KQ ? load_k4<VEC>(W, n0 + r, N, k0 + kq, K)
                                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    };
    // Store them transposed into shared-memory buffer `buf`.
    auto store_tiles = [&](int buf) {
#pragma unroll
        for (int l = 0; l < A_LOADS; ++l) {
            const int idx = tid + l * THREADS, r = idx / KQ, kq = (idx % KQ) * 4;
            if (idx < BM * KQ) {
                As[buf][kq + 0][r] = a_reg[l].x;
                As[buf][kq + 1][r] = a_reg[l].y;
                As[buf][kq + 2][r] = a_reg[l].z;
                As[buf][kq + 3][r] = a_reg[l].w;
            }
        }
#pragma unroll
        for (int l = 0; l < W_LOADS; ++l) {
            const int idx = tid + l * THREADS, r = idx / KQ, kq = (idx % KQ) * 4;
            if (idx < BN * KQ) {
                Ws[buf][kq + 0][r] = w_reg[l].x;
                Ws[buf][kq + 1][r] = w_reg[l].y;
                Ws[buf][kq + 2][r] = w_reg[l].z;
                Ws[buf][kq + 3][r] = w_reg[l].w;
            }
        }
    };

    const int n_tiles = (K + BK - 1) / BK;
    load_tiles(0);
    store_tiles(0);
    __syncthreads();
    for (int t = 0; t < n_tiles; ++t) {
        const int buf = t & 1;
        if (t + 1 < n_tiles) load_tiles((t + 1) * BK);         // global loads fly during the FMAs
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM / 4; ++i) {
                const float4 v = *reinterpret_cast<const float4*>(&As[buf][k][i * TY * 4 + ty * 4]);
                a[4 * i + 0] = v.x; a[4 * i + 1] = v.y; a[4 * i + 2] = v.z; a[4 * i + 3] = v.w;
            }
#pragma unroll
            for (int j = 0; j < TN / 4; ++j) {
                const float4 v = *reinterpret_cast<const float4*>(&Ws[buf][k][j * TX * 4 + tx * 4]);
                b[4 * j + 0] = v.x; b[4 * j + 1] = v.y; b[4 * j + 2] = v.z; b[4 * j + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        if (t + 1 < n_tiles) store_tiles(buf ^ 1);   // the other buffer: nobody reads it now
        __syncthreads();
    }

    // Each thread writes its 8 x 8 (TM x TN) block as float4s: rows (i / 4) * 4 TY + 4 ty + i % 4.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + (i / 4) * TY * 4 + ty * 4 + i % 4;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN / 4; ++j) {
            const int n = n0 + j * TX * 4 + tx * 4;
            float* c = C + (size_t)m * N + n;
            const float4 v = make_float4(acc[i][4 * j], acc[i][4 * j + 1], acc[i][4 * j + 2],
                                         acc[i][4 * j + 3]);
            if (VEC) {
                if (n < N) *reinterpret_cast<float4*>(c) = v;   // N % 4 == 0: all 4 or none
            } else {
                if (n + 0 < N) c[0] = v.x;
                if (n + 1 < N) c[1] = v.y;
                if (n + 2 < N) c[2] = v.z;
                if (n + 3 < N) c[3] = v.w;
            }
        }
    }
}


// ---------------------------------------------------------------------------------------------
// GEMV: y[m, n] = sum_k x[m, k] W[n, k] for a few rows m (decoding one token per sequence).
//
// With 1..8 rows of x there is almost no reuse of W: every weight is read once and used ROWS
// times, so the kernel is bound by how fast it streams W from memory. One warp per output n:
//
//     lane l reads W[n, 4l .. 4l+3], W[n, 128 + 4l ..], ...   (a float4 per lane, 512 bytes per
//                                                              warp-wide load: fully coalesced)
//     and the matching float4 of each row of x (small, and cached after the first warp)
//
// then the 32 partial sums are folded with warp shuffles (reduce.cu); lane r writes row r.
// Unrolling the k loop keeps several 16-byte loads per lane in flight, which is what it takes to
// saturate HBM. `accumulate` adds into y instead of overwriting it (the residual connection).
// ROWS rows of x per warp; blockIdx.y picks which ROWS rows, for batches larger than ROWS.
// A small matrix (N of a few hundred) has too few rows to keep HBM busy with one warp each, so
// `ksplit` warps share a row, each summing a slice of k.
//
// Prologues. Decoding a token, the step before each matmul is small (a norm, a gate) but costs
// a launch of its own. PRO fuses it into the loads of x instead, so the GEMV reads what the
// step would have written:
//
//     GEMV_PLAIN     x[m, k]
//     GEMV_RMSNORM   x[m, k] * inv_rms[m] * norm_w[k]       model.rms_norm; each block first
//                    reduces its rows of x for inv_rms = 1 / sqrt(mean(x^2) + eps)
//     GEMV_SWIGLU    silu(x[m, k]) * x[m, K + k]            model.FeedForward's gate; rows of x
//                    hold [h1 | h3] from the w13 matmul, so they are 2K long
//
// with the float32 operations in model.py's order, so the product sees the same values.

#define GEMV_PLAIN 0
#define GEMV_RMSNORM 1
#define GEMV_SWIGLU 2

__device__ __forceinline__ float silu(float x) { return x * (0.5f + 0.5f * tanhf(0.5f * x)); }

// x[m, k] after the prologue; xr points at row m.
template <int PRO>
__device__ __forceinline__ float gemv_x(const float* __restrict__ xr, int k, int K,
                                        const float* __restrict__ norm_w, float inv_rms) {
    const float x = __ldg(xr + k);
    if (PRO == GEMV_RMSNORM) return x * inv_rms * __ldg(norm_w + k);
    if (PRO == GEMV_SWIGLU) return silu(x) * __ldg(xr + K + k);
    return x;
}

// The same for x[m, 4 k4 .. 4 k4 + 3], one float4 (K % 4 == 0, aligned rows).
template <int PRO>
__device__ __forceinline__ float4 gemv_x4(const float* __restrict__ xr, int k4, int K,
                                          const float* __restrict__ norm_w, float inv_rms) {
    float4 x = __ldg(reinterpret_cast<const float4*>(xr) + k4);
    if (PRO == GEMV_RMSNORM) {
        const float4 g = __ldg(reinterpret_cast<const float4*>(norm_w) + k4);
        x = make_float4(x.x * inv_rms * g.x, x.y * inv_rms * g.y, x.z * inv_rms * g.z,
                        x.w * inv_rms * g.w);
    } else if (PRO == GEMV_SWIGLU) {
        const float4 u = __ldg(reinterpret_cast<const float4*>(xr + K) + k4);
        x = make_float4(silu(x.x) * u.x, silu(x.y) * u.y, silu(x.z) * u.z, silu(x.w) * u.w);
    }
    return x;
}

template <int ROWS, bool VEC, int PRO>
__global__ void __launch_bounds__(256)
gemv(const float* __restrict__ X, const float* __restrict__ W, float* __restrict__ Y,
     int M, int N, int K, int accumulate, const float* __restrict__ norm_w, float eps,
     int ksplit) {
    // A block is 8 warps. Each output row n gets `ksplit` of them, which take interleaved
    // 128-float slices of k, so a small matrix still gives the GPU enough loads in flight;
    // their partial sums meet in shared memory, added in a fixed order (deterministic).
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slice = warp % ksplit;
    const int n = blockIdx.x * (blockDim.x / 32 / ksplit) + warp / ksplit;
    const int m0 = blockIdx.y * ROWS;
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K;        // row length of X
    const bool active = n < N;                          // idle warps still reach the barriers
    __shared__ float partial[8][ROWS];

    float inv_rms[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) inv_rms[r] = 1.0f;
    if (PRO == GEMV_RMSNORM) {        // every block reduces its rows of x, all ROWS at once
        __shared__ float sums[8][ROWS];                 // per warp, per row
        float ss[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            ss[r] = 0.0f;
            if (m0 + r < M)
                for (int k = threadIdx.x; k < K; k += blockDim.x) {
                    const float v = X[(size_t)(m0 + r) * ldx + k];
                    ss[r] += v * v;
                }
            ss[r] = warp_sum(ss[r]);
        }
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sums[warp][r] = ss[r];
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float total = 0.0f;
            for (int i = 0; i < blockDim.x / 32; ++i) total += sums[i][r];
            inv_rms[r] = 1.0f / sqrtf(total / K + eps);
        }
    }
    const float* w = W + (size_t)n * K;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;

    if (active && VEC) {                                // K % 4 == 0, 16-byte aligned rows
        const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll 4
        for (int k4 = slice * 32 + lane; k4 < K / 4; k4 += 32 * ksplit) {
            const float4 wv = __ldg(w4 + k4);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (m0 + r < M) {
                    const float4 xv =
                        gemv_x4<PRO>(X + (size_t)(m0 + r) * ldx, k4, K, norm_w, inv_rms[r]);
                    acc[r] = fmaf(wv.x, xv.x, acc[r]);
                    acc[r] = fmaf(wv.y, xv.y, acc[r]);
                    acc[r] = fmaf(wv.z, xv.z, acc[r]);
                    acc[r] = fmaf(wv.w, xv.w, acc[r]);
                }
            }
        }
    } else if (active) {
        for (int k = slice * 32 + lane; k < K; k += 32 * ksplit) {
            const float wv = __ldg(w + k);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                if (m0 + r < M)
                    acc[r] = fmaf(wv, gemv_x<PRO>(X + (size_t)(m0 + r) * ldx, k, K, norm_w,
                                                  inv_rms[r]), acc[r]);
        }
    }

    float mine = 0.0f;                                  // lane r keeps row r's total
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float total = warp_sum(acc[r]);
        if (lane == r) mine = total;
    }
    if (ksplit > 1) {                                   // add the slices: warp `slice 0` does
        if (lane < ROWS) partial[warp][lane] = mine;
        __syncthreads();
        if (slice == 0 && lane < ROWS)
            for (int s = 1; s < ksplit; ++s) mine += partial[warp + s][lane];
    }
    if (active && slice == 0 && lane < ROWS && m0 + lane < M) {
        float* y = Y + (size_t)(m0 + lane) * N + n;
        *y = accumulate ? *y + mine : mine;
    }
}


// ---------------------------------------------------------------------------------------------
// Batched product with arbitrary strides, for attention:
//
//     C[z0, z1] = A[z0, z1] @ B[z0, z1]        A: (M, K), B: (K, N), C: (M, N) contiguous
//
// The keys and values are strided views of the KV cache (bsz, seq, n_kv_heads, head_dim), read
// in place: scores = q @ keys with keys[k = d, n = t] at cache_k[b, t, g, d], and out =
// probs @ values. The shapes are small (K = head_dim), so this is v2's tiling with 16 x 16
// tiles and element strides instead of row lengths. Two batch dims cover (bsz, n_kv_heads);
// blockIdx.z = z0 * Z1 + z1.

#define BMM_TILE 16

extern "C" __global__ void bmm_strided(const float* __restrict__ A, const float* __restrict__ B,
                                       float* __restrict__ C, int M, int N, int K, int Z1,
                                       long long sa0, long long sa1, long long sam, long long sak,
                                       long long sb0, long long sb1, long long sbk, long long sbn) {
    __shared__ float As[BMM_TILE][BMM_TILE + 1];   // As[m][k]
    __shared__ float Bs[BMM_TILE][BMM_TILE + 1];   // Bs[k][n]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int z0 = blockIdx.z / Z1, z1 = blockIdx.z % Z1;
    A += z0 * sa0 + z1 * sa1;
    B += z0 * sb0 + z1 * sb1;
    C += (size_t)blockIdx.z * M * N;
    const int m = blockIdx.y * BMM_TILE + ty, n = blockIdx.x * BMM_TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += BMM_TILE) {
        As[ty][tx] = (m < M && k0 + tx < K) ? A[m * sam + (k0 + tx) * sak] : 0.0f;
        Bs[ty][tx] = (k0 + ty < K && n < N) ? B[(k0 + ty) * sbk + n * sbn] : 0.0f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BMM_TILE; ++kk) acc += As[ty][kk] * Bs[kk][tx];
        __syncthreads();
    }
    if (m < M && n < N) C[(size_t)m * N + n] = acc;
}

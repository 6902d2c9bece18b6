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
//   v5  tensor cores (mma.sync): float16/bfloat16 operands, float32 accumulation, cp.async
//       pipeline; weights may be packed (Q8_0/Q4_0/Q4_1), dequantized into shared memory
//   v6  v5 with 64 x 64 warp tiles, fragments double-buffered in registers, one barrier per
//       k-tile, an L2-friendly tile order and C stored through shared memory
//   v7  Hopper's wgmma: warpgroups multiply straight from shared memory, asynchronously
//       (v5's weight formats; compiled for sm_90a: compute capability 9.0 only)
//
// v1..v4 handle any M, N, K (edges are zero-padded on load and masked on store); v5, v6, v7 any
// M, N and K % 8 == 0 (K % 32 == 0 for packed weights).
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
// v5: tensor cores. float16 / bfloat16 inputs, float32 accumulation, and weights that may be
// packed (Q8_0, Q4_0, Q4_1), dequantized into the shared-memory tile on the way in.
//
// What changes from v4. v4's inner step is an outer product on the FMA units: per k, a thread
// multiplies 8 values of A by 8 of W into its 64 accumulators. A tensor core does a whole small
// matrix product as one warp-wide instruction:
//
//     mma.sync.m16n8k16:   D (16 x 8, f32) = A (16 x 16, f16) * B (16 x 8, f16) + C (16 x 8, f32)
//
// 4096 multiply-adds per instruction, issued by one warp: on an H100/H200 about 16 times the
// float32 FMA rate. Everything else in the kernel exists to feed it: the operands are 16-bit (half
// the bytes of v4's floats), and each thread holds its share of A, B and C in registers in a
// fixed "fragment" layout. With g = lane / 4 and t = lane % 4 (8 groups of 4 lanes):
//
//     A (16 x 16, row-major):  a0 = A[g][2t, 2t+1]      a1 = A[g+8][2t, 2t+1]
//                              a2 = A[g][2t+8, 2t+9]    a3 = A[g+8][2t+8, 2t+9]
//     B (16 x 8, k x n):       b0 = B[2t, 2t+1][g]      b1 = B[2t+8, 2t+9][g]
//     C, D (16 x 8):           c0, c1 = C[g][2t, 2t+1]  c2, c3 = C[g+8][2t, 2t+1]
//
// (each aN, bN is one 32-bit register holding two 16-bit values). Since B[k][n] = W[n][k], a row
// of W in memory is a column of B, and "B column-major" (`.col`) is exactly W as stored: still
// no transpose. The fragments come out of shared memory with `ldmatrix`, which loads four 8 x 8
// tiles of 16-bit values in one instruction, each lane giving the address of one 16-byte row and
// receiving the pieces of the fragment layout above:
//
//     A fragment:  lanes 0-15 point at rows 0-15, k 0-7; lanes 16-31 at rows 0-15, k 8-15
//     B, two n-fragments at once: lanes 0-7 rows n 0-7 k 0-7, 8-15 rows 0-7 k 8-15,
//                                 16-23 rows 8-15 k 0-7, 24-31 rows 8-15 k 8-15
//
// Tiles: a block of 8 warps computes BM x BN of C (128 x 128 or 128 x 256), a 2 x 4 grid of warp
// tiles; a warp tile of 64 x 32 is 4 x 4 mma's per k-step of 16 (64 x 64: 4 x 8). BK = 32, so a
// tile row is 64 bytes, and one k-tile of a packed row is exactly one GGUF block.
//
// Shared memory and the pipeline. Global -> shared copies use `cp.async` (16 bytes per thread,
// straight from memory into shared memory, no registers), in STAGES buffers: while the tensor
// cores work on tile t, the copies of tiles t+1 .. t+STAGES-1 are in flight. `cp.async.wait_group`
// says when one has landed. A 64-byte row would put the 8 rows that one ldmatrix reads on the
// same 4 banks (two rows per 128 bytes), so the 16-byte chunks of a row are swizzled: chunk kc of
// row r is stored at position kc ^ ((r / 2) % 4), which spreads any 8 consecutive rows over all 32
// banks (see v5_swizzle).
//
// Packed weights cannot be copied as they are: the tensor cores want 16-bit values. Each k-tile
// of W is one block per row, so the loader reads the 16 (q4) or 32 (q8) bytes of codes and the
// float16 scale of each row into registers (issued a whole tile ahead, so their latency hides
// behind the math), unpacks them with the magic-number tricks of qgemv.cu, multiplies by the scale
// in float16x2 (one rounding, as Marlin and llama.cpp do), and stores the float16 tile into the
// same swizzled buffer. From there on the kernel is the float16 one.
//
// Activations are float32 in the model: f32_to_16bit converts them first (round to nearest).
// The tensor cores multiply 16-bit inputs exactly and add in float32, so the result matches
// float64 of the rounded inputs to ~1e-6; the rounding of the inputs themselves (~5e-4 relative
// per value for float16, 4e-3 for bfloat16) is the price, which is why decoding keeps the float32
// GEMV and the tensor cores are for prompts and batches.
//
// Template: BM x BN block tile, STAGES buffers, WF the weight format (V5_F16 ... V5_Q4_1; the
// packed ones take float16 A). Needs K % 8 == 0 (16-byte rows; K % 32 == 0 for packed W) and
// 16-byte aligned A and W; any M, N (out-of-range rows are zero-filled, stores masked).
// Dynamic shared memory: STAGES * (BM + BN) * 64 bytes.

// 16-bit numbers in PTX, so no header is needed (NVRTC compiles this without cuda_fp16.h).
// A 32-bit register holds two of them, "half2": the low 16 bits are the first value.
__device__ __forceinline__ float f16_lo(unsigned int h2) {
    float f;
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tcvt.f32.f16 %0, l;}" : "=f"(f) : "r"(h2));
    return f;
}

__device__ __forceinline__ float f16_hi(unsigned int h2) {
    float f;
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tcvt.f32.f16 %0, h;}" : "=f"(f) : "r"(h2));
    return f;
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned int f16x2_sub(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ unsigned int f16x2_mul(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ unsigned int f16x2_fma(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Bytes of d picked from the 8 bytes of (b, a): selector nibble i names the source of byte i
// (0-3: a's bytes, 4-7: b's).
__device__ __forceinline__ unsigned int byte_perm(unsigned int a, unsigned int b, unsigned int sel) {
    unsigned int d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// The magic numbers of the nibble tricks (qgemv.cu explains them), as half2 pairs.
#define HALF2_1024 0x64006400u         // (1024, 1024): OR 4 or 8 bits in, get 1024 + bits
#define HALF2_1032 0x64086408u         // 1024 + 8: subtracting it leaves code - 8
#define HALF2_1152 0x64806480u         // 1024 + 128: the bias of a sign-flipped int8
#define HALF2_1_16 0x2C002C00u         // 1/16: a high nibble arrives times 16
#define HALF2_M64 0xD400D400u          // -64 = -1024 / 16
#define HALF2_M72 0xD480D480u          // -72 = -1024 / 16 - 8

// (w & MASK) | OR in one instruction: MASK's bits of w under a magic number (OR: HALF2_1024 here,
// the float 2^23 in qgemv.cu's float32 unpacking). Given the C++, the compiler emits an AND and
// an OR, two LOP3s, because a LOP3 holds one 32-bit immediate; handed PTX's three-input lop3
// (lookup table 0xEA = (a & b) | c), ptxas keeps the other constant in a register, set once.
template <unsigned int MASK, unsigned int OR>
__device__ __forceinline__ unsigned int and_or(unsigned int w) {
    unsigned int d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(MASK), "n"(OR));
    return d;
}

// Two q4 codes of a word as float16x2 (qgemv.cu's trick 3): the low nibbles of bytes 0 and 2
// (q4_low_pair), or their high nibbles, masked where they stand (1024 + 16 code) and brought down
// by one FMA of 1/16 (q4_high_pair); the word shifted by 8 gives bytes 1 and 3. MIN (q4_1): the
// code itself; else (q4_0) code - 8.
template <bool MIN>
__device__ __forceinline__ unsigned int q4_low_pair(unsigned int w) {
    return f16x2_sub(and_or<0x000F000Fu, HALF2_1024>(w), MIN ? HALF2_1024 : HALF2_1032);
}

template <bool MIN>
__device__ __forceinline__ unsigned int q4_high_pair(unsigned int w) {
    return f16x2_fma(and_or<0x00F000F0u, HALF2_1024>(w), HALF2_1_16,
                     MIN ? HALF2_M64 : HALF2_M72);
}

template <bool BF16>
__device__ __forceinline__ unsigned short round_to_16bit(float x) {    // to nearest even
    unsigned short h;
    if (BF16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// y[i] = x[i] rounded to float16 (or bfloat16), 4 per thread; VEC: x 16-byte aligned and
// n % 4 == 0, so each thread reads one float4 and writes 8 bytes. Grid: cdiv(n, 4 * block).
template <bool BF16, bool VEC>
__global__ void f32_to_16bit(const float* __restrict__ x, unsigned short* __restrict__ y,
                             long long n) {
    const long long i = 4 * ((long long)blockIdx.x * blockDim.x + threadIdx.x);
    if (VEC) {
        if (i >= n) return;
        const float4 v = __ldg(reinterpret_cast<const float4*>(x + i));
        const unsigned int lo = round_to_16bit<BF16>(v.x) | ((unsigned int)round_to_16bit<BF16>(v.y) << 16);
        const unsigned int hi = round_to_16bit<BF16>(v.z) | ((unsigned int)round_to_16bit<BF16>(v.w) << 16);
        *reinterpret_cast<uint2*>(y + i) = make_uint2(lo, hi);
    } else {
        for (long long j = i; j < i + 4 && j < n; ++j) y[j] = round_to_16bit<BF16>(x[j]);
    }
}

// Shared memory addresses, asynchronous copies, ldmatrix and mma, in PTX.
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned int a;
    asm("{.reg .u64 t;\n\tcvta.to.shared.u64 t, %1;\n\tcvt.u32.u64 %0, t;}" : "=r"(a) : "l"(p));
    return a;
}

// Copy 16 bytes global -> shared without passing through registers; bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16(unsigned int dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int PENDING>      // wait until at most PENDING committed groups are still in flight
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

__device__ __forceinline__ void st_shared16(unsigned int addr, uint4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w) : "memory");
}

// c (16 x 8, f32) += a (16 x 16) * b (16 x 8), fragments as in the table above
template <bool BF16>
__device__ __forceinline__ void mma_16816(float* c, const unsigned int* a, const unsigned int* b) {
    if (BF16)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Byte offset of 16-byte chunk kc (0..3) of row r in a tile of 64-byte rows, swizzled.
__device__ __forceinline__ unsigned int v5_swizzle(int r, int kc) {
    return r * 64 + ((kc ^ ((r >> 1) & 3)) << 4);
}

#define V5_F16 0
#define V5_BF16 1
#define V5_Q8_0 2
#define V5_Q4_0 3
#define V5_Q4_1 4

// Half h (0: codes 0-15, 1: codes 16-31) of one packed block as float16 weights, in k order:
// out[0] = weights 16h + 0..7, out[1] = 16h + 8..15. q holds the block's 16 bytes (q4) or bytes
// 16h .. 16h + 15 (q8); d2, m2: the scale and min twice, as half2.
template <int WF>
__device__ __forceinline__ void v5_dequant(const uint4& q, int h, unsigned int d2, unsigned int m2,
                                           uint4* out) {
    unsigned int v[8];                      // 8 half2 = 16 weights, pairs (2i, 2i+1)
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        const unsigned int word = w == 0 ? q.x : w == 1 ? q.y : w == 2 ? q.z : q.w;
        unsigned int p01, p23;              // weights (0, 1) and (2, 3) of this word's four
        if (WF == V5_Q8_0) {                // bytes 4w..4w+3 = weights 16h + 4w ..
            const unsigned int u = word ^ 0x80808080u;
            p01 = f16x2_mul(f16x2_sub(byte_perm(u, 0x64646464u, 0x4140), HALF2_1152), d2);
            p23 = f16x2_mul(f16x2_sub(byte_perm(u, 0x64646464u, 0x4342), HALF2_1152), d2);
        } else {                            // q4: nibbles of bytes 4w..4w+3, low (h = 0) or high
            const unsigned int u = byte_perm(word, 0, 0x3120);     // bytes (b0, b2, b1, b3)
            constexpr bool min = WF == V5_Q4_1;
            if (h == 0) {
                p01 = q4_low_pair<min>(u);
                p23 = q4_low_pair<min>(u >> 8);
            } else {
                p01 = q4_high_pair<min>(u);
                p23 = q4_high_pair<min>(u >> 8);
            }
            p01 = min ? f16x2_fma(p01, d2, m2) : f16x2_mul(p01, d2);
            p23 = min ? f16x2_fma(p23, d2, m2) : f16x2_mul(p23, d2);
        }
        v[2 * w] = p01;
        v[2 * w + 1] = p23;
    }
    out[0] = make_uint4(v[0], v[1], v[2], v[3]);
    out[1] = make_uint4(v[4], v[5], v[6], v[7]);
}

// ---- the tile loaders of gemm_v5 and gemm_v6 -------------------------------------------------
// Both kernels lay out a pipeline stage the same way: A's rows of the k-tile (64 bytes each, BK =
// 32 values) at the stage's start, then W's rows, each row's four 16-byte chunks swizzled
// (v5_swizzle). Only the block's thread count and tile origin differ, so they are arguments.

// ROWS rows of a 16-bit matrix X (n_rows x K, row-major) from row r0, k-tile t, into the tile at
// shared address smem + offset, by cp.async: ROWS x 4 chunks of 16 bytes over THREADS threads.
// Rows past n_rows and k past K are zero-filled. Loads A, and a float16/bfloat16 W. (smem and
// offset come apart, and are added to the swizzle in that order, as the kernels did before these
// loaders were shared: with the tile's address summed first, ptxas spilled gemm_v6's float16
// and bfloat16 instances.)
template <int ROWS, int THREADS>
__device__ __forceinline__ void v5_load_tile(unsigned int smem, unsigned int offset,
                                             const unsigned short* X, int r0, int n_rows, int K,
                                             int t, int tid) {
#pragma unroll
    for (int i = 0; i < ROWS * 4 / THREADS; ++i) {
        const int c = tid + i * THREADS, r = c >> 2, kc = c & 3;
        const int row = r0 + r, k = t * 32 + kc * 8;
        const bool ok = row < n_rows && k < K;
        cp_async16(smem + offset + v5_swizzle(r, kc), ok ? X + (size_t)row * K + k : X,
                   ok ? 16 : 0);
    }
}

// A packed W (format WF) in two steps, so its loads fly a whole tile before their values are
// needed: fetch reads block t of rows n0 .. n0 + BN - 1 into registers, as 2 BN items (row,
// half) dealt to THREADS threads; store unpacks them (v5_dequant) into the W tile at shared
// address smem + offset. nb: blocks per row (K / 32).
template <int WF, int BN, int THREADS>
struct V5PackedW {
    static constexpr int ITEMS = 2 * BN / THREADS;    // half-blocks of W per thread per tile
    uint4 q[ITEMS];                                   // codes: the block's 16 bytes (q4), or
    unsigned short d[ITEMS], m[ITEMS];                // the half's 16 (q8); scale, min (Q4_1)

    __device__ __forceinline__ void fetch(const void* __restrict__ Wq,
                                          const unsigned short* __restrict__ Wd,
                                          const unsigned short* __restrict__ Wm, int n0, int N,
                                          int nb, int t, int tid) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int it = tid + i * THREADS, n = n0 + (it >> 1), h = it & 1;
            q[i] = make_uint4(0, 0, 0, 0);
            d[i] = m[i] = 0;
            if (n < N) {
                const size_t blk = (size_t)n * nb + t;
                const uint4* qs = static_cast<const uint4*>(Wq);
                q[i] = __ldg(WF == V5_Q8_0 ? qs + 2 * blk + h : qs + blk);
                d[i] = __ldg(Wd + blk);
                if (WF == V5_Q4_1) m[i] = __ldg(Wm + blk);
            }
        }
    }

    __device__ __forceinline__ void store(unsigned int smem, unsigned int offset, int tid) const {
        const unsigned int base = smem + offset;
        store_at([&](int r, int kc) { return base + v5_swizzle(r, kc); }, tid);
    }

    // The same, into any layout: chunk(r, kc) is the shared address of the 16-byte chunk kc
    // (weights 8 kc .. 8 kc + 7 of the block) of the tile's row r (gemm_v7's 128-byte rows)
    template <class Chunk>
    __device__ __forceinline__ void store_at(Chunk chunk, int tid) const {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int it = tid + i * THREADS, r = it >> 1, h = it & 1;
            uint4 out[2];
            v5_dequant<WF>(q[i], h, d[i] * 0x10001u, m[i] * 0x10001u, out);
            st_shared16(chunk(r, 2 * h), out[0]);
            st_shared16(chunk(r, 2 * h + 1), out[1]);
        }
    }
};

template <int BM, int BN, int STAGES, int WF>
__global__ void __launch_bounds__(256, BN <= 128 ? 2 : 1)
gemm_v5(const unsigned short* __restrict__ A, const void* __restrict__ Wq,
        const unsigned short* __restrict__ Wd, const unsigned short* __restrict__ Wm,
        float* __restrict__ C, int M, int N, int K) {
    constexpr int BK = 32;                              // k per tile: 64-byte rows, one q block
    constexpr int WM = BM / 2, WN = BN / 4;             // 2 x 4 warps
    constexpr int MI = WM / 16, NI = WN / 8;            // mma tiles per warp per k-step
    constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
    constexpr bool BF16 = WF == V5_BF16, PACKED = WF >= V5_Q8_0;
    static_assert(NI % 2 == 0 && BM % 64 == 0 && BN % 128 == 0, "tile shape");
    extern __shared__ __align__(128) unsigned char gemm_v5_smem[];
    const unsigned int smem = smem_addr(gemm_v5_smem);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / 4, wn = warp % 4;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int T = (K + BK - 1) / BK, nb = K / 32;       // k-tiles; blocks per row (packed)

    // The tile loaders (v5_load_tile, V5PackedW): tile t of A, or of a float16/bfloat16 W, into
    // stage s by cp.async; a packed W fetched into registers, then unpacked into stage s
    auto load_a = [&](int s, int t) {
        v5_load_tile<BM, 256>(smem, s * STAGE_BYTES, A, m0, M, K, t, tid);
    };
    auto load_w = [&](int s, int t) {
        v5_load_tile<BN, 256>(smem, s * STAGE_BYTES + A_BYTES,
                              static_cast<const unsigned short*>(Wq), n0, N, K, t, tid);
    };
    V5PackedW<WF, BN, 256> packed_w;
    auto fetch_w = [&](int t) { packed_w.fetch(Wq, Wd, Wm, n0, N, nb, t, tid); };
    auto store_w = [&](int s) { packed_w.store(smem, s * STAGE_BYTES + A_BYTES, tid); };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Prologue: tiles 0 .. STAGES-2 in flight (one commit group each, possibly empty).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < T) {
            load_a(s, s);
            if (PACKED) { fetch_w(s); store_w(s); } else load_w(s, s);
        }
        cp_async_commit();
    }

    for (int t = 0; t < T; ++t) {
        cp_async_wait<STAGES - 2>();          // tile t has landed (this thread's copies)
        __syncthreads();                      // ... everyone's; and everyone is done with t - 1
        const int next = t + STAGES - 1, s_next = next % STAGES;   // the buffer of t - 1
        if (next < T) {
            load_a(s_next, next);
            if (PACKED) fetch_w(next); else load_w(s_next, next);
        }
        cp_async_commit();

        const unsigned int sa = smem + (t % STAGES) * STAGE_BYTES, sw = sa + A_BYTES;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned int a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i)
                ldmatrix_x4(a[i], sa + v5_swizzle(wm * WM + i * 16 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
            for (int j = 0; j < NI; j += 2) {
                unsigned int r[4];
                ldmatrix_x4(r, sw + v5_swizzle(wn * WN + j * 8 + (lane & 7) + ((lane >> 4) << 3),
                                               2 * kk + ((lane >> 3) & 1)));
                b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_16816<BF16>(acc[i][j], a[i], b[j]);
        }
        if (PACKED && next < T) store_w(s_next);   // nobody reads that buffer before tile `next`
    }

    // C fragments -> C: rows g and g + 8, columns 2t and 2t + 1 of each 16 x 8 tile
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int m = m0 + wm * WM + i * 16 + (lane >> 2) + 8 * half;
                const int n = n0 + wn * WN + j * 8 + 2 * (lane & 3);
                const float v0 = acc[i][j][2 * half], v1 = acc[i][j][2 * half + 1];
                if (m >= M) continue;
                float* c = C + (size_t)m * N + n;
                if (N % 2 == 0) {
                    if (n < N) *reinterpret_cast<float2*>(c) = make_float2(v0, v1);
                } else {
                    if (n < N) c[0] = v0;
                    if (n + 1 < N) c[1] = v1;
                }
            }
}


// ---------------------------------------------------------------------------------------------
// v6: v5 rearranged so that the tensor cores wait less. Same operands, same contract (float16 /
// bfloat16 A, W f16, bf16, Q8_0, Q4_0 or Q4_1, float32 C; K % 8 == 0, K % 32 == 0 if packed),
// same 32-wide k-tiles, swizzle, cp.async copies, ldmatrix and mma as v5. Four changes:
//
// 1. Every warp tile is 64 x 64 (4 x 8 mma's per k-step of 16), the block 128 x 256 (2 x 4 warps)
//    or 256 x 128 (4 x 2), or 128 x 128 (2 x 2, two blocks per SM). Per k-step a warp loads 4 A
//    and 4 B fragments (ldmatrix.x4) for 32 mma's, where v5's 64 x 32 loaded 4 + 2 for 16: a
//    quarter fewer shared-memory reads per mma. 128 accumulators per thread, 255 registers (no
//    spills, ptxas -v), so 8 warps per SM: one block of 8, or two of 4.
// 2. Fragments double-buffered in registers: the ldmatrix of k-step kk + 1 is issued before the
//    mma's of k-step kk, so its latency hides behind them, and at the end of a tile the next
//    tile's first fragments are loaded the same way (CUTLASS's multistage main loop). With 8
//    warps per SM (v5: 16) there are few other warps to hide that latency; the registers must.
// 3. One __syncthreads per k-tile, issued right after the mma's of its first k-step (which keep
//    the tensor cores busy while the warps meet there): it says the next tile has landed, and
//    that everyone is done reading the buffer the next cp.async will overwrite. A packed W is
//    read into registers a whole tile before it is unpacked into shared memory.
// 4. Tiles in L2-friendly order, and C through shared memory. Blocks run in launch order; v5's
//    row-major grid makes one wave read a few rows of A and all of W. Here the grid is 1-D and
//    block b takes tile (v6_tile): V6_GROUP tile-rows at a time, column by column, so a wave
//    touches a square-ish patch of C and re-reads its A and W rows from L2. At the end each warp
//    writes its 64 x 64 float32 tile to shared memory, 32 rows at a time (fragment layout in,
//    rows out: a row stride of 72 floats keeps both sides free of bank conflicts), and stores
//    whole rows, 16 bytes per lane, 256 contiguous bytes per half warp.
//
// Template: BM x BN (128 x 256, 256 x 128 or 128 x 128), STAGES >= 3 buffers, WF the weight
// format. A block has a warp per 64 x 64 tile of C: 256 threads (128 for 128 x 128). Dynamic
// shared memory: max(STAGES * (BM + BN) * 64, warps * 32 * 72 * 4) bytes (gemm_v6_smem in
// kernels.py). Grid: cdiv(M, BM) * cdiv(N, BN) blocks, 1-D.

#define V6_GROUP 16                     // tile-rows of C walked together (block order for L2)
#define V6_LDC 72                       // row stride of the epilogue's staging, in floats

// Tile (tm, tn) of C that block b computes: groups of V6_GROUP tile-rows, each walked column by
// column (tile-rows first within a column), groups in order.
__device__ __forceinline__ void v6_tile(int b, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int per_group = V6_GROUP * tiles_n;
    const int first = b / per_group * V6_GROUP;
    const int rows = min(tiles_m - first, V6_GROUP);   // the last group may be shorter
    const int r = b % per_group;
    tm = first + r % rows;
    tn = r / rows;
}

template <int BM, int BN, int STAGES, int WF>
__global__ void __launch_bounds__(BM * BN / 128, BM * BN == 128 * 128 ? 2 : 1)
gemm_v6(const unsigned short* __restrict__ A, const void* __restrict__ Wq,
        const unsigned short* __restrict__ Wd, const unsigned short* __restrict__ Wm,
        float* __restrict__ C, int M, int N, int K) {
    constexpr int BK = 32, KSTEPS = BK / 16;            // k per tile: 64-byte rows, one q block
    constexpr int WARPS_N = BN / 64;                    // warp tiles of 64 x 64
    constexpr int MI = 4, NI = 8;                       // mma tiles per warp per k-step
    constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
    constexpr bool BF16 = WF == V5_BF16, PACKED = WF >= V5_Q8_0;
    constexpr int THREADS = BM * BN / (64 * 64) * 32;   // a warp per 64 x 64 tile of C
    static_assert((THREADS == 256 || THREADS == 128) && BN % 128 == 0 && STAGES >= 3, "tiles");
    extern __shared__ __align__(128) unsigned char gemm_v6_smem[];
    const unsigned int smem = smem_addr(gemm_v6_smem);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    int tm, tn;
    v6_tile(blockIdx.x, (M + BM - 1) / BM, (N + BN - 1) / BN, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN;
    const int T = (K + BK - 1) / BK, nb = K / 32;       // k-tiles; blocks per row (packed)

    // The loaders are v5's (v5_load_tile, V5PackedW), for THREADS threads: tile t of A, or of a
    // float16/bfloat16 W, into stage s by cp.async; a packed W fetched into registers, then
    // unpacked into stage s
    auto load_a = [&](int s, int t) {
        v5_load_tile<BM, THREADS>(smem, s * STAGE_BYTES, A, m0, M, K, t, tid);
    };
    auto load_w = [&](int s, int t) {
        v5_load_tile<BN, THREADS>(smem, s * STAGE_BYTES + A_BYTES,
                                  static_cast<const unsigned short*>(Wq), n0, N, K, t, tid);
    };
    V5PackedW<WF, BN, THREADS> packed_w;
    auto fetch_w = [&](int t) { packed_w.fetch(Wq, Wd, Wm, n0, N, nb, t, tid); };
    auto store_w = [&](int s) { packed_w.store(smem, s * STAGE_BYTES + A_BYTES, tid); };

    // Fragments of k-step kk of the tile in stage s, into register buffer `buf` (v5's ldmatrix)
    unsigned int a[2][MI][4], b[2][NI][2];
    auto load_frags = [&](int buf, int s, int kk) {
        const unsigned int sa = smem + s * STAGE_BYTES, sw = sa + A_BYTES;
#pragma unroll
        for (int i = 0; i < MI; ++i)
            ldmatrix_x4(a[buf][i],
                        sa + v5_swizzle(wm * 64 + i * 16 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int j = 0; j < NI; j += 2) {
            unsigned int r[4];
            ldmatrix_x4(r, sw + v5_swizzle(wn * 64 + j * 8 + (lane & 7) + ((lane >> 4) << 3),
                                           2 * kk + ((lane >> 3) & 1)));
            b[buf][j][0] = r[0]; b[buf][j][1] = r[1];
            b[buf][j + 1][0] = r[2]; b[buf][j + 1][1] = r[3];
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Prologue: tiles 0 .. STAGES-2 in flight (one commit group each, possibly empty). A packed
    // W is unpacked up to tile STAGES-3; tile STAGES-2 waits in registers (the loop stores it).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < T) {
            load_a(s, s);
            if (!PACKED) load_w(s, s);
            else { fetch_w(s); if (s < STAGES - 2) store_w(s); }
        }
        cp_async_commit();
    }
    cp_async_wait<STAGES - 2>();              // tile 0 has landed (this thread's copies)
    __syncthreads();                          // ... everyone's
    load_frags(0, 0, 0);

    // Stages counted, not taken modulo STAGES (a division by 3 costs registers, which are
    // short: a few bytes spilled).
    for (int t = 0, s_cur = 0; t < T; ++t, s_cur = s_cur + 1 == STAGES ? 0 : s_cur + 1) {
        const int next = t + STAGES - 1;                        // tile, and its buffer: t - 1's
        const int s_next = s_cur == 0 ? STAGES - 1 : s_cur - 1;
        const int s_after = s_cur + 1 == STAGES ? 0 : s_cur + 1;   // tile t + 1's
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const int cur = kk & 1;
            if (kk + 1 < KSTEPS) load_frags(cur ^ 1, s_cur, kk + 1);
            else if (t + 1 < T) load_frags(cur ^ 1, s_after, 0);   // next tile's first
            if (kk == 0) {                    // everyone passed the barrier after reading t - 1
                if (next < T) {
                    load_a(s_next, next);
                    if (!PACKED) load_w(s_next, next);
                }
                cp_async_commit();
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_16816<BF16>(acc[i][j], a[cur][i], b[cur][j]);
            if (kk == KSTEPS - 2) {
                if (PACKED) {                 // unpack tile t + STAGES - 2 (fetched a tile ago)
                    if (next - 1 < T) store_w(s_next == 0 ? STAGES - 1 : s_next - 1);   // t - 2's
                    if (next < T) fetch_w(next);
                }
                cp_async_wait<STAGES - 2>();  // tile t + 1 has landed (this thread's copies)
                __syncthreads();              // ... everyone's; and everyone is done with t
            }
        }
    }

    // Epilogue: each warp's 64 x 64 tile through its own 32-row patch of shared memory, in two
    // halves (a whole tile would need 144 KiB: more than an RTX 40's 99), then rows out.
    cp_async_wait<0>();                       // (only empty groups are left)
    __syncthreads();                          // nobody reads the pipeline buffers any more
    const unsigned int patch = smem + warp * 32 * V6_LDC * 4;
    const int col = 4 * (lane & 15), n = n0 + wn * 64 + col;
#pragma unroll
    for (int part = 0; part < 2; ++part) {              // rows 0-31 of the warp tile, 32-63
#pragma unroll
        for (int i = 0; i < MI / 2; ++i)
#pragma unroll
            for (int j = 0; j < NI; ++j)
#pragma unroll
                for (int half = 0; half < 2; ++half) {  // rows g and g + 8, columns 2t, 2t + 1
                    const int r = i * 16 + (lane >> 2) + 8 * half, c = j * 8 + 2 * (lane & 3);
                    const float* v = acc[2 * part + i][j] + 2 * half;
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};"
                                 ::"r"(patch + (r * V6_LDC + c) * 4), "f"(v[0]), "f"(v[1])
                                 : "memory");
                }
        __syncwarp();
#pragma unroll 4
        for (int r = lane >> 4; r < 32; r += 2) {       // half a warp per row: 256 bytes
            const int m = m0 + wm * 64 + 32 * part + r;
            float4 v;
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                         : "r"(patch + (r * V6_LDC + col) * 4) : "memory");
            if (m >= M) continue;
            float* c = C + (size_t)m * N + n;
            if (N % 4 == 0) {                           // 16-byte rows: all 4 or none
                if (n < N) *reinterpret_cast<float4*>(c) = v;
            } else {
                if (n + 0 < N) c[0] = v.x;
                if (n + 1 < N) c[1] = v.y;
                if (n + 2 < N) c[2] = v.z;
                if (n + 3 < N) c[3] = v.w;
            }
        }
        __syncwarp();                                   // read before the next half lands
    }
}


// ---------------------------------------------------------------------------------------------
// v7: Hopper's own tensor-core instruction, wgmma. v5 and v6 use mma.sync, the instruction every
// tensor-core GPU since Ampere runs: a warp multiplies 16 x 8 x 16 from operands in its registers,
// so each k-step the warps first copy their fragments out of shared memory (ldmatrix) and the
// tensor cores wait for them. On an H100/H200 that path is reported to top out well below the
// chip's rate (v6: ~0.46 of cuBLAS). Hopper (sm_90a) adds
//
//     wgmma.mma_async.m64nNk16:   D (64 x N, f32) += A (64 x 16) * B (16 x N)
//
// issued by a *warpgroup* (4 warps, 128 threads) together. Three things change:
//
// 1. The operands are read by the tensor cores straight from shared memory, each described by a
//    64-bit "matrix descriptor" (v7_desc: its address, and how its rows are laid out). No
//    ldmatrix, no fragment registers: the registers hold only the accumulators.
// 2. It is asynchronous: wgmma returns at once; `wgmma.commit_group` closes a batch, and
//    `wgmma.wait_group n` waits until at most n batches are still running. So a warpgroup issues
//    the four k-steps of a tile and goes on to the next barrier while the tensor cores work.
// 3. The tile layout is the hardware's: rows of 128 bytes (64 values of k), the 16-byte chunks of
//    row r stored at chunk ^ (r % 8) (the "128-byte swizzle", v7_swizzle: conflict-free for the
//    tensor cores' reads), 8-row groups 1024 bytes apart, each tile at a 1024-byte boundary. The
//    cp.async loads write that layout, as v5's wrote its own.
//
// Shape: a block of two warpgroups computes 128 x BN of C (BN = 128 or 256); warpgroup g owns
// rows 64 g .. 64 g + 63 (64 x BN accumulators: 64 or 128 registers a thread). BK = 64.
// A and W tiles of STAGES k-tiles in flight: (128 + BN) x 128 bytes a stage (48 KiB at BN 256).
// Per k-tile t (one barrier):
//
//     wait for tile t's copies; fence them for the tensor cores; __syncthreads
//     copy tile t + STAGES - 2 into the buffer of t - 2 (free: every warpgroup waited for it)
//     4 x wgmma (k-steps of 16), commit;  wait until only this tile's batch is running
//
// So a tile's products run while the next tile's barrier is reached and the copies of the ones
// after it fly. The accumulators, in wgmma's layout, are stored straight from registers: warp w
// of warpgroup g holds rows 64 g + 16 w + lane / 4 (+ 8), columns 8 j + 2 (lane % 4) (+ 1), the
// mma.sync layout of a 16 x 8 tile repeated along N.
//
// Packed weights (Q8_0, Q4_0, Q4_1) come in as v6's do (V5PackedW): a k-tile's two GGUF blocks
// of each W row read into registers an iteration ahead, unpacked (v5_dequant) into the stage's
// 128-byte rows by the CUDA cores while the tensor cores multiply the tile before.
//
// Contract: v5's and v6's. float16 (or bfloat16) A; W f16, bf16, Q8_0, Q4_0 or Q4_1; float32 C;
// any M and N, K % 8 == 0 (16-byte chunks; the last k-tile zero-filled), K % 32 == 0 when
// packed; 16-byte aligned A and W. Needs an sm_90 GPU and code compiled for sm_90a (the "a":
// features of that chip only); minillama compiles this group so (kernels.py, GROUP_ARCH).
// Dynamic shared memory: STAGES * (128 + BN) * 128 + 1024 bytes (the 1024 to align the base).

#define V7_BM 128
#define V7_BK 64                       // 128-byte rows: the widest swizzle wgmma reads

// Byte offset of 16-byte chunk kc (0..7) of row r in a tile of 128-byte rows, 128-byte swizzle
__device__ __forceinline__ unsigned int v7_swizzle(int r, int kc) {
    return r * 128 + ((kc ^ (r & 7)) << 4);
}

// wgmma's shared-memory matrix descriptor of a K-major tile in the layout above, at `addr`:
// bits 0-13 the address / 16, 16-29 the leading-dimension offset / 16 (unused with this
// swizzle: 1), 32-45 the stride between 8-row groups / 16 (1024 bytes), 62-63 the swizzle
// (1: 128 bytes).
__device__ __forceinline__ unsigned long long v7_desc(unsigned int addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) |
           ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

// The wgmma instructions exist only in code compiled for sm_90a; elsewhere (the modules of the
// other groups, which parse this file too) the template is never instantiated, and these guards
// keep a stray instantiation from failing the whole module's compilation.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define V7_ASM(...) asm volatile(__VA_ARGS__)
#else
#define V7_ASM(...) __trap()
#endif

__device__ __forceinline__ void wgmma_fence() { V7_ASM("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    V7_ASM("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
    V7_ASM("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory");
}
// Writes by cp.async (the generic proxy) made visible to the tensor cores' reads (async proxy)
__device__ __forceinline__ void fence_proxy_async() {
    V7_ASM("fence.proxy.async.shared::cta;" ::: "memory");
}

#define V7_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                 "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define V7_M64N128K16(type)                                                                     \
    V7_ASM("wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " "                    \
           "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
           "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
           "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
           "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
           "%64, %65, 1, 1, 1, 0, 0;"                                                          \
           : V7_D8(0), V7_D8(8), V7_D8(16), V7_D8(24), V7_D8(32), V7_D8(40), V7_D8(48),        \
             V7_D8(56)                                                                         \
           : "l"(a), "l"(b))

// d (64 x 128, this warpgroup's share: 64 floats a thread) += A (64 x 16) B (16 x 128), both
// read from shared memory through their descriptors; the 1s: add to d, A and B unscaled; the
// 0s: both K-major (W's rows are B's columns, as stored)
template <bool BF16>
__device__ __forceinline__ void wgmma_m64n128k16(float* d, unsigned long long a,
                                                 unsigned long long b) {
    if (BF16) V7_M64N128K16("bf16");
    else V7_M64N128K16("f16");
}

// ROWS rows of a 16-bit matrix X (n_rows x K) from row r0, k-tile t, into the tile at shared
// address `tile` in v7's layout, by cp.async: ROWS x 8 chunks over 256 threads; rows past n_rows
// and k past K are zero-filled
template <int ROWS>
__device__ __forceinline__ void v7_load_tile(unsigned int tile, const unsigned short* X, int r0,
                                             int n_rows, int K, int t, int tid) {
#pragma unroll
    for (int i = 0; i < ROWS * 8 / 256; ++i) {
        const int c = tid + i * 256, r = c >> 3, kc = c & 7;
        const int row = r0 + r, k = t * V7_BK + kc * 8;
        const bool ok = row < n_rows && k < K;
        cp_async16(tile + v7_swizzle(r, kc), ok ? X + (size_t)row * K + k : X, ok ? 16 : 0);
    }
}

template <int BN, int STAGES, int WF>
__global__ void __launch_bounds__(256, 1)
gemm_v7(const unsigned short* __restrict__ A, const void* __restrict__ Wq,
        const unsigned short* __restrict__ Wd, const unsigned short* __restrict__ Wm,
        float* __restrict__ C, int M, int N, int K) {
    constexpr int A_BYTES = V7_BM * V7_BK * 2, STAGE_BYTES = (V7_BM + BN) * V7_BK * 2;
    constexpr int NH = BN / 128;                        // wgmma's of n 128 per k-step
    constexpr bool BF16 = WF == V5_BF16, PACKED = WF >= V5_Q8_0;
    static_assert((BN == 128 || BN == 256) && STAGES >= 3, "tiles");
    extern __shared__ unsigned char gemm_v7_smem[];
    const unsigned int smem = (smem_addr(gemm_v7_smem) + 1023) & ~1023u;   // swizzle atoms
    const int tid = threadIdx.x, wg = tid / 128, lane = tid % 32, warp = (tid / 32) % 4;
    int tm, tn;
    v6_tile(blockIdx.x, (M + V7_BM - 1) / V7_BM, (N + BN - 1) / BN, tm, tn);
    const int m0 = tm * V7_BM, n0 = tn * BN;
    const int T = (K + V7_BK - 1) / V7_BK, nb = K / 32;  // k-tiles; blocks per row (packed)

    auto load = [&](int t) {                            // k-tile t into its stage, by cp.async
        const unsigned int stage = smem + (t % STAGES) * STAGE_BYTES;
        v7_load_tile<V7_BM>(stage, A, m0, M, K, t, tid);
        if (!PACKED)
            v7_load_tile<BN>(stage + A_BYTES, static_cast<const unsigned short*>(Wq), n0, N, K,
                             t, tid);
    };
    // A packed W as v6 reads it (V5PackedW), two GGUF blocks a row per k-tile: fetched into
    // registers an iteration before they are unpacked into the stage's 128-byte rows
    V5PackedW<WF, BN, 256> packed_w[2];
    auto fetch_w = [&](int t) {
#pragma unroll
        for (int j = 0; j < 2; ++j)                     // block 2t + j; past the row: zeros
            packed_w[j].fetch(Wq, Wd, Wm, n0, 2 * t + j < nb ? N : 0, nb, 2 * t + j, tid);
    };
    auto store_w = [&](int t) {
        const unsigned int tile = smem + (t % STAGES) * STAGE_BYTES + A_BYTES;
#pragma unroll
        for (int j = 0; j < 2; ++j)
            packed_w[j].store_at([&](int r, int kc) { return tile + v7_swizzle(r, 4 * j + kc); },
                                 tid);
    };

    float d[NH][64];                                    // (64 x BN) of this warpgroup
#pragma unroll
    for (int h = 0; h < NH; ++h)
#pragma unroll
        for (int i = 0; i < 64; ++i) d[h][i] = 0.0f;

    // Prologue: tiles 0 .. STAGES-3 in flight, one commit group each (possibly empty); a packed
    // W's unpacked into them at once, and tile STAGES-2's fetched
#pragma unroll
    for (int t = 0; t < STAGES - 2; ++t) {
        if (t < T) {
            load(t);
            if (PACKED) { fetch_w(t); store_w(t); }
        }
        cp_async_commit();
    }
    if (PACKED && STAGES - 2 < T) fetch_w(STAGES - 2);
    for (int t = 0; t < T; ++t) {
        cp_async_wait<STAGES - 3>();                    // tile t has landed (this thread's)
        fence_proxy_async();                            // (and its unpacked W, stored before)
        __syncthreads();                                // everyone's; and wgmma of t - 2 is done
        if (t + STAGES - 2 < T) load(t + STAGES - 2);   // into t - 2's buffer
        cp_async_commit();
        const unsigned int sa = smem + (t % STAGES) * STAGE_BYTES + wg * 64 * 128;
        const unsigned int sw = smem + (t % STAGES) * STAGE_BYTES + A_BYTES;
        wgmma_fence();                                  // the accumulators are ours to add to
#pragma unroll
        for (int kk = 0; kk < V7_BK / 16; ++kk)         // 16 values of k = 32 bytes along a row
#pragma unroll
            for (int h = 0; h < NH; ++h)
                wgmma_m64n128k16<BF16>(d[h], v7_desc(sa + 32 * kk),
                                       v7_desc(sw + h * 128 * 128 + 32 * kk));
        wgmma_commit();
        if (PACKED && t + STAGES - 2 < T) {             // while the tensor cores work
            store_w(t + STAGES - 2);                    // fetched an iteration ago
            if (t + STAGES - 1 < T) fetch_w(t + STAGES - 1);
        }
        wgmma_wait<1>();                                // tile t - 1's batch has finished
    }
    wgmma_wait<0>();
#pragma unroll
    for (int h = 0; h < NH; ++h)         // the accumulators are read only after that wait: an
#pragma unroll                          // empty asm that "writes" them ties the reads to it
        for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[h][i])::"memory");

    // Epilogue: row 64 wg + 16 warp + lane / 4 (+ 8), columns 8 j + 2 (lane % 4) (+ 1)
    const int r = m0 + wg * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int h = 0; h < NH; ++h)
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int n = n0 + h * 128 + j * 8 + 2 * (lane % 4);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int m = r + 8 * half;
                const float* v = d[h] + 4 * j + 2 * half;
                if (m >= M || n >= N) continue;
                float* c = C + (size_t)m * N + n;
                if (N % 2 == 0) *reinterpret_cast<float2*>(c) = make_float2(v[0], v[1]);
                else {
                    c[0] = v[0];
                    if (n + 1 < N) c[1] = v[1];
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
//     GEMV_RMSNORM   x[m, k] * inv_rms[m] * norm_w[k]       model.rms_norm, inv_rms = 1 / sqrt(
//                    mean(x^2) + eps) of the row: gemv, qgemv v1 and v2, qgemv_k and gemv_v3
//                    reduce x for it first; qgemv_v4 (x staged whole), qgemv_mma and gemv's
//                    GEMV_RMSNORM_LATE multiply their sums of W x norm_w by it at the end
//     GEMV_SWIGLU    silu(x[m, k]) * x[m, K + k]            model.FeedForward's gate; rows of x
//                    hold [h1 | h3] from the w13 matmul, so they are 2K long
//
// with the float32 operations in model.py's order, so the product sees the same values (but
// for inv_rms after the sums: the same product, rounded a few units of the last place apart;
// and silu, below, from an exponential rather than tanh, within ~1e-6 of it).

#define GEMV_PLAIN 0
#define GEMV_RMSNORM 1
#define GEMV_SWIGLU 2
#define GEMV_RMSNORM_LATE 3     // gemv's RMSNorm with inv_rms after the sums (gemv, below)

// silu(x) = x sigmoid(x) = x / (1 + e^-x), from one MUFU.EX2 and one MUFU.RCP (__expf,
// __fdividef). model.py writes it with tanh, which a GPU's full-precision tanhf takes ~20
// instructions for; here it is ~5, within ~1e-6 of float64 where it matters: __expf's error
// grows as |x| 2^-24 (1e-6 at |x| 20, where silu is ~1e-8), and the limits hold (x large: x;
// x below -88: e^-x is inf and x / inf 0; -inf or NaN: NaN, as model.py's). Measured on the 7B
// batch-8 step, whose w2 launches (qgemv_mma) take 11,264 silu a block in their staging (8 rows
// of a 1408-position slice): q4_0 1.01x, int8 1.00x, one row even (H200, 2026-12-01,
// docs/kernels.md "silu from one exponential").
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// x[m, k] after the prologue; xr points at row m.
template <int PRO>
__device__ __forceinline__ float gemv_x(const float* __restrict__ xr, int k, int K,
                                        const float* __restrict__ norm_w, float inv_rms) {
    const float x = __ldg(xr + k);
    if (PRO == GEMV_RMSNORM) return x * inv_rms * __ldg(norm_w + k);
    if (PRO == GEMV_SWIGLU) return silu(x) * __ldg(xr + K + k);
    return x;
}

__device__ __forceinline__ float4 scale4(float4 x, float s) {
    return make_float4(x.x * s, x.y * s, x.z * s, x.w * s);
}

// The prologue's arithmetic on a float4 of x, given `other`: RMSNorm's weights g
// (x * inv_rms * g) or SwiGLU's gate u (silu(x) * u); plain x as it is.
template <int PRO>
__device__ __forceinline__ float4 gemv_prologue4(float4 x, float4 other, float inv_rms) {
    if (PRO == GEMV_RMSNORM)
        return make_float4(x.x * inv_rms * other.x, x.y * inv_rms * other.y,
                           x.z * inv_rms * other.z, x.w * inv_rms * other.w);
    if (PRO == GEMV_SWIGLU)
        return make_float4(silu(x.x) * other.x, silu(x.y) * other.y, silu(x.z) * other.z,
                           silu(x.w) * other.w);
    return x;
}

// The same for x[m, 4 k4 .. 4 k4 + 3], one float4 (K % 4 == 0, aligned rows).
template <int PRO>
__device__ __forceinline__ float4 gemv_x4(const float* __restrict__ xr, int k4, int K,
                                          const float* __restrict__ norm_w, float inv_rms) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(xr) + k4);
    float4 other = x;
    if (PRO == GEMV_RMSNORM) other = __ldg(reinterpret_cast<const float4*>(norm_w) + k4);
    if (PRO == GEMV_SWIGLU) other = __ldg(reinterpret_cast<const float4*>(xr + K) + k4);
    return gemv_prologue4<PRO>(x, other, inv_rms);
}

// acc[r] += W[n, 4 k4 .. 4 k4 + 3] . x[m0 + r, same] for the ROWS rows, x after the prologue
// (RMSNorm: inv_rms[r] 1 where it comes after the sums, LATE, and then ss[r] += the x^2 there)
template <int ROWS, int PRO, bool LATE>
__device__ __forceinline__ void gemv_add4(float* acc, float* ss, const float4 wv,
                                          const float* __restrict__ X, int m0, int M, int ldx,
                                          int k4, int K, const float* __restrict__ norm_w,
                                          const float* inv_rms) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (m0 + r < M) {
            const float* xr = X + (size_t)(m0 + r) * ldx;
            const float4 xv = gemv_x4<PRO>(xr, k4, K, norm_w, inv_rms[r]);
            if (LATE)                                      // the same loads: x itself, squared
                ss[r] += sum_squares4(gemv_x4<GEMV_PLAIN>(xr, k4, K, norm_w, 1.0f));
            acc[r] = fmaf(wv.x, xv.x, acc[r]);
            acc[r] = fmaf(wv.y, xv.y, acc[r]);
            acc[r] = fmaf(wv.z, xv.z, acc[r]);
            acc[r] = fmaf(wv.w, xv.w, acc[r]);
        }
    }
}

// W's loads in gemv's k loop: through the read-only path (ld.global.nc), or with WALK
// evict-first in L1 and L2 (__ldcs: ld.global.cs, "cache streaming, likely accessed once").
template <bool WALK, typename T>
__device__ __forceinline__ T gemv_w(const T* p) {
    return WALK ? __ldcs(p) : __ldg(p);
}

// PREFETCH: float4s of W each lane loads before its grid_dependency_wait, so that under
// programmatic launches (reduce.cu) they travel while the previous kernel ends (W is not its
// output). They stay in registers across the wait and the RMSNorm prologue (up to 14 more a
// thread), so kernels.gemv_prefetch takes an instance with PREFETCH > 0 (one row of x, float4
// loads) only where they are the lane's whole share of its row of W, and the grid is one wave
// of at most GEMV_PREFETCH_BLOCKS blocks an SM (their registers' occupancy): the row is then
// one round trip, begun early. PREFETCH 0 loads nothing early (the code the kernel had before it had the
// parameter). Correct for any K either way: the k loop takes what the early loads did not.
// WALK: the block takes groups of rows a grid apart until N is covered, for a grid smaller
// than N's groups (kernels.gemv_grid); without it, one group a block, the grid covering N.
// A matrix that long is the classifier, read once a step, and read last: WALK loads it
// evict-first (gemv_w), so that L2 keeps the layers' weights between steps instead of its
// lines (stories15M: 24 MB of layers and 37 MB of classifier, an H200's L2 60 MB; 1.10x).
template <int ROWS, bool VEC, int PRO, int PREFETCH, bool WALK = false>
__global__ void __launch_bounds__(256)
gemv(const float* __restrict__ X, const float* __restrict__ W, float* __restrict__ Y,
     int M, int N, int K, int accumulate, const float* __restrict__ norm_w, float eps,
     int ksplit) {
    static_assert(PREFETCH == 0 || VEC, "the early loads are float4s");
    static_assert(PREFETCH == 0 || !WALK, "the early loads are the first group's only");
    // A block is 8 warps. Each output row n gets `ksplit` of them, which take interleaved
    // 128-float slices of k, so a small matrix still gives the GPU enough loads in flight;
    // their partial sums meet in shared memory, added in a fixed order (deterministic). A
    // block takes a group of 8 / ksplit rows of W: group blockIdx.x, and with WALK the groups
    // a grid apart after it (kernels.gemv_grid caps the grid where 4000 blocks that end as
    // soon as they begin cost more than their rows: stories15M's classifier).
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slice = warp % ksplit;
    const int per_group = blockDim.x / 32 / ksplit, groups = (N + per_group - 1) / per_group;
    const int m0 = blockIdx.y * ROWS;
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K;        // row length of X
    int n = blockIdx.x * per_group + warp / ksplit;     // the warp's row in the first group
    bool active = n < N;                                // idle warps still reach the barriers
    // GEMV_RMSNORM_LATE is RMSNorm's arithmetic with inv_rms after the sums (below)
    constexpr bool LATE = PRO == GEMV_RMSNORM_LATE;
    constexpr int XPRO = LATE ? GEMV_RMSNORM : PRO;
    __shared__ float partial[8][ROWS], partial_ss[LATE ? 8 : 1][ROWS];
    // The lane's first PREFETCH float4s of its row of W, k4 = slice * 32 + lane, + 32 ksplit,
    // ..: through L2 (__ldcg), since ptxas keeps ordinary loads on their side of the wait but
    // may move read-only ones (__ldg) across it (kernels/dev/wait_order.py lists the order).
    float4 w_early[PREFETCH > 0 ? PREFETCH : 1];
#pragma unroll
    for (int i = 0; i < PREFETCH; ++i) {
        const int k4 = slice * 32 + lane + i * 32 * ksplit;
        w_early[i] = active && k4 < K / 4
                         ? __ldcg(reinterpret_cast<const float4*>(W + (size_t)n * K) + k4)
                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    grid_launch_dependents();
    grid_dependency_wait();                             // (reduce.cu) x is the last kernel's

    float inv_rms[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) inv_rms[r] = 1.0f;
    if (PRO == GEMV_RMSNORM) {        // every block reduces its rows of x, all ROWS at once
        __shared__ float sums[8][ROWS];                 // per warp, per row
        float ss[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            ss[r] = m0 + r < M ? thread_sum_squares(X + (size_t)(m0 + r) * ldx, K,
                                                    threadIdx.x, blockDim.x) : 0.0f;
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
    // GEMV_RMSNORM_LATE, RMSNorm after the sums: the loop multiplies W by x * norm_w and adds
    // up each row's x^2 beside it, from the same loads, and inv_rms = 1 / sqrt(mean(x^2) + eps)
    // scales the warp's total, y = inv_rms sum_k W x norm_w. Every warp sees the whole row (its
    // lanes, or its k slices, which meet below), so no block-wide sum of squares comes first:
    // one round trip to x after the wait, not a sum of squares, its barrier, then x.
    for (int group = blockIdx.x; !WALK || group < groups; group += gridDim.x) {  // the block's
        const float* w = W + (size_t)n * K;
        float acc[ROWS], ss[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] = ss[r] = 0.0f;

        if (active && VEC) {                                // K % 4 == 0, 16-byte aligned rows
            const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
            for (int i = 0; i < PREFETCH; ++i) {            // the loads made before the wait
                const int k4 = slice * 32 + lane + i * 32 * ksplit;   // (no WALK: one group)
                if (k4 < K / 4) gemv_add4<ROWS, XPRO, LATE>(acc, ss, w_early[i], X, m0, M, ldx,
                                                            k4, K, norm_w, inv_rms);
            }
#pragma unroll 4
            for (int k4 = slice * 32 + lane + PREFETCH * 32 * ksplit; k4 < K / 4;
                 k4 += 32 * ksplit)
                gemv_add4<ROWS, XPRO, LATE>(acc, ss, gemv_w<WALK>(w4 + k4), X, m0, M, ldx, k4,
                                            K, norm_w, inv_rms);
        } else if (active) {
            for (int k = slice * 32 + lane; k < K; k += 32 * ksplit) {
                const float wv = gemv_w<WALK>(w + k);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
                    if (m0 + r < M) {
                        const float* xr = X + (size_t)(m0 + r) * ldx;
                        acc[r] = fmaf(wv, gemv_x<XPRO>(xr, k, K, norm_w, inv_rms[r]), acc[r]);
                        if (LATE) {
                            const float x = gemv_x<GEMV_PLAIN>(xr, k, K, norm_w, 1.0f);
                            ss[r] = fmaf(x, x, ss[r]);
                        }
                    }
            }
        }

        float mine = 0.0f, mine_ss = 0.0f;                  // lane r keeps row r's totals
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float total = warp_sum(acc[r]);
            if (lane == r) mine = total;
            if (LATE) {
                const float squares = warp_sum(ss[r]);
                if (lane == r) mine_ss = squares;
            }
        }
        if (ksplit > 1) {                                   // add the slices: warp `slice 0` does
            if (lane < ROWS) {
                partial[warp][lane] = mine;
                if (LATE) partial_ss[warp][lane] = mine_ss;
            }
            __syncthreads();
            if (slice == 0 && lane < ROWS)
                for (int s = 1; s < ksplit; ++s) {
                    mine += partial[warp + s][lane];
                    if (LATE) mine_ss += partial_ss[warp + s][lane];
                }
        }
        if (LATE) mine *= 1.0f / sqrtf(mine_ss / K + eps);
        if (active && slice == 0 && lane < ROWS && m0 + lane < M) {
            float* y = Y + (size_t)(m0 + lane) * N + n;
            *y = accumulate ? *y + mine : mine;
        }
        if (!WALK) break;                                   // one group a block
        n += gridDim.x * per_group;                         // the next group's row
        active = n < N;
        if (ksplit > 1 && group + gridDim.x < groups)
            __syncthreads();                            // slice 0's reads of partial are done
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

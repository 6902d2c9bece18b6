// Row softmax: y[r, j] = exp(x[r, j] - max_r) / sum_j' exp(x[r, j'] - max_r)
//
// Subtracting the row maximum first keeps every exponent <= 0, so exp never overflows, and the
// result is the same function (the factor exp(-max) cancels). The CPU path does the same.
//
// Causal attention needs no mask tensor: row r of an (..., seqlen, start_pos + seqlen) block of
// scores is query i = r % seqlen at position start_pos + i, which sees the keys 0 .. start_pos + i.
// Each kernel computes that valid length per row and writes exact zeros past it, which is what
// adding a -inf mask and exponentiating gives. Without a mask the caller passes seqlen = 1 and
// start_pos = n_cols - 1, so every row is valid in full.
//
// Two kernels, picked by row length (minillama/cuda.py: softmax):
//   softmax_warp      one warp per row, online single pass for max and sum, then a pass to write.
//                     For attention rows (up to a few thousand keys).
//   softmax_block<V, THREADS>  one block per row, the row kept in registers (V values per thread): reads
//                     x once and writes y once, the least memory traffic possible. For long rows
//                     such as a vocabulary of logits.
//
// exp is expf (accurate to about 1 ulp), not the faster __expf, whose error grows with |x| and
// would break the 1e-5 agreement with float64 that the tests ask for.
// Compiled as one module after reduce.cu (see minillama/cuda.py).

__device__ __forceinline__ int valid_cols(int row, int n_cols, int start_pos, int seqlen) {
    return min(n_cols, start_pos + row % seqlen + 1);
}

// ---------------------------------------------------------------------------------------------
// Online softmax: one pass keeps a running maximum m and the sum s of exp(x - m). When a larger
// value v arrives, the sum so far was taken against the old maximum and is rescaled:
//
//     s <- s * exp(m - v) + 1,   m <- v           (v > m)
//     s <- s + exp(v - m)                         (otherwise)
//
// Two partial results (m1, s1) and (m2, s2), from two lanes, combine the same way:
//
//     m = max(m1, m2),   s = s1 * exp(m1 - m) + s2 * exp(m2 - m)
//
// which is what the shuffle loop below does, so the warp reads the row once to get max and sum
// (the classic version reads it twice: once for the max, once for the sum).

__device__ __forceinline__ void online_combine(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    // both empty (-inf): keep s = 0 instead of 0 * exp(-inf - -inf) = NaN
    s = mx == neg_inf() ? 0.0f : s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

extern "C" __global__ void softmax_warp(const float* __restrict__ x, float* __restrict__ y,
                                        int n_rows, int n_cols, int start_pos, int seqlen) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= n_rows) return;                          // the whole warp leaves together
    const float* xr = x + (size_t)row * n_cols;
    float* yr = y + (size_t)row * n_cols;
    const int valid = valid_cols(row, n_cols, start_pos, seqlen);

    float m = neg_inf(), s = 0.0f;                      // this lane's running max and sum
    for (int j = lane; j < valid; j += 32) {
        const float v = xr[j];
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += v == neg_inf() ? 0.0f : expf(v - m);   // a NaN v falls through and poisons s
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(FULL_MASK, s, o);
        online_combine(m, s, m2, s2);
    }
    const float inv = 1.0f / s;
    for (int j = lane; j < n_cols; j += 32) yr[j] = j < valid ? expf(xr[j] - m) * inv : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Register-cached: thread t holds elements t, t + THREADS, t + 2 THREADS, ... of its row.
// Consecutive threads read consecutive addresses (coalesced), and all V loads are issued before
// the first is used, so the whole row is in flight at once. Three steps, two block reductions:
//
//     v[i] = x[j]            m = block max(v)
//     v[i] = exp(v[i] - m)   s = block sum(v)
//     y[j] = v[i] / s
//
// Traffic is one read and one write of the row: bytes moved = 2 * 4 * n_cols per row.
// THREADS * V floats fit: 1024 threads with V = 32 hold rows of up to 32768 floats (Llama's
// 32000 logits). That is as far as registers go: the values take V of a thread's registers, and
// at 1024 threads a thread may use only 64 in all (this kernel needs exactly 64 at V = 32).

template <int V, int THREADS>
__global__ void __launch_bounds__(THREADS)
softmax_block(const float* __restrict__ x, float* __restrict__ y, int n_rows, int n_cols,
              int start_pos, int seqlen) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    const float* xr = x + (size_t)row * n_cols;
    float* yr = y + (size_t)row * n_cols;
    const int valid = valid_cols(row, n_cols, start_pos, seqlen);

    float v[V];
    float m = neg_inf();
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const int j = threadIdx.x + i * THREADS;
        v[i] = j < valid ? xr[j] : neg_inf();
        m = fmaxf(m, v[i]);
    }
    m = block_max(m, scratch);

    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const int j = threadIdx.x + i * THREADS;
        v[i] = j < valid ? expf(v[i] - m) : 0.0f;
        s += v[i];
    }
    s = block_sum(s, scratch);

    const float inv = 1.0f / s;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const int j = threadIdx.x + i * THREADS;
        if (j < n_cols) yr[j] = v[i] * inv;
    }
}

// One kernel per token: the whole decode step of a float32 model as a single persistent launch.
//
// FusedDecoder (minillama/cuda/fused.py) decodes a token in 5 launches per layer, replayed as one
// CUDA graph. For a small model that is still the bottleneck: a stories15M step reads 60 MB of
// weights (14 us at the H200's copy bandwidth) but takes 38 launches, and every kernel boundary
// costs more than the launch itself: the GPU drains (the last blocks of one kernel run while the
// other SMs wait), then fills again, then ramps its loads up from nothing.
//
// Here the grid is one block per SM, all resident at once, and it stays for the whole step.
// The blocks walk through the same stages FusedDecoder launches, and where a kernel boundary
// was, they meet at a grid-wide barrier (grid_sync) instead:
//
//     stage  reads                 computes                                 writes
//     qkv    h (or the embedding)  x = rmsnorm(h); rows of wqkv in pairs,   q, cache_k[pos],
//                                  RoPE applied to each pair                 cache_v[pos]
//     attn   q, the cache          softmax(q k / sqrt(d)) v per (head, row)  att
//     wo     att                   h += att @ wo^T                            h
//     w13    h                     [h1 | h3] = rmsnorm(h) @ w13^T             h13
//     w2     h13                   h += (silu(h1) * h3) @ w2^T                h
//     ... for every layer, then
//     out    h                     logits = rmsnorm(h) @ output^T             logits
//
// Five barriers a layer. A stage never reads what it writes, so the barriers are the only
// synchronisation. Each block computes a stage's input vector itself (the norm, the gate) into
// shared memory, then its warps take weight rows round-robin across the whole grid: warp g of G
// computes rows g, g + G, ... (one row per warp, a float4 per lane per load, as gemv does).
//
// Two rules that a single-stage kernel never meets:
// - All blocks must be resident at once, or a block spins at a barrier waiting for one that
//   never starts. The grid is at most one block per SM and the block fits an SM alone
//   (__launch_bounds__(BLOCK, 1), shared memory checked by the host), and nothing else runs on
//   the stream meanwhile.
// - Data written during the launch is read through L2 (`ld.global.cg`, __ldcg), never through
//   the SM's own L1 or the read-only path (__ldg): those are not kept coherent between SMs, and
//   an SM that read the q buffer in layer 0 could see its old lines again in layer 1. Only the
//   weights, constant for the whole launch, go through __ldg.
//
// minillama/cuda/persistent.py (PersistentDecoder) launches it; tests/test_cuda_persistent.py
// checks it against the CPU path and llama2.c's golden; docs/kernels.md measures it.

#define PERSISTENT_BLOCK 512

// Weight rows a warp takes at a time: 1 where the grid has a warp for every row (the most
// warps loading at once), 4 for the tall matrices (the classifier), so each warp keeps 4 rows'
// loads in flight instead of walking its many rows one after another.
__device__ __forceinline__ int rows_per_warp(int N, int warps) {
    return N > 2 * (int)gridDim.x * warps ? 4 : 1;
}

// ---- the grid-wide barrier -------------------------------------------------------------------
// A counter that only grows: the k-th barrier of a launch waits until it reads k * gridDim.x
// (the host zeroes it before each launch). Thread 0 of each block arrives for its block with a
// release add (the block's writes, ordered before it by __syncthreads, become visible to whoever
// acquires the counter after it) and waits with acquiring loads. No sequentially consistent
// fence (__threadfence) is needed: release and acquire are exactly the ordering a barrier asks
// for, and they are cheaper.

__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
    unsigned int v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void add_release(unsigned int* p, unsigned int v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void grid_sync(unsigned int* counter, unsigned int& arrivals) {
    arrivals += gridDim.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        add_release(counter, 1u);
        while (load_acquire(counter) < arrivals) { }
    }
    __syncthreads();
}

// ---- a stage's input vector, in shared memory ------------------------------------------------
// xs[b, 0:K] for rows b < bsz: the source row as it is (attention's output), RMSNorm'd (model.
// rms_norm: x * (1 / sqrt(mean(x^2) + eps)) * w, in that order), or the SwiGLU gate of [h1 | h3]
// rows (silu(h1) * h3, matmul.cu's silu). `src` was written during this launch: read with __ldcg.

#define INPUT_PLAIN 0
#define INPUT_RMSNORM 1
#define INPUT_SWIGLU 2

// `tokens`, when given, picks the source rows (the embedding table's rows of the step's tokens).
template <int MODE>
__device__ void stage_input(float* xs, const float* src, int ld, int bsz, int K,
                            const float* __restrict__ norm_w, float eps, float* scratch,
                            const int* __restrict__ tokens = nullptr) {
    for (int b = 0; b < bsz; ++b) {
        const float* row = src + (size_t)(tokens ? tokens[b] : b) * ld;
        float* x = xs + (size_t)b * K;
        float ss = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {   // one read of the source
            const float v = __ldcg(row + k);
            x[k] = MODE == INPUT_SWIGLU ? silu(v) * __ldcg(row + K + k) : v;
            ss += v * v;
        }
        if (MODE == INPUT_RMSNORM) {    // then scaled in place, each thread its own elements
            const float inv_rms = 1.0f / sqrtf(block_sum(ss, scratch) / K + eps);
            for (int k = threadIdx.x; k < K; k += blockDim.x)
                x[k] = x[k] * inv_rms * __ldg(norm_w + k);
        }
    }
    __syncthreads();
}

// Ask L2 for the first rows of W this warp computes in a coming stage (rows_per_warp of them,
// the round-robin of stage_matvec), while the grid waits at a barrier: the weights do not depend
// on the step, so their trip from memory need not wait for the activations. Only the first
// group: the later ones follow while the warp computes, and a whole large matrix would not fit
// in L2 anyway.
__device__ __forceinline__ void prefetch_rows(const float* __restrict__ W, int N, int K,
                                              int min_rows = 1) {      // 2: the qkv stage's pairs
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int R = max(min_rows, rows_per_warp(N, warps));
    const int n0 = (blockIdx.x * warps + threadIdx.x / 32) * R;
    if (n0 >= N) return;
    const char* first = reinterpret_cast<const char*>(W + (size_t)n0 * K);
    const size_t bytes = (size_t)min(R, N - n0) * K * 4;
    for (size_t at = 128 * lane; at < bytes; at += 128 * 32)            // one line per lane
        asm volatile("prefetch.global.L2 [%0];" :: "l"(first + at));
}

// ---- weight rows against the input rows, by one warp -----------------------------------------
// acc[r][b] = W[n0 + r, :] . xs[b, :] for r < R (rows past N read as zero) and b < bsz <= B,
// every lane holding the sums. K % 4 == 0. The R rows' loads are issued together, so a warp
// has R * 16 bytes per lane in flight however short K is.

template <int R, int B>
__device__ __forceinline__ void warp_rows(const float* __restrict__ W, int n0, int N, int K,
                                          const float* xs, int bsz, float acc[R][B]) {
    const int lane = threadIdx.x % 32;
    const float4* x4 = reinterpret_cast<const float4*>(xs);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;
#pragma unroll (R >= 4 ? 2 : 4)
    for (int k4 = lane; k4 < K / 4; k4 += 32) {
        float4 w[R];
#pragma unroll
        for (int r = 0; r < R; ++r)
            w[r] = n0 + r < N ? __ldg(reinterpret_cast<const float4*>(W + (size_t)(n0 + r) * K)
                                      + k4)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int b = 0; b < B; ++b) {
            if (b < bsz) {
                const float4 x = x4[(size_t)b * (K / 4) + k4];
#pragma unroll
                for (int r = 0; r < R; ++r)
                    acc[r][b] += w[r].x * x.x + w[r].y * x.y + w[r].z * x.z + w[r].w * x.w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
}

// Lane (r, b) = (lane / B, lane % B) takes the sum acc[r][b] out of the warp's registers (all
// lanes hold all sums; a runtime index into registers would send the array to local memory).
template <int R, int B>
__device__ __forceinline__ float lane_sum(const float acc[R][B], int r, int b) {
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j)
            if (i == r && j == b) v = acc[i][j];
    return v;
}

// y[b, n] (+)= W[n, :] . xs[b, :] for every row n, R rows at a time dealt round-robin to the
// grid's warps.
template <int R, int B>
__device__ void matvec_rows(const float* __restrict__ W, int N, int K, const float* xs, int bsz,
                            float* y, int ldy, bool accumulate) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int r = lane / B, b = lane % B;              // the sum this lane writes
    float acc[R][B];
    for (int n0 = (blockIdx.x * warps + threadIdx.x / 32) * R; n0 < N;
         n0 += gridDim.x * warps * R) {
        warp_rows<R, B>(W, n0, N, K, xs, bsz, acc);
        const float v = lane_sum<R, B>(acc, r, b);
        if (r < R && b < bsz && n0 + r < N) {
            float* out = y + (size_t)b * ldy + n0 + r;
            *out = accumulate ? __ldcg(out) + v : v;
        }
    }
}

template <int B>
__device__ void stage_matvec(const float* __restrict__ W, int N, int K, const float* xs, int bsz,
                             float* y, int ldy, bool accumulate) {
    if (rows_per_warp(N, blockDim.x / 32) == 4)
        matvec_rows<4, B>(W, N, K, xs, bsz, y, ldy, accumulate);
    else
        matvec_rows<1, B>(W, N, K, xs, bsz, y, ldy, accumulate);
}

// The qkv stage: rows of wqkv = [q heads | k heads | v heads], R at a time = R / 2 pairs
// (2i, 2i + 1) of one head (head_dim % 4 == 0), so the warp that computes a pair of a q or k
// head also rotates it (model.apply_rotary_emb, as attention_decode in decode.cu does) and
// writes it where it goes: q to the q buffer, k and v to the cache at `pos`. Lane (pair, b)
// writes one pair. (Here the grid barrier after this stage makes the cache row safe to read:
// attend reads position pos from the cache, where decode.cu's kernel uses its own copy.)
template <int R, int B>
__device__ void qkv_rows(const float* __restrict__ wqkv, int K, const float* xs, int bsz,
                         const float* __restrict__ cos_row, const float* __restrict__ sin_row,
                         float* q, float* cache_k, float* cache_v, int pos, int n_heads,
                         int n_kv_heads, int head_dim, int max_seq) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const int N = q_dim + 2 * kv_dim;
    const int pair = lane / B, b = lane % B;
    float acc[R][B];
    for (int n0 = (blockIdx.x * warps + threadIdx.x / 32) * R; n0 < N;
         n0 += gridDim.x * warps * R) {
        warp_rows<R, B>(wqkv, n0, N, K, xs, bsz, acc);
        const float x0 = lane_sum<R, B>(acc, 2 * pair, b);
        const float x1 = lane_sum<R, B>(acc, 2 * pair + 1, b);
        if (pair >= R / 2 || b >= bsz) continue;
        const int n = n0 + 2 * pair;                    // rows n and n + 1
        if (n >= q_dim + kv_dim) {                      // a v pair: into the cache as it is
            float* dst = cache_v + ((size_t)b * max_seq + pos) * kv_dim + (n - q_dim - kv_dim);
            dst[0] = x0;
            dst[1] = x1;
            continue;
        }
        const int i = (n % head_dim) / 2;               // the pair's frequency
        const float c = __ldg(cos_row + i), s = __ldg(sin_row + i);
        const float out0 = x0 * c - x1 * s;
        const float out1 = x0 * s + x1 * c;
        float* dst = n < q_dim ? q + (size_t)b * q_dim + n
                               : cache_k + ((size_t)b * max_seq + pos) * kv_dim + (n - q_dim);
        dst[0] = out0;
        dst[1] = out1;
    }
}

template <int B>
__device__ void stage_qkv(const float* __restrict__ wqkv, int K, const float* xs, int bsz,
                          const float* __restrict__ cos_row, const float* __restrict__ sin_row,
                          float* q, float* cache_k, float* cache_v, int pos, int n_heads,
                          int n_kv_heads, int head_dim, int max_seq) {
    const int N = (n_heads + 2 * n_kv_heads) * head_dim;
    if (rows_per_warp(N, blockDim.x / 32) == 4)
        qkv_rows<4, B>(wqkv, K, xs, bsz, cos_row, sin_row, q, cache_k, cache_v, pos, n_heads,
                       n_kv_heads, head_dim, max_seq);
    else
        qkv_rows<2, B>(wqkv, K, xs, bsz, cos_row, sin_row, q, cache_k, cache_v, pos, n_heads,
                       n_kv_heads, head_dim, max_seq);
}

// ---- softmax and the weighted sum of the values over one block: attend's last steps ---------
// decode.cu's attention_decode ran these too until 2026-11-30 (its scores in shared memory,
// block reductions between the steps); it now keeps a softmax per warp, and only attend (below)
// calls them, on the scores it computes itself.

// scores[0 .. n_keys) -> exp(score - max) in place (softmax's numerators); returns their sum.
// Thread tid wrote scores tid, tid + blockDim, ... and m is its max of them: each thread
// exponentiates its own, so only the block reductions (reduce.cu) need barriers.
__device__ __forceinline__ float softmax_numerators(float* scores, int n_keys, float m,
                                                    float* scratch) {
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int t = threadIdx.x; t < n_keys; t += blockDim.x) {
        const float e = expf(scores[t] - m);
        scores[t] = e;
        sum += e;
    }
    return block_sum(sum, scratch);                        // its barrier publishes scores[]
}

// out[at + d] = sum_t p[t] v_t[d] / sum, d < head_dim. Threads split as (group, piece): piece i
// covers v[WIDTH i .. WIDTH i + WIDTH - 1] and group g sums p_t v_t over t = g, g + groups, ...;
// consecutive threads read consecutive pieces of one row (coalesced). The groups' partials meet
// in `partial` (WIDTH * blockDim floats) and are added in a fixed order. value(t, piece, v)
// loads piece `piece` of v_t into float v[WIDTH]: where the row lives and how it is read is the
// caller's. UNROLL unrolls the loop over t (persistent.cu's attend: 1, its registers are short).
template <int WIDTH, int UNROLL, typename Value>
__device__ __forceinline__ void weighted_values(const float* p, int n_keys, float sum,
                                                int head_dim, float* partial, float* out,
                                                size_t at, Value value) {
    const int tid = threadIdx.x, pieces = head_dim / WIDTH;
    const int groups = blockDim.x / pieces, grp = tid / pieces, piece = tid % pieces;
    if (grp < groups) {
        float acc[WIDTH];
#pragma unroll
        for (int j = 0; j < WIDTH; ++j) acc[j] = 0.0f;
#pragma unroll UNROLL
        for (int t = grp; t < n_keys; t += groups) {
            float v[WIDTH];
            value(t, piece, v);
            const float pt = p[t];
#pragma unroll
            for (int j = 0; j < WIDTH; ++j) acc[j] += pt * v[j];
        }
        if (WIDTH == 4)                  // one 16-byte store (head_dim % 4 == 0: aligned)
            reinterpret_cast<float4*>(partial)[grp * pieces + piece] =
                make_float4(acc[0], acc[1], acc[2], acc[3]);
        else
#pragma unroll
            for (int j = 0; j < WIDTH; ++j) partial[grp * head_dim + piece * WIDTH + j] = acc[j];
    }
    __syncthreads();
    for (int d = tid; d < head_dim; d += blockDim.x) {
        float total = 0.0f;
        for (int i = 0; i < groups; ++i) total += partial[i * head_dim + d];
        out[at + d] = total / sum;
    }
}

// ---- attention of one query head of one row -------------------------------------------------
// attention_decode of decode.cu without its RoPE (the qkv stage did it), reduced to float32
// caches and head_dim % 4 == 0, with every load of q and the cache through L2 (they were
// written during this launch): its own scores, then softmax_numerators and weighted_values
// (above). smem: head_dim + 4 * blockDim + max_seq floats.
__device__ void attend(int h, int b, const float* q, const float* cache_k, const float* cache_v,
                       float* att, int n_keys, int n_heads, int n_kv_heads, int head_dim,
                       int max_seq, float scale, float* smem, float* scratch) {
    float* qs = smem;                                    // (head_dim,)
    float* partial = qs + head_dim;                      // (4 * blockDim,)
    float* scores = partial + 4 * blockDim.x;            // (max_seq,)
    const int tid = threadIdx.x;
    const int g = h / (n_heads / n_kv_heads);
    const size_t row_stride = (size_t)n_kv_heads * head_dim;
    const float* keys = cache_k + (size_t)b * max_seq * row_stride + g * head_dim;
    const float* values = cache_v + (size_t)b * max_seq * row_stride + g * head_dim;
    const int pieces = head_dim / 4;

    for (int d = tid; d < head_dim; d += blockDim.x)     // scaled first, as model.py does
        qs[d] = __ldcg(q + (size_t)b * n_heads * head_dim + h * head_dim + d) * scale;
    __syncthreads();

    // The scores: not decode.cu's dot_row, which adds product by product where this adds each
    // float4's four products first (and reads 16 pieces at a time through __ldg, where a cache
    // written during this launch must be read through L2): sharing it would change the rounding.
    float m = neg_inf();
    for (int t = tid; t < n_keys; t += blockDim.x) {
        const float4* k4 = reinterpret_cast<const float4*>(keys + t * row_stride);
        float dot = 0.0f;
        for (int i0 = 0; i0 < pieces; i0 += 8) {         // 8 loads in flight, then the sums
            float4 k[8];
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (i0 + i < pieces) k[i] = __ldcg(k4 + i0 + i);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                if (i0 + i < pieces) {
                    const float* qi = qs + 4 * (i0 + i);
                    dot += qi[0] * k[i].x + qi[1] * k[i].y + qi[2] * k[i].z + qi[3] * k[i].w;
                }
            }
        }
        scores[t] = dot;
        m = fmaxf(m, dot);
    }
    // softmax and the values' weighted sum are attention_decode's (decode.cu), the loop over the
    // values not unrolled (UNROLL 1): unrolled, decode_persistent<8> spills
    const float sum = softmax_numerators(scores, n_keys, m, scratch);
    weighted_values<4, 1>(scores, n_keys, sum, head_dim, partial, att,
                          (size_t)b * n_heads * head_dim + h * head_dim,
                          [&](int t, int piece, float* v) {     // v_t's piece, through L2
                              const float4 x = __ldcg(reinterpret_cast<const float4*>(
                                                          values + t * row_stride) + piece);
                              v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
                          });
    __syncthreads();                                     // smem is reused by the next item
}

// ---- the step --------------------------------------------------------------------------------
// layers: (n_layers, 8) pointers, per layer attention_norm, wqkv, wo, ffn_norm, w13, w2,
// cache_k, cache_v (the model's own arrays). step = [start_pos, token_0, ..., token_{bsz-1}].
// Buffers: h (bsz, dim), q and att (bsz, n_heads * head_dim), h13 (bsz, 2 * hidden),
// logits (bsz, vocab). B: the rows a warp's registers hold (1, 2, 4 or 8), bsz <= B. Dynamic
// shared memory: PersistentDecoder's shared_bytes (the largest stage input, bsz * max(dim,
// n_heads * head_dim, hidden) floats, or attend's). Before each barrier, a warp asks L2 for the
// weight rows it multiplies after it (prefetch_rows).

struct LayerWeights {
    const float *attention_norm, *wqkv, *wo, *ffn_norm, *w13, *w2;
    float *cache_k, *cache_v;
};

__device__ __forceinline__ LayerWeights layer_weights(const unsigned long long* layers, int l) {
    const unsigned long long* L = layers + 8 * l;
    return {reinterpret_cast<const float*>(L[0]), reinterpret_cast<const float*>(L[1]),
            reinterpret_cast<const float*>(L[2]), reinterpret_cast<const float*>(L[3]),
            reinterpret_cast<const float*>(L[4]), reinterpret_cast<const float*>(L[5]),
            reinterpret_cast<float*>(L[6]), reinterpret_cast<float*>(L[7])};
}

template <int B>
__global__ void __launch_bounds__(PERSISTENT_BLOCK, 1)
decode_persistent(const int* __restrict__ step, const float* __restrict__ tok_embeddings,
                  const float* __restrict__ norm, const float* __restrict__ output,
                  const float* __restrict__ freqs_cos, const float* __restrict__ freqs_sin,
                  const unsigned long long* __restrict__ layers, float* h, float* q, float* att,
                  float* h13, float* logits, unsigned int* counter, int bsz, int dim,
                  int hidden, int n_layers, int n_heads, int n_kv_heads, int head_dim,
                  int max_seq, int vocab, float eps, float scale) {
    grid_launch_dependents();
    grid_dependency_wait();                                // (reduce.cu)
    extern __shared__ __align__(16) float stage_smem[];   // decode.cu has a `smem`
    __shared__ float scratch[32];
    unsigned int arrivals = 0;
    // step through L2, as everything written during a step: read-only loads (__ldg, what const
    // __restrict__ pointers get) ptxas may move across the wait (kernels.md, What is left)
    const int pos = __ldcg(step);
    const int q_dim = n_heads * head_dim, n_qkv = q_dim + 2 * n_kv_heads * head_dim;
    const float* cos_row = freqs_cos + (size_t)pos * (head_dim / 2);
    const float* sin_row = freqs_sin + (size_t)pos * (head_dim / 2);

    // h = tok_embeddings[token]: block 0 writes it for the residual (first read after layer 0's
    // first barrier); layer 0's norm reads the table directly
    if (blockIdx.x == 0)
        for (int b = 0; b < bsz; ++b)
            for (int k = threadIdx.x; k < dim; k += blockDim.x)
                h[(size_t)b * dim + k] = __ldg(tok_embeddings + (size_t)step[1 + b] * dim + k);

    for (int l = 0; l < n_layers; ++l) {
        const LayerWeights L = layer_weights(layers, l);
        if (l == 0)         // h is the embedding rows: read them from the table itself
            stage_input<INPUT_RMSNORM>(stage_smem, tok_embeddings, dim, bsz, dim,
                                       L.attention_norm, eps, scratch, step + 1);
        else
            stage_input<INPUT_RMSNORM>(stage_smem, h, dim, bsz, dim, L.attention_norm, eps,
                                       scratch);
        stage_qkv<B>(L.wqkv, dim, stage_smem, bsz, cos_row, sin_row, q, L.cache_k, L.cache_v,
                     pos, n_heads, n_kv_heads, head_dim, max_seq);
        prefetch_rows(L.wo, dim, q_dim);
        grid_sync(counter, arrivals);

        for (int item = blockIdx.x; item < n_heads * bsz; item += gridDim.x)
            attend(item % n_heads, item / n_heads, q, L.cache_k, L.cache_v, att, pos + 1,
                   n_heads, n_kv_heads, head_dim, max_seq, scale, stage_smem, scratch);
        prefetch_rows(L.w13, 2 * hidden, dim);
        grid_sync(counter, arrivals);

        stage_input<INPUT_PLAIN>(stage_smem, att, q_dim, bsz, q_dim, nullptr, 0.0f, scratch);
        stage_matvec<B>(L.wo, dim, q_dim, stage_smem, bsz, h, dim, true);
        prefetch_rows(L.w2, dim, hidden);
        grid_sync(counter, arrivals);

        stage_input<INPUT_RMSNORM>(stage_smem, h, dim, bsz, dim, L.ffn_norm, eps, scratch);
        stage_matvec<B>(L.w13, 2 * hidden, dim, stage_smem, bsz, h13, 2 * hidden, false);
        if (l + 1 < n_layers) prefetch_rows(layer_weights(layers, l + 1).wqkv, n_qkv, dim, 2);
        grid_sync(counter, arrivals);

        stage_input<INPUT_SWIGLU>(stage_smem, h13, 2 * hidden, bsz, hidden, nullptr, 0.0f,
                                  scratch);
        stage_matvec<B>(L.w2, dim, hidden, stage_smem, bsz, h, dim, true);
        if (l + 1 == n_layers) prefetch_rows(output, vocab, dim);
        grid_sync(counter, arrivals);
    }
    stage_input<INPUT_RMSNORM>(stage_smem, h, dim, bsz, dim, norm, eps, scratch);
    stage_matvec<B>(output, vocab, dim, stage_smem, bsz, logits, vocab, false);
}

// The small steps of decoding one token, fused so that a layer takes 5 launches instead of ~45.
//
// Transformer.forward (minillama/model.py) runs a layer as a few dozen CuPy calls (RMSNorm
// alone is six elementwise kernels), which is fine for a prompt but at one token per call the
// GPU spends its time waiting for the next launch. FusedDecoder (minillama/cuda/fused.py) runs
// the same arithmetic with these kernels plus gemv (matmul.cu; qgemv.cu for weights kept as
// stored), whose prologues compute RMSNorm and the SwiGLU gate on the fly as they load their
// input:
//
//     embed_tokens                                          h = tok_embeddings[token]
//     per layer:  gemv(rmsnorm -> wqkv) -> attention_decode (RoPE, cache write, attention)
//                 -> gemv(wo, h +=) -> gemv(rmsnorm -> w13) -> gemv(swiglu -> w2, h +=)
//     gemv(rmsnorm -> output)                               logits
//
// (One row of float32 weights takes halves.cu's two launches a layer instead. A batch of
// weights kept as stored, unless the caller asks for the same bits every run, leaves the two
// RMSNorms to the kernel after the product: attention_decode scales q, k and v, w2's staging
// h13 (qgemv_mma.cu, "rms_out"; FusedDecoder.run_deferred).)
//
// What changes from one token to the next, the position and the token ids, is read from device
// memory (`step` = [start_pos, token_0, ..., token_{bsz-1}]), never passed as a kernel argument.
// So the launches are identical for every position and are recorded once into a CUDA graph,
// which the host then replays with a single call per token.
//
// Each kernel mirrors a function of model.py, written the same way so the float32 results agree
// to rounding (tests/test_cuda.py compares logits with the CPU path token by token).
// Compiled as one module after reduce.cu and matmul.cu (see minillama/cuda/runtime.py).
//
// The KV cache holds float32 or float16 (the model's kv_dtype): attention_decode is a
// template over its element type T, float or unsigned short (the bits of a float16, as
// f32_to_16bit in matmul.cu writes them). Only the cache is 16-bit: a key or value is rounded
// to nearest when it is written, as NumPy's assignment into a float16 array rounds it, and
// widened when it is read; every sum and product is float32.

// One cache element written from float32 (round_to_16bit: matmul.cu), and as_cached: what the
// element then holds, read back as float32 (f16_to_f32). The pointer's type picks the overload.
__device__ __forceinline__ void cache_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void cache_store(unsigned short* p, float v) {
    *p = round_to_16bit<false>(v);
}
__device__ __forceinline__ float as_cached(const float*, float v) { return v; }
__device__ __forceinline__ float as_cached(const unsigned short*, float v) {
    return f16_to_f32(round_to_16bit<false>(v));
}

// h[b, :] = table[step[1 + b], :], and clear[0 .. clear_count) = 0 (where clear is not null:
// what the step's first launch adds into, halves.cu's residual buffer or the batches' qkv and
// sums of squares)                                           grid (bsz), any block size
extern "C" __global__ void embed_tokens(const int* __restrict__ step, const float* __restrict__ table,
                                        float* __restrict__ h, float* __restrict__ clear,
                                        int clear_count, int dim) {
    grid_launch_dependents();
    grid_dependency_wait();                                // (reduce.cu)
    const float* row = table + (size_t)step[1 + blockIdx.x] * dim;
    float* out = h + (size_t)blockIdx.x * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[j] = row[j];
    if (clear != nullptr) clear_next(clear, clear_count);   // (reduce.cu)
}

// ---- attention_decode ----------------------------------------------------------------------
// Attention of one new query per row against the cache, keys 0 .. pos, in one kernel, RoPE
// and the cache write included (they were a launch of their own, rope_kv, until 2026-11-29):
// q, k = apply_rotary_emb(q, k),  cache[pos] = k, v,
// scores = (q * scale) . k_t,  p = softmax(scores),  out = sum_t p_t v_t.
//
// qkv: (bsz, (n_heads + 2 n_kv) * head_dim) = [q heads | k heads | v heads], from gemv(wqkv).
// row_ss: null, or each row's sum of squares of the residual whose RMSNorm the product left to
// this kernel (qgemv_mma's rms_out, the batches' deferred norm): q, k and v of row b are then
// scaled by 1 / sqrt(row_ss[b] / norm_k + eps) as they are loaded.
// One block per (query head, row, split); query head h reads kv head g = h / (n_heads /
// n_kv_heads). grid (n_heads, bsz, splits); block: up to ATTN_WARPS warps; head_dim <=
// ATTN_HEAD_DIM (256); no dynamic shared memory, and no bound on max_seq. split_parts (bsz,
// n_heads, splits, head_dim + 2) floats and arrivals (bsz, n_heads) zeros, read where splits > 1.
//
// At the positions a story reaches the work is a few dozen keys, nothing: what the kernel costs
// is latency, its chain of round trips to memory and of barriers, and the wo GEMV after it
// starts only when its last block ends. So it is laid out to have few of them (issues 10, 13):
//   - a warp per key. A row of head_dim values is `pieces` pieces of WIDTH values (one float4,
//     or four float16s, when head_dim % 4 == 0; else one value), lane l holding pieces l,
//     l + 32, ... (PER_LANE of them: a slice). A key's row is then one coalesced load and its
//     score a butterfly of shuffles, no shared memory and no barrier. Warp w takes keys
//     w, w + warps, w + 2 warps, ..., KEYS of them at once (a chunk), every key and value row
//     of the chunk loaded before the first is used.
//   - 1. before grid_dependency_wait(): what the wqkv GEMV before this kernel does not write
//     (the position, its cos and sin, the first chunk of cached keys and values), so that their
//     round trips overlap the GEMV's end (programmatic launch, reduce.cu);
//   - 2. after it, one round trip: q, the new key and value, rotated by every warp for itself
//     (cheaper than sharing them through a barrier);
//   - 3. a softmax kept per warp, online, as flash-decoding keeps one per split of the keys: a
//     running max, the sum of exp(score - max) and the weighted sum of values, rescaled when
//     the max grows. Long contexts are more chunks; nothing grows with max_seq;
//   - 4. one barrier: the warps' (max, sum, weighted values) meet in shared memory and each
//     thread combines one element of the output;
//   - 5. from ATTN_SPLIT_CHUNKS chunks of keys on, splits: the chunks go round the grid's splits
//     (blockIdx.z) as the keys go round a block's warps, so a long context is round trips
//     side by side on other SMs, not one after another on one; each split leaves its combined
//     softmax as a record, and the last split to finish combines the records (flash-decoding).
// The new key and value (t = pos): the n_heads / n_kv_heads blocks of kv head g run in any
// order and all need them, and only the first of them (h % rep == 0) writes them into the
// cache, for the steps after this one. So no block reads cache row pos: each uses its own
// rotated copy, rounded as the cache holds it (float16, for a float16 cache), in the warp whose
// turn the key is in the round robin (pos % warps).

// Warps a block has at most: a chunk of keys is KEYS per warp, so 16 warps keep 128 keys in
// flight where 8 kept 64, one round trip per 128 keys. kernels.attention_threads launches 16
// at up to 8 rows of float4 pieces in models of up to 16 heads (a one-row step at position
// 200: 1.12x on stories15M, 1.10x on stories110M), else 8 (32 rows: 0.95x with 16, the blocks
// outnumbering the SMs; the 7B shape's 32 heads: 0.98x to 1.00x).
constexpr int ATTN_WARPS = 16;
// A block's threads at most, by WIDTH: scalar pieces take more registers a thread (174 to 191
// where float4 pieces take 125), so they keep 8 warps and ptxas' 255 registers, no spills.
__host__ __device__ constexpr int attention_most_threads(int width) {
    return width == 4 ? ATTN_WARPS * 32 : 256;
}
constexpr int ATTN_HEAD_DIM = 256;             // FusedDecoder.covers: head_dim <= its block
// Floats of cached keys a lane holds at once (and as many of values): a chunk is
// ATTN_LANE_FLOATS / (WIDTH * PER_LANE) keys, 8 when head_dim <= 128 with float4 pieces.
constexpr int ATTN_LANE_FLOATS = 32;
// Chunks of keys from which they are split over the grid (step 5): two chunks in two splits
// were slower than in one block (stories15M at position 200: 0.97x), the records' round trip
// and the last block's combine costing more than the chunk they save; 5 and 8 chunks gained
// (stories110M at positions 600 and 1000: 1.17x and 1.34x).
constexpr int ATTN_SPLIT_CHUNKS = 3;

// The warps' partial softmaxes (step 4); a warp without keys leaves max -inf, sum 0, zeros.
struct WarpSoftmax {
    float max[ATTN_WARPS], sum[ATTN_WARPS];
    float acc[ATTN_WARPS * ATTN_HEAD_DIM];                 // (warps, head_dim) weighted values
};

// Every global load of attention_decode goes through L2 (__ldcg: ld.global.cg), none through
// the read-only path (__ldg: ld.global.nc, what `const __restrict__` pointers get by default).
// ptxas (sm_90, NVRTC 13) moves read-only loads across grid_dependency_wait, both ways: in the
// SASS they put the first chunk's loads after the wait (the lead of step 1 lost), and in one
// version some of qkv's loads before it (a race with the GEMV that writes qkv). Ordinary loads
// stay on their side of the wait.

// WIDTH values from p (float32 or float16 bits) as float32; WIDTH 4: one 16- or 8-byte load.
template <int WIDTH>
__device__ __forceinline__ void load_w(const float* p, float* v) {
    if (WIDTH == 4) {
        const float4 x = __ldcg(reinterpret_cast<const float4*>(p));
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    } else {
#pragma unroll
        for (int i = 0; i < WIDTH; ++i) v[i] = __ldcg(p + i);
    }
}

template <int WIDTH>
__device__ __forceinline__ void load_w(const unsigned short* p, float* v) {
    if (WIDTH == 4) {
        const uint2 x = __ldcg(reinterpret_cast<const uint2*>(p));     // four float16s
        v[0] = f16_lo(x.x); v[1] = f16_hi(x.x); v[2] = f16_lo(x.y); v[3] = f16_hi(x.y);
    } else {
#pragma unroll
        for (int i = 0; i < WIDTH; ++i) v[i] = f16_to_f32(__ldcg(p + i));
    }
}

// This lane's slice of a row: pieces lane + 32 i, i < PER_LANE, as float32; zeros past the
// row's end (head_dim 64 in float4s: lanes 16 .. 31), so they add nothing to a product.
// SHARED: a float row in shared memory (halves.cu's), read the plain way.
template <int WIDTH, int PER_LANE, bool SHARED = false, typename T>
__device__ __forceinline__ void load_slice(const T* row, int pieces,
                                           float (&x)[PER_LANE][WIDTH]) {
    static_assert(!SHARED || sizeof(T) == sizeof(float), "shared memory rows hold floats");
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int piece = threadIdx.x % 32 + 32 * i;
        if (piece < pieces && SHARED) {
#pragma unroll
            for (int j = 0; j < WIDTH; ++j) x[i][j] = row[piece * WIDTH + j];
        } else if (piece < pieces) {
            load_w<WIDTH>(row + piece * WIDTH, x[i]);
        } else {
#pragma unroll
            for (int j = 0; j < WIDTH; ++j) x[i][j] = 0.0f;
        }
    }
}

// The slice into a cache row (rounded to float16 for a float16 cache) or into shared memory
template <int WIDTH, int PER_LANE, typename T>
__device__ __forceinline__ void store_slice(T* row, int pieces,
                                            const float (&x)[PER_LANE][WIDTH]) {
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int piece = threadIdx.x % 32 + 32 * i;
        if (piece < pieces)
#pragma unroll
            for (int j = 0; j < WIDTH; ++j) cache_store(row + piece * WIDTH + j, x[i][j]);
    }
}

// model.apply_rotary_emb on one pair (x0, x1) = (x[2i], x[2i+1]), with the cos and sin of pair i
// at the position: the same float operations.
__device__ __forceinline__ void rotate_pair(float x0, float x1, float c, float s, float* out) {
    out[0] = x0 * c - x1 * s;
    out[1] = x0 * s + x1 * c;
}

// The cos and sin of the pairs this lane's pieces touch, from the tables' rows at pos: a piece
// of 4 values holds pairs 2 piece and 2 piece + 1; a piece of 1 value is half of pair piece / 2.
template <int WIDTH, int PER_LANE>
__device__ __forceinline__ void load_angles(const float* __restrict__ cos_row,
                                            const float* __restrict__ sin_row, int pieces,
                                            float (&c)[PER_LANE][2], float (&s)[PER_LANE][2]) {
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int piece = threadIdx.x % 32 + 32 * i, first = WIDTH * piece / 2;
#pragma unroll
        for (int j = 0; j < (WIDTH == 4 ? 2 : 1); ++j) {
            c[i][j] = piece < pieces ? __ldcg(cos_row + first + j) : 0.0f;
            s[i][j] = piece < pieces ? __ldcg(sin_row + first + j) : 0.0f;
        }
    }
}

// This lane's slice of head x (a q or k head in the qkv row), rotated by the angles above.
// SHARED: x in shared memory (halves.cu's), read the plain way.
template <int WIDTH, int PER_LANE, bool SHARED = false>
__device__ __forceinline__ void load_rotated(const float* x, int pieces,
                                             const float (&c)[PER_LANE][2],
                                             const float (&s)[PER_LANE][2],
                                             float (&out)[PER_LANE][WIDTH]) {
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int piece = threadIdx.x % 32 + 32 * i;
        float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (piece < pieces && WIDTH == 4) {           // two pairs, one float4
            const float4* at = reinterpret_cast<const float4*>(x + 4 * piece);
            const float4 v = SHARED ? *at : __ldcg(at);
            rotate_pair(v.x, v.y, c[i][0], s[i][0], r);
            rotate_pair(v.z, v.w, c[i][1], s[i][1], r + 2);
        } else if (piece < pieces) {                  // element `piece` of its pair
            const float* pair = x + (piece & ~1);
            rotate_pair(SHARED ? pair[0] : __ldcg(pair), SHARED ? pair[1] : __ldcg(pair + 1),
                        c[i][0], s[i][0], r);
            r[0] = piece & 1 ? r[1] : r[0];
        }
#pragma unroll
        for (int j = 0; j < WIDTH; ++j) out[i][j] = r[j];
    }
}

// This lane's share of q . k: its slice's products, added in order
template <int WIDTH, int PER_LANE>
__device__ __forceinline__ float slice_dot(const float (&q)[PER_LANE][WIDTH],
                                           const float (&k)[PER_LANE][WIDTH]) {
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i)
#pragma unroll
        for (int j = 0; j < WIDTH; ++j) dot += q[i][j] * k[i][j];
    return dot;
}

// reduce.cu's warp_sum on N values at once: the N butterflies are independent, so their
// shuffles are in flight together rather than one sum's latency after another's.
template <int N>
__device__ __forceinline__ void warp_sums(float (&v)[N]) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] += __shfl_xor_sync(FULL_MASK, v[j], o);
}

// Chunk c of this warp's keys, t = (c * KEYS + j) * warps + warp: the rows t < pos from the
// cache into k[j] and v[j], zeros for the others (the new key, t = pos, is not read: step 3).
template <int WIDTH, int PER_LANE, int KEYS, typename T>
__device__ __forceinline__ void load_chunk(const T* keys, const T* values, size_t row_stride,
                                           int c, int pos, int pieces,
                                           float (&k)[KEYS][PER_LANE][WIDTH],
                                           float (&v)[KEYS][PER_LANE][WIDTH]) {
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int j = 0; j < KEYS; ++j) {
        const int t = (c * KEYS + j) * warps + warp;
        load_slice<WIDTH, PER_LANE>(keys + t * row_stride, t < pos ? pieces : 0, k[j]);
        load_slice<WIDTH, PER_LANE>(values + t * row_stride, t < pos ? pieces : 0, v[j]);
    }
}

// Step 3's loop: the warp's online softmax over chunks first, first + stride, .. of the cached
// keys t < pos (chunk `first` already in k and v). m: the largest score so far; sum and acc:
// sum_t exp(score_t - m) and sum_t exp(score_t - m) v_t, rescaled when m grows.
// attention_decode's splits take first = split, stride = splits; halves.cu's blocks the same.
template <int WIDTH, int PER_LANE, int KEYS, typename T>
__device__ __forceinline__ void attend_chunks(const T* keys, const T* values, size_t row_stride,
                                              int pos, int pieces, int first, int stride,
                                              const float (&q)[PER_LANE][WIDTH],
                                              float (&k)[KEYS][PER_LANE][WIDTH],
                                              float (&v)[KEYS][PER_LANE][WIDTH], float& m,
                                              float& sum, float (&acc)[PER_LANE][WIDTH]) {
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int chunk = first; chunk * KEYS * warps + warp < pos; chunk += stride) {
        if (chunk > first) load_chunk<WIDTH, PER_LANE, KEYS>(keys, values, row_stride, chunk,
                                                             pos, pieces, k, v);
        float score[KEYS];
#pragma unroll
        for (int j = 0; j < KEYS; ++j) score[j] = slice_dot<WIDTH, PER_LANE>(q, k[j]);
        warp_sums<KEYS>(score);                            // every lane holds every score
        float top = m;
#pragma unroll
        for (int j = 0; j < KEYS; ++j) {
            if ((chunk * KEYS + j) * warps + warp >= pos) score[j] = neg_inf();  // not cached
            top = fmaxf(top, score[j]);
        }
        const float fade = expf(m - top);                  // 0 while m = -inf
        sum *= fade;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i)
#pragma unroll
            for (int e = 0; e < WIDTH; ++e) acc[i][e] *= fade;
#pragma unroll
        for (int j = 0; j < KEYS; ++j) {
            const float p = expf(score[j] - top);          // 0 for t >= pos
            sum += p;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i)
#pragma unroll
                for (int e = 0; e < WIDTH; ++e) acc[i][e] += p * v[j][i][e];
        }
        m = top;
    }
}

// Step 4: each warp's (max, sum, weighted values) into shared memory; after a barrier, the
// block's largest score M, and element d of the block's softmax, whose warps count exp(m_w -
// M) times each: returns sum_w f_w acc_w[d] and sets norm = sum_w f_w sum_w, in warp order. A
// block whose warps saw no key (halves.cu's splits past the last chunk) has M = -inf: zeros.
template <int WIDTH, int PER_LANE>
__device__ __forceinline__ void publish_softmax(WarpSoftmax& parts, float m, float sum,
                                                const float (&acc)[PER_LANE][WIDTH],
                                                int head_dim, int pieces) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        parts.max[warp] = m;
        parts.sum[warp] = sum;
    }
    store_slice<WIDTH, PER_LANE>(parts.acc + warp * head_dim, pieces, acc);
}

__device__ __forceinline__ float warps_max(const WarpSoftmax& parts, int warps) {
    float most = neg_inf();
    for (int w = 0; w < warps; ++w) most = fmaxf(most, parts.max[w]);
    return most;
}

__device__ __forceinline__ float warps_total(const WarpSoftmax& parts, int warps, int head_dim,
                                             float most, int d, float& norm) {
    float total = 0.0f;
    norm = 0.0f;
    if (most == neg_inf()) return total;                   // no keys: exp(-inf + inf) is NaN
    for (int w = 0; w < warps; ++w) {                      // in a fixed order
        const float f = expf(parts.max[w] - most);         // 0 for a warp without keys
        total += f * parts.acc[w * head_dim + d];
        norm += f * parts.sum[w];
    }
    return total;
}

// Step 5: records of `splits` splits, read(r, i) element i of split r's (M, norm, totals):
// the largest M, then output element d, the records counted as the warps were, in split order.
template <class Read>
__device__ __forceinline__ float records_max(const Read& read, int splits) {
    float top = neg_inf();
    for (int r = 0; r < splits; ++r) top = fmaxf(top, read(r, 0));
    return top;
}

template <class Read>
__device__ __forceinline__ float records_output(const Read& read, int splits, float top, int d) {
    float total = 0.0f, norm = 0.0f;
    for (int r = 0; r < splits; ++r) {
        const float f = expf(read(r, 0) - top);
        total += f * read(r, 2 + d);
        norm += f * read(r, 1);
    }
    return total / norm;
}

// One block's attention with PER_LANE pieces a lane (the steps of the comment above)
template <int WIDTH, int PER_LANE, typename T>
__device__ __forceinline__ void attention_by_warps(
        const float* __restrict__ qkv, const int* __restrict__ step,
        const float* __restrict__ cos_table, const float* __restrict__ sin_table,
        T* __restrict__ cache_k, T* __restrict__ cache_v, float* __restrict__ out, int n_heads,
        int n_kv_heads, int head_dim, int max_seq, float scale, float* __restrict__ split_parts,
        int* __restrict__ arrivals, const float* __restrict__ row_ss, int norm_k, float eps,
        WarpSoftmax& parts) {
    constexpr int KEYS = ATTN_LANE_FLOATS / (WIDTH * PER_LANE);   // keys of a chunk, per warp
    const int h = blockIdx.x, b = blockIdx.y, warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32, rep = n_heads / n_kv_heads, g = h / rep;
    const int pieces = head_dim / WIDTH, half = head_dim / 2;
    const size_t row_stride = (size_t)n_kv_heads * head_dim;   // from one position to the next
    T* keys = cache_k + (size_t)b * max_seq * row_stride + g * head_dim;
    T* values = cache_v + (size_t)b * max_seq * row_stride + g * head_dim;

    // 1. Before the wait, nothing that the kernels of this step write. `step` is written before
    //    the step's first kernel starts: by a copy (FusedDecoder.send_step's beside the graph,
    //    or the copy node greedy_steps' graph begins with), or by the step before's greedy_pick
    //    (greedy_steps' later steps), which has ended before this step's first kernel, launched
    //    the ordinary way, starts, and this kernel starts only after that one has; the cos and
    //    sin tables never change; the cache rows t < pos of this layer were written by earlier
    //    steps, which ended before this one began (in stream order, or through greedy_pick's
    //    end), and in this step only this kernel writes this layer's cache, at row pos, after
    //    its wait. (A kernel of this step that wrote `step` would need this read of pos moved
    //    after the wait.)
    const int pos = __ldcg(step);
    // The split of the keys this block takes (blockIdx.z of gridDim.z, step 5): chunks split,
    // split + splits, ..., where splits is as many of the grid's as the cached keys fill, from
    // ATTN_SPLIT_CHUNKS chunks on; a block beyond them has nothing to do. One split (gridDim.z
    // 1, or a short context): the block takes every chunk and writes out itself.
    const int split = blockIdx.z, chunks = (pos + KEYS * warps - 1) / (KEYS * warps);
    const int splits = chunks >= ATTN_SPLIT_CHUNKS ? min((int)gridDim.z, chunks) : 1;
    if (split >= splits) return;
    float c[PER_LANE][2], s[PER_LANE][2];                  // (pieces, pairs) cos, sin at pos
    load_angles<WIDTH, PER_LANE>(cos_table + (size_t)pos * half, sin_table + (size_t)pos * half,
                                 pieces, c, s);
    float k[KEYS][PER_LANE][WIDTH], v[KEYS][PER_LANE][WIDTH];   // (keys, slice): first chunk
    load_chunk<WIDTH, PER_LANE, KEYS>(keys, values, row_stride, split, pos, pieces, k, v);
    grid_dependency_wait();                                // (reduce.cu) qkv is written

    // 2. q of head h (times scale: model.py scales q before the product), the new key of kv
    //    head g, rotated, and the new value, loaded by every warp (one round trip for all).
    const float* row = qkv + (size_t)b * (n_heads + 2 * n_kv_heads) * head_dim;
    float q[PER_LANE][WIDTH], k_new[PER_LANE][WIDTH], v_new[PER_LANE][WIDTH];   // (slice)
    load_rotated<WIDTH, PER_LANE>(row + h * head_dim, pieces, c, s, q);
    load_rotated<WIDTH, PER_LANE>(row + (n_heads + g) * head_dim, pieces, c, s, k_new);
    load_slice<WIDTH, PER_LANE>(row + (n_heads + n_kv_heads + g) * head_dim, pieces, v_new);
    if (row_ss != nullptr) {                               // the norm the product left to us
        const float inv_rms = 1.0f / sqrtf(__ldcg(row_ss + b) / norm_k + eps);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i)
#pragma unroll
            for (int j = 0; j < WIDTH; ++j) {
                q[i][j] *= inv_rms;
                k_new[i][j] *= inv_rms;
                v_new[i][j] *= inv_rms;
            }
    }
    // The new key is the next of the round robin: warp pos % warps of split 0 takes it. In the
    // first block of kv head g, that warp writes it and the value into the cache.
    const bool owner = split == 0 && warp == pos % warps;
    if (owner && h % rep == 0) {
        store_slice<WIDTH, PER_LANE>(keys + pos * row_stride, pieces, k_new);
        store_slice<WIDTH, PER_LANE>(values + pos * row_stride, pieces, v_new);
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i)
#pragma unroll
        for (int j = 0; j < WIDTH; ++j) {
            q[i][j] *= scale;
            k_new[i][j] = as_cached(keys, k_new[i][j]);      // as the cache holds them
            v_new[i][j] = as_cached(values, v_new[i][j]);
        }

    // 3. The warp's softmax, online. m: the largest score so far; sum and acc: sum_t
    //    exp(score_t - m) and sum_t exp(score_t - m) v_t. The owner of the new key starts from
    //    it (m = its score, sum = exp(0) = 1, acc = its value), the others from nothing. (Every
    //    warp scores it, with no branch: a branch would let the compiler put the new key's loads
    //    after q's rotation, a second round trip.)
    const float score_new = warp_sum(slice_dot<WIDTH, PER_LANE>(q, k_new));
    float m = owner ? score_new : neg_inf(), sum = owner ? 1.0f : 0.0f, acc[PER_LANE][WIDTH];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i)
#pragma unroll
        for (int j = 0; j < WIDTH; ++j) acc[i][j] = owner ? v_new[i][j] : 0.0f;
    //    Then the cached keys t < pos, a chunk at a time.
    attend_chunks<WIDTH, PER_LANE, KEYS>(keys, values, row_stride, pos, pieces, split, splits, q,
                                         k, v, m, sum, acc);

    // 4. The warps' softmaxes combined (publish_softmax, warps_total): thread d adds element
    //    d of the warps' weighted values.
    publish_softmax<WIDTH, PER_LANE>(parts, m, sum, acc, head_dim, pieces);
    __syncthreads();
    const float most = warps_max(parts, warps);            // M
    const int record = head_dim + 2;                       // a split's (M, norm, totals)
    float* records = split_parts + ((size_t)b * n_heads + h) * gridDim.z * record;
    float* y = out + (size_t)b * n_heads * head_dim + h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float norm;
        const float total = warps_total(parts, warps, head_dim, most, d, norm);
        if (splits == 1) {
            y[d] = total / norm;
        } else {                                           // this split's record (step 5)
            records[split * record + 2 + d] = total;
            if (d == 0) {
                records[split * record] = most;
                records[split * record + 1] = norm;
            }
        }
    }
    if (splits == 1) return;

    // 5. The splits' softmaxes combined as the warps' were, by the block that finishes last
    //    (split_last_block, reduce.cu: a counter per head and row, which that block sets back
    //    to 0 for the next launch), in split order whichever block that is.
    if (!split_last_block(arrivals + (size_t)b * n_heads + h, splits)) return;
    const auto read = [&](int r, int i) { return __ldcg(records + r * record + i); };
    const float top = records_max(read, splits);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        y[d] = records_output(read, splits, top, d);
}

template <int WIDTH, typename T>
__global__ void __launch_bounds__(attention_most_threads(WIDTH))
attention_decode(const float* __restrict__ qkv, const int* __restrict__ step,
                 const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                 T* __restrict__ cache_k, T* __restrict__ cache_v, float* __restrict__ out,
                 int n_heads, int n_kv_heads, int head_dim, int max_seq, float scale,
                 float* __restrict__ split_parts, int* __restrict__ arrivals,
                 const float* __restrict__ row_ss, int norm_k, float eps) {
    grid_launch_dependents();
    __shared__ __align__(16) WarpSoftmax parts;
    // A slice of 1, 2, 4 or 8 pieces a lane, the fewest that hold the row; a chunk has as
    // many fewer keys (ATTN_LANE_FLOATS). MOST: the pieces of a lane at ATTN_HEAD_DIM, 2 for
    // float4 pieces, so that no longer slice is compiled for them.
    constexpr int MOST = ATTN_HEAD_DIM / (32 * WIDTH);
    const int pieces = head_dim / WIDTH;
#define ATTN_ARGS qkv, step, cos_table, sin_table, cache_k, cache_v, out, n_heads, n_kv_heads, \
                  head_dim, max_seq, scale, split_parts, arrivals, row_ss, norm_k, eps, parts
    if (pieces <= 32)
        attention_by_warps<WIDTH, 1>(ATTN_ARGS);
    else if (pieces <= 64 || MOST == 2)
        attention_by_warps<WIDTH, 2>(ATTN_ARGS);
    else if (pieces <= 128)
        attention_by_warps<WIDTH, MOST / 2>(ATTN_ARGS);
    else
        attention_by_warps<WIDTH, MOST>(ATTN_ARGS);
#undef ATTN_ARGS
}


// ---- the next token: greedy_pick -------------------------------------------------------------
// Greedy decoding takes each row's argmax of the last logits. generation.greedy needs back from
// the GPU only the bsz ids and whether every logit was finite (else it raises, saying where);
// with CuPy that was four launches (argmax, isfinite, all, a concatenation), each with its
// Python, about as long as a stories15M step. Here it is one: a block per row, one pass over
// the row. Each thread keeps the largest value it has seen and the first index holding it
// (`v > top`: a later equal value does not replace it, and a NaN never does), and whether a
// value was not finite. Then the threads meet once: each pair (maximum, first index) is one
// 64-bit key whose order is the argmax's (argmax_key), so one reduction finds the maximum and,
// among the threads holding it, the least index (numpy.argmax's choice among equal maxima),
// and the flags ride the same barrier. (Three block reductions, the maximum, the least index
// and a count, took six barriers; one made the stories15M and 110M tokens 1.01x as fast, H200,
// 2026-11-30, docs/kernels.md "One key, one barrier".) A row of NaN has no index holding its
// maximum: its id is 0, a valid one, and the flag is what makes the caller look. The loads go
// GREEDY_UNROLL at a time, float4s where the row is aligned, all in flight before the first
// is compared: a stories15M step is ~0.1 ms, and a first version, which read the row three
// times one load at a time, took a sixth of it.
// logits: bsz rows of `vocab` floats, `ld` floats apart (logits[:, -1] of (bsz, seqlen, vocab));
// out (2 bsz) int32: the ids, then a flag per row, 1 where a logit is not finite.
// next_step: null, or the [position, tokens] a chain of greedy steps reads (FusedDecoder.
// greedy_steps): each row's id becomes its next token, and the position moves on by one. Every
// kernel of this step has ended by then (each ends after its own wait for the one before).
#define GREEDY_UNROLL 8             // (1024 threads leave 64 registers a thread: a larger
                                    // unroll would spill; kernels/dev/nvrtc_build.py --ptxas-v
                                    // shows it, nothing at run time does)
// One value of the row seen by this thread, at index k: its maximum and first index, and
// `poison`, a sum of v * 0 that turns NaN at the first value that is not finite (inf * 0 and
// NaN * 0 are NaN; runtime.py compiles without --use_fast_math, which could fold v * 0 to 0).
__device__ __forceinline__ void greedy_see(float v, int k, float& top, int& first, float& poison) {
    poison = fmaf(v, 0.0f, poison);
    if (v > top) { top = v; first = k; }
}

// A thread's (maximum, first index) as one 64-bit key whose unsigned order is the argmax's: the
// float's bits made monotonic (a negative's flipped, a positive's sign bit set; -0.0 taken as
// 0.0, which NumPy counts equal to it) above the index inverted, so that of equal maxima the
// first index has the larger key. 0 for a thread with no index (`none`: it saw only NaN, or
// nothing above -inf).
__device__ __forceinline__ unsigned long long argmax_key(float top, int first, int none) {
    if (first == none) return 0ull;
    unsigned int bits = __float_as_uint(top == 0.0f ? 0.0f : top);
    bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
    return (unsigned long long)bits << 32 | (0xFFFFFFFFu - (unsigned int)first);
}

extern "C" __global__ void __launch_bounds__(1024) greedy_pick(const float* __restrict__ logits,
                                                               int vocab, int ld,
                                                               int* __restrict__ out, int bsz,
                                                               int* __restrict__ next_step) {
    __shared__ unsigned long long keys[32];                  // a warp's largest key
    __shared__ int poisoned[32];                            // whether it saw a value not finite
    grid_dependency_wait();            // (reduce.cu) the logits are the last kernel's
    const float* x = logits + (size_t)blockIdx.x * ld;
    float top = neg_inf(), poison = 0.0f;
    int first = vocab;                                      // (vocab: no index yet)
    // float4s where the row starts on 16 bytes (FusedDecoder's logits: 32,000 floats are one
    // round of 8 float4s a thread), then the rest one float at a time; a thread's k only grow
    const int vec = ((size_t)x % 16 == 0) ? vocab / 4 : 0;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int j0 = threadIdx.x; j0 < vec; j0 += GREEDY_UNROLL * blockDim.x) {
        float4 v[GREEDY_UNROLL];
#pragma unroll
        for (int i = 0; i < GREEDY_UNROLL; ++i) {    // through L2: written by the last kernel
            const int j = j0 + i * blockDim.x;
            v[i] = j < vec ? __ldcg(x4 + j) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int i = 0; i < GREEDY_UNROLL; ++i) {
            const int j = j0 + i * blockDim.x;
            if (j < vec) {
                greedy_see(v[i].x, 4 * j, top, first, poison);
                greedy_see(v[i].y, 4 * j + 1, top, first, poison);
                greedy_see(v[i].z, 4 * j + 2, top, first, poison);
                greedy_see(v[i].w, 4 * j + 3, top, first, poison);
            }
        }
    }
    for (int k0 = 4 * vec + threadIdx.x; k0 < vocab; k0 += GREEDY_UNROLL * blockDim.x) {
        float v[GREEDY_UNROLL];
#pragma unroll
        for (int i = 0; i < GREEDY_UNROLL; ++i) {
            const int k = k0 + i * blockDim.x;
            v[i] = k < vocab ? __ldcg(x + k) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < GREEDY_UNROLL; ++i)
            if (k0 + i * blockDim.x < vocab)
                greedy_see(v[i], k0 + i * blockDim.x, top, first, poison);
    }
    // the threads meet once: each warp's largest key and flag, then warp 0 over the warps'
    // (GREEDY_THREADS, a multiple of 32, a block: every warp whole)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const unsigned long long key = warp_max_u64(argmax_key(top, first, vocab));
    const bool bad = __any_sync(FULL_MASK, poison != 0.0f);
    if (lane == 0) {
        keys[warp] = key;
        poisoned[warp] = bad;
    }
    __syncthreads();
    if (warp > 0) return;
    const unsigned long long best = warp_max_u64(lane < warps ? keys[lane] : 0ull);
    const bool flag = __any_sync(FULL_MASK, lane < warps && poisoned[lane]);
    if (lane == 0) {                   // a row of NaN has no index of its maximum: id 0, flagged
        const int id = best ? (int)(0xFFFFFFFFu - (unsigned int)best) : 0;
        out[blockIdx.x] = id;
        out[bsz + blockIdx.x] = flag ? 1 : 0;
        if (next_step != nullptr) {
            next_step[1 + blockIdx.x] = id;
            if (blockIdx.x == 0) next_step[0] += 1;
        }
    }
}

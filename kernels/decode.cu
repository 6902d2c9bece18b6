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

// h[b, :] = table[step[1 + b], :]          grid (bsz), any block size
extern "C" __global__ void embed_tokens(const int* __restrict__ step, const float* __restrict__ table,
                                        float* __restrict__ h, int dim) {
    grid_launch_dependents();
    grid_dependency_wait();                                // (reduce.cu)
    const float* row = table + (size_t)step[1 + blockIdx.x] * dim;
    float* out = h + (size_t)blockIdx.x * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[j] = row[j];
}

// Attention of one new query per row against the cache, keys 0 .. pos, in one kernel, RoPE
// and the cache write included (they were a launch of their own, rope_kv, until 2026-11-29):
// q, k = apply_rotary_emb(q, k),  cache[pos] = k, v,
// scores = (q * scale) . k_t,  p = softmax(scores),  out = sum_t p_t v_t.
//
// qkv: (bsz, (n_heads + 2 n_kv) * head_dim) = [q heads | k heads | v heads], from gemv(wqkv).
// One block per (query head, row); query head h reads kv head g = h / (n_heads / n_kv_heads).
//   1. one thread per pair (x[2i], x[2i+1]) rotates q's pair (into shared memory, times scale)
//      and the new key's pair of kv head g (model.apply_rotary_emb, the same float operations),
//      and copies the new value's pair. The block uses its own new key and value for position
//      pos, rounded as the cache stores them, and never reads cache row pos: the
//      n_heads / n_kv_heads blocks of kv head g run in any order, and only the first of them
//      (h % (n_heads / n_kv_heads) == 0) writes k and v into the cache at pos, for the steps
//      after this one.
//   2. thread t computes the scores of keys t, t + blockDim, ... into shared memory, reading
//      its key row WIDTH values at a time (one float4, or four float16s, when
//      head_dim % 4 == 0), and their max
//   3. exponentiate against the block max and sum (block reductions, reduce.cu)
//   4. threads split as (group, piece): piece i covers v[WIDTH i .. WIDTH i + WIDTH - 1] and
//      group g sums p_t v_t over t = g, g + groups, ...; consecutive threads read consecutive
//      pieces of one cached v row (coalesced). The group partials are added in shared memory
//      and divided by the sum.
// Dynamic shared memory: 3 head_dim + WIDTH * blockDim + max_seq floats.
// Needs head_dim <= blockDim.
// grid (n_heads, bsz)

// WIDTH values from p (float32 or float16 bits) as float32; WIDTH 4: one 16- or 8-byte load.
// LDG: through the read-only data cache (__ldg), for the cache rows below pos, which no block
// writes during the launch (the compiler no longer infers it: the kernel writes the cache).
template <int WIDTH, bool LDG = false>
__device__ __forceinline__ void load_w(const float* p, float* v) {
    if (WIDTH == 4) {
        const float4* p4 = reinterpret_cast<const float4*>(p);
        const float4 x = LDG ? __ldg(p4) : *p4;
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    } else {
#pragma unroll
        for (int i = 0; i < WIDTH; ++i) v[i] = LDG ? __ldg(p + i) : p[i];
    }
}

template <int WIDTH, bool LDG = false>
__device__ __forceinline__ void load_w(const unsigned short* p, float* v) {
    if (WIDTH == 4) {
        const uint2* p2 = reinterpret_cast<const uint2*>(p);
        const uint2 x = LDG ? __ldg(p2) : *p2;                  // four float16s
        v[0] = f16_lo(x.x); v[1] = f16_hi(x.x); v[2] = f16_lo(x.y); v[3] = f16_hi(x.y);
    } else {
#pragma unroll
        for (int i = 0; i < WIDTH; ++i) v[i] = f16_to_f32(LDG ? __ldg(p + i) : p[i]);
    }
}

// q . k over one row of head_dim values, WIDTH at a time: k is a cache row (float32 or float16
// bits) or the block's own new key in shared memory; the same order of products either way.
template <int WIDTH, bool LDG, typename K>
__device__ __forceinline__ float dot_row(const float* qs, const K* k, int pieces) {
    float dot = 0.0f;
    // 16 pieces at a time: all 16 loads are issued before the first product waits on one
    for (int i0 = 0; i0 < pieces; i0 += 16) {
        float kv[16][WIDTH];
#pragma unroll
        for (int i = 0; i < 16; ++i)
            if (i0 + i < pieces) load_w<WIDTH, LDG>(k + (i0 + i) * WIDTH, kv[i]);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            if (i0 + i < pieces) {
                float qv[WIDTH];
                load_w<WIDTH>(qs + (i0 + i) * WIDTH, qv);
#pragma unroll
                for (int j = 0; j < WIDTH; ++j) dot += qv[j] * kv[i][j];
            }
        }
    }
    return dot;
}

// model.apply_rotary_emb on one pair (x[2i], x[2i+1]) of a q or k head, at position pos
__device__ __forceinline__ void rotate_pair(const float* x, const float* __restrict__ cos_table,
                                            const float* __restrict__ sin_table, int pos, int i,
                                            int half, float* out) {
    const float x0 = x[0], x1 = x[1];
    const float c = cos_table[(size_t)pos * half + i], s = sin_table[(size_t)pos * half + i];
    out[0] = x0 * c - x1 * s;
    out[1] = x0 * s + x1 * c;
}

// ---- steps 3 and 4 over one block: softmax, then the weighted sum of the values ---------------
// Shared with persistent.cu's attend, which runs them on its own scores and cache (compiled
// after this file). The scores themselves are computed by each kernel its own way (see step 2).

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
// caller's. UNROLL unrolls the loop over t: 4 in attention_decode; 1 in persistent.cu's attend,
// whose registers are short (unrolled by 4, decode_persistent<8> spills).
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

template <int WIDTH, typename T>
__global__ void __launch_bounds__(256)
attention_decode(const float* __restrict__ qkv, const int* __restrict__ step,
                 const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                 T* __restrict__ cache_k, T* __restrict__ cache_v, float* __restrict__ out,
                 int n_heads, int n_kv_heads, int head_dim, int max_seq, float scale) {
    grid_launch_dependents();
    grid_dependency_wait();                                // (reduce.cu)
    extern __shared__ __align__(16) float smem[];
    float* qs = smem;                                      // (head_dim,) q * scale, rotated
    float* ks = qs + head_dim;                             // (head_dim,) the new key, rotated
    float* vs = ks + head_dim;                             // (head_dim,) the new value
    float* partial = vs + head_dim;                        // (WIDTH * blockDim,)
    float* scores = partial + WIDTH * blockDim.x;          // (max_seq,)
    __shared__ float scratch[32];

    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int rep = n_heads / n_kv_heads, g = h / rep;
    const int pos = step[0], n_keys = pos + 1, half = head_dim / 2;
    const size_t row_stride = (size_t)n_kv_heads * head_dim;   // from one position to the next
    T* keys = cache_k + (size_t)b * max_seq * row_stride + g * head_dim;
    T* values = cache_v + (size_t)b * max_seq * row_stride + g * head_dim;
    const int pieces = head_dim / WIDTH;                   // WIDTH-wide pieces of a row

    // 1. RoPE: q of head h and k of kv head g, one pair per thread. The new key and value are
    //    used from shared memory, as the cache will hold them (rounded, for a float16 cache):
    //    the other blocks of kv head g may not have written them yet, and only the first writes.
    const float* row = qkv + (size_t)b * (n_heads + 2 * n_kv_heads) * head_dim;
    const float* k_new = row + (n_heads + g) * head_dim;
    const float* v_new = k_new + n_kv_heads * head_dim;
    const bool writer = h % rep == 0;
    for (int i = tid; i < half; i += blockDim.x) {
        float qr[2], kr[2];
        rotate_pair(row + h * head_dim + 2 * i, cos_table, sin_table, pos, i, half, qr);
        rotate_pair(k_new + 2 * i, cos_table, sin_table, pos, i, half, kr);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int d = 2 * i + j;
            qs[d] = qr[j] * scale;                         // model.py scales q before the product
            ks[d] = as_cached(keys, kr[j]);
            vs[d] = as_cached(values, v_new[d]);
            if (writer) {
                cache_store(keys + (size_t)pos * row_stride + d, kr[j]);
                cache_store(values + (size_t)pos * row_stride + d, v_new[d]);
            }
        }
    }
    __syncthreads();

    // 2. scores of keys 0 .. pos (pos: the new key, from shared memory) and their max. Not
    //    shared with persistent.cu's attend: its dot products read 8 float4s at a time through
    //    L2 and add each float4's four products before adding them to the sum, where dot_row
    //    adds product by product; one function would change one kernel's rounding.
    float m = neg_inf();
    for (int t = tid; t < n_keys; t += blockDim.x) {
        const float dot = t == pos ? dot_row<WIDTH, false>(qs, ks, pieces)
                                   : dot_row<WIDTH, true>(qs, keys + t * row_stride, pieces);
        scores[t] = dot;
        m = fmaxf(m, dot);
    }

    // 3. softmax's numerators and sum
    const float sum = softmax_numerators(scores, n_keys, m, scratch);

    // 4. sum_t p_t v_t / sum, the new value (t = pos) from shared memory
    weighted_values<WIDTH, 4>(scores, n_keys, sum, head_dim, partial, out,
                              (size_t)b * n_heads * head_dim + h * head_dim,
                              [&](int t, int piece, float* v) {
                                  if (t == pos)
                                      load_w<WIDTH>(vs + piece * WIDTH, v);
                                  else
                                      load_w<WIDTH, true>(values + t * row_stride + piece * WIDTH,
                                                          v);
                              });
}


// ---- the next token: greedy_pick -------------------------------------------------------------
// Greedy decoding takes each row's argmax of the last logits. generation.greedy needs back from
// the GPU only the bsz ids and whether every logit was finite (else it raises, saying where);
// with CuPy that was four launches (argmax, isfinite, all, a concatenation), each with its
// Python, about as long as a stories15M step. Here it is one: a block per row, three block
// reductions over the row (which stays in L1 and L2 between them): the maximum, the first index
// holding it (numpy.argmax's choice among equal maxima; indices are exact as floats up to 2^24),
// and the count of values that are not finite (fmaxf skips a NaN, so a row of NaN has no index
// that holds its maximum: its id is 0, a valid one, and the flag is what makes the caller look).
// logits: bsz rows of `vocab` floats, `ld` floats apart (logits[:, -1] of (bsz, seqlen, vocab));
// out (2 bsz) int32: the ids, then a flag per row, 1 where a logit is not finite.
extern "C" __global__ void greedy_pick(const float* __restrict__ logits, int vocab, int ld,
                                       int* __restrict__ out, int bsz) {
    __shared__ float scratch[32];
    grid_dependency_wait();            // (reduce.cu) the logits are the last kernel's
    const float* x = logits + (size_t)blockIdx.x * ld;
    float top = neg_inf(), bad = 0.0f;
    for (int k = threadIdx.x; k < vocab; k += blockDim.x) {
        top = fmaxf(top, x[k]);
        bad += isfinite(x[k]) ? 0.0f : 1.0f;
    }
    top = block_max(top, scratch);
    bad = block_sum(bad, scratch);
    float first = (float)vocab;                         // (no index: the flag is set)
    for (int k = threadIdx.x; k < vocab; k += blockDim.x)
        if (x[k] == top) { first = (float)k; break; }   // a thread's k only grow
    first = block_min(first, scratch);
    if (threadIdx.x == 0) {            // a row of NaN has no index of its maximum: id 0, flagged
        out[blockIdx.x] = first < (float)vocab ? (int)first : 0;
        out[bsz + blockIdx.x] = bad > 0.0f ? 1 : 0;
    }
}

// ---- the step's edges: read_step -------------------------------------------------------------
// step <- [start_pos, token_0, ..., token_{n-2}], read in place from the page-locked row the host
// wrote (a GPU reads page-locked host memory over the bus; unified addressing gives the row one
// address for both). FusedDecoder.greedy_step's graph begins with this kernel and ends with
// greedy_pick writing its ids into page-locked memory the same way, so that no copy runs beside
// the graph: on the Llama-2-7B shape each such copy cost 60 to 80 us, though it moves a few bytes
// (docs/kernels.md, "What the host adds to a step"). __ldcv: fetched again every time, never a
// cached copy of an earlier step's row.
extern "C" __global__ void read_step(const int* __restrict__ host_row, int* __restrict__ step,
                                     int n) {
    grid_launch_dependents();          // (reduce.cu) embed_tokens may start; it waits for this
    for (int i = threadIdx.x; i < n; i += blockDim.x) step[i] = __ldcv(host_row + i);
}

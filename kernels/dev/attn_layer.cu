// The attention half of a layer for one decode row as ONE launch of clusters (development
// kernel, measured by kernels/dev/ab_mlp.py): RMSNorm and wqkv's rows of a head, RoPE and the
// cache write, attention, and that head's columns of wo, with the heads' products added into
// the next residual by float atomics.
//
//     h_mid = h + wo @ attention(rope(wqkv @ rmsnorm(h)))
//
// A cluster of R blocks per head (blockIdx.y), block r = blockIdx.x its rank. Block r:
//   1. before the wait: its rows of wqkv (rows r S .. r S + S - 1 of the head's q, and of its
//      kv head's k and v, S = head_dim / R) and its rows of wo's head columns (rows r D / R ..
//      of wo[:, h hd : (h + 1) hd]) into shared memory (cp.async), the position's cos and sin,
//      and the first chunk of its split of the cached keys;
//   2. x = h, its sum of squares, its 3 S products (RMSNorm after the sums), each pushed into
//      every block of the cluster (st.shared::cluster); cluster barrier: every block holds the
//      head's q, new k, new v;
//   3. RoPE, the cache write (rank 0 of the kv head's first query head), the online softmax
//      over its split of the keys (chunks r, r + R, ..), the block's warps combined into a
//      record (max, sum, weighted values); cluster barrier;
//   4. the R records combined from the cluster's shared memory, in rank order (every block
//      gets the same output), and its rows of wo times it, added into h_mid (atomicAdd; the
//      residual h added by head 0's blocks); a last cluster barrier before exit, as a block's
//      shared memory may not go while another reads it.
// h_mid must be zero before the launch; Z is zeroed for the launch after.
// head_dim % R == 0, head_dim % 4 == 0, head_dim <= 128 (one float4 piece a lane), dim % R == 0,
// a float32 cache, one row.

__device__ __forceinline__ void cl_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cl_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cl_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned int cl_map(const float* local, unsigned int rank) {
    unsigned int l = static_cast<unsigned int>(__cvta_generic_to_shared(local)), remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(l), "r"(rank));
    return remote;
}
__device__ __forceinline__ void cl_store(const float* local, unsigned int rank, float v) {
    asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(cl_map(local, rank)), "f"(v) : "memory");
}
__device__ __forceinline__ float cl_load(const float* local, unsigned int rank) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(cl_map(local, rank)) : "memory");
    return v;
}

// kernels/dev/timeline_layer.py: thread 0 of each block writes %globaltimer at each phase
// into stamps[block * 16 + phase] (stamps null: nothing)
__device__ __forceinline__ void stamp(unsigned long long* stamps, int phase) {
    if (stamps != nullptr && threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        stamps[(blockIdx.y * gridDim.x + blockIdx.x) * 16 + phase] = t;
    }
}

// This block's rows of wo's head columns times the head's output o, added into Y (the
// residual X too, once: by head 0's blocks)
__device__ __forceinline__ void wo_rows(const float* wos, const float* o, const float* xs,
                                        float* Y, int r, int h, int DR, int HD, int warps) {
    const int lane = threadIdx.x % 32;
    for (int d = threadIdx.x / 32; d < DR; d += warps) {
        float y = 0.0f;
        for (int e = lane; e < HD; e += 32) y = fmaf(wos[d * HD + e], o[e], y);
        y = warp_sum(y);
        if (lane == 0) {
            if (h == 0) y += xs[r * DR + d];
            atomicAdd(Y + r * DR + d, y);
        }
    }
}

template <int R, int P, int WARPS, int MINB = 1>
__global__ void __cluster_dims__(R, 1, 1) __launch_bounds__(WARPS * 32, MINB)
attn_layer(const float* __restrict__ X, const float* __restrict__ norm_w, float eps,
           const float* __restrict__ Wqkv, const float* __restrict__ Wo,
           const int* __restrict__ step, const float* __restrict__ cos_table,
           const float* __restrict__ sin_table, float* cache_k, float* cache_v, float* Y,
           float* Z, int D, int n_heads, int n_kv_heads, int HD, int max_seq, float scale,
           int alone_chunks, unsigned long long* stamps) {
    constexpr int WIDTH = 4, PER_LANE = 1, KEYS = ATTN_LANE_FLOATS / (WIDTH * PER_LANE);
    const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int rep = n_heads / n_kv_heads, g = h / rep, S = HD / R, NR = 3 * S, DR = D / R;
    const int D4 = D / 4, HD4 = HD / 4, pieces = HD / WIDTH, half = HD / 2;
    extern __shared__ __align__(16) float smem[];
    float* ws = smem;                           // (NR, D) its rows of wqkv
    float* wos = ws + NR * D;                   // (DR, HD) its rows of wo's head columns
    float* qkv = wos + DR * HD;                 // (3, HD) the head's q, new k, new v
    float* rec = qkv + 3 * HD;                  // (HD + 2) its record: max, sum, totals
    float* o = rec + HD + 2;                    // (HD) the head's output
    float* xs = o + HD + 2;                     // (D) x, 16-byte aligned (HD % 4 == 0)
    __shared__ float part_max[WARPS], part_sum[WARPS];
    __shared__ __align__(16) float part_acc[WARPS * 128];

    cl_arrive_relaxed();                        // every block of the cluster has started: below
    stamp(stamps, 0);
    // 1. weights into shared memory
    for (int c = threadIdx.x; c < NR * D4; c += blockDim.x) {
        const int j = c / D4, k4 = c % D4, which = j / S, jj = j % S;
        const int base = which == 0 ? h * HD : which == 1 ? (n_heads + g) * HD
                                                          : (n_heads + n_kv_heads + g) * HD;
        cp_async16(smem_addr(ws + j * D + 4 * k4), Wqkv + (size_t)(base + r * S + jj) * D + 4 * k4, 16);
    }
    for (int c = threadIdx.x; c < DR * HD4; c += blockDim.x) {
        const int d = c / HD4, e4 = c % HD4;
        cp_async16(smem_addr(wos + d * HD + 4 * e4),
                   Wo + (size_t)(r * DR + d) * (n_heads * HD) + h * HD + 4 * e4, 16);
    }
    cp_async_commit();
    const int pos = __ldcg(step);
    const size_t row_stride = (size_t)n_kv_heads * HD;
    float* keys = cache_k + g * HD;
    float* values = cache_v + g * HD;
    float c[PER_LANE][2], s[PER_LANE][2];
    load_angles<WIDTH, PER_LANE>(cos_table + (size_t)pos * half, sin_table + (size_t)pos * half,
                                 pieces, c, s);
    // alone: few enough keys that every block of the cluster attends to all of them itself,
    // so that no block needs another's record (one cluster barrier, not three)
    const int chunks = (pos + KEYS * WARPS - 1) / (KEYS * WARPS);
    const bool alone = chunks <= alone_chunks;
    const int first = alone ? 0 : r, stride = alone ? 1 : R;
    float k[KEYS][PER_LANE][WIDTH], v[KEYS][PER_LANE][WIDTH];
    load_chunk<WIDTH, PER_LANE, KEYS>(keys, values, row_stride, first, pos, pieces, k, v);
    float4 gn[P];                               // RMSNorm's weights (not an input)
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = lane + 32 * i;
        gn[i] = k4 < D4 ? __ldg(reinterpret_cast<const float4*>(norm_w) + k4)
                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    grid_launch_dependents();
    grid_dependency_wait();
    stamp(stamps, 1);
    float4* xs4 = reinterpret_cast<float4*>(xs);    // x through shared memory (mlp.cu says why)
    for (int c = threadIdx.x; c < D4; c += blockDim.x)
        xs4[c] = __ldcg(reinterpret_cast<const float4*>(X) + c);
    const int blocks = gridDim.x * gridDim.y, block = blockIdx.y * gridDim.x + blockIdx.x;
    for (int i = block * blockDim.x + threadIdx.x; i < D; i += blocks * blockDim.x) Z[i] = 0.0f;

    // 2. x, RMSNorm after the sums, the block's rows of wqkv
    cp_async_wait<0>();
    __syncthreads();
    float4 xn[P];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = lane + 32 * i;
        if (k4 < D4) {
            const float4 x = xs4[k4], w = gn[i];
            ss += sum_squares4(x);
            xn[i] = make_float4(x.x * w.x, x.y * w.y, x.z * w.z, x.w * w.w);
        } else {
            xn[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
    const float inv_rms = 1.0f / sqrtf(warp_sum(ss) / D + eps);
    stamp(stamps, 2);
    cl_wait();                                  // every block has started: pushes may go
    for (int j = warp; j < NR; j += WARPS) {
        const float4* w4 = reinterpret_cast<const float4*>(ws + j * D);
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < P; ++i) {
            const int k4 = lane + 32 * i;
            if (k4 < D4) {
                const float4 w = w4[k4];
                acc = fmaf(w.x, xn[i].x, acc); acc = fmaf(w.y, xn[i].y, acc);
                acc = fmaf(w.z, xn[i].z, acc); acc = fmaf(w.w, xn[i].w, acc);
            }
        }
        acc = warp_sum(acc) * inv_rms;
        if (lane < R) cl_store(qkv + (j / S) * HD + r * S + j % S, lane, acc);
    }
    stamp(stamps, 3);
    cl_arrive();
    cl_wait();                                  // the head's q, k, v in every block
    stamp(stamps, 4);

    // 3. RoPE, the cache write, the online softmax over this block's split
    float q[PER_LANE][WIDTH], k_new[PER_LANE][WIDTH], v_new[PER_LANE][WIDTH];
    {
        float rq[4] = {0, 0, 0, 0}, rk[4] = {0, 0, 0, 0}, rv[4] = {0, 0, 0, 0};
        if (lane < pieces) {
            const float* qs = qkv + 4 * lane;
            const float* ks = qkv + HD + 4 * lane;
            const float* vs = qkv + 2 * HD + 4 * lane;
            rotate_pair(qs[0], qs[1], c[0][0], s[0][0], rq);
            rotate_pair(qs[2], qs[3], c[0][1], s[0][1], rq + 2);
            rotate_pair(ks[0], ks[1], c[0][0], s[0][0], rk);
            rotate_pair(ks[2], ks[3], c[0][1], s[0][1], rk + 2);
            for (int e = 0; e < 4; ++e) rv[e] = vs[e];
        }
        for (int e = 0; e < 4; ++e) {
            q[0][e] = rq[e] * scale;
            k_new[0][e] = rk[e];
            v_new[0][e] = rv[e];
        }
    }
    const bool owner = (alone || r == 0) && warp == pos % WARPS;
    if (owner && r == 0 && h % rep == 0) {
        store_slice<WIDTH, PER_LANE>(keys + pos * row_stride, pieces, k_new);
        store_slice<WIDTH, PER_LANE>(values + pos * row_stride, pieces, v_new);
    }
    const float score_new = warp_sum(slice_dot<WIDTH, PER_LANE>(q, k_new));
    float m = owner ? score_new : neg_inf(), sum = owner ? 1.0f : 0.0f, acc[PER_LANE][WIDTH];
#pragma unroll
    for (int e = 0; e < WIDTH; ++e) acc[0][e] = owner ? v_new[0][e] : 0.0f;
    for (int chunk = first; chunk * KEYS * WARPS + warp < pos; chunk += stride) {
        if (chunk > first) load_chunk<WIDTH, PER_LANE, KEYS>(keys, values, row_stride, chunk, pos,
                                                         pieces, k, v);
        float score[KEYS];
#pragma unroll
        for (int j = 0; j < KEYS; ++j) score[j] = slice_dot<WIDTH, PER_LANE>(q, k[j]);
        warp_sums<KEYS>(score);
        float top = m;
#pragma unroll
        for (int j = 0; j < KEYS; ++j) {
            if ((chunk * KEYS + j) * WARPS + warp >= pos) score[j] = neg_inf();
            top = fmaxf(top, score[j]);
        }
        const float fade = expf(m - top);
        sum *= fade;
#pragma unroll
        for (int e = 0; e < WIDTH; ++e) acc[0][e] *= fade;
#pragma unroll
        for (int j = 0; j < KEYS; ++j) {
            const float p = expf(score[j] - top);
            sum += p;
#pragma unroll
            for (int e = 0; e < WIDTH; ++e) acc[0][e] += p * v[j][0][e];
        }
        m = top;
    }
    stamp(stamps, 5);
    if (lane == 0) {
        part_max[warp] = m;
        part_sum[warp] = sum;
    }
    store_slice<WIDTH, PER_LANE>(part_acc + warp * HD, pieces, acc);
    __syncthreads();
    float most = neg_inf();
    for (int w = 0; w < WARPS; ++w) most = fmaxf(most, part_max[w]);
    const bool none = most == neg_inf();        // a split without keys: an empty record
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float total = 0.0f, norm = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float f = none ? 0.0f : expf(part_max[w] - most);
            total += f * part_acc[w * HD + d];
            norm += f * part_sum[w];
        }
        if (alone) {
            o[d] = total / norm;
        } else {
            rec[2 + d] = total;
            if (d == 0) {
                rec[0] = most;
                rec[1] = norm;
            }
        }
    }
    stamp(stamps, 6);
    if (alone) {
        __syncthreads();
        wo_rows(wos, o, xs, Y, r, h, DR, HD, WARPS);
        stamp(stamps, 9);
        return;
    }
    cl_arrive();
    cl_wait();                                  // every block's record
    stamp(stamps, 7);

    // 4. the records combined, in rank order; this block's rows of wo
    if (threadIdx.x < HD) {
        const int d = threadIdx.x;
        float top = neg_inf();
        for (int rr = 0; rr < R; ++rr) top = fmaxf(top, cl_load(rec, rr));
        float total = 0.0f, norm = 0.0f;
        for (int rr = 0; rr < R; ++rr) {
            const float f = expf(cl_load(rec, rr) - top);
            total += f * cl_load(rec + 2 + d, rr);
            norm += f * cl_load(rec + 1, rr);
        }
        o[d] = total / norm;
    }
    cl_arrive();                                // done reading the others' shared memory
    __syncthreads();
    stamp(stamps, 8);
    wo_rows(wos, o, xs, Y, r, h, DR, HD, WARPS);
    stamp(stamps, 9);
    cl_wait();                                  // no block leaves while another reads it
    stamp(stamps, 10);
}

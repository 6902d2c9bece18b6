// A layer in two launches: one row of float32 weights (issue 13; docs/kernels.md, "A layer in
// two launches").
//
// FusedDecoder's layer is 5 launches (decode.cu's header), and at stories sizes each costs
// ~2 us of waiting, for its input through L2, its sums across the warps, its store, where its
// bytes take a tenth of that. Two of the five meetings are not in the arithmetic: wo's product
// needs only its head's output, and w2's only its hidden units' gates,
//
//     wo @ att       = sum over heads h     of wo[:, h hd : (h + 1) hd] @ att_h
//     w2 @ gate      = sum over hidden units of w2[:, u] gate_u
//
// so the launch that makes att_h or gate_u can multiply it by its columns at once, and what no
// block can do, add the blocks' products up, the memory system does: every block adds its
// (dim,) product into the next residual with atomicAdd (red.global.add.f32, executed in L2).
// The layer is then
//
//     attention_half     h_mid  = h + wo @ attention(rope(wqkv @ rmsnorm(h)))    a cluster a head
//     feed_forward_half  h_next = h_mid + w2 @ swiglu(w13 @ rmsnorm(h_mid))   J units a block
//                        (or feed_forward_wide: 32 units a block, its rows in shared memory)
//
// The price: the order in which L2 adds the blocks' products is the order they arrive in, so
// the sums are not the same bits from one step to the next (their last place or two). Logits
// stay within 2e-6 (relative) of the five launches'; FusedDecoder takes this path only where
// the caller did not ask for bitwise-repeatable decoding (CudaOps(deterministic=True)).
//
// The residual lives in three buffers in turn. Each launch reads one, adds into the next, which
// must hold zeros, and zeroes the third, the one the launch after it adds into (no one reads it
// any more: the launch before this one read it, and has ended by this one's wait). The step's
// first launch adds into a buffer embed_tokens zeroed.
//
// Three lessons from measuring it (H200, 2026-12-01, docs/kernels.md):
//   - x goes through shared memory, one load of each line a block. Read by every warp from L2
//     (where gemv reads it through L1, a block's warps sharing each line), the same 24 lines
//     were asked for by 2048 warps at once, and queued: staged, the stories110M feed-forward
//     launch took 1.6 us from its wait to its gates instead of 4.7 (stories15M 0.9, not 1.3).
//   - Every weight a block reads is loaded before grid_dependency_wait (registers, or shared
//     memory by cp.async), so it travels while the launch before ends.
//   - That pays only where the block has an SM to load on while the launch before runs: each
//     block takes a whole SM (its registers or its shared memory), so the two launches' blocks
//     must fit on the GPU together. stories110M's 96 + 128 did not (132 SMs); clusters of 4
//     and feed_forward_wide's 64 blocks do, and its step is 1.04x to 1.07x as fast
//     (kernels.halves_plan chooses).

constexpr int HALVES_CLUSTER = 8;       // blocks of a head's cluster (R): the portable most
                                        // (attention_half's default; 4 an instance too)
constexpr int HALVES_WARPS = 16;        // warps of an attention_half block
constexpr int HALVES_ALONE_CHUNKS = 1;  // keys in up to this many chunks: each block attends alone

// ---- Hopper's clusters: barrier and the neighbours' shared memory ---------------------------
// A cluster's blocks run at once on neighbouring SMs, and each may read and write the others'
// shared memory (distributed shared memory: mapa turns a local address into block `rank`'s).
// barrier.cluster is a barrier of all their threads, split into arrive and wait so that work
// can go between; .release / .acquire order the shared-memory writes before it against the
// reads after it. (0.55 us against 1.03 for a kernel boundary: "What a wait costs".)
__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned int cluster_address(const float* local, unsigned int rank) {
    unsigned int remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                 : "=r"(remote) : "r"(smem_addr(local)), "r"(rank));
    return remote;
}
__device__ __forceinline__ void cluster_store(const float* local, unsigned int rank, float v) {
    asm volatile("st.shared::cluster.f32 [%0], %1;"
                 :: "r"(cluster_address(local, rank)), "f"(v) : "memory");
}
__device__ __forceinline__ float cluster_load(const float* local, unsigned int rank) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];"
                 : "=f"(v) : "r"(cluster_address(local, rank)) : "memory");
    return v;
}

// ---- pieces both halves share ------------------------------------------------------------------

// x (dim,) into shared memory, a float4 a thread, through L2 (__ldcg: the launch before wrote it)
__device__ __forceinline__ void stage_x(const float* X, float* xs, int dim) {
    for (int c = threadIdx.x; c < dim / 4; c += blockDim.x)
        reinterpret_cast<float4*>(xs)[c] = __ldcg(reinterpret_cast<const float4*>(X) + c);
}

// This lane's P float4s of RMSNorm's weights (k4 = lane + 32 i), loaded before the wait
template <int P>
__device__ __forceinline__ void load_norm(const float* norm_w, int dim, float4 (&g)[P]) {
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = threadIdx.x % 32 + 32 * i;
        g[i] = k4 < dim / 4 ? __ldg(reinterpret_cast<const float4*>(norm_w) + k4)
                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// This lane's float4 i of a row (k4 = lane + 32 i) in shared memory, zeros past its end
__device__ __forceinline__ float4 slice_at(const float* row, int dim, int i) {
    const int k4 = threadIdx.x % 32 + 32 * i;
    return k4 < dim / 4 ? reinterpret_cast<const float4*>(row)[k4]
                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

// All P of them
template <int P>
__device__ __forceinline__ void row_slice(const float* row, int dim, float4 (&w)[P]) {
#pragma unroll
    for (int i = 0; i < P; ++i) w[i] = slice_at(row, dim, i);
}

// a * b, element by element
__device__ __forceinline__ float4 mul4(float4 a, float4 b) {
    return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}

// x * norm_w for this lane's float4s, and the lane's share of sum x^2 (RMSNorm after the
// sums, as gemv's GEMV_RMSNORM_LATE: the products take x * g, and their sums, added across
// the warp with it, are scaled by 1 / sqrt(mean(x^2) + eps))
template <int P>
__device__ __forceinline__ float normed_x(const float* xs, const float4 (&g)[P], int dim,
                                          float4 (&xn)[P]) {
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const float4 x = slice_at(xs, dim, i);
        ss += sum_squares4(x);
        xn[i] = mul4(x, g[i]);
    }
    return ss;
}

// stage_x, and beside x in shared memory x * norm_w (xg) and each warp's share of sum x^2
// (sq[warp]), for feed_forward_wide: its 32 warps then read one row of x each, where they read
// x and norm_w and added up x's squares every one. g: this thread's float4 of norm_w, c =
// threadIdx.x (dim / 4 <= blockDim.x).
__device__ __forceinline__ void stage_x_normed(const float* X, float4 g, float* xs, float* xg,
                                               float* sq, int dim) {
    const int c = threadIdx.x;
    float ss = 0.0f;
    if (c < dim / 4) {
        const float4 x = __ldcg(reinterpret_cast<const float4*>(X) + c);
        reinterpret_cast<float4*>(xs)[c] = x;
        reinterpret_cast<float4*>(xg)[c] = mul4(x, g);
        ss = sum_squares4(x);
    }
    ss = warp_sum(ss);
    if (c % 32 == 0) sq[c / 32] = ss;
}

// acc + w . x, a float4 of each, added in order
__device__ __forceinline__ float fma4(float4 w, float4 x, float acc) {
    acc = fmaf(w.x, x.x, acc);
    acc = fmaf(w.y, x.y, acc);
    acc = fmaf(w.z, x.z, acc);
    return fmaf(w.w, x.w, acc);
}

// This lane's share of a row of W (its float4s w) times xn. The warp's sums of several rows
// are added across it together (decode.cu's warp_sums: their shuffles in flight at once).
template <int P>
__device__ __forceinline__ float row_dot(const float4 (&w)[P], const float4 (&xn)[P], int dim) {
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < P; ++i)
        if (threadIdx.x % 32 + 32 * i < dim / 4) acc = fma4(w[i], xn[i], acc);
    return acc;
}

// Each half's turn, once its weights are on their way: let the next launch start (its blocks
// load while this one works), wait for the launch before (x is its output; reduce.cu), zero
// this launch's share of the buffer the next one adds into, stage x (stage(): stage_x, or
// stage_x_normed), and see the block's own copies (COPIES: cp.async; feed_forward_half has
// none) landed before anyone reads them
template <bool COPIES = true, typename Stage>
__device__ __forceinline__ void wait_and_stage(Stage stage, float* Z, int dim) {
    grid_launch_dependents();
    grid_dependency_wait();
    clear_next(Z, dim);
    stage();
    if (COPIES) cp_async_wait<0>();
    __syncthreads();
}

template <bool COPIES = true>
__device__ __forceinline__ void wait_and_stage_x(const float* X, float* xs, float* Z, int dim) {
    wait_and_stage<COPIES>([&] { stage_x(X, xs, dim); }, Z, dim);
}

// ---- attention_half ----------------------------------------------------------------------------
// grid (R, n_heads), clusters of R blocks (8, or 4 where kernels.halves_plan wants the launch on
// half as many SMs, each block then twice the rows): cluster h computes head h, its block
// r (rank r) a share of everything, S = head_dim / R rows of each of the head's q, k and v and
// D / R rows of wo:
//   1. before the wait: its rows of wqkv and of wo's head columns into shared memory (cp.async),
//      RMSNorm's weights, the position's cos and sin, and the first chunk of its cached keys;
//   2. x, its RMSNorm, its 3 S products of wqkv, each pushed into all R blocks (cluster_store);
//      cluster barrier: every block holds the head's q, new key and new value;
//   3. RoPE, the cache write (rank 0 of the kv head's first query head), then attention as
//      attention_decode's warps compute it: with keys in at most HALVES_ALONE_CHUNKS chunks every
//      block attends to all of them itself (no block then needs another's result); with more,
//      block r takes chunks r, r + R, .. (the splits of attention_decode), and the R records
//      (M, norm, totals) meet in shared memory across the cluster, combined in rank order, so
//      every block gets the same output;
//   4. its rows of wo times the head's output, added into h_mid (head 0's blocks add x too).
// A block must not leave while another reads its shared memory: in split mode a last cluster
// barrier, arrived at once the records are read, waited for at the end.
// Shapes: head_dim % 4 == 0, head_dim % R == 0, head_dim <= 128 (a float4 piece a lane),
// dim % R == 0, dim <= 128 P; a float32 cache; one row. kernels.halves_plan checks them.
// Steps 1, 2, the end of 3 and 4 are the device functions below, the kernel after them.

// 1. This block's weights into shared memory (cp.async): S = head_dim / R rows each of head h's
//    q, and of its kv head g's k and v (rows of wqkv), as ws's rows part S + i; and D / R rows of
//    wo's columns for head h (its head_dim of each row), wos
template <int R>
__device__ __forceinline__ void copy_head_rows(const float* wqkv, const float* wo, float* ws,
                                               float* wos, int h, int g, int dim, int n_heads,
                                               int n_kv_heads, int head_dim) {
    const int r = blockIdx.x, S = head_dim / R, DR = dim / R, D4 = dim / 4, HD4 = head_dim / 4;
    for (int c = threadIdx.x; c < 3 * S * D4; c += blockDim.x) {
        const int j = c / D4, k4 = c % D4, part = j / S;          // part 0 q, 1 k, 2 v
        const int head = part == 0 ? h : n_heads + (part - 1) * n_kv_heads + g;
        cp_async16(smem_addr(ws + j * dim + 4 * k4),
                   wqkv + (size_t)(head * head_dim + r * S + j % S) * dim + 4 * k4, 16);
    }
    for (int c = threadIdx.x; c < DR * HD4; c += blockDim.x) {
        const int d = c / HD4, e4 = c % HD4;
        cp_async16(smem_addr(wos + d * head_dim + 4 * e4),
                   wo + (size_t)(r * DR + d) * n_heads * head_dim + h * head_dim + 4 * e4, 16);
    }
    cp_async_commit();
}

// 2. The block's 3 S rows of wqkv times rmsnorm(x), a warp a row, each product pushed into
//    qkv (3, head_dim) of every block of the cluster (its lane r to rank r)
template <int P, int WARPS, int R>
__device__ __forceinline__ void push_qkv(const float* ws, const float4 (&xn)[P], float inv_rms,
                                         float* qkv, int dim, int head_dim) {
    const int r = blockIdx.x, S = head_dim / R, lane = threadIdx.x % 32;
    for (int j = threadIdx.x / 32; j < 3 * S; j += WARPS) {
        float4 w[P];
        row_slice<P>(ws + j * dim, dim, w);
        const float y = warp_sum(row_dot<P>(w, xn, dim)) * inv_rms;
        if (lane < R) cluster_store(qkv + (j / S) * head_dim + r * S + j % S, lane, y);
    }
}

// 3. (the end) The head's output o (head_dim) from the warps' parts: alone, the block's own;
//    else the block's record (M, norm, totals) into rec, and the cluster's R records combined
//    in rank order, so that every block gets the same o. A block that read the others' records
//    arrives at the cluster's barrier; it waits for it before it leaves (attention_half's end).
template <int WARPS, int R>
__device__ __forceinline__ void head_output(const WarpSoftmax& parts, float* rec, float* o,
                                            bool alone, int head_dim) {
    const float most = warps_max(parts, WARPS);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float norm;
        const float total = warps_total(parts, WARPS, head_dim, most, d, norm);
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
    if (alone) return;
    cluster_arrive();
    cluster_wait();
    const auto read = [&](int rank, int i) { return cluster_load(rec + i, rank); };
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        o[d] = records_output(read, R, records_max(read, R), d);
    cluster_arrive();                               // done with the others' shared memory
}

// 4. The block's D / R rows of wo's head columns times o, added into Y (head 0's blocks add x
//    too): the warp's rows d = warp, warp + WARPS, .., four at a time, their sums added across
//    the warp at once
template <int WARPS, int R>
__device__ __forceinline__ void add_wo_rows(const float* wos, const float* o, const float* xs,
                                            float* Y, int dim, int head_dim) {
    const int r = blockIdx.x, h = blockIdx.y, DR = dim / R, lane = threadIdx.x % 32;
    for (int row0 = threadIdx.x / 32; row0 < DR; row0 += 4 * WARPS) {
        float y[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int d = min(row0 + t * WARPS, DR - 1);
            y[t] = 0.0f;
            for (int e = lane; e < head_dim; e += 32)
                y[t] = fmaf(wos[d * head_dim + e], o[e], y[t]);
        }
        warp_sums<4>(y);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int d = row0 + t * WARPS;
            if (lane == 0 && d < DR)
                atomicAdd(Y + r * DR + d, h == 0 ? y[t] + xs[r * DR + d] : y[t]);
        }
    }
}

template <int P, int WARPS = HALVES_WARPS, int R = HALVES_CLUSTER>
__global__ void __cluster_dims__(R, 1, 1) __launch_bounds__(WARPS * 32, 1)
attention_half(const float* __restrict__ X, const float* __restrict__ norm_w, float eps,
               const float* __restrict__ wqkv, const float* __restrict__ wo,
               const int* __restrict__ step, const float* __restrict__ cos_table,
               const float* __restrict__ sin_table, float* cache_k, float* cache_v, float* Y,
               float* Z, int dim, int n_heads, int n_kv_heads, int head_dim, float scale) {
    constexpr int WIDTH = 4, PER_LANE = 1, KEYS = ATTN_LANE_FLOATS / WIDTH;
    const int r = blockIdx.x, h = blockIdx.y, warp = threadIdx.x / 32;
    const int rep = n_heads / n_kv_heads, g = h / rep, pieces = head_dim / WIDTH;
    extern __shared__ __align__(16) float smem[];   // kernels.halves_plan sizes it
    float* ws = smem;                               // (3 S, dim) its rows of wqkv
    float* wos = ws + 3 * (head_dim / R) * dim;     // (D / R, head_dim) its rows of wo's columns
    float* xs = wos + dim / R * head_dim;           // (dim) x
    float* qkv = xs + dim;                          // (3, head_dim) q, new key, new value
    float* o = qkv + 3 * head_dim;                  // (head_dim) the head's output
    float* rec = o + head_dim;                      // (head_dim + 2) its record: M, norm, totals
    __shared__ __align__(16) WarpSoftmax parts;

    cluster_arrive_relaxed();                       // waited for before the first push (2.)
    // 1. Before the wait: the weights (never written by a step), cos, sin, the cached keys
    //    t < pos (written by earlier steps: attention_decode's step 1 says why that is safe).
    copy_head_rows<R>(wqkv, wo, ws, wos, h, g, dim, n_heads, n_kv_heads, head_dim);
    float4 gn[P];
    load_norm<P>(norm_w, dim, gn);
    const int pos = __ldcg(step);
    const int chunks = (pos + KEYS * WARPS - 1) / (KEYS * WARPS);
    const bool alone = chunks <= HALVES_ALONE_CHUNKS;
    const int first = alone ? 0 : r, stride = alone ? 1 : R;
    float* keys = cache_k + g * head_dim;
    float* values = cache_v + g * head_dim;
    const size_t row_stride = (size_t)n_kv_heads * head_dim;
    float c[PER_LANE][2], s[PER_LANE][2];
    load_angles<WIDTH, PER_LANE>(cos_table + (size_t)pos * head_dim / 2,
                                 sin_table + (size_t)pos * head_dim / 2, pieces, c, s);
    float k[KEYS][PER_LANE][WIDTH], v[KEYS][PER_LANE][WIDTH];
    load_chunk<WIDTH, PER_LANE, KEYS>(keys, values, row_stride, first, pos, pieces, k, v);

    // 2. x, RMSNorm, this block's rows of the head's q, k, v, pushed to the whole cluster
    wait_and_stage_x(X, xs, Z, dim);
    float4 xn[P];
    const float inv_rms = 1.0f / sqrtf(warp_sum(normed_x<P>(xs, gn, dim, xn)) / dim + eps);
    cluster_wait();                                 // every block has started: pushes may go
    push_qkv<P, WARPS, R>(ws, xn, inv_rms, qkv, dim, head_dim);
    cluster_arrive();
    cluster_wait();

    // 3. RoPE on q and the new key (q times scale, as model.py), the cache write, attention
    float q[PER_LANE][WIDTH], k_new[PER_LANE][WIDTH], v_new[PER_LANE][WIDTH];
    load_rotated<WIDTH, PER_LANE, true>(qkv, pieces, c, s, q);
    load_rotated<WIDTH, PER_LANE, true>(qkv + head_dim, pieces, c, s, k_new);
    load_slice<WIDTH, PER_LANE, true>(qkv + 2 * head_dim, pieces, v_new);
#pragma unroll
    for (int e = 0; e < WIDTH; ++e) q[0][e] *= scale;
    // the new key: warp pos % WARPS of every block that attends to it (all, alone; else rank 0)
    const bool owner = (alone || r == 0) && warp == pos % WARPS;
    if (owner && r == 0 && h % rep == 0) {
        store_slice<WIDTH, PER_LANE>(keys + pos * row_stride, pieces, k_new);
        store_slice<WIDTH, PER_LANE>(values + pos * row_stride, pieces, v_new);
    }
    const float score_new = warp_sum(slice_dot<WIDTH, PER_LANE>(q, k_new));
    float m = owner ? score_new : neg_inf(), sum = owner ? 1.0f : 0.0f, acc[PER_LANE][WIDTH];
#pragma unroll
    for (int e = 0; e < WIDTH; ++e) acc[0][e] = owner ? v_new[0][e] : 0.0f;
    attend_chunks<WIDTH, PER_LANE, KEYS>(keys, values, row_stride, pos, pieces, first, stride, q,
                                         k, v, m, sum, acc);
    publish_softmax<WIDTH, PER_LANE>(parts, m, sum, acc, head_dim, pieces);
    __syncthreads();
    head_output<WARPS, R>(parts, rec, o, alone, head_dim);
    __syncthreads();

    // 4. this block's rows of wo's head columns times o, into h_mid
    add_wo_rows<WARPS, R>(wos, o, xs, Y, dim, head_dim);
    if (!alone) cluster_wait();                     // no block leaves while another reads it
}

// ---- feed_forward_half and feed_forward_wide ---------------------------------------------------
// Both: block b takes hidden units u0 = J b .. u0 + J - 1, warp j unit u0 + j, whose rows of w1
// and w3 (rows u and hidden + u of w13) it multiplies by rmsnorm(h_mid), so that the block holds
// gate_j = silu(a1) a3 for its J units without any other block. Then w2's columns u0 .. u0 +
// J - 1 (a (dim, J) slice, J / 4 float4s a row) times the gates: thread t takes float4 e = t,
// t + 32 J, .. of the slice (row e / (J / 4)), and the J / 4 lanes of a row add their products
// by shuffles; one atomicAdd a row (block 0 adds h_mid too). Every weight is loaded before the
// wait.

// This thread's P float4s of w2's slice (registers), zeros past its rows
template <int J, int P>
__device__ __forceinline__ void load_w2_slice(const float* w2, int dim, int hidden, int u0,
                                              float4 (&r2)[P]) {
    constexpr int Q = J / 4;                                  // float4s of a row of the slice
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int e = threadIdx.x + i * 32 * J, d = e / Q;
        r2[i] = d < dim ? __ldcg(reinterpret_cast<const float4*>(w2 + (size_t)d * hidden + u0)
                                 + e % Q)
                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
}

// The slice times the block's J gates (shared memory), added into Y
template <int J, int P>
__device__ __forceinline__ void add_w2_slice(const float4 (&r2)[P], const float* gate,
                                             const float* xs, float* Y, int dim) {
    constexpr int Q = J / 4;
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int e = threadIdx.x + i * 32 * J, d = e / Q, q = e % Q;
        float p = r2[i].x * gate[4 * q];
        p = fmaf(r2[i].y, gate[4 * q + 1], p);
        p = fmaf(r2[i].z, gate[4 * q + 2], p);
        p = fmaf(r2[i].w, gate[4 * q + 3], p);
#pragma unroll
        for (int o = 1; o < Q; o *= 2) p += __shfl_xor_sync(FULL_MASK, p, o);
        if (q == 0 && d < dim) atomicAdd(Y + d, blockIdx.x == 0 ? p + xs[d] : p);
    }
}

// The warp's gate from its sums (w1's row, w3's, x's squares: RMSNorm after the sums), then
// the slice times the block's J gates, added into Y
template <int J, int P>
__device__ __forceinline__ void gates_times_w2(float (&sums)[3], float eps, float* gate,
                                               const float4 (&r2)[P], const float* xs, float* Y,
                                               int dim) {
    warp_sums<3>(sums);
    const float inv_rms = 1.0f / sqrtf(sums[2] / dim + eps);
    if (threadIdx.x % 32 == 0)
        gate[threadIdx.x / 32] = silu(sums[0] * inv_rms) * (sums[1] * inv_rms);
    __syncthreads();
    add_w2_slice<J, P>(r2, gate, xs, Y, dim);
}

// feed_forward_half: grid (hidden / J), J warps a block, every weight in registers: P float4s a
// lane of each of its two rows, P of the slice a thread (P = ceil(dim / 128) either way).
// Shapes: dim % 4 == 0, dim <= 128 P, hidden % J == 0, J in 4, 8, 16.
template <int J, int P>
__global__ void __launch_bounds__(32 * J, 1)
feed_forward_half(const float* __restrict__ X, const float* __restrict__ norm_w, float eps,
                  const float* __restrict__ w13, const float* __restrict__ w2, float* Y,
                  float* Z, int dim, int hidden) {
    static_assert(J % 4 == 0 && J <= 32, "J / 4 lanes share a row of w2's slice");
    const int lane = threadIdx.x % 32, j = threadIdx.x / 32, D4 = dim / 4;
    const int u0 = blockIdx.x * J, u = u0 + j;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float4* w1 = reinterpret_cast<const float4*>(w13 + (size_t)u * dim);
    const float4* w3 = reinterpret_cast<const float4*>(w13 + (size_t)(hidden + u) * dim);
    __shared__ __align__(16) float xs[128 * P];     // x
    __shared__ float gate[J];                       // the block's gates
    float4 r1[P], r3[P], r2[P];                  // its rows of w1 and w3, its float4s of w2
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = lane + 32 * i;
        r1[i] = k4 < D4 ? __ldcg(w1 + k4) : zero;
        r3[i] = k4 < D4 ? __ldcg(w3 + k4) : zero;
    }
    load_w2_slice<J, P>(w2, dim, hidden, u0, r2);
    float4 gn[P];
    load_norm<P>(norm_w, dim, gn);
    wait_and_stage_x<false>(X, xs, Z, dim);
    float4 xn[P];
    float sums[3];                                  // w1's row, w3's, x's squares
    sums[2] = normed_x<P>(xs, gn, dim, xn);
    sums[0] = row_dot<P>(r1, xn, dim);
    sums[1] = row_dot<P>(r3, xn, dim);
    gates_times_w2<J, P>(sums, eps, gate, r2, xs, Y, dim);
}

// feed_forward_wide: grid (hidden / 32), 32 warps a block, the same arithmetic with twice the
// hidden units a block, so that half as many blocks take the launch (beside attention_half's
// clusters, kernels.halves_plan). Its rows of w1 and w3 (2 x 32 rows of dim) are more than the
// registers hold: they go into shared memory by cp.async before the wait, and each warp reads
// its two rows from there, with x * norm_w staged once for all (stage_x_normed: shared
// memory's bandwidth, 128 bytes a clock, bounds the loop); w2's slice stays in registers.
// Shapes: dim % 4 == 0, dim <= 128 P, hidden % 32 == 0; 4 (64 dim + 256 P) + 256 bytes of
// shared memory.
template <int P>
__global__ void __launch_bounds__(1024, 1)
feed_forward_wide(const float* __restrict__ X, const float* __restrict__ norm_w, float eps,
                  const float* __restrict__ w13, const float* __restrict__ w2, float* Y,
                  float* Z, int dim, int hidden) {
    constexpr int J = 32;
    static_assert(32 * P <= 1024, "a thread stages x's float4 threadIdx.x");
    const int lane = threadIdx.x % 32, j = threadIdx.x / 32, D4 = dim / 4, u0 = blockIdx.x * J;
    extern __shared__ __align__(16) float rows[];   // (2 J, dim): w1's rows u0 .., then w3's
    __shared__ __align__(16) float xs[128 * P];     // x                      (kernels.halves_plan
    __shared__ __align__(16) float xg[128 * P];     // x * norm_w              sizes them all)
    __shared__ float sq[J];                         // each warp's share of sum x^2
    __shared__ float gate[J];                       // the block's gates
    for (int c = threadIdx.x; c < 2 * J * D4; c += blockDim.x) {
        const int row = c / D4, k4 = c % D4;
        const int from = row < J ? u0 + row : hidden + u0 + row - J;
        cp_async16(smem_addr(rows + row * dim + 4 * k4), w13 + (size_t)from * dim + 4 * k4, 16);
    }
    cp_async_commit();
    float4 r2[P];
    load_w2_slice<J, P>(w2, dim, hidden, u0, r2);
    const float4 g = threadIdx.x < D4 ? __ldg(reinterpret_cast<const float4*>(norm_w) + threadIdx.x)
                                      : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    wait_and_stage([&] { stage_x_normed(X, g, xs, xg, sq, dim); }, Z, dim);
    float sums[3] = {0.0f, 0.0f, sq[lane]};         // w1's row, w3's, x's squares (lane l:
    const float4* w1 = reinterpret_cast<const float4*>(rows + j * dim);      // warp l's share)
    const float4* w3 = reinterpret_cast<const float4*>(rows + (J + j) * dim);
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = lane + 32 * i;
        if (k4 < D4) {
            const float4 xn = reinterpret_cast<const float4*>(xg)[k4];
            sums[0] = fma4(w1[k4], xn, sums[0]);
            sums[1] = fma4(w3[k4], xn, sums[1]);
        }
    }
    gates_times_w2<J, P>(sums, eps, gate, r2, xs, Y, dim);
}

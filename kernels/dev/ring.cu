// decode_ring: decode_persistent at one row with the weights streamed through shared memory
// (issue 13). A development kernel, measured and not used by the package: kernels/dev/
// bench_ring.py compiles it after kernels/*.cu (it uses persistent.cu's pieces), checks it
// against the CPU path and times it beside FusedDecoder's graph and decode_persistent<1>;
// docs/kernels.md ("A ring of weights") has what it measured. With `stamps` given, thread 0 of
// every block writes the global timer (ns) at each stage's phases, for where a stage's time goes.

// ---------------------------------------------------------------------------------------------
// decode_persistent's stages cost about 2.7 us each at one row, about what a kernel boundary
// costs in a graph, and most of it is a chain of round trips that every stage pays after its
// barrier: the input through L2, its norm, then the weight rows from memory, the sums, the
// stores. The weights, though, do not depend on the step: only the input does. So here each
// block's weights are not loaded by the stage that uses them but streamed, in the order the
// stages will use them, into a ring in its shared memory, by bulk copies (Hopper's
// cp.async.bulk: one thread asks for a contiguous range, the copy engine moves it and counts the
// bytes on an mbarrier). The stream runs ahead of the stages by as much as the ring holds, so
// when a barrier releases a stage, its weights are already on the SM:
//
//     the stream (thread 0):   [qkv 0][wo 0][w13 0][w2 0][qkv 1][wo 1] ...  as ring space frees
//     the stages (all):        qkv 0 | attn 0 | wo 0 | w13 0 | w2 0 | qkv 1 | ...
//                                    ^ grid barriers, as decode_persistent's
//
// Each block takes a contiguous range of every matrix's rows (rows [N b / G, N (b+1) / G),
// rounded to pairs for wqkv so a pair's rotation stays in one warp): a contiguous range of
// memory, cut into items of at most `chunk` bytes, one bulk copy each (the classifier's range
// is many items). Item k sits in slot k % RING_SLOTS, whose mbarrier completes when its bytes
// have landed; thread 0 records where in the ring each item went. The ring never wraps inside an
// item (an item that does not fit before the end starts again at 0, the rest skipped). An item's
// space is freed once every warp has used it (a __syncthreads), and the stream refills.
//
// Two orderings matter beyond decode_persistent's: the ring bytes that warps have read (generic
// loads) are overwritten by the copy engine (the async proxy) only after a proxy fence; and a
// consumer reads an item only after its mbarrier's phase completes (acquire), which also makes
// thread 0's note of its offset, written before the arrive (release), visible.

#define RING_SLOTS 32
#define RING_STAMPS 512        // timestamps a block may write (2 + 15 a layer + 2: 33 layers)

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void mbar_init(unsigned int bar, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// thread 0 announces `bytes` to come into the slot's barrier and arrives (the phase completes
// when they have landed)
__device__ __forceinline__ void mbar_expect(unsigned int bar, unsigned int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(unsigned int bar, unsigned int parity) {
    unsigned int done;
    asm volatile("{\n\t.reg .pred p;\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                 "selp.u32 %0, 1, 0, p;\n\t}"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    return done != 0;
}

// bytes (a multiple of 16, 16-byte aligned both sides) from global src to shared dst by the copy
// engine, counted on barrier bar
__device__ __forceinline__ void bulk_copy(unsigned int dst, const void* src, unsigned int bytes,
                                          unsigned int bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
                 "[%0], [%1], %2, [%3];" ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// The matrices of the step in stream order: m = 4 l + (0 wqkv, 1 wo, 2 w13, 3 w2), then 4 L the
// classifier; each with its rows N, their length K, and the unit the blocks' ranges round to.
// `layers` is the block's copy of the layers' pointers, in shared memory.
struct RingShape {
    const unsigned long long* layers;
    const float* output;
    int n_layers, dim, hidden, n_qkv, q_dim, vocab, chunk;
};

struct RingMatrix {
    const float* W;
    int N, K, unit;
    int lo, hi, per;          // this block's rows [lo, hi), `per` of them (whole units) an item

    __device__ __forceinline__ int items() const { return (hi - lo + per - 1) / per; }
};

__device__ __forceinline__ RingMatrix ring_matrix(const RingShape& S, int m) {
    RingMatrix M;
    if (m == 4 * S.n_layers) {
        M = {S.output, S.vocab, S.dim, 1};
    } else {
        const LayerWeights L = layer_weights(S.layers, m / 4);
        const int kind = m % 4;
        M = kind == 0 ? RingMatrix{L.wqkv, S.n_qkv, S.dim, 2}
          : kind == 1 ? RingMatrix{L.wo, S.dim, S.q_dim, 1}
          : kind == 2 ? RingMatrix{L.w13, 2 * S.hidden, S.dim, 1}
                      : RingMatrix{L.w2, S.dim, S.hidden, 1};
    }
    const int units = M.N / M.unit, b = blockIdx.x, G = gridDim.x;   // units * G < 2^31
    M.lo = units * b / G * M.unit;
    M.hi = units * (b + 1) / G * M.unit;
    M.per = max(1, S.chunk / (M.K * 4 * M.unit)) * M.unit;
    return M;
}

// The stream's state, kept by thread 0 only: the matrix it is in and the next item of it, the
// items issued and freed, and the ring's head and tail (bytes streamed so far) and where the
// head is in the ring. Each slot's note: where its item sits, and the head after it.
struct RingStream {
    RingMatrix M;
    int m, item, issued, freed;
    unsigned int head, tail, at;
};

struct RingSlots {
    unsigned long long bar[RING_SLOTS];
    unsigned int offset[RING_SLOTS], end[RING_SLOTS];
};

// Thread 0: issue the next items while the ring and the slots have room.
__device__ __noinline__ void ring_refill(RingStream& s, RingSlots& slots, unsigned int ring,
                                         unsigned int size, const RingShape& S) {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // reads before, copies after
    while (s.issued - s.freed < RING_SLOTS) {
        if (s.item == s.M.items()) {                       // on to the next matrix
            if (s.m == 4 * S.n_layers) return;             // the stream is all issued
            s.M = ring_matrix(S, ++s.m);
            s.item = 0;
            continue;
        }
        if (s.head == s.tail) s.at = 0;                    // empty: start again at the start
        const int row0 = s.M.lo + s.item * s.M.per;
        const unsigned int bytes = (unsigned int)(min(s.M.per, s.M.hi - row0) * s.M.K * 4);
        const bool wrap = s.at + bytes > size;             // never wrap inside an item
        const unsigned int skip = wrap ? size - s.at : 0;
        if (s.head + skip + bytes - s.tail > size) return;  // the ring is full
        if (wrap) s.at = 0;
        const int slot = s.issued % RING_SLOTS;
        s.head += skip + bytes;
        slots.offset[slot] = s.at;
        slots.end[slot] = s.head;
        const unsigned int bar = smem_addr(&slots.bar[slot]);
        mbar_expect(bar, bytes);
        bulk_copy(ring + s.at, s.M.W + (size_t)row0 * s.M.K, bytes, bar);
        s.at += bytes;
        ++s.issued;
        ++s.item;
    }
}

// Thread 0: item k is used up (after a __syncthreads): its space and slot are free again
__device__ __forceinline__ void ring_free(RingStream& s, const RingSlots& slots, int k) {
    s.freed = k + 1;
    s.tail = slots.end[k % RING_SLOTS];
}

// All threads: wait until item k has landed; its offset in the ring
__device__ __forceinline__ unsigned int ring_wait(RingSlots& slots, int k) {
    const unsigned int bar = smem_addr(&slots.bar[k % RING_SLOTS]);
    while (!mbar_try_wait(bar, (k / RING_SLOTS) & 1)) { }
    return slots.offset[k % RING_SLOTS];
}

// One weight row (K floats in shared memory) against xs: every lane gets the sum
__device__ __forceinline__ float ring_dot(const float* row, const float* xs, int K) {
    const int lane = threadIdx.x % 32;
    float acc = 0.0f;
    for (int i = lane; i < K / 4; i += 32) {
        const float4 w = reinterpret_cast<const float4*>(row)[i];
        const float4 x = reinterpret_cast<const float4*>(xs)[i];
        acc += w.x * x.x + w.y * x.y + w.z * x.z + w.w * x.w;
    }
    return warp_sum(acc);
}

// What a stage does with its sums: y[n] = or += them, or (wqkv) each pair rotated and sent to q
// and the cache, as qkv_rows does
#define RING_STORE 0
#define RING_ADD 1
#define RING_QKV 2

struct RingOut {
    float* y;                                       // STORE, ADD: the output row
    const float *cos_row, *sin_row;                 // QKV
    float *q, *cache_k, *cache_v;
    int pos, q_dim, kv_dim, head_dim;
};

// Rows row0 .. row0 + rows - 1 of the stage's matrix, in the ring at `w`: warp w' takes rows
// (pairs for QKV) w', w' + warps, ...
template <int WHAT>
__device__ void ring_rows(const float* w, int row0, int rows, int K, const float* xs,
                          const RingOut& o) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int step = WHAT == RING_QKV ? 2 : 1;
    for (int i = warp * step; i < rows; i += warps * step) {
        const float x0 = ring_dot(w + (size_t)i * K, xs, K);
        if (WHAT != RING_QKV) {
            if (lane == 0) {
                float* out = o.y + row0 + i;
                *out = WHAT == RING_ADD ? __ldcg(out) + x0 : x0;
            }
            continue;
        }
        const float x1 = ring_dot(w + (size_t)(i + 1) * K, xs, K);
        if (lane != 0) continue;
        const int n = row0 + i;                          // rows n and n + 1: a pair
        if (n >= o.q_dim + o.kv_dim) {                   // v: into the cache as it is
            float* dst = o.cache_v + (size_t)o.pos * o.kv_dim + (n - o.q_dim - o.kv_dim);
            dst[0] = x0;
            dst[1] = x1;
            continue;
        }
        const int f = (n % o.head_dim) / 2;              // the pair's frequency
        const float c = __ldg(o.cos_row + f), s = __ldg(o.sin_row + f);
        float* dst = n < o.q_dim ? o.q + n : o.cache_k + (size_t)o.pos * o.kv_dim + (n - o.q_dim);
        dst[0] = x0 * c - x1 * s;
        dst[1] = x0 * s + x1 * c;
    }
}

// grid_sync, with `then` run by thread 0 between its arrival and its wait (the stream's refill:
// off the path of the barrier)
template <typename Then>
__device__ __forceinline__ void grid_sync_then(unsigned int* counter, unsigned int& arrivals,
                                               Then then) {
    arrivals += gridDim.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        add_release(counter, 1u);
        then();
        while (load_acquire(counter) < arrivals) { }
    }
    __syncthreads();
}

// Dynamic shared memory: the layers' pointers (n_layers x 8, rounded up to 128 bytes), the ring
// (ring_bytes, a multiple of 16), then a stage's input (decode_persistent's at one row).
extern "C" __global__ void __launch_bounds__(PERSISTENT_BLOCK, 1)
decode_ring(const int* __restrict__ step, const float* __restrict__ tok_embeddings,
            const float* __restrict__ norm, const float* __restrict__ output,
            const float* __restrict__ freqs_cos, const float* __restrict__ freqs_sin,
            const unsigned long long* __restrict__ layers, float* h, float* q, float* att,
            float* h13, float* logits, unsigned int* counter, int dim, int hidden, int n_layers,
            int n_heads, int n_kv_heads, int head_dim, int max_seq, int vocab, float eps,
            float scale, int ring_bytes, int chunk, unsigned long long* stamps) {
    extern __shared__ __align__(128) unsigned long long ring_dyn[];
    __shared__ RingSlots slots;
    __shared__ float scratch[32];
    unsigned long long* layer_table = ring_dyn;
    float* ring_smem = reinterpret_cast<float*>(ring_dyn + (n_layers * 8 + 15) / 16 * 16);
    float* stage_smem = ring_smem + ring_bytes / 4;
    const unsigned int ring = smem_addr(ring_smem);
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const RingShape S = {layer_table, output, n_layers, dim, hidden, q_dim + 2 * kv_dim, q_dim,
                         vocab, chunk};
    RingStream s;
    auto stamp = [&](int i) {                     // where a stage's time goes (stamps given)
        if (stamps && threadIdx.x == 0 && i < RING_STAMPS)
            stamps[(size_t)blockIdx.x * RING_STAMPS + i] = global_ns();
    };
    stamp(0);

    // The weights do not depend on the previous kernel: start streaming before its wait
    for (int i = threadIdx.x; i < n_layers * 8; i += blockDim.x)
        layer_table[i] = __ldg(layers + i);
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 0; i < RING_SLOTS; ++i) mbar_init(smem_addr(&slots.bar[i]), 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        s = {ring_matrix(S, 0), 0, 0, 0, 0, 0u, 0u, 0u};
        ring_refill(s, slots, ring, ring_bytes, S);
    }
    grid_launch_dependents();
    grid_dependency_wait();                                // (reduce.cu)
    __syncthreads();
    stamp(1);
    unsigned int arrivals = 0;
    int k = 0;                                             // the next item to use
    const int pos = __ldcg(step);
    RingOut o = {nullptr, freqs_cos + (size_t)pos * (head_dim / 2),
                 freqs_sin + (size_t)pos * (head_dim / 2), q, nullptr, nullptr, pos, q_dim,
                 kv_dim, head_dim};

    // One matrix stage: this block's items of matrix m against stage_smem. Each item but the
    // stage's last is freed as soon as the warps are done with it; the last one at the grid
    // barrier that ends the stage (`last`: thread 0 frees it and refills after arriving)
    auto matrix_stage = [&](int m, int what) {
        const RingMatrix M = ring_matrix(S, m);
        for (int i = 0; i < M.items(); ++i, ++k) {
            const int row0 = M.lo + i * M.per, rows = min(M.per, M.hi - row0);
            const float* w = ring_smem + ring_wait(slots, k) / 4;
            if (what == RING_QKV) ring_rows<RING_QKV>(w, row0, rows, M.K, stage_smem, o);
            else if (what == RING_ADD) ring_rows<RING_ADD>(w, row0, rows, M.K, stage_smem, o);
            else ring_rows<RING_STORE>(w, row0, rows, M.K, stage_smem, o);
            if (i + 1 < M.items()) {
                __syncthreads();                           // everyone is done with item k
                if (threadIdx.x == 0) {
                    ring_free(s, slots, k);
                    ring_refill(s, slots, ring, ring_bytes, S);
                }
            }
        }
    };
    auto stage_end = [&]() {                               // the stage's last item, at the barrier
        grid_sync_then(counter, arrivals, [&]() {
            if (k > 0 && s.freed < k) {
                ring_free(s, slots, k - 1);
                ring_refill(s, slots, ring, ring_bytes, S);
            }
        });
    };

    // A matrix stage after its input (stamp t: the input staged; t + 1: the sums; t + 2: the
    // barrier), its products written to y (the qkv stage writes through o's q and cache rows)
    auto products = [&](int t, float* y, int m, int what) {
        stamp(t);
        o.y = y;
        matrix_stage(m, what);
        stamp(t + 1);
        stage_end();
        stamp(t + 2);
    };

    if (blockIdx.x == 0)                  // h = the token's embedding row, for the residual
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            h[i] = __ldg(tok_embeddings + (size_t)step[1] * dim + i);

    for (int l = 0; l < n_layers; ++l) {
        const LayerWeights L = layer_weights(layer_table, l);
        if (l == 0)
            stage_input<INPUT_RMSNORM>(stage_smem, tok_embeddings, dim, 1, dim,
                                       L.attention_norm, eps, scratch, step + 1);
        else
            stage_input<INPUT_RMSNORM>(stage_smem, h, dim, 1, dim, L.attention_norm, eps,
                                       scratch);
        o.cache_k = L.cache_k;
        o.cache_v = L.cache_v;
        const int t = 2 + 15 * l;        // stamps of layer l: per stage, input / sums / barrier
        products(t, o.y, 4 * l, RING_QKV);

        stamp(t + 3);
        for (int head = blockIdx.x; head < n_heads; head += gridDim.x)
            attend(head, 0, q, L.cache_k, L.cache_v, att, pos + 1, n_heads, n_kv_heads, head_dim,
                   max_seq, scale, stage_smem, scratch);
        stamp(t + 4);
        grid_sync(counter, arrivals);
        stamp(t + 5);

        stage_input<INPUT_PLAIN>(stage_smem, att, q_dim, 1, q_dim, nullptr, 0.0f, scratch);
        products(t + 6, h, 4 * l + 1, RING_ADD);

        stage_input<INPUT_RMSNORM>(stage_smem, h, dim, 1, dim, L.ffn_norm, eps, scratch);
        products(t + 9, h13, 4 * l + 2, RING_STORE);

        stage_input<INPUT_SWIGLU>(stage_smem, h13, 2 * hidden, 1, hidden, nullptr, 0.0f,
                                  scratch);
        products(t + 12, h, 4 * l + 3, RING_ADD);
    }
    stage_input<INPUT_RMSNORM>(stage_smem, h, dim, 1, dim, norm, eps, scratch);
    stamp(2 + 15 * n_layers);
    o.y = logits;
    matrix_stage(4 * n_layers, RING_STORE);
    stamp(3 + 15 * n_layers);
}

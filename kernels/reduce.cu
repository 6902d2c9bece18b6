// Warp and block reductions shared by the other kernels.
//
// minillama compiles reduce.cu, matmul.cu, qgemv.cu, softmax.cu and decode.cu as ONE CUDA module,
// in that order (see minillama/cuda/runtime.py: KERNEL_FILES), so what is defined here is visible
// in the others.
//
// A warp is 32 threads that execute in lockstep. __shfl_xor_sync(mask, v, o) hands each lane the
// value `v` of lane (lane ^ o), register to register, with no shared memory and no barrier.
// Folding with o = 16, 8, 4, 2, 1 is a butterfly: after 5 steps every lane holds the result for
// all 32 lanes.
//
//     o = 16:  lane 0 <-> 16, 1 <-> 17, ...      (pairs 16 apart)
//     o = 8:   lane 0 <-> 8,  1 <-> 9, ...       (now each lane has 4 of 32 values folded in)
//     ...
//     o = 1:   lane 0 <-> 1                      (all 32 folded in, in every lane)
//
// A block reduction does this twice: each warp reduces its own values, lane 0 of each warp
// writes its partial to shared memory, and then every warp reduces those (at most 32) partials
// itself, so every thread ends with the result without one more broadcast step.

#define FULL_MASK 0xffffffffu

// Programmatic dependent launch (Hopper and later; minillama/cuda/pdl.py launches with it).
// A kernel launched that way may start while the kernel before it in the stream is still
// finishing: its blocks take free SMs early, issue what does not depend on the previous kernel
// (the first weight loads of a GEMV), and wait in grid_dependency_wait() until the previous
// grid has finished and its writes are visible. So every kernel that a decode step launches
// calls grid_dependency_wait() before it reads an activation or writes anything.
// grid_launch_dependents() lets the next kernel be scheduled as soon as every block of this
// one has started. Launched the ordinary way, both are no-ops.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Zero this block's share of Z[0 .. count): the grid's threads (any grid shape) stride over it
// together. What a launch zeroes for a later one to add into (halves.cu's next residual, the
// batches' deferred products: qgemv_mma.cu's and embed_tokens' clear); after the wait.
__device__ __forceinline__ void clear_next(float* Z, int count) {
    const int blocks = gridDim.x * gridDim.y, block = blockIdx.y * gridDim.x + blockIdx.x;
    for (int i = block * blockDim.x + threadIdx.x; i < count; i += blocks * blockDim.x) Z[i] = 0.0f;
}

// -inf without <math.h> (NVRTC compiles without the host headers)
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
    static __device__ __forceinline__ float identity() { return 0.0f; }
};

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
    static __device__ __forceinline__ float identity() { return neg_inf(); }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float v) {
    Op op;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<SumOp>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<MaxOp>(v); }

// The largest of the warp's 64-bit unsigned values, in every lane (greedy_pick's keys).
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(FULL_MASK, v, o);
        v = other > v ? other : v;
    }
    return v;
}

// Every thread of the block calls this and gets the reduction over the whole block.
// `scratch` is 32 floats of shared memory. The trailing barrier lets the caller reuse scratch
// (and anything it wrote to shared memory before the call is visible to all threads after it).
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n_warps = (blockDim.x + 31) / 32;
    v = warp_reduce<Op>(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : Op::identity();
    v = warp_reduce<Op>(v);
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce<SumOp>(v, scratch);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce<MaxOp>(v, scratch);
}

// block_reduce of R values at once (one per row of x): each value in the order block_reduce
// takes (a butterfly in each warp, then one over the warps' partials), so the results are
// bit for bit those of R calls, with 2 barriers instead of 2 R. `scratch` is R * 32 floats of
// shared memory; every thread gets the R results.
template <class Op, int R>
__device__ __forceinline__ void block_reduce_rows(float (&v)[R], float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n_warps = (blockDim.x + 31) / 32;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        v[r] = warp_reduce<Op>(v[r]);
        if (lane == 0) scratch[32 * r + warp] = v[r];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = warp_reduce<Op>(lane < n_warps ? scratch[32 * r + lane] : Op::identity());
    __syncthreads();
}

// x^2 summed over the four values of a float4, in one order for every kernel that adds up
// squares for RMSNorm (thread_sum_squares, v4_stage_pairs's units, gemv's late norm,
// qgemv_mma's spans)
__device__ __forceinline__ float sum_squares4(float4 v) {
    return (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
}

// This thread's share of sum_k row[k]^2, for RMSNorm's 1 / sqrt(mean(x^2) + eps): the float4s
// start, start + stride, .. of the row (a block's thread: threadIdx.x and blockDim.x, then
// block_sum; a warp's lane: lane and 32, then warp_sum; stride is unsigned, as blockDim.x is).
// A normed GEMV computes it right after its grid_dependency_wait, before anything else can
// start, so the loads are float4s, unrolled so that all of a thread's loads are in flight at
// once: 4096 values over 256 threads are one round trip to memory instead of four or more, one
// at a time. Rows that are not 16-byte aligned, or of a length not a multiple of 4, take one
// float at a time (elements start, start + stride, ..). __ldcg (through L2, where the previous
// kernel's x is): ptxas keeps these after the wait, where it may move a read-only (__ldg,
// const __restrict__) load above it (kernels/dev/wait_order.py shows the order).
__device__ __forceinline__ float thread_sum_squares(const float* row, int K, int start,
                                                    unsigned stride) {
    float ss = 0.0f;
    if ((K & 3) == 0 && (reinterpret_cast<size_t>(row) & 15) == 0) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
#pragma unroll 4
        for (int k4 = start; k4 < K / 4; k4 += stride) {
            const float4 v = __ldcg(row4 + k4);
            ss += sum_squares4(v);
        }
    } else {
#pragma unroll 4
        for (int k = start; k < K; k += stride) {
            const float v = __ldcg(row + k);
            ss += v * v;
        }
    }
    return ss;
}

// ---- a split over k: the block that ends a tile last adds the slices -----------------------
// gemv_v3, qgemv_v4s and qgemv_mma split k over the blocks of a tile (attention_decode its
// keys over a head's blocks, decode.cu): each block writes its slice's partial sums to a
// workspace, and the block that ends the tile last (a counter per tile, which it resets, so
// that a CUDA graph can replay the launch) adds the slices in slice order: the same float sum
// whichever block is last, deterministic.
//
// Whether this block is the last of its tile; every thread of the block calls it, after its
// partial sums are written. The block's writes are ordered before the count by the barrier and
// one thread's release (PTX's memory model: a release is cumulative, it carries what the
// barrier ordered before it), and the last block's reads after it by that thread's acquire and
// the barrier after it, the pattern of CUTLASS's semaphore. Each thread's own fence
// (__threadfence, fence.sc.gpu) before the count, as the kernels had it, waits for more.
__device__ __forceinline__ bool split_last_block(int* counter, int ks) {
    __shared__ int split_last;
    __syncthreads();                            // the block's partial sums are written
    if (threadIdx.x == 0) {
        int before;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;"
                     : "=r"(before) : "l"(counter) : "memory");
        split_last = before == ks - 1;
        if (split_last) *counter = 0;           // for the next launch
    }
    __syncthreads();
    return split_last;
}

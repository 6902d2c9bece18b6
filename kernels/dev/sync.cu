// What each way of waiting costs on the GPU: the kernels of kernels/dev/bench_sync.py (issue 13).
//
// A decode step at one row is a chain of stages, each needing all of the stage before: at
// stories15M's size the chain, not the bytes, is the step's time. A stage can end where a
// kernel ends (the next kernel waits at griddepcontrol.wait), at a grid-wide barrier inside one
// persistent kernel (persistent.cu's grid_sync), at a counter that only some blocks share (the
// "No Bubbles" megakernel's dependency counters), or at a cluster's barrier (Hopper: up to 8
// blocks on neighbouring SMs, with each other's shared memory in reach). Every kernel here runs
// the same round, only the wait differs:
//
//     read  n values another block wrote in the round before (through L2, or a neighbour's
//           shared memory for the cluster), add them up across the block,
//     write this block's value for the next round,
//     wait  until every block this one depends on has written.
//
// The value a block writes in round r is r + 1, so round r must read n values of r: a wait that
// let a block read too early would see r - 1 (or the buffer's zero) and count an error in
// `errors`, which bench_sync.py requires to stay 0.
//
// So the time per round is a stage's chain with nothing else in it: a round trip for the
// input, a block reduction, a store, the wait. Compiled after reduce.cu and persistent.cu
// (block_sum, grid_dependency_wait, load_acquire, add_release, grid_sync).

// Round r's sum of n values (each r, exact in float32), checked by thread 0.
__device__ __forceinline__ void sync_check(float s, int n, int r, int* errors) {
    if (threadIdx.x == 0 && s != (float)n * (float)r) atomicAdd(errors, 1);
}

// The round's input: n values of `in` from the blocks after this one (wrapping at `blocks`),
// summed over the block and checked.
__device__ __forceinline__ void sync_read(const float* in, int blocks, int n, int r, int* errors,
                                          float* scratch) {
    float s = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) s += __ldcg(in + (blockIdx.x + 1 + k) % blocks);
    sync_check(block_sum(s, scratch), n, r, errors);
}

// One round as its own kernel: read the previous kernel's values, write this one's. Launched
// rounds times in a CUDA graph, programmatic or ordinary (bench_sync.py).
extern "C" __global__ void sync_kernel(const float* in, float* out, int n, int r, int* errors) {
    __shared__ float scratch[32];
    grid_launch_dependents();
    grid_dependency_wait();
    sync_read(in, gridDim.x, n, r, errors, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(r + 1);
}

// rounds in one persistent kernel, a grid-wide barrier between them (buffers in turn)
extern "C" __global__ void sync_grid(float* buf, unsigned int* counter, int rounds, int n,
                                     int* errors) {
    __shared__ float scratch[32];
    unsigned int arrivals = 0;
    for (int r = 0; r < rounds; ++r) {
        sync_read(buf + (r % 2) * gridDim.x, gridDim.x, n, r, errors, scratch);
        if (threadIdx.x == 0) buf[((r + 1) % 2) * gridDim.x + blockIdx.x] = (float)(r + 1);
        grid_sync(counter, arrivals);
    }
}

// rounds in one persistent kernel, blocks in groups of `group` that wait only for each other:
// a counter per group (counters[blockIdx.x / group]), as a dependency counter would be.
extern "C" __global__ void sync_group(float* buf, unsigned int* counters, int rounds, int n,
                                      int group, int* errors) {
    __shared__ float scratch[32];
    const int g0 = blockIdx.x / group * group, me = blockIdx.x - g0;
    unsigned int* counter = counters + blockIdx.x / group;
    for (int r = 0; r < rounds; ++r) {
        const float* in = buf + (r % 2) * gridDim.x + g0;
        float s = 0.0f;
        for (int k = threadIdx.x; k < n; k += blockDim.x) s += __ldcg(in + (me + 1 + k) % group);
        sync_check(block_sum(s, scratch), n, r, errors);
        if (threadIdx.x == 0) buf[((r + 1) % 2) * gridDim.x + blockIdx.x] = (float)(r + 1);
        __syncthreads();
        if (threadIdx.x == 0) {
            add_release(counter, 1u);
            while (load_acquire(counter) < (unsigned int)((r + 1) * group)) { }
        }
        __syncthreads();
    }
}

// rounds in one kernel of clusters of C blocks: the values sit in each block's shared memory
// and a block reads its neighbours' there (distributed shared memory), the wait is the
// cluster's barrier. No global memory in the round at all.
__device__ __forceinline__ unsigned int cluster_rank() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ float load_neighbour(const float* own, unsigned int rank) {
    unsigned int local = static_cast<unsigned int>(__cvta_generic_to_shared(own)), remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

template <int C>
__global__ void __cluster_dims__(C, 1, 1) sync_cluster(int rounds, int n, int* errors) {
    __shared__ float scratch[32];
    __shared__ float value[2];                          // this block's value, rounds in turn
    const unsigned int me = cluster_rank();
    if (threadIdx.x == 0) value[0] = 0.0f;
    cluster_sync_all();
    for (int r = 0; r < rounds; ++r) {
        float s = 0.0f;
        for (int k = threadIdx.x; k < n; k += blockDim.x)
            s += load_neighbour(&value[r % 2], (me + 1 + k) % C);
        sync_check(block_sum(s, scratch), n, r, errors);
        if (threadIdx.x == 0) value[(r + 1) % 2] = (float)(r + 1);
        cluster_sync_all();
    }
}

// The floor under all of them: one thread's chain of dependent loads through L2 (each load's
// address comes from the value before), rounds of them: the latency of one trip.
extern "C" __global__ void sync_l2_chain(const int* next, int* out, int rounds) {
    int i = 0;
    for (int r = 0; r < rounds; ++r) i = __ldcg(next + i);
    out[0] = i;
}

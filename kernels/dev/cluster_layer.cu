// A bound for a stories15M layer run by one cluster of 16 SMs: kernels/dev/bench_cluster_layer.py
// (development code, issue 13; compiled after reduce.cu and matmul.cu's silu).
//
// FusedDecoder's one-row step is a chain of launches, each about 2 us where the data takes a
// fraction of that ("What a wait costs", docs/kernels.md), and a cluster's barrier costs 0.55 us
// where a kernel boundary costs 1.03. So: could one cluster, its blocks meeting at cluster
// barriers, run a layer faster than five launches? Here the layer's four products (wqkv, wo,
// w13, w2 of stories15M's shapes, attention left out) run as stages of one kernel:
//
//     before the barrier   each warp loads its rows of the stage's W into registers (the
//                          weights do not depend on the input, so their trip overlaps the wait)
//     barrier (wait)       the stage's input has arrived in this block's shared memory
//     compute              the warp's rows against the input (RMSNorm after the sums, or the
//                          SwiGLU gate, as gemv's prologues), a warp sum per row
//     push, barrier        each output value stored into every block's shared memory
//     (arrive)             (st.shared::cluster), then the arrive that publishes it
//
// The barrier is split (arrive, then the next stage's loads, then wait): an arrive with release
// semantics waits for the block's outstanding loads, so arriving after the loads would put
// their trip back on the chain (measured: 2.68 us a stage that way, 2.40 split).
//
// The math is a stand-in for the layer's (no attention; wo multiplies qkv's first dim values),
// checked against float64 by the tool so that no stage reads its input early.

#define CL_THREADS 512

__device__ __forceinline__ unsigned int cl_rank() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ void cl_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}

__device__ __forceinline__ void cl_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// v into block `to`'s copy of *local (distributed shared memory)
__device__ __forceinline__ void cl_push(float* local, unsigned int to, float v) {
    unsigned int l = static_cast<unsigned int>(__cvta_generic_to_shared(local)), remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(l), "r"(to));
    asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"(v) : "memory");
}

#define CL_PLAIN 0
#define CL_RMSNORM 1          // x * inv_rms, inv_rms after the sums (no norm weight: a bound)
#define CL_SWIGLU 2           // silu(x[k]) * x[K + k]

// One stage: rows g, g + G, .. (R of them) of W (N, K), F float4s a lane each, g the warp's
// index in the cluster and G the cluster's warps; out[n] pushed to all C blocks' `xout`.
template <int R, int F, int MODE, int C>
__device__ __forceinline__ void cl_stage(const float* __restrict__ W, int N, int K,
                                         const float* xin, float* xout) {
    const int lane = threadIdx.x % 32, warps = CL_THREADS / 32;
    const int g = cl_rank() * warps + threadIdx.x / 32, G = C * warps, K4 = K / 4;
    const float4* W4 = reinterpret_cast<const float4*>(W);
    float4 w[R][F];                                             // (R, F) float4s of W
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < F; ++j) {
            const int n = g + i * G, k4 = lane + 32 * j;
            w[i][j] = n < N && k4 < K4 ? __ldg(W4 + (size_t)n * K4 + k4)
                                       : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    cl_wait();                                                  // xin has arrived
    float acc[R], ss = 0.0f;
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = 0.0f;
    const float4* x4 = reinterpret_cast<const float4*>(xin);
#pragma unroll
    for (int j = 0; j < F; ++j) {
        const int k4 = lane + 32 * j;
        if (k4 < K4) {
            float4 x = x4[k4];
            if (MODE == CL_SWIGLU) {
                const float4 u = x4[K4 + k4];
                x = make_float4(silu(x.x) * u.x, silu(x.y) * u.y, silu(x.z) * u.z,
                                silu(x.w) * u.w);
            }
            if (MODE == CL_RMSNORM) ss += sum_squares4(x);
#pragma unroll
            for (int i = 0; i < R; ++i) {
                acc[i] = fmaf(w[i][j].x, x.x, acc[i]);
                acc[i] = fmaf(w[i][j].y, x.y, acc[i]);
                acc[i] = fmaf(w[i][j].z, x.z, acc[i]);
                acc[i] = fmaf(w[i][j].w, x.w, acc[i]);
            }
        }
    }
    const float inv_rms = MODE == CL_RMSNORM ? 1.0f / sqrtf(warp_sum(ss) / K + 1e-5f) : 1.0f;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const float v = warp_sum(acc[i]) * inv_rms;
        const int n = g + i * G;
        if (n < N && lane < C) cl_push(xout + n, lane, v);      // lane b: into block b
    }
    cl_arrive();                                                // the pushes are out
}

// L layers of stories15M's four products (dim 288, hidden 768), one cluster of C = 16 blocks
// (R and F are the rows a warp and float4s a lane at 16 blocks of 16 warps); out: block 0's
// last output. Buffers alternate, so a block pushes into one its neighbours no longer read.
template <int C>
__global__ void __launch_bounds__(CL_THREADS, 1)
cluster_layers(const float* __restrict__ wqkv, const float* __restrict__ wo,
               const float* __restrict__ w13, const float* __restrict__ w2,
               const float* __restrict__ x0, float* __restrict__ out, int layers) {
    __shared__ __align__(16) float buf[2][1536];
    for (int k = threadIdx.x; k < 288; k += CL_THREADS) buf[0][k] = x0[k];
    cl_arrive();
    for (int l = 0; l < layers; ++l) {
        cl_stage<4, 3, CL_RMSNORM, C>(wqkv, 864, 288, buf[0], buf[1]);
        cl_stage<2, 3, CL_PLAIN, C>(wo, 288, 288, buf[1], buf[0]);
        cl_stage<6, 3, CL_RMSNORM, C>(w13, 1536, 288, buf[0], buf[1]);
        cl_stage<2, 6, CL_SWIGLU, C>(w2, 288, 768, buf[1], buf[0]);
    }
    cl_wait();
    if (cl_rank() == 0)
        for (int k = threadIdx.x; k < 288; k += CL_THREADS) out[k] = buf[0][k];
}

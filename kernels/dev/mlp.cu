// The feed-forward block of one decode row as ONE launch (development kernel, measured by
// kernels/dev/ab_mlp.py): w13's products, SwiGLU and w2's product, with w2's partial sums
// added by the memory system (float atomics) instead of by a second launch.
//
//     h_next = h + w2 @ (silu(w1 @ n) * (w3 @ n)),   n = rmsnorm(h) * norm_w
//
// The hidden dimension splits the work: block b takes J hidden units u0 .. u0 + J - 1, warp j
// unit u0 + j, whose rows of w1 and w3 it multiplies by n; so the block holds g[j] = silu(a1) a3
// for its J units without waiting for any other block. w2's product then needs only those:
//
//     h_next[d] += sum_j w2[d, u0 + j] g[j]        for every d: (dim,) partial sums a block
//
// and every block adds its partial into h_next with `red.global.add.f32`. The order of those
// additions is whatever order the blocks reach L2 in, so the sum is not the same bits from one
// step to the next (a few units of the last place). h_next must be zero before the launch; the
// launch zeroes a third buffer, the one the next layer's launch adds into (FusedDecoder-style
// rotation of three residual buffers, in ab_mlp.py).
//
// Every weight this block reads (2 J rows of w13, a (dim, J) slice of w2) is loaded into
// registers before grid_dependency_wait: P float4s a lane a row of w13 and P float4s a thread of
// w2's slice, P = ceil(dim / 128).

__device__ __forceinline__ void mlp_stamp(unsigned long long* stamps, int phase) {
    if (stamps != nullptr && threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        stamps[blockIdx.x * 16 + phase] = t;
    }
}

// ADD: 0 atomicAdd per float, 1 red.global.add.v4.f32 per 4 floats (gathered by shuffles),
// 2 plain stores (wrong sums: a bound on what the adds cost).
template <int J, int P, int ADD = 0>
__global__ void __launch_bounds__(32 * J, 1)
mlp_decode(const float* __restrict__ X, const float* __restrict__ norm_w, float eps,
           const float* __restrict__ W13, const float* __restrict__ W2, float* Y, float* Z,
           int D, int H, unsigned long long* stamps) {
    static_assert(J % 4 == 0 && J <= 32, "J / 4 lanes share a row of w2's slice");
    mlp_stamp(stamps, 0);
    const int lane = threadIdx.x % 32, j = threadIdx.x / 32;
    const int u0 = blockIdx.x * J, u = u0 + j;
    const int D4 = D / 4;
    const float4* w1 = reinterpret_cast<const float4*>(W13 + (size_t)u * D);
    const float4* w3 = reinterpret_cast<const float4*>(W13 + (size_t)(H + u) * D);
    float4 r1[P], r3[P], r2[P];
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = lane + 32 * i;
        r1[i] = k4 < D4 ? __ldcg(w1 + k4) : zero;
        r3[i] = k4 < D4 ? __ldcg(w3 + k4) : zero;
    }
    constexpr int Q = J / 4;                            // float4s of a row of w2's slice
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int e = threadIdx.x + i * 32 * J, d = e / Q, q = e % Q;
        r2[i] = d < D ? __ldcg(reinterpret_cast<const float4*>(W2 + (size_t)d * H + u0) + q)
                      : zero;
    }
    float4 gn[P];                                       // RMSNorm's weights (not an input)
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = lane + 32 * i;
        gn[i] = k4 < D4 ? __ldg(reinterpret_cast<const float4*>(norm_w) + k4) : zero;
    }
    grid_launch_dependents();
    grid_dependency_wait();
    mlp_stamp(stamps, 1);
    // x through shared memory: one load of each line a block (every warp reading all of x
    // from L2 queued 768 to 2048 warps on the same few lines)
    __shared__ __align__(16) float xs[P * 128];
    float4* xs4 = reinterpret_cast<float4*>(xs);
    for (int c = threadIdx.x; c < D4; c += blockDim.x)
        xs4[c] = __ldcg(reinterpret_cast<const float4*>(X) + c);
    __syncthreads();

    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < D; i += gridDim.x * blockDim.x)
        Z[i] = 0.0f;                                    // the next layer's h_next

    float a1 = 0.0f, a3 = 0.0f, ss = 0.0f;
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int k4 = lane + 32 * i;
        if (k4 < D4) {
            const float4 x = xs4[k4], g = gn[i];
            ss += sum_squares4(x);
            const float4 n = make_float4(x.x * g.x, x.y * g.y, x.z * g.z, x.w * g.w);
            a1 = fmaf(r1[i].x, n.x, a1); a1 = fmaf(r1[i].y, n.y, a1);
            a1 = fmaf(r1[i].z, n.z, a1); a1 = fmaf(r1[i].w, n.w, a1);
            a3 = fmaf(r3[i].x, n.x, a3); a3 = fmaf(r3[i].y, n.y, a3);
            a3 = fmaf(r3[i].z, n.z, a3); a3 = fmaf(r3[i].w, n.w, a3);
        }
    }
    a1 = warp_sum(a1);
    a3 = warp_sum(a3);
    ss = warp_sum(ss);
    const float inv_rms = 1.0f / sqrtf(ss / D + eps);
    __shared__ float gate[J];
    if (lane == 0) gate[j] = silu(a1 * inv_rms) * (a3 * inv_rms);
    __syncthreads();
    mlp_stamp(stamps, 2);

#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int e = threadIdx.x + i * 32 * J, d = e / Q, q = e % Q;
        const float4 w = r2[i];
        float p = w.x * gate[4 * q];
        p = fmaf(w.y, gate[4 * q + 1], p);
        p = fmaf(w.z, gate[4 * q + 2], p);
        p = fmaf(w.w, gate[4 * q + 3], p);
#pragma unroll
        for (int o = 1; o < Q; o *= 2) p += __shfl_xor_sync(FULL_MASK, p, o);
        if (ADD == 1) {                                 // lanes 4 Q m gather d .. d + 3
            const float p1 = __shfl_down_sync(FULL_MASK, p, Q);
            const float p2 = __shfl_down_sync(FULL_MASK, p, 2 * Q);
            const float p3 = __shfl_down_sync(FULL_MASK, p, 3 * Q);
            if (lane % (4 * Q) == 0 && d < D) {
                float4 s = make_float4(p, p1, p2, p3);
                if (blockIdx.x == 0) {
                    const float4 x = xs4[d / 4];
                    s = make_float4(s.x + x.x, s.y + x.y, s.z + x.z, s.w + x.w);
                }
                asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                             :: "l"(Y + d), "f"(s.x), "f"(s.y), "f"(s.z), "f"(s.w) : "memory");
            }
        } else if (q == 0 && d < D) {
            if (blockIdx.x == 0) p += xs[d];                // the residual, once
            if (ADD == 0) atomicAdd(Y + d, p);
            else Y[d] = p;
        }
    }
    mlp_stamp(stamps, 3);
}

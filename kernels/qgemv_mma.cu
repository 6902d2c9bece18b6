// Batches on the tensor cores, without rounding x: qgemv_mma, the lesson after qgemv (issue 10).
//
//     y[m, n] = sum_k x[m, k] W[n, k]        x: (M, K) float32,  W: (N, K) packed,  y: (M, N) float32
//
// qgemv (qgemv.cu) spends one float32 FMA per weight and per row of x. At one row that is cheap
// next to the bytes; at 8 rows it is 8 FMAs per weight, and a step of a batch costs 2.5 to 3.5
// times a step of one row instead of about the same. The tensor cores do 16 x 8 x 16
// multiply-adds per warp instruction (mma.sync.m16n8k16): the 16 are weight rows, the 8 are rows
// of x, the 16 run along k. Two things stand in the way, and this kernel is how it gets past them.
//
// 1. Precision. The tensor cores multiply 16-bit numbers, exactly, and add in float32. The
//    weights are 16-bit already: q4_0's codes - 8 (-8..7) and q8_0's codes (-128..127) are
//    exact in float16, as float16 weights are, and bfloat16 weights are bfloat16. x is float32,
//    24 significant bits, so it enters in parts, and every product is made once per part:
//
//      float16 weights, q8_0, q4_0: x = hi + lo, two float16 (11 + 11 bits). float16 reaches
//        only 65504, and its small numbers lose bits, so each span of k (one loop step's
//        positions, below) of each row of x is scaled by a power of two first (its largest
//        value into [2^14, 2^15)) and the step's sums back after: exact both ways. What x
//        loses is its last 2 bits, ~2e-7 of the span's largest value.
//      bfloat16 weights: x = hi + mid + lo, three bfloat16 (8 + 8 + 8 bits: exact), no
//        scaling needed (bfloat16 has float32's exponent range).
//
//    So the sums are those of a float32 GEMV of the same weights, in another order. A caller
//    who takes x rounded to float16, as the prompts' tensor-core GEMM does, may ask for one
//    float16 part instead (OnePart, below: kernels.qgemv_mma's x16).

// 2. The scales. q4_0 and q8_0 multiply each block of 32 codes by the block's float16 scale d.
//    One mma must therefore see codes of one block only in each weight row, and the fragment
//    layout of mma.m16n8k16 gives the 4 lanes of a quad (t = lane % 4) the same row g and
//    k-slots 2t, 2t+1, 2t+8, 2t+9: the quad must hold one block between them. But each lane loads
//    16 bytes (a whole q4_0 block, half a q8_0 block) so that the loads are wide. So the quad
//    loads 4 consecutive 16-byte chunks of the row, one each, and transposes them with 4
//    shuffles: lane t ends with word t of each chunk (quad_transpose). Word t of a q4_0 block is
//    8 codes, word t of a q8_0 chunk 4: one mma's share of the block for the lane. The scale is
//    applied per block after the block's mma's (into a zeroed fragment), as qgemv applies it.
//
// The order of k inside an mma does not matter, as long as x is put in the same order. Each
// format fixes which position of the block lands in which k-slot of which lane (the natural one
// for its unpacking), and x is staged in shared memory in exactly that order, as ready-made B
// fragments: lane (g, t) reads the 16 bytes of its two mma's of a 32-position unit at once.
//
//     unit: 32 positions of k, 2 mma's. q4_0: one block (mma 0: the low nibbles, 1: the high);
//     q8_0: one block (mma c: chunk c of it); f16/bf16: the quad's 4 chunks of 8 weights (lane
//     t holds positions 8t .. 8t+7, mma m its 4m .. 4m+3).
//     span: what a quad loads in one step, 4 chunks: 4 units (q4_0), 2 (q8_0), 1 (f16, bf16).
//
// Layout of the work. A block of W warps (16: kernels.MMA_WARPS) owns 16 NR weight rows per
// warp (a tile of 16 W NR rows) and one slice of k: the grid is tiles x ks, so that a matrix of
// few rows still gives every SM work. The block stages its slice of x (after the prologue) as
// B fragments, then each warp streams its rows' chunks with U steps of loads in flight,
// transposes, unpacks and runs the mma's. x is staged once per block, so the more warps share
// it the less staging there is: 16 warps, one block an SM, stage half of what two blocks of 8
// did, each thread half as much (the 7B batch-8 step 1.03x in q4_0, 1.02x in int8, the same
// bits; H200, 2026-11-30). With ks > 1 the slices' partial sums go to a scratch buffer, and
// the last block of a tile to finish (a counter per tile, reset by that block) adds them in
// slice order: the result does not depend on which block finishes first. Where the caller
// does not need that (FusedDecoder's steps unless deterministic), the slices add into y by
// atomics instead, and a normed product leaves 1 / rms to the kernel after it (any_order,
// rms_out, x_ss, at qgemv_mma below: the 7B batch-8 step 1.17x in q4_0, 1.13x in int8).
//
// RMSNorm (GEMV_RMSNORM) is applied after the product: y[m, n] = inv_rms[m] sum_k (x[m, k]
// norm_w[k]) W[n, k], inv_rms being one number per row of x. So a block needs only its slice of
// x; it adds up the squares of its slice, and the last block adds the slices' sums first.
// Compiled after qgemv.cu (q_word, q_load16) and matmul.cu (GEMV prologues, gemv_x4).

#define MMA_ROWS 8                      // rows of x per pass: the mma's N
#define MMA_PARTS_MAX 3                 // parts of x: float16 hi, lo; bfloat16 hi, mid, lo

// Two floats -> bfloat16x2, rounded to nearest even; `lo` in the low half.
__device__ __forceinline__ unsigned int bf16x2_pack(float lo, float hi) {
    unsigned int d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ float bf16_lo(unsigned int h2) { return __uint_as_float(h2 << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int h2) { return __uint_as_float(h2 & 0xFFFF0000u); }

// Two floats -> float16x2, rounded to nearest even; `lo` in the low half.
__device__ __forceinline__ unsigned int f16x2_pack(float lo, float hi) {
    unsigned int d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// (a, b) -> PARTS 16-bit pairs whose sums are a and b: each part takes the next bits of what
// the parts before it left (bfloat16: 8 bits each, so three are exact; float16: 11 each).
template <bool BF16, int PARTS>
__device__ __forceinline__ void x_split(float a, float b, unsigned int (&part)[MMA_PARTS_MAX]) {
#pragma unroll
    for (int p = 0; p < PARTS; ++p) {
        part[p] = BF16 ? bf16x2_pack(a, b) : f16x2_pack(a, b);
        a -= BF16 ? bf16_lo(part[p]) : f16_lo(part[p]);
        b -= BF16 ? bf16_hi(part[p]) : f16_hi(part[p]);
    }
}

template <bool BF16>
__device__ __forceinline__ void mma_16bit(float (&c)[4], const unsigned int (&a)[4],
                                          unsigned int b0, unsigned int b1) {
    if (BF16)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 4 lanes of a quad hold 4 words each, lane c word i = M[c][i]; afterwards lane t holds
// M[0][t], M[1][t], M[2][t], M[3][t]. Two exchanges: lanes t, t^2 swap their off-diagonal pairs
// of words, then lanes t, t^1 swap the words whose parity is not theirs.
__device__ __forceinline__ void quad_transpose(unsigned int (&w)[4], int t) {
    const bool upper = t & 2, odd = t & 1;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const unsigned int got = __shfl_xor_sync(FULL_MASK, upper ? w[e] : w[2 + e], 2);
        if (upper) w[e] = got; else w[2 + e] = got;
    }
#pragma unroll
    for (int a = 0; a < 2; ++a) {
        const unsigned int got = __shfl_xor_sync(FULL_MASK, odd ? w[2 * a] : w[2 * a + 1], 1);
        if (odd) w[2 * a] = got; else w[2 * a + 1] = got;
    }
}


// ---------------------------------------------------------------------------------------------
// The formats. WEIGHTS per 16-byte chunk; UNITS per span; BLOCKS: scale blocks per span (0: no
// scale); BF16: the mma's type (and so x's parts: PARTS); Q4ORDER: how a unit's positions meet
// the k-slots (below); `unit(g, e, u, a)`: the A fragments of unit u's two mma's from the
// lane's words of rows g and g + 8. In a fragment, a[0] is row g at k-slots 2t, 2t+1, a[1] row
// g+8 there, a[2] and a[3] the same at 2t+8, 2t+9; which positions those are, mma_x_base says
// on the x side.

// float16 and bfloat16: the lane's chunk is 8 weights, positions 8t .. 8t+7 of the unit; mma m
// takes words 2m, 2m+1 as they are.
template <bool BF16_>
struct Mma16 {
    static constexpr int WEIGHTS = 8, UNITS = 1, BLOCKS = 0;
    static constexpr bool BF16 = BF16_, Q4ORDER = false;
    static constexpr int PARTS = BF16 ? 3 : 2;
    static __device__ __forceinline__ void unit(const unsigned int (&g)[4], const unsigned int (&e)[4],
                                                int, unsigned int (&a)[2][4]) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            a[m][0] = g[2 * m]; a[m][1] = e[2 * m];
            a[m][2] = g[2 * m + 1]; a[m][3] = e[2 * m + 1];
        }
    }
};
typedef Mma16<false> MmaF16;
typedef Mma16<true> MmaBF16;

// Q8_0: after the transpose, word c of the lane is bytes 4t .. 4t+3 of chunk c; unit u is
// chunks 2u, 2u+1 (one block), mma c of the unit is chunk 2u + c. A signed byte flipped to
// b + 128 and placed under the float16 1024.0 is 1024 + 128 + b: one float16x2 subtraction
// leaves (b0, b1) and (b2, b3), as qgemv's FmtQ8_0 does.
struct MmaQ8_0 {
    static constexpr int WEIGHTS = 16, UNITS = 2, BLOCKS = 2, PARTS = 2;
    static constexpr bool BF16 = false, Q4ORDER = false;
    static __device__ __forceinline__ void pairs(unsigned int w, unsigned int& p01, unsigned int& p23) {
        const unsigned int u = w ^ 0x80808080u;
        p01 = f16x2_sub(byte_perm(u, 0x64646464u, 0x4140), HALF2_1152);
        p23 = f16x2_sub(byte_perm(u, 0x64646464u, 0x4342), HALF2_1152);
    }
    static __device__ __forceinline__ void unit(const unsigned int (&g)[4], const unsigned int (&e)[4],
                                                int u, unsigned int (&a)[2][4]) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            pairs(g[2 * u + m], a[m][0], a[m][2]);
            pairs(e[2 * u + m], a[m][1], a[m][3]);
        }
    }
};

// Q4_0: after the transpose, word u of the lane is bytes 4t .. 4t+3 of block u: low nibbles
// codes 4t .. 4t+3, high nibbles 16 + 4t .. 16 + 4t+3. A nibble OR-ed under the float16 1024.0
// is 1024 + code, and one float16x2 subtraction leaves code - 8 for two codes at once; a high
// nibble, masked where it is, arrives as 1024 + 16 code, and one FMA by 1/16 with -72 leaves
// code - 8 (q4_low_pair, q4_high_pair: qgemv.cu's trick 3). One shift of the word brings bytes
// 1 and 3 down: per word one shift, four LOP3s, four float16x2 instructions. Pairs come out as
// (code 0, code 2), (code 1, code 3): that is Q4ORDER, positions 4t + j + 2e for k-slot pair j,
// element e.
struct MmaQ4_0 {
    static constexpr int WEIGHTS = 32, UNITS = 4, BLOCKS = 4, PARTS = 2;
    static constexpr bool BF16 = false, Q4ORDER = true;
    static __device__ __forceinline__ void unit(const unsigned int (&g)[4], const unsigned int (&e)[4],
                                                int u, unsigned int (&a)[2][4]) {
        const unsigned int g8 = g[u] >> 8, e8 = e[u] >> 8;
        a[0][0] = q4_low_pair<false>(g[u]); a[0][1] = q4_low_pair<false>(e[u]);    // mma 0
        a[0][2] = q4_low_pair<false>(g8); a[0][3] = q4_low_pair<false>(e8);
        a[1][0] = q4_high_pair<false>(g[u]); a[1][1] = q4_high_pair<false>(e[u]);  // mma 1
        a[1][2] = q4_high_pair<false>(g8); a[1][3] = q4_high_pair<false>(e8);
    }
};

// x in one float16 part (kernels.qgemv_mma's x16; FusedDecoder's batch steps unless the
// caller asks for two parts, x16_batches=False): a format of float16 mma's with PARTS 1. x
// keeps 11 significant bits a value (its span's power of two still keeps the range), as the
// prompts' tensor-core GEMM takes it (x rounded to float16), and loses its second part's
// mma's, shared-memory loads and staging: the 7B q4_0 batch-8 step 1.10x as fast, the logits
// ~5e-4 from the two parts' in q4_0, int8 and float16 (H200, 2026-12-02, docs/kernels.md "x
// in one part", "One part by default"). The products of the rounded x are still exact and
// the sums float32. Not for bfloat16 weights: one bfloat16 part would keep 8 bits.
template <class F>
struct OnePart : F {
    static_assert(!F::BF16, "x16: float16 parts only");
    static constexpr int PARTS = 1;
};


// ---------------------------------------------------------------------------------------------
// x as B fragments. Unit u of a row holds 16 words per part: lane t's 4 (mma 0: b0, b1; mma 1:
// b0, b1), in lane order. A row is ROWW words, ROWW % 32 == 16, so the two rows one quarter-warp
// reads fall on different banks.

__device__ __forceinline__ int mma_row_words(int units) { return 16 * units + (units % 2 ? 0 : 16); }

// The two x positions of k-slot pair j of mma m, lane t, relative to the unit: element e at
// base + (Q4ORDER ? j + 2e : 2j + e), base = 4t (+16 for mma 1) or, for f16/bf16, 8t + 4m.
template <class F>
__device__ __forceinline__ int mma_x_base(int m, int t) {
    return F::UNITS == 1 ? 8 * t + 4 * m : 16 * m + 4 * t;
}

// An item's 8 values of x (v[m]: mma m's float4) as F::PARTS uint4s of B fragments at slot,
// part p at slot + p * 8 rows: words (mma m, pair j) = the pair's part, pairs as F orders them.
template <class F>
__device__ __forceinline__ void mma_store_parts(const float (&v)[2][4], unsigned int* slot,
                                                int row_words) {
    unsigned int words[MMA_PARTS_MAX][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            unsigned int part[MMA_PARTS_MAX];
            const int e0 = F::Q4ORDER ? j : 2 * j, e1 = F::Q4ORDER ? j + 2 : 2 * j + 1;
            x_split<F::BF16, F::PARTS>(v[m][e0], v[m][e1], part);
#pragma unroll
            for (int p = 0; p < F::PARTS; ++p) words[p][2 * m + j] = part[p];
        }
#pragma unroll
    for (int p = 0; p < F::PARTS; ++p)
        *reinterpret_cast<uint4*>(slot + p * MMA_ROWS * row_words) =
            make_uint4(words[p][0], words[p][1], words[p][2], words[p][3]);
}

// The power of two that brings a span's largest |x| into [2^14, 2^15), as an exponent: the
// float16 parts then neither overflow (65504) nor lose the bits of the values that matter.
// 0 for a span of zeros, or one holding inf or NaN (which the sums carry on as they are).
__device__ __forceinline__ int mma_shift(float amax) {
    const int ex = (__float_as_int(amax) >> 23) & 0xFF;
    return amax == 0.0f || ex == 0xFF ? 0 : min(max(141 - ex, -126), 126);
}

// Rows of x a thread stages at once in mma_stage_x, all at the same (unit, lane) of the slice:
// their loads are in flight together, and the norm's weights are loaded once for them. Item
// by item (a row's 8 values), a slice took 2 (wo) to 8 (the classifier) round trips to L2 a
// thread, one after the other (the SASS: an item's two LDG.128, then their use); four rows
// take one or two. Two with SwiGLU, whose gate doubles the loads. All 8 rows (4 with SwiGLU)
// measured slower on the 7B batch-8 step (0.98x): fewer threads then share the staging's
// arithmetic (docs/kernels.md, "Round trips one after the other"). 4 with SwiGLU, measured
// again once silu was cheap (2026-12-01): 0.99x (q4_0), 1.00x (int8).
template <int PRO>
__host__ __device__ constexpr int mma_stage_rows() { return PRO == GEMV_SWIGLU ? 2 : 4; }

// Stage rows m0 .. m0 + 7 of x over units u0 .. u0 + units - 1, after the prologue (RMSNorm's
// norm_w only: inv_rms comes after the product), into xs as B fragments of F::PARTS parts; rows
// past M and positions past K are zeros. A thread takes the items (row, unit, lane t: a row's 8
// values) of RB rows at one (unit, lane) at a time (mma_stage_rows), and the 4 F::UNITS lanes
// of a span (what the loop's step reads: 4, 8 or 16 items) are neighbouring threads of one
// warp: what a span needs from all its values is two to four shuffles away. So every span of
// every row gets its own power of two (float16 parts; none for bfloat16), and no barrier is
// needed before the parts are written: unscale[sp * 8 + r] = 2^-e, what the loop multiplies
// span sp's sums of row r by. (Until 2026-11-30 a row had one power of two for its whole
// slice, its largest value found by a block reduction, and each item was read back and split
// in a second pass: two reductions and four barriers before the loop.) With RMSNorm,
// span_ss[r * spans + sp] gets the sum of squares of row r's span sp, before the prologue;
// mma_row_ss adds them up after the loop, where no warp waits for them.
//
// x_ss: null, or the rows' sums of squares of the norm the launch that wrote X left undone
// (rms_out, below): row m's values, the gate's too, are scaled by 1 / sqrt(x_ss[m] / x_ss_k +
// eps) first, in the same trip to L2 as the values.
template <class F, int PRO>
__device__ void mma_stage_x(const float* __restrict__ X, int m0, int M, int K, int u0, int units,
                            const float* __restrict__ norm_w, unsigned int* xs, float* unscale,
                            float* span_ss, const float* __restrict__ x_ss, int x_ss_k,
                            float eps) {
    const int ldx = PRO == GEMV_SWIGLU ? 2 * K : K, row_words = mma_row_words(units);
    const int cols = 4 * units, spans = units / F::UNITS;           // (unit, lane) of the slice
    constexpr int LANES = 4 * F::UNITS;                              // a span's items
    const unsigned int span_lanes = ((1u << LANES) - 1) << (threadIdx.x % 32 & ~(LANES - 1u));
    constexpr int RB = mma_stage_rows<PRO>();
    for (int i = threadIdx.x; i < cols * (MMA_ROWS / RB); i += blockDim.x) {
        const int u = (i % cols) / 4, t = i % 4, r0 = (i / cols) * RB;
        // mma 0's and 1's float4s: of the RB rows of x, of SwiGLU's gate, of RMSNorm's weights
        float4 x[RB][2], gate[RB][2], gw[2];
        float ss_x[RB];                                 // the deferred norm's sums (x_ss)
        bool live[RB][2];
        const bool scaled = PRO != GEMV_RMSNORM && x_ss != nullptr;   // (not both norms)
#pragma unroll
        for (int rr = 0; rr < RB; ++rr)
            ss_x[rr] = scaled && m0 + r0 + rr < M ? __ldcg(x_ss + m0 + r0 + rr) : 0.0f;
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            const int k4 = (32 * (u0 + u) + mma_x_base<F>(m, t)) / 4;
            gw[m] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (PRO == GEMV_RMSNORM && 4 * k4 < K) gw[m] = __ldg(reinterpret_cast<const float4*>(norm_w) + k4);
#pragma unroll
            for (int rr = 0; rr < RB; ++rr) {
                const float4* xr = reinterpret_cast<const float4*>(X + (size_t)(m0 + r0 + rr) * ldx);
                live[rr][m] = m0 + r0 + rr < M && 4 * k4 < K;
                x[rr][m] = gate[rr][m] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (!live[rr][m]) continue;
                x[rr][m] = __ldcg(xr + k4);             // through L2: not above the wait
                if (PRO == GEMV_SWIGLU) gate[rr][m] = __ldcg(xr + K / 4 + k4);
            }
        }
#pragma unroll
        for (int rr = 0; rr < RB; ++rr) {
            const int r = r0 + rr;
            float v[2][4], sq = 0.0f, big = 0.0f;
            const float rms_x = scaled ? 1.0f / sqrtf(ss_x[rr] / x_ss_k + eps) : 1.0f;
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                float4 e = x[rr][m], gt = gate[rr][m];  // (zeros where not live)
                if (scaled) { e = scale4(e, rms_x); gt = scale4(gt, rms_x); }
                if (PRO == GEMV_RMSNORM) sq += sum_squares4(e);
                e = gemv_prologue4<PRO>(e, PRO == GEMV_RMSNORM ? gw[m] : gt, 1.0f);
                v[m][0] = e.x; v[m][1] = e.y; v[m][2] = e.z; v[m][3] = e.w;
                big = fmaxf(big, fmaxf(fmaxf(fabsf(e.x), fabsf(e.y)), fmaxf(fabsf(e.z), fabsf(e.w))));
            }
#pragma unroll
            for (int o = 1; o < LANES; o *= 2) {                      // over the span's lanes
                if (!F::BF16) big = fmaxf(big, __shfl_xor_sync(span_lanes, big, o));
                if (PRO == GEMV_RMSNORM) sq += __shfl_xor_sync(span_lanes, sq, o);
            }
            const int shift = F::BF16 ? 0 : mma_shift(big);
            if (!F::BF16) {
                const float up = pow2(shift);
#pragma unroll
                for (int m = 0; m < 2; ++m)
#pragma unroll
                    for (int q = 0; q < 4; ++q) v[m][q] *= up;       // exact: a power of two
            }
            mma_store_parts<F>(v, xs + r * row_words + 16 * u + 4 * t, row_words);
            if (i % LANES == 0) {
                unscale[u / F::UNITS * MMA_ROWS + r] = pow2(-shift);
                if (PRO == GEMV_RMSNORM) span_ss[r * spans + u / F::UNITS] = sq;
            }
        }
    }
}

// After the loop (the staging's barrier between): row r's sum of squares over the slice, warp
// r (< MMA_ROWS) adding its spans' in a fixed order (lanes, then warp_sum), in every lane.
__device__ __forceinline__ float mma_row_ss(const float* span_ss, int spans) {
    const int r = threadIdx.x / 32;
    float s = 0.0f;
    for (int sp = threadIdx.x % 32; sp < spans; sp += 32) s += span_ss[r * spans + sp];
    return warp_sum(s);
}

// ---------------------------------------------------------------------------------------------
// The weights of U steps of one lane: per tile j and half h (row g, row g + 8) the 16-byte chunk
// 4 step + t, and the raw float16 scale of block BLOCKS step + (t % BLOCKS) (0 past the row).

template <class F, int NR, int U>
struct MmaLoads {
    uint4 q[U][NR][2];
    unsigned int d[U][NR];          // row g's scale (low half), row g + 8's (high half)

    __device__ __forceinline__ void fetch(const uint4* __restrict__ qs,
                                          const unsigned short* __restrict__ ds, int row0, int N,
                                          int step0, int step_end, int chunks, int nb, int t) {
        constexpr int BL = F::BLOCKS > 0 ? F::BLOCKS : 1;
        const int g = (threadIdx.x % 32) / 4;
#pragma unroll
        for (int s = 0; s < U; ++s)
#pragma unroll
            for (int j = 0; j < NR; ++j) {
                const int step = step0 + s;
                d[s][j] = 0;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int n = min(row0 + 16 * j + 8 * h + g, N - 1);   // past N: never written
                    const int c = 4 * step + t;
                    q[s][j][h] = make_uint4(0, 0, 0, 0);
                    if (step < step_end && c < chunks)                  // (qgemv.cu: L2 lines)
                        q[s][j][h] = q_load16<128>(qs + (size_t)n * chunks + c);
                    if (F::BLOCKS > 0) {
                        const int b = F::BLOCKS * step + t % BL;
                        if (step < step_end && b < nb)
                            d[s][j] |= (unsigned int)q_scale<128>(ds + (size_t)n * nb + b) << (16 * h);
                    }
                }
            }
    }
};

// Passes of the loop over k (U steps each) unrolled: 2 where the compiler then keeps `cur` and
// `next` in two sets of registers that take turns, where one pass copied the one into the other
// (10 moves a step for q4_0 at NR 1), and shares the next fetch's addressing between the two:
// the loop per 512 bytes of codes, q4_0 122 -> 110 instructions at NR 1, 108 -> 102 at NR 2,
// q8_0 87 -> 83 at NR 1 (kernels/dev/sass_loop.py, NVRTC 13 sm_90). Measured at 8 rows (H200,
// 2026-12-01): int8's w2 21.6 -> 19.4 us, its step 1.02x; q4_0 even (docs/kernels.md, "Two
// passes a turn"). q8_0 at NR 2 and the 16-bit formats spill 160 to 430 bytes a thread
// unrolled: they keep 1.
template <class F, int NR>
__host__ __device__ constexpr int mma_loop_unroll() {
    return F::BLOCKS == 4 || (F::BLOCKS == 2 && NR == 1) ? 2 : 1;
}

// ---------------------------------------------------------------------------------------------
// The last block of a tile adds the ks slices, in slice order (reduce.cu), 8 rows of x at a
// time. A thread's outputs i = threadIdx.x + 32 W j (4 NR of them: a tile's 16 W NR rows
// times 8 rows of x, over its 32 W threads) are summed
// slice-major, eight slices' loads of all of them in flight at once, where an output at a time
// waits for L2 once per output. In the same trips come what the sums are finished with: y's
// values (with accumulate), and with RMSNorm each row's sums of squares of the slices, which
// lanes 0 .. 7 of every warp turn into the row's 1 / rms, and a shuffle hands to the lanes
// whose outputs are in that row: the block waits for L2 once after its count, where y's read
// after the sums and the norm's before them took a trip each (docs/kernels.md, "The split's
// sums"), and no barrier (one warp's rows through shared memory took two).
template <int NR, int PRO, int W>
__device__ __forceinline__ void mma_combine(const float* __restrict__ partial,
                                            const float* __restrict__ sums,
                                            float* __restrict__ Y, int M, int N, int K, int ks,
                                            int tile, int accumulate, float eps) {
    constexpr int TR = 16 * W * NR, THREADS = 32 * W, PER = MMA_ROWS * TR / THREADS;
    const int rows = min(TR, N - tile * TR), n0 = tile * TR;
    for (int m0 = 0; m0 < M; m0 += MMA_ROWS) {
        const int mr = min(MMA_ROWS, M - m0), live = mr * rows;
        const int lane = threadIdx.x % 32;
        const bool norms = PRO == GEMV_RMSNORM && lane < mr;            // row lane's 1 / rms
        int r[PER];                                             // output j's row of x, m - m0
        size_t at[PER];                                         // its (m, n) in y
        float v[PER], y[PER];
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + THREADS * j;
            r[j] = rows == TR ? i / TR : i / rows;          // a shift for a whole tile
            at[j] = i < live ? (size_t)(m0 + r[j]) * N + n0 + i - r[j] * rows : 0;
            y[j] = accumulate && i < live ? Y[at[j]] : 0.0f;
            v[j] = 0.0f;
        }
        float ss = 0.0f;
#pragma unroll 8
        for (int s = 0; s < ks; ++s) {
#pragma unroll
            for (int j = 0; j < PER; ++j)
                if (threadIdx.x + THREADS * j < live)
                    v[j] += __ldcg(partial + (size_t)s * M * N + at[j]);
            if (norms) ss += __ldcg(sums + ((size_t)tile * ks + s) * M + m0 + lane);
        }
        const float inv_rms = norms ? 1.0f / sqrtf(ss / K + eps) : 0.0f;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const float scale = PRO == GEMV_RMSNORM ? __shfl_sync(FULL_MASK, inv_rms, r[j]) : 1.0f;
            if (threadIdx.x + THREADS * j >= live) continue;
            const float out = PRO == GEMV_RMSNORM ? v[j] * scale : v[j];
            Y[at[j]] = accumulate ? y[j] + out : out;
        }
    }
}

// Grid (tiles, ks); block 32 W threads (W warps: kernels.MMA_WARPS, at least one per row of x,
// which add up its sums of squares). Tile `blockIdx.x`: rows 16 W NR tile .. + 16 W NR - 1;
// slice `blockIdx.y` of the k spans. Dynamic shared memory: F::PARTS * 8 * ROWW words of x's
// parts, then spans * 8 floats of unscale and as many of span_ss (mma_stage_x).
// scratch: ks * M * N floats of partial sums, then tiles * ks * M sums of squares;
// counters: tiles ints, zero before the launch and zero after it.
// any_order (with accumulate, and no RMSNorm: its 1 / rms needs every slice's squares first):
// each slice adds its sums into Y by atomics (red.global.add.f32, done in L2), so no block
// waits for the others' partial sums, and no last block adds them; the order the slices'
// sums arrive in, so the last bits of Y, changes from launch to launch (halves.cu's price).
// rms_out (with RMSNorm; the batches' deferred norm): the norm is left to the kernel after,
// which knows every slice's squares by then. Y (zeros before) gets the products of x * norm_w
// without 1 / rms, and rms_out[m] (zeros before) each row's sum of squares of x, both added by
// atomics (the squares by the blocks of tile 0, one a slice): no last block, whatever ks.
// The kernel after scales row m by 1 / sqrt(rms_out[m] / K + eps): attention_decode's row_ss,
// or this kernel's x_ss (with x_ss_k = K), in mma_stage_x.
// clear: clear_count floats zeroed after the wait (what a later launch adds into: FusedDecoder
// gives each launch the zeroing of the next deferred product's Y and rms_out).
// U: steps of loads in flight, 64 bytes a lane each (kernels.MMA_U, per format and NR);
// B: blocks an SM, the launch bounds' (kernels.MMA_BLOCKS_PER_SM, which qgemv_mma_plan's waves
// count), so the registers a thread may take (B 1 at W 16: 128).
template <class F, int NR, int PRO, int U, int B, int W>
__global__ void __launch_bounds__(32 * W, B)
qgemv_mma(const float* __restrict__ X, const uint4* __restrict__ qs,
          const unsigned short* __restrict__ d, float* __restrict__ Y, int M, int N, int K,
          int accumulate, const float* __restrict__ norm_w, float eps, float* __restrict__ scratch,
          int* __restrict__ counters, int any_order, float* __restrict__ rms_out,
          const float* __restrict__ x_ss, int x_ss_k, float* __restrict__ clear, int clear_count) {
    static_assert(W >= MMA_ROWS, "warp r adds row r's sums of squares (mma_row_ss)");
    constexpr int SPAN = 4 * F::WEIGHTS;           // positions of k per step
    extern __shared__ __align__(16) unsigned int mma_xs[];
    __shared__ float mma_ss[MMA_ROWS];              // the rows' sums of squares (ks == 1)
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, ks = gridDim.y, slice = blockIdx.y;
    const int chunks = K / F::WEIGHTS, nb = K / 32;
    const int spans = (K + SPAN - 1) / SPAN, per_slice = (spans + ks - 1) / ks;
    const int step_begin = slice * per_slice, step_end = min(spans, step_begin + per_slice);
    const int units = (step_end - step_begin) * F::UNITS, row_words = mma_row_words(units);
    const int row0 = (tile * W + warp) * 16 * NR;             // the warp's first weight row
    const bool adds = PRO != GEMV_RMSNORM && any_order && ks > 1;     // the slices' sums by atomics
    const bool defers = PRO == GEMV_RMSNORM && rms_out != nullptr;    // and the norm to the next
    float* partial = scratch;                                   // (ks, M, N)
    float* sums = scratch + (size_t)ks * M * N;                 // (tiles, ks, M)
    float* unscale = reinterpret_cast<float*>(mma_xs + F::PARTS * MMA_ROWS * row_words);
    float* span_ss = unscale + (step_end - step_begin) * MMA_ROWS;   // (spans, 8), (8, spans)

    MmaLoads<F, NR, U> next;
    next.fetch(qs, d, row0, N, step_begin, step_end, chunks, nb, t);   // before x is staged
    grid_launch_dependents();
    grid_dependency_wait();            // (reduce.cu) the weights are ours; x is the last kernel's
    clear_next(clear, clear_count);    // (reduce.cu; none where clear_count is 0)

    for (int m0 = 0; m0 < M; m0 += MMA_ROWS) {
        __syncthreads();                                        // the last pass's readers are done
        mma_stage_x<F, PRO>(X, m0, M, K, step_begin * F::UNITS, units, norm_w, mma_xs, unscale,
                            span_ss, x_ss, x_ss_k, eps);
        __syncthreads();
        if (m0 > 0) next.fetch(qs, d, row0, N, step_begin, step_end, chunks, nb, t);

        float acc[NR][4];
#pragma unroll
        for (int j = 0; j < NR; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

        constexpr int UNROLL = mma_loop_unroll<F, NR>();
#pragma unroll UNROLL
        for (int s0 = step_begin; s0 < step_end; s0 += U) {
            const MmaLoads<F, NR, U> cur = next;
            if (s0 + U < step_end) next.fetch(qs, d, row0, N, s0 + U, step_end, chunks, nb, t);
#pragma unroll
            for (int s = 0; s < U; ++s) {
                if (s0 + s >= step_end) break;
                unsigned int w[NR][2][4];
#pragma unroll
                for (int j = 0; j < NR; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        w[j][h][0] = cur.q[s][j][h].x; w[j][h][1] = cur.q[s][j][h].y;
                        w[j][h][2] = cur.q[s][j][h].z; w[j][h][3] = cur.q[s][j][h].w;
                        if (F::BLOCKS > 0) quad_transpose(w[j][h], t);
                    }
                // The span's sums of each tile, before x's power of two: span[j][e], the same
                // fragment as acc's; then acc += 2^-e span, e of x's rows 2t and 2t + 1 here.
                float span[NR][4];
#pragma unroll
                for (int u = 0; u < F::UNITS; ++u) {
                    const int unit = (s0 + s - step_begin) * F::UNITS + u;
                    uint4 b[F::PARTS];                           // x's fragments, shared by the tiles
#pragma unroll
                    for (int p = 0; p < F::PARTS; ++p)
                        b[p] = *reinterpret_cast<const uint4*>(
                            mma_xs + (p * MMA_ROWS + g) * row_words + 16 * unit + 4 * t);
#pragma unroll
                    for (int j = 0; j < NR; ++j) {
                        unsigned int a[2][4];
                        F::unit(w[j][0], w[j][1], u, a);
                        // Each unit's sum starts from zero and is added up outside the tensor
                        // cores: their own additions round less finely than float32's
                        // (measured: 2e-5 after 4096 positions in one chain, 2e-7 this way).
                        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                        for (int p = 0; p < F::PARTS; ++p) {
                            mma_16bit<F::BF16>(part, a[0], b[p].x, b[p].y);
                            mma_16bit<F::BF16>(part, a[1], b[p].z, b[p].w);
                        }
                        if (F::BLOCKS == 0) {                    // f16, bf16: one unit a span
#pragma unroll
                            for (int e = 0; e < 4; ++e) span[j][e] = part[e];
                        } else {                                 // the block's scales, rows g, g + 8
                            const unsigned int dd =
                                __shfl_sync(FULL_MASK, cur.d[s][j], (lane & ~3) | u % (F::BLOCKS > 0 ? F::BLOCKS : 1));
                            const float dg = f16_lo(dd), de = f16_hi(dd);
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const float dr = e < 2 ? dg : de;      // row g or g + 8
                                span[j][e] = u == 0 ? dr * part[e] : fmaf(dr, part[e], span[j][e]);
                            }
                        }
                    }
                }
                if (F::BF16) {                                   // three parts, never scaled
#pragma unroll
                    for (int j = 0; j < NR; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[j][e] += span[j][e];
                } else {
                    const float2 us = *reinterpret_cast<const float2*>(
                        unscale + (s0 + s - step_begin) * MMA_ROWS + 2 * t);
#pragma unroll
                    for (int j = 0; j < NR; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            acc[j][e] = fmaf(e & 1 ? us.y : us.x, span[j][e], acc[j][e]);
                }
            }
        }

        if (PRO == GEMV_RMSNORM) {              // the rows' sums of squares: warp r, row m0 + r
            if (warp < MMA_ROWS) {
                const float ss = mma_row_ss(span_ss, step_end - step_begin);
                if (lane == 0 && defers && tile == 0 && m0 + warp < M)
                    atomicAdd(rms_out + m0 + warp, ss);
                if (lane == 0 && !defers && ks == 1) mma_ss[warp] = ss;
                if (lane == 0 && !defers && ks > 1 && m0 + warp < M)
                    sums[((size_t)tile * ks + slice) * M + m0 + warp] = ss;
            }
            if (ks == 1 && !defers) __syncthreads();
        }

        // fragment: acc[j][e] = y[m0 + 2t + (e & 1)][row0 + 16 j + g + 8 (e >> 1)]
#pragma unroll
        for (int j = 0; j < NR; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + 2 * t + (e & 1), n = row0 + 16 * j + g + 8 * (e >> 1);
                if (m >= M || n >= N) continue;
                float v = acc[j][e];                    // (x's scaling undone step by step)
                if (adds || defers) {
                    atomicAdd(Y + (size_t)m * N + n, v);
                } else if (ks == 1) {
                    if (PRO == GEMV_RMSNORM) v *= 1.0f / sqrtf(mma_ss[2 * t + (e & 1)] / K + eps);
                    Y[(size_t)m * N + n] = accumulate ? Y[(size_t)m * N + n] + v : v;
                } else {
                    partial[((size_t)slice * M + m) * N + n] = v;
                }
            }
    }
    // The last block of this tile adds the ks slices (mma_combine, above).
    if (ks == 1 || adds || defers || !split_last_block(counters + tile, ks)) return;
    mma_combine<NR, PRO, W>(partial, sums, Y, M, N, K, ks, tile, accumulate, eps);
}

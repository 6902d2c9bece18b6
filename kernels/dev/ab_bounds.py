"""Bounds before building: what a whole decode step would gain (development tool, needs a GPU).

    PYTHONPATH=. python kernels/dev/ab_bounds.py [--rounds 7] [--only 7b,stories,batches,...]
        [--variants ...]

Candidates, measured as bounds on the step they would change, before any is written:

- "plain norms": every normed product (wqkv, w13, the classifier) launched without its RMSNorm
  prologue. The logits are wrong (flagged as a mismatch, expected); the time is what a step
  would take if the sum of squares and its block-wide barrier cost nothing, the most a
  candidate that folds RMSNorm into the products' epilogue could save.
- "slices in order", "norms in place": candidates taken, measured the other way round. The
  package's batch products that add into the residual (wo, w2) add their slices of k by
  atomics in any order (qgemv_mma's any_order), and wqkv and w13 leave RMSNorm to the kernel
  after them, adding their slices by atomics too (FusedDecoder.defers_norms; both unless
  deterministic). "norms in place" has wqkv's and w13's slices added up and normed by the last
  block of each tile; "slices in order" every split's, as they were before.
- "tanh silu": a candidate taken, the other way round too: SwiGLU's silu with the full-precision
  tanhf, as model.py writes it and matmul.cu did until 2026-12-01 (SOURCE_BOUNDS says what it
  measured).
- "programmatic" and "ordinary": the graph captured with programmatic launches, or without,
  whatever FusedDecoder.programmatic says. Its rule, one row only, was measured before
  qgemv_mma's plan went to one wave (docs/kernels.md, "Between kernels" and "One wave"); this
  tool's first run (H200, 2026-11-30) found the 7B batch-8 step 5 to 8% faster with them, and
  the rule now takes them for batches of a model kept as stored.

- "kept wo", "kept w2", "kept both": the one-row products without RMSNorm (wo, w2) of q4_0 and
  q8_0 launched as variants.cu's qgemv_v4s_pre, which copies x's digits staged beforehand
  instead of staging them itself, from digits made once (wrong logits, flagged). The time is what
  a step would take if the kernel before (attention for wo, w13 for w2) wrote the digits as it
  writes x and the product only copied them, at the package's split (QGEMV_V4S). Measured
  (H200, 2026-11-30, 9 rounds): q4_0 1.5619 ms, kept wo 1.01x, kept w2 1.02x, kept both 1.03x;
  int8 2.0908, 0.99x / 1.01x / 1.01x. Not worth the kernels it would take.

- "balanced v4": qgemv_v4's grid sized so that its warps' tiles of NR rows are as even as they
  can be. The package's grid is what fits at once (B blocks an SM), and its warps walk tiles
  a grid apart: on the 7B w13 (22016 rows, NR 2, 264 blocks) 448 of 2112 warps take a sixth
  tile while the rest have ended. Balanced, the fewest warps that still take no more tiles
  each (1835, 230 blocks) take ~6 each. Measured (H200, 2026-11-30, 9 rounds): q4_0 1.5575 ->
  1.5565 ms, int8 2.0670 -> 2.0465 (1.01x): the last tile's few warps are not what costs.

- "no combine", "no staging": the kernels compiled from an edited source (SOURCE_BOUNDS), wrong
  logits. "no combine": qgemv_mma and qgemv_v4s return once a block has written its slice's
  partial sums, so no block adds the slices (what a free combine would save); "no staging":
  qgemv_v4, qgemv_v4s and qgemv_mma skip staging x (what free digits would save). Measured
  (H200, 2026-11-30, the same edits on two trees, FusedDecoder's graph in turn, ms a step):
  7B q4_0 one row 1.557 -> 1.496 (no combine) and 1.273 (no staging), 8 rows 3.483 -> 2.522 and
  3.007; int8 one row 2.088 -> 2.041 and 1.935, 8 rows 4.268 -> 3.322 and 3.674. The combine's
  count by one thread's acquire-release atomic (reduce.cu's split_last_block) and q4_0's
  staging in lanes then took 1.013x and 1.032x of them. "no sums": the count kept, but the last
  block returns without adding the slices; measured on the final tree (3 rounds): q4_0 one row
  1.5090 -> 1.4503 (no combine) and 1.4733 (no sums), 8 rows 3.4517 -> 2.5394 and 2.6233
  (1.32x): the last block's sums, not the count, are what costs. Launch by launch
  (sweep_mma_plan.py --bounds) most of them were the normed launches' sums of squares, added
  again for every output; with each row's 1 / rms once and the sums slice-major, the 8-row
  step went 1.11x (q4_0) and 1.10x (int8) faster (docs/kernels.md, "The split's sums").

- "attention one row": the step with attention_decode's grid cut to one row's blocks (wrong
  logits): whether the SMs that a batch's attention blocks hold, which the next product's blocks
  then wait for, are what attention costs at 8 rows. Measured (H200, 2026-12-02, 7B q4_0 at 8
  rows, 7 rounds): 1.02x, where "no attention" is 1.09x (docs/kernels.md, "What the 8-row step
  pays").
- "no attention": the step with attention_decode left out (wrong logits): what folding attention
  into the kernel before or after it could gain at most. "no staging or combine": both edits at
  once. Measured (H200, 2026-11-30, 3 rounds): 7B q4_0 1.5009 ms at one row, 1.05x without
  attention, 1.24x without staging and combine; 8 rows 2.9885, 1.04x and 1.69x; int8 2.0816,
  1.04x and 1.11x; 8 rows 3.8608, 1.03x and 1.55x. More than the two bounds alone: each launch's
  chain is the kernel before's combine, then its own staging (docs/kernels.md, "Round trips one
  after the other").

- "loads after the wait", "dependents after the loop": candidates, not bounds (the logits
  stay right): qgemv_mma's first loads of W after `grid_dependency_wait` instead of before it,
  and its `grid_launch_dependents` after the loop instead of at the start. More of W asked for
  before the wait (to L2, or into shared memory) lost every time it was tried; these tried the
  other direction, and lost too. Measured (H200, 2026-11-30, 3 rounds, 8 rows): q4_0 2.5475 ms,
  loads after the wait 0.96x, dependents after the loop 0.96x; int8 3.3347, 0.95x and 0.95x.
- "mma plain stores", "mma no transpose", "mma one part", "mma raw codes": bounds of qgemv_mma's
  8-row step, its slices' atomics as stores, the quad transpose skipped, x in one float16 part,
  q4_0's codes not unpacked (wrong logits). Measured (H200, 2026-12-02, 7B q4_0 at 8 rows, 5
  rounds): 1.01x, 1.07x, 1.11x, 1.04x. Candidates for the same step, right logits, all lost:
  "mma paired atomics" 0.98x, "mma word loads" 0.77x, "mma scales in lanes" 0.78x, "mma two
  chains" 0.98x, and q4_0's products by wgmma 0.72x (commit 864d97e; SOURCE_BOUNDS says what
  each is). docs/kernels.md, "Where the 8-row step's time goes".
- "mma staged in two", "... a third first", "... in two at nr 1", "mma staged after the first
  step": candidates, right logits: qgemv_mma's x staged in two parts, the second behind the
  first step's loads of W. Measured (H200, 2026-12-02, 7B q4_0 at 8 rows, 5 rounds): 0.87x,
  0.87x, 0.93x, 0.93x (docs/kernels.md, "x staged in two").
- "fewer v4 shuffles": a candidate for one row (q4_0): v4_unit_lane's shuffles a round from 23
  to 12 (|x|'s bits for the maximum and finiteness at once, two digit sums in one word, the sum
  of squares by xor); 107 -> 63 SHFL before the first dp4a in qgemv_v4<V4Q4_0,1,..>'s SASS.
  "no v4 staging": the bound of qgemv_walk's staging alone (x staged whole by every block of
  wqkv, w13 and the classifier at one row). Measured (H200, 2026-11-30, 3 rounds, one row):
  q4_0 1.4962 ms, fewer v4 shuffles 0.99x, no v4 staging 1.15x; int8 2.0624, 1.00x and 1.06x.
  The staging's cost is not its shuffles (see the copies bound below for the rest). That
  candidate edited the staging of the time (8 lanes a unit), which x's staging in pairs
  (qgemv.cu's v4_stage_pairs, 1.05x on the q4_0 step) has since replaced; it is no longer
  among the variants. What the pairs took away was most of the instructions and the chain of
  dependent shuffles, the lanes' loads kept in the row's order (docs/kernels.md).
- "v4 copies digits", "mma copies parts": bounds for x staged once per step by the kernel
  before (it would write the digits, or the float16 parts, as it writes x): the product copies
  them from global memory, 16-byte loads all in flight, then stores, with no arithmetic (X's
  own bytes stand for them: wrong logits). Measured (H200, 2026-11-30, 3 rounds): one row,
  q4_0 1.5069 ms, v4 copies digits 1.10x (no v4 staging 1.15x); int8 2.0812, 1.00x (1.06x);
  8 rows, q4_0 2.5446, mma copies parts 1.05x (no staging 1.19x); int8 3.3615, 1.09x (1.10x).
  What the kernel before would add to its own tail (the digits or parts of its outputs, after
  its sums) comes off these, and the two pull apart: q4_0's one-row step 1.10x faster would
  take batch 8 / batch 1 from 4.77 (twenty-second run) to ~4.33 (~4.54 with the 8-row
  copy's 1.05x).

And gemv's RMSNorm after the sums, once written ("late none", "late early", "late all":
kernels.GEMV_LATE_NORM): on the one-row float32 steps, the graph's gemv launches without it,
with it where W's first loads come before the wait, or on every one-row launch.

Each on the shapes where it matters (ab_step.py: one model per shape and storage, its graph
captured per variant, replays interleaved over rounds, medians, ms a step).
"""
import contextlib
import sys

import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_step                                              # noqa: E402  (checkout first)
from ab_step import ab_steps, patched                       # noqa: E402
from minillama.cuda import fused, kernels, require_cupy     # noqa: E402

RUNS = {"7b": [("7B", "q4_0", (1, 8)), ("7B", "int8", (1, 8)), ("7B", "float16", (8,))],
        "stories": [("15M", "float32", (1, 8, 32)), ("110M", "float32", (1, 8, 32))],
        "batches": [("7B", "q4_0", (2, 4, 16, 32))],
        "large batches": [("7B", "int8", (16, 32)), ("7B", "float16", (16, 32))],
        "one row": [("15M", "float32", (1,)), ("110M", "float32", (1,))],
        "7b one row": [("7B", "q4_0", (1,)), ("7B", "int8", (1,))],
        "7b both": [("7B", "q4_0", (1, 8)), ("7B", "int8", (1, 8))],
        "7b q4_0": [("7B", "q4_0", (1, 8))],
        "7b batches": [("7B", "q4_0", (8,)), ("7B", "int8", (8,))],
        "7b q4_0 batch": [("7B", "q4_0", (8,))]}


def norms_in_place():
    """FusedDecoder's batch steps without the deferred norms (defers_norms): wqkv's and w13's
    slices added up, and normed, by the last block of each tile."""
    return patched(fused.FusedDecoder, "deferred_norms", False)


@contextlib.contextmanager
def matvec_without(argument):
    """norms_in_place, and FusedDecoder's products (fused.matvec) with `argument` dropped. A
    batch step that defers its norms (run_deferred) calls qgemv_mma itself, not matvec: so the
    norms stay in place here, and every product goes through matvec."""
    matvec = fused.matvec

    def without(x, w, **kwargs):
        kwargs.pop(argument, None)
        return matvec(x, w, **kwargs)
    with norms_in_place(), patched(fused, "matvec", without):
        yield


def plain_norms():
    """FusedDecoder's products with their norm argument dropped (timing only)."""
    return matvec_without("norm")


def slices_in_order():
    """Every split's slices added up by the last block of each tile, in slice order (where the
    package adds wo's and w2's by atomics, and defers wqkv's and w13's norms)."""
    return matvec_without("any_order")


def captured(programmatic):
    """The graph captured with programmatic launches, or without, whatever the rule says."""
    return patched(ab_step, "capture_programmatic", lambda fused, bsz: programmatic)


KEPT = {}          # (fmt, K, prologue) -> digits made once; "module": variants.cu's instances


def kept_module():
    """variants.cu's qgemv_v4s_pre and v4_digits, with the package's kernels (one module)."""
    if "module" not in KEPT:
        from bench_variants import variants_source
        cp = require_cupy()
        names = [f"qgemv_v4s_pre<V4{f},{nr},{u}>" for f, (nr, u, _) in
                 (("Q4_0", kernels.QGEMV_V4S["q4_0"]), ("Q8_0", kernels.QGEMV_V4S["q8_0"]))]
        names += [f"v4_digits<V4{f},{pro}>" for f in ("Q4_0", "Q8_0") for pro in (0, 2)]
        KEPT["module"] = cp.RawModule(code=variants_source(), name_expressions=names,
                                      options=("-std=c++17",))
    return KEPT["module"]


def launch_kept(x, w, y, prologue, accumulate):
    """qgemv_v4s_pre on digits of a random x made once per (format, K, prologue), at the
    package's qgemv_v4s plan, programmatic where KERNELS launches so."""
    from minillama.cuda import pdl
    cp, fmt, (N, K) = require_cupy(), w.format, w.shape
    module, (nr, u, ks) = kept_module(), kernels.QGEMV_V4S[fmt]
    f = "V4Q4_0" if fmt == "q4_0" else "V4Q8_0"
    weights = kernels.QGEMV_WEIGHTS[fmt]
    key = (fmt, K, prologue)
    if key not in KEPT:                          # eagerly, before the capture
        xr = cp.random.standard_normal(x.shape[1], dtype=cp.float32)
        digits = cp.empty((3 * weights // 16 + 1) * (K // weights) * 4, dtype=np.uint32)
        module.get_function(f"v4_digits<{f},{prologue}>")(
            (kernels.cdiv(K // 4, 256),), (256,), (xr, np.int32(K), digits))
        KEPT[key] = digits
    slices, per, rows, tiles = kernels.qgemv_v4s_plan(N, K, fmt, nr, ks)
    partial, counters = kernels._split_workspace(slices * N, tiles)
    function = module.get_function(f"qgemv_v4s_pre<{f},{nr},{u}>")
    qs, d, _ = kernels._check_packed(w)
    args = (KEPT[key], qs, d, y, np.int32(N), np.int32(K),
            np.int32(bool(accumulate)), np.int32(rows), np.int32(per), partial, counters)
    smem = per * (3 * weights // 16 + 1) * 16
    kernels.KERNELS.launches += 1
    if kernels.KERNELS._programmatic and pdl.supported(cp.cuda.Device().id):
        pdl.launch(function.kernel.ptr, (tiles, slices), (256,), args, smem,
                   cp.cuda.get_current_stream().ptr)
    else:
        function((tiles, slices), (256,), args, shared_mem=smem)
    return y


def kept_digits(which):
    """wo and/or w2 (`which`) of one row in q4_0 or q8_0 through launch_kept (timing only)."""
    matvec = fused.matvec

    def kept(x, w, out=None, accumulate=False, norm=None, swiglu=False, **kwargs):
        name = "w2" if swiglu else "wo"
        if (x.shape[0] == 1 and norm is None and name in which
                and getattr(w, "format", None) in ("q4_0", "q8_0")):
            return launch_kept(x, w, out, 2 if swiglu else 0, accumulate)
        return matvec(x, w, out=out, accumulate=accumulate, norm=norm, swiglu=swiglu, **kwargs)
    return patched(fused, "matvec", kept)


def v4_balanced_grid(N, nr, blocks, sms, warps=8):
    """qgemv_v4's grid with its warps' tiles even: the most tiles a warp takes at the
    package's grid (min(tiles of 8 NR rows, B blocks an SM)), then the fewest blocks that
    keep every warp at that many."""
    warp_tiles = kernels.cdiv(N, nr)
    per = kernels.cdiv(warp_tiles, min(kernels.cdiv(N, warps * nr), blocks * sms) * warps)
    return kernels.cdiv(kernels.cdiv(warp_tiles, per), warps)


def balanced_v4():
    """kernels._qgemv_v4 launched on v4_balanced_grid (the same kernel and arguments)."""
    launch = kernels.KERNELS.launch

    def balanced(name, grid, block, args, shared_mem=0, ordinary=False):
        if name.startswith("qgemv_v4<"):
            N, fmt = int(args[4]), "q4_0" if "Q4_0" in name else "q8_0"
            nr, _, blocks = kernels.QGEMV_V4[fmt]
            grid = (v4_balanced_grid(N, nr, blocks, kernels.sm_count()),)
        return launch(name, grid, block, args, shared_mem, ordinary)
    return patched(kernels.KERNELS, "launch", balanced)


def no_attention():
    """FusedDecoder's step with attention_decode left out (timing only): wo reads whatever
    att held. The most a step could gain if attention cost nothing, its launch and the wait
    between it and wo included: the bound of folding it into the kernel before or after."""
    launch = kernels.KERNELS.launch

    def without(name, *args, **kwargs):
        if not name.startswith("attention_decode<"):
            return launch(name, *args, **kwargs)
    return patched(kernels.KERNELS, "launch", without)


def attention_one_row():
    """FusedDecoder's step with attention_decode's grid cut to one row's blocks at every batch
    (timing only: rows 1 .. bsz-1 of att keep what they held): what a batch's attention would
    cost if its blocks took as few SMs as one row's, each doing one row's work. The bound of a
    block that serves every row of a head, which would leave the other SMs to the next
    product's blocks and their early loads of W."""
    grid_of = fused.FusedDecoder.attention_grid

    def one_row(self, bsz):
        width, grid, block = grid_of(self, bsz)
        return width, (grid[0], 1, grid[2]), block
    return patched(fused.FusedDecoder, "attention_grid", one_row)


# name -> (old, new) edits of runtime.kernel_source(), each found at least once
V4S_COMBINE = "    if (ks == 1 || any_order || !split_last_block(counters + tile, ks)) return;"
MMA_COMBINE = ("    if (ks == 1 || adds || defers || !split_last_block(counters + tile, ks))"
               " return;")
SOURCE_BOUNDS = {
    "no combine": [(line, "    return;   // BOUND: no block adds the slices")
                   for line in (V4S_COMBINE, MMA_COMBINE)],
    "no sums": [(line, line + "\n    return;   // BOUND: the count, but no block adds the slices")
                for line in (V4S_COMBINE, MMA_COMBINE)],
    "no staging": [("            Step::stage(X, m0, M, ldx, K, k0, len, CH, inv_rms, norm_w);",
                    "            if (false) Step::stage(X, m0, M, ldx, K, k0, len, CH, inv_rms, norm_w);"),
                   ("    src.stage(K, first, CH);", "    if (false) src.stage(K, first, CH);"),
                   ("        mma_stage_x<F, PRO>(X, m0, M, K,", "        if (false) mma_stage_x<F, PRO>(X, m0, M, K,")],
}
SOURCE_BOUNDS["no staging or combine"] = SOURCE_BOUNDS["no staging"] + SOURCE_BOUNDS["no combine"]
# Not bounds but candidates, right logits: qgemv_mma's first loads of W after the wait, not
# before it ("loads after the wait"), and its grid_launch_dependents after the loop, so that
# the next kernel's blocks (and their early loads) start only as this one's tails run
# ("dependents after the loop"). Asking for more of W before the wait lost every time it was
# tried (docs/kernels.md, "A power of two per span"); these measure the other direction.
SOURCE_BOUNDS["loads after the wait"] = [
    ("    next.fetch(qs, d, row0, N, step_begin, step_end, chunks, nb, t);   // before x is staged\n"
     "    grid_launch_dependents();\n"
     "    grid_dependency_wait();",
     "    grid_launch_dependents();\n"
     "    grid_dependency_wait();\n"
     "    next.fetch(qs, d, row0, N, step_begin, step_end, chunks, nb, t);   // CANDIDATE: after")]
# A bound for one row: only qgemv_walk's staging (qgemv_v4 on wqkv, w13 and the classifier,
# x staged whole by every block) skipped, v4s's and qgemv_mma's kept.
SOURCE_BOUNDS["no v4 staging"] = SOURCE_BOUNDS["no staging"][:1]


def copied_from_x(what, count, wrap, dst, after):
    """A copies bound's block of CUDA: `count` uint4s from X (index modulo `wrap`, X's own
    uint4s) into `dst`, four a thread in flight, then their stores; `after` follows it (what
    ends the staging it stands for)."""
    return f"""        {{   // BOUND: {what} copied, as if the kernel before made them
            const int n = {count};
            const uint4* src = reinterpret_cast<const uint4*>(X);
            uint4* dst = reinterpret_cast<uint4*>({dst});
            for (int base = 0; base < n; base += 4 * blockDim.x) {{
                uint4 v[4];
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    if (base + r * blockDim.x + threadIdx.x < n) v[r] = __ldcg(src + (base + r * blockDim.x + threadIdx.x) % ({wrap}));
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    if (base + r * blockDim.x + threadIdx.x < n) dst[base + r * blockDim.x + threadIdx.x] = v[r];
            }}
        }}
{after}"""


# Bounds for staging done once per step by the kernel before (the "kept" bounds, for the normed
# launches and the batches): the product copies its staged x from global memory, 16-byte loads
# through L2 all in flight, then stores, with no arithmetic. The copy reads X's own bytes (what
# the kernel before would have written in their place; an index past x's K values, or its M
# rows, wraps), so the logits are wrong; the time is
# that of a product whose staging is one trip to L2 and a barrier. "v4 copies digits": one row,
# qgemv_v4's stage (wqkv, w13, the classifier); "mma copies parts": qgemv_mma's at every batch.
V4_COPY = copied_from_x("the units' digits and sums",
                        "(META + 1) * CH + (PRO == GEMV_RMSNORM ? CH / 4 : 0)",   # + unit_ss
                        "K / 4", "v4_xs", "        return;\n")
MMA_COPY = copied_from_x("x's parts, unscale and span_ss",
                         "(F::PARTS * MMA_ROWS * row_words + 2 * MMA_ROWS * (step_end - step_begin)) / 4",
                         "M * K / 4", "mma_xs", "        if (false)\n")
SOURCE_BOUNDS["v4 copies digits"] = [
    ("        if (V4_PAIRS<F>()) {\n", V4_COPY + "        if (V4_PAIRS<F>()) {\n")]
SOURCE_BOUNDS["mma copies parts"] = [
    ("        mma_stage_x<F, PRO>(X, m0, M, K,", MMA_COPY + "        mma_stage_x<F, PRO>(X, m0, M, K,")]
SOURCE_BOUNDS["dependents after the loop"] = [
    ("    next.fetch(qs, d, row0, N, step_begin, step_end, chunks, nb, t);   // before x is staged\n"
     "    grid_launch_dependents();\n",
     "    next.fetch(qs, d, row0, N, step_begin, step_end, chunks, nb, t);   // before x is staged\n"),
    ("    // The last block of this tile adds the ks slices (mma_combine, above).\n",
     "    grid_launch_dependents();   // CANDIDATE: the next kernel starts as the tails run\n"
     "    // The last block of this tile adds the ks slices (mma_combine, above).\n")]
# The other way round, right logits to a few units of the last place: matmul.cu's silu as it
# was until 2026-12-01, with the full-precision tanhf (model.py's formula), where the package's
# takes one exponential and a division (__expf, __fdividef). qgemv_mma's w2 staging at 8 rows
# took ~3 us of a ~16 us launch (q4_0) beyond a copy of the parts (sweep_mma_plan.py
# --bounds "no staging,mma copies parts"), most of it arithmetic. Measured as a candidate
# (H200, 2026-12-01, 5 rounds, ms a step): q4_0 8 rows 2.2703 -> 2.2558 (1.006x) and 2.2441
# (1.012x) with the change in qgemv_mma's staging alone; int8 3.0952 -> 3.0808 and 3.0862;
# one row and the stories steps even; w2's launch alone 15.8 -> 15.0 us (q4_0), 22.4 -> 21.8
# (int8).
SOURCE_BOUNDS["tanh silu"] = [
    ("__device__ __forceinline__ float silu(float x) "
     "{ return __fdividef(x, 1.0f + __expf(-x)); }",
     "__device__ __forceinline__ float silu(float x) "
     "{ return x * (0.5f + 0.5f * tanhf(0.5f * x)); }   // BEFORE")]
# A candidate, right logits: SwiGLU's staging (w2's) takes 4 rows of x a thread at one (unit,
# lane), as the other prologues do, where it takes 2 (mma_stage_rows: 4 measured 0.98x on the
# 7B batch-8 step while silu took tanhf's ~20 instructions; now ~5). The 7B w2's slice at 8 rows
# is then 352 items for 512 threads, one trip each, where 2 rows give 704, two trips for some.
# Measured (H200, 2026-12-01, 7 rounds, 8 rows): q4_0 2.2542 -> 2.2659 ms (0.99x; w2's launch
# 15.0 -> 15.2 us), int8 3.0835 -> 3.0821 (1.00x). Not taken.
SOURCE_BOUNDS["swiglu stages 4 rows"] = [
    ("constexpr int mma_stage_rows() { return PRO == GEMV_SWIGLU ? 2 : 4; }",
     "constexpr int mma_stage_rows() { return 4; }   // CANDIDATE")]
# A candidate taken, the other way round: qgemv_mma's loop over k not unrolled, one pass copying
# the next step's loads into the current's registers (mma_loop_unroll: q4_0 and q8_0 at NR 1
# take 2 passes a turn).
SOURCE_BOUNDS["loop not unrolled"] = [
    ("    return F::BLOCKS == 4 || (F::BLOCKS == 2 && NR == 1) ? 2 : 1;",
     "    return 1;   // BEFORE")]
# Bounds of qgemv_mma's loop and tail at 8 rows (wrong logits, the time only; 2026-12-02):
# "mma plain stores": the slices' sums stored, not added by atomics (what the atomics cost over
# the stores); "mma no transpose": the quad transpose skipped (what a layout of the codes that
# needs none would save); "mma one part": q4_0's x in one float16 part, not two (what the
# second part's mma's and fragments cost); "mma raw codes": q4_0's codes into the mma's as
# they are loaded, not unpacked (what the unpacking costs). Measured (H200, 2026-12-02, 5
# rounds, 7B q4_0 at 8 rows, "7b q4_0 batch"): package 2.2538 ms; plain stores 1.01x, no
# transpose 1.07x, one part 1.11x (logits 3.5e-5 from the package's: under the 1e-5 the batches
# are held to only with the second part), raw codes 1.04x. One part is now the package's
# default for batch steps (qgemv_mma's x16, CudaOps' x16_batches: docs/kernels.md "x in one
# part"), so "mma one part" bounds only a package run with MINILLAMA_X16_BATCHES=0.
SOURCE_BOUNDS["mma plain stores"] = [
    ("                    atomicAdd(Y + (size_t)m * N + n, v);",
     "                    Y[(size_t)m * N + n] = v;   // BOUND: a store, not an atomic")]
SOURCE_BOUNDS["mma no transpose"] = [
    ("                        if (F::BLOCKS > 0) quad_transpose(w[j][h], t);",
     "                        if (false) quad_transpose(w[j][h], t);   // BOUND")]
SOURCE_BOUNDS["mma one part"] = [
    ("    static constexpr int WEIGHTS = 32, UNITS = 4, BLOCKS = 4, PARTS = 2;",
     "    static constexpr int WEIGHTS = 32, UNITS = 4, BLOCKS = 4, PARTS = 1;   // BOUND")]
SOURCE_BOUNDS["mma raw codes"] = [
    ("        a[0][0] = q4_low_pair<false>(g[u]); a[0][1] = q4_low_pair<false>(e[u]);    // mma 0\n"
     "        a[0][2] = q4_low_pair<false>(g8); a[0][3] = q4_low_pair<false>(e8);\n"
     "        a[1][0] = q4_high_pair<false>(g[u]); a[1][1] = q4_high_pair<false>(e[u]);  // mma 1\n"
     "        a[1][2] = q4_high_pair<false>(g8); a[1][3] = q4_high_pair<false>(e8);",
     "        a[0][0] = g[u]; a[0][1] = e[u]; a[0][2] = g8; a[0][3] = e8;   // BOUND: not unpacked\n"
     "        a[1][0] = g[u] ^ e8; a[1][1] = e[u] ^ g8; a[1][2] = g8 + 1; a[1][3] = e8 + 1;")]
# A candidate, right logits: the atomics of the slices' sums in pairs of n, one
# red.global.add.v2.f32 for two, the pair gathered by one shuffle between lanes g and g ^ 1
# (each lane holds rows 2t and 2t + 1 of x at weight row g; after the exchange an even g holds
# row 2t at n = g, g + 1 and an odd g row 2t + 1 at n = g - 1, g): half the atomics.
# Measured (H200, 2026-12-02, 5 rounds): 2.3074 ms against 2.2538, 0.98x.
MMA_PAIRS = """        if ((adds || defers) && N % 2 == 0 && ((size_t)Y & 7) == 0) {   // CANDIDATE
            const bool odd = g & 1;
#pragma unroll
            for (int j = 0; j < NR; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float got = __shfl_xor_sync(FULL_MASK, acc[j][2 * h + (odd ? 0 : 1)], 4);
                    const int m = m0 + 2 * t + (odd ? 1 : 0);
                    const int n = row0 + 16 * j + (g & ~1) + 8 * h;
                    const float a = odd ? got : acc[j][2 * h], b = odd ? acc[j][2 * h + 1] : got;
                    if (m < M && n < N)
                        asm volatile("red.global.add.v2.f32 [%0], {%1, %2};"
                                     :: "l"(Y + (size_t)m * N + n), "f"(a), "f"(b) : "memory");
                }
        }
"""
SOURCE_BOUNDS["mma paired atomics"] = [
    ("        // fragment: acc[j][e] = y[m0 + 2t + (e & 1)][row0 + 16 j + g + 8 (e >> 1)]\n",
     MMA_PAIRS + "        // fragment: acc[j][e] = y[m0 + 2t + (e & 1)][row0 + 16 j + g + 8 (e >> 1)]\n"),
    ("                if (adds || defers) {\n                    atomicAdd(Y + (size_t)m * N + n, v);",
     "                if ((adds || defers) && N % 2 == 0 && ((size_t)Y & 7) == 0) {\n"
     "                } else if (adds || defers) {\n"
     "                    atomicAdd(Y + (size_t)m * N + n, v);")]
# A candidate, right logits: q4_0's codes loaded as the mma's need them, no quad transpose
# ("mma no transpose" bounds it): lane t of a quad loads word t of each of the step's 4 chunks
# of its row, four 4-byte loads that share the chunks' sectors (through L1; l1: the
# load's L1 policy), where one 16-byte load of chunk t and 4 SHFL and 12 SEL made the same words.
# Measured (H200, 2026-12-02, 5 rounds): 2.9387 ms against 2.2634, 0.77x (evict_first 0.76x).
def mma_word_loads(l1):
    return [
        ("                    if (step < step_end && c < chunks)                  // (qgemv.cu: L2 lines)\n"
         "                        q[s][j][h] = q_load16<128>(qs + (size_t)n * chunks + c);\n",
         "                    if (F::BLOCKS == 4) {   // CANDIDATE: word t of the step's 4 chunks\n"
         "                        const unsigned int* wp = reinterpret_cast<const unsigned int*>(\n"
         "                            qs + (size_t)n * chunks + 4 * step) + t;\n"
         "                        unsigned int wv[4];\n"
         "#pragma unroll\n"
         "                        for (int i = 0; i < 4; ++i) {\n"
         "                            wv[i] = 0;\n"
         "                            if (step < step_end && 4 * step + i < chunks)\n"
         "                                asm(\"ld.global.nc" + l1 + ".L2::128B.u32 %0, [%1];\"\n"
         "                                    : \"=r\"(wv[i]) : \"l\"(wp + 4 * i));\n"
         "                        }\n"
         "                        q[s][j][h] = make_uint4(wv[0], wv[1], wv[2], wv[3]);\n"
         "                    } else if (step < step_end && c < chunks)\n"
         "                        q[s][j][h] = q_load16<128>(qs + (size_t)n * chunks + c);\n"),
        ("                        if (F::BLOCKS > 0) quad_transpose(w[j][h], t);",
         "                        if (F::BLOCKS > 0 && F::BLOCKS != 4) quad_transpose(w[j][h], t);")]


SOURCE_BOUNDS["mma word loads"] = mma_word_loads("")
SOURCE_BOUNDS["mma word loads first"] = mma_word_loads(".L1::evict_first")
# A candidate, right logits: q4_0's scales without shuffles. Each lane loads the step's 4
# scales of its rows g and g + 8 (8 bytes each, where nb % 4 == 0), and one PRMT takes unit u's
# pair out of them, where each lane loaded block t's scale and a SHFL a unit fetched block u's
# from lane u of the quad (4 SHFL a step a tile: the shared-memory pipe the transpose's
# shuffles and x's fragments use too). Measured (H200, 2026-12-02, 7 rounds): 2.8703 ms against
# 2.2510, 0.78x.
SOURCE_BOUNDS["mma scales in lanes"] = [
    ("    uint4 q[U][NR][2];\n",
     "    uint4 q[U][NR][2];\n    uint2 dq[U][NR][2];   // CANDIDATE: q4_0, the step's 4 scales\n"),
    ("                    if (F::BLOCKS > 0) {\n"
     "                        const int b = F::BLOCKS * step + t % BL;\n",
     "                    if (F::BLOCKS == 4 && nb % 4 == 0) {   // CANDIDATE\n"
     "                        dq[s][j][h] = make_uint2(0, 0);\n"
     "                        if (step < step_end && 4 * step < nb)\n"
     "                            asm(\"ld.global.nc.L2::128B.v2.u32 {%0, %1}, [%2];\"\n"
     "                                : \"=r\"(dq[s][j][h].x), \"=r\"(dq[s][j][h].y)\n"
     "                                : \"l\"(ds + (size_t)n * nb + 4 * step));\n"
     "                    } else if (F::BLOCKS > 0) {\n"
     "                        const int b = F::BLOCKS * step + t % BL;\n"),
    ("                            const unsigned int dd =\n"
     "                                __shfl_sync(FULL_MASK, cur.d[s][j], (lane & ~3) | u % (F::BLOCKS > 0 ? F::BLOCKS : 1));\n",
     "                            const unsigned int dd = F::BLOCKS == 4 && nb % 4 == 0\n"
     "                                ? __byte_perm(u < 2 ? cur.dq[s][j][0].x : cur.dq[s][j][0].y,\n"
     "                                              u < 2 ? cur.dq[s][j][1].x : cur.dq[s][j][1].y,\n"
     "                                              u % 2 ? 0x7632 : 0x5410)   // CANDIDATE\n"
     "                                : __shfl_sync(FULL_MASK, cur.d[s][j], (lane & ~3) | u % (F::BLOCKS > 0 ? F::BLOCKS : 1));\n")]
# A candidate, right logits (other last bits): each unit's mma's in two chains of two, one per
# nibble half, added after, where all four (two halves, two parts) chain into one fragment:
# whether the chain's latency, not the tensor pipe's throughput, is what x's second part costs.
# Measured (H200, 2026-12-02, 7 rounds): 2.2837 ms against 2.2386, 0.98x: not the latency.
SOURCE_BOUNDS["mma two chains"] = [
    ("                        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};\n"
     "#pragma unroll\n"
     "                        for (int p = 0; p < F::PARTS; ++p) {\n"
     "                            mma_16bit<F::BF16>(part, a[0], b[p].x, b[p].y);\n"
     "                            mma_16bit<F::BF16>(part, a[1], b[p].z, b[p].w);\n"
     "                        }\n",
     "                        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f}, other[4] = {0.0f, 0.0f, 0.0f, 0.0f};\n"
     "#pragma unroll\n"
     "                        for (int p = 0; p < F::PARTS; ++p) {   // CANDIDATE\n"
     "                            mma_16bit<F::BF16>(part, a[0], b[p].x, b[p].y);\n"
     "                            mma_16bit<F::BF16>(other, a[1], b[p].z, b[p].w);\n"
     "                        }\n"
     "#pragma unroll\n"
     "                        for (int e = 0; e < 4; ++e) part[e] += other[e];\n")]
# q4_0's products by wgmma (sm_90a), A from registers, x's parts read by the tensor cores from
# shared memory, was a candidate too ("mma one part" put x's second part at 1.11x, and wgmma ran
# gemm_v7 at 1.47x mma.sync's rate); commit 864d97e holds it (qgemv_mma.cu's QGEMV_MMA_WG, and
# here "mma wgmma"). Right (logits 7e-8 from the package's), and 0.72x: 0.83x of the package
# at the NR 1 plan it needs ("nr 1", 0.87x), each step waiting for its wgmma's.


# A candidate, right logits: x staged in two parts, the second behind the first step's loads.
# Before the loop every block stages its whole slice of x (an L2 trip, then the arithmetic:
# w2's SwiGLU, the split into float16 parts), with only the first step of W in flight; "no
# staging" put it at 1.10x of the 8-row step. Here the steps before `mid` (num / den of the
# slice's steps, whole steps of U) are staged first; each thread stages its share of the rest at
# the end of the loop's first step, while the next step's weights are on their way, and the
# block meets once more at step `mid`, before the loop reads them (nr1: only the NR 1 instances;
# the NR 2 ones spill 32 to 68 bytes a thread with it, where the package's spill 4 to 8).
# Measured (H200, 2026-12-02, 7B q4_0 at 8 rows, 5 rounds; logits within 9.1e-8 of the
# package's): halves 0.87x, a third first 0.87x, halves at NR 1 only (wo and w2) 0.93x; and the
# first step taken out of the loop instead ("mma staged after the first step", below) 0.93x.
# What staging costs is its chain (the trip to L2, then a barrier), not arithmetic that loads
# could hide: a second chain adds one. docs/kernels.md, "x staged in two".
def mma_stage_rest(indent):
    """The call, `indent` spaces in, that stages the slice's units from step `mid` on."""
    pad = " " * indent
    return (f"{pad}mma_stage_x<F, PRO>(X, m0, M, K, step_begin * F::UNITS, units, norm_w, mma_xs,\n"
            f"{pad}                    unscale, span_ss, x_ss, x_ss_k, eps,\n"
            f"{pad}                    (mid - step_begin) * F::UNITS, (step_end - mid) * F::UNITS);\n")


def mma_staged_in_two(num, den, nr1=False):
    at = "NR == 1 ? " if nr1 else ""
    otherwise = " : step_end" if nr1 else ""
    return [
        ("                            float* span_ss, const float* __restrict__ x_ss, int x_ss_k,\n"
         "                            float eps) {\n",
         "                            float* span_ss, const float* __restrict__ x_ss, int x_ss_k,\n"
         "                            float eps, int first = 0, int count = -1) {   // CANDIDATE\n"),
        ("    const int cols = 4 * units, spans = units / F::UNITS;           // (unit, lane) of the slice\n",
         "    if (count < 0) count = units - first;            // CANDIDATE: units first .. + count - 1\n"
         "    const int cols = 4 * count, spans = units / F::UNITS;\n"),
        ("        const int u = (i % cols) / 4, t = i % 4, r0 = (i / cols) * RB;\n",
         "        const int u = first + (i % cols) / 4, t = i % 4, r0 = (i / cols) * RB;\n"),
        ("                            span_ss, x_ss, x_ss_k, eps);\n        __syncthreads();\n",
         "                            span_ss, x_ss, x_ss_k, eps, 0, (mid - step_begin) * F::UNITS);\n"
         "        __syncthreads();\n"),
        ("    for (int m0 = 0; m0 < M; m0 += MMA_ROWS) {\n        __syncthreads();   ",
         f"    const int first_steps = ((step_end - step_begin) * {num} + {den - 1}) / {den};   // CANDIDATE\n"
         f"    const int mid = {at}min(step_end, step_begin + (first_steps + U - 1) / U * U){otherwise};\n"
         "    for (int m0 = 0; m0 < M; m0 += MMA_ROWS) {\n        __syncthreads();   "),
        ("            const MmaLoads<F, NR, U> cur = next;\n",
         "            if (s0 == mid) __syncthreads();               // CANDIDATE: the rest is staged\n"
         "            const MmaLoads<F, NR, U> cur = next;\n"),
        ("                            acc[j][e] = fmaf(e & 1 ? us.y : us.x, span[j][e], acc[j][e]);\n"
         "                }\n            }\n",
         "                            acc[j][e] = fmaf(e & 1 ? us.y : us.x, span[j][e], acc[j][e]);\n"
         "                }\n            }\n"
         "            if (s0 == step_begin && mid < step_end)       // CANDIDATE: behind the next loads\n"
         + mma_stage_rest(16))]


SOURCE_BOUNDS["mma staged in two"] = mma_staged_in_two(1, 2)
SOURCE_BOUNDS["mma staged a third first"] = mma_staged_in_two(1, 3)
SOURCE_BOUNDS["mma staged in two at nr 1"] = mma_staged_in_two(1, 2, nr1=True)
# The same split with the loop's code left as it is: the first step taken out of the loop (the
# loop's body a lambda), the rest of x staged after it, while the second step's weights are on
# their way, and one barrier before the loop goes on from the second step. Only at NR 1 (wo's
# and w2's tiles on the 7B shape): at NR 2 the registers spill. Measured with the above: 0.93x.
SOURCE_BOUNDS["mma staged after the first step"] = mma_staged_in_two(1, 2)[:4] + [
    ("    for (int m0 = 0; m0 < M; m0 += MMA_ROWS) {\n        __syncthreads();   ",
     "    const int mid = NR == 1 ? min(step_end, step_begin + U) : step_end;   // CANDIDATE\n"
     "    for (int m0 = 0; m0 < M; m0 += MMA_ROWS) {\n        __syncthreads();   "),
    ("#pragma unroll UNROLL\n"
     "        for (int s0 = step_begin; s0 < step_end; s0 += U) {\n"
     "            const MmaLoads<F, NR, U> cur = next;\n",
     "        const auto run_step = [&](const int s0) {   // CANDIDATE: the loop's body\n"
     "            const MmaLoads<F, NR, U> cur = next;\n"),
    ("                            acc[j][e] = fmaf(e & 1 ? us.y : us.x, span[j][e], acc[j][e]);\n"
     "                }\n            }\n        }\n\n",
     "                            acc[j][e] = fmaf(e & 1 ? us.y : us.x, span[j][e], acc[j][e]);\n"
     "                }\n            }\n        };\n"
     "        if (NR == 1) {\n"
     "            run_step(step_begin);\n"
     "            if (mid < step_end) {   // CANDIDATE: the rest of x, behind the next step's loads\n"
     + mma_stage_rest(16) +
     "                __syncthreads();\n"
     "            }\n"
     "#pragma unroll UNROLL\n"
     "            for (int s0 = step_begin + U; s0 < step_end; s0 += U) run_step(s0);\n"
     "        } else {\n"
     "#pragma unroll UNROLL\n"
     "            for (int s0 = step_begin; s0 < step_end; s0 += U) run_step(s0);\n"
     "        }\n\n")]


EDITED = {}        # name -> the compiled state of KERNELS with its edited source (kept alive)


@contextlib.contextmanager
def edited_source(name):
    """KERNELS launching kernels compiled from runtime.kernel_source() with SOURCE_BOUNDS[name]'s
    edits (each group compiled on its first launch, once per process), then its own again."""
    from minillama.cuda import runtime
    K = kernels.KERNELS
    source = runtime.kernel_source()
    for old, new in SOURCE_BOUNDS[name]:
        if old not in source:
            raise RuntimeError(f"{name}: {old.strip()!r} is not in kernels/*.cu")
        source = source.replace(old, new)
    state = ("_modules", "_functions", "_shared", "_static")
    own = {a: getattr(K, a) for a in state}
    for a, v in EDITED.setdefault(name, {a: {} for a in state}).items():
        setattr(K, a, v)
    try:
        with patched(runtime, "kernel_source", lambda: source):
            yield
    finally:
        for a, v in own.items():
            setattr(K, a, v)


VARIANTS = {"package": contextlib.nullcontext,
            "plain norms": plain_norms,
            "slices in order": slices_in_order,
            "norms in place": norms_in_place,
            "programmatic": lambda: captured(True),
            "ordinary": lambda: captured(False),
            "kept wo": lambda: kept_digits(("wo",)),
            "kept w2": lambda: kept_digits(("w2",)),
            "kept both": lambda: kept_digits(("wo", "w2")),
            "balanced v4": balanced_v4,
            "no combine": lambda: edited_source("no combine"),
            "no staging": lambda: edited_source("no staging"),
            "no sums": lambda: edited_source("no sums"),
            "no staging or combine": lambda: edited_source("no staging or combine"),
            "loads after the wait": lambda: edited_source("loads after the wait"),
            "dependents after the loop": lambda: edited_source("dependents after the loop"),
            "no v4 staging": lambda: edited_source("no v4 staging"),
            "v4 copies digits": lambda: edited_source("v4 copies digits"),
            "mma copies parts": lambda: edited_source("mma copies parts"),
            "tanh silu": lambda: edited_source("tanh silu"),
            "swiglu stages 4 rows": lambda: edited_source("swiglu stages 4 rows"),
            "no attention": no_attention,
            "attention one row": attention_one_row,
            "mma plain stores": lambda: edited_source("mma plain stores"),
            "mma no transpose": lambda: edited_source("mma no transpose"),
            "mma one part": lambda: edited_source("mma one part"),
            "mma raw codes": lambda: edited_source("mma raw codes"),
            "mma paired atomics": lambda: edited_source("mma paired atomics"),
            "mma word loads": lambda: edited_source("mma word loads"),
            "mma word loads first": lambda: edited_source("mma word loads first"),
            "mma scales in lanes": lambda: edited_source("mma scales in lanes"),
            "mma two chains": lambda: edited_source("mma two chains"),
            "mma staged in two": lambda: edited_source("mma staged in two"),
            "mma staged a third first": lambda: edited_source("mma staged a third first"),
            "mma staged in two at nr 1": lambda: edited_source("mma staged in two at nr 1"),
            "mma staged after the first step":
                lambda: edited_source("mma staged after the first step"),
            "nr 1": lambda: patched(kernels, "MMA_NR", (1,)),
            "loop not unrolled": lambda: edited_source("loop not unrolled"),
            # gemv's RMSNorm after the sums (GEMV_RMSNORM_LATE) on no launch, on the launches
            # with early loads of W (the package's), on every one-row launch
            "late none": lambda: patched(kernels, "GEMV_LATE_NORM", "none"),
            "late early": lambda: patched(kernels, "GEMV_LATE_NORM", "early"),
            "late all": lambda: patched(kernels, "GEMV_LATE_NORM", "all")}


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="7b,stories")
    ap.add_argument("--variants", default="package,plain norms,programmatic,ordinary")
    a = ap.parse_args()
    variants = {k: VARIANTS[k] for k in a.variants.split(",")}
    cp = require_cupy()
    for part in a.only.split(","):
        for shape, dtype, batches in RUNS[part]:
            ab_steps(cp, shape, dtype, batches, variants, rounds=a.rounds,
                     steps=20 if shape in ("15M", "110M") else 10)


if __name__ == "__main__":
    main()

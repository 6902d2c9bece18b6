"""Check and time gemv_v3 (kernels/gemv_batch.cu), the float32 product of a batched decode step
(issue 13), then time whole decode steps with it and without it (needs a GPU).

    PYTHONPATH=. python kernels/dev/bench_f32batch.py [--batches 8,32,64] [--shapes 15M,110M]
                                                      [--no-check] [--no-step] [--out f.json]

1. Checks (llm.c dev/cuda style: the kernel against float64 before any timing): gemv_v3 in
   each of its tiles (ROWS 8, 16, 32) and with split-K forced on and off, at odd sizes and the
   stories shapes, batches 8..64, every prologue (RMSNorm, SwiGLU) and accumulate, outputs
   poisoned with NaN; relative error under 1e-5, and the same bits on a second launch.
2. Times each product of the stories15M and stories110M shapes (wqkv, wo, w13, w2, the
   classifier) at each batch: v1 (gemv), v2 (qgemv_v2 on float32 weights), v3 as the rule plans
   it and with half and twice its split, and cuBLAS (cupy.matmul, float32, TF32 off). The
   package's kernels are captured in a CUDA graph over copies of W larger than the L2 (as in a
   decode step, where each weight comes from HBM); cuBLAS runs eagerly over the same copies
   (CuPy's cuBLAS refuses a capture), so its figure includes launch gaps where it is small.
3. The whole decode step, kernels/dev/profile_step.py's profile (graph replay and per-kernel
   event times), float32, batches 1 and 32, once with kernels.gemv's rule (v3 from 8 rows)
   and once with the rule before it (v2 for tall matrices, v1 for the rest), in this process
   so the kernels compile once.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_formats as cf          # noqa: E402  (graph_time, median_time; puts the checkout first)
import profile_step                 # noqa: E402
from minillama.bench.torch_compiled import SHAPES   # noqa: E402  (the stories shapes and 7B)
from minillama.cuda import fused, kernels   # noqa: E402
from minillama.cuda.kernels import cdiv, gemv, gemv_v3_plan      # noqa: E402
from minillama.model import rms_norm, silu  # noqa: E402

rng = np.random.default_rng()


def products(shape):
    """(name, N, K) of the four products of a layer and the classifier."""
    s = SHAPES[shape]
    dim, hidden = s["dim"], s["hidden_dim"]
    return [("wqkv", 3 * dim, dim), ("wo", dim, dim), ("w13", 2 * hidden, dim),
            ("w2", dim, hidden), ("cls", s["vocab_size"], dim)]


def launch_v3(x, w, y, plan, norm=None, swiglu=False, accumulate=False):
    pro = kernels.GEMV_PROLOGUES["rmsnorm" if norm is not None else "swiglu" if swiglu else None]
    kernels._gemv_v3(x, w, y, pro, accumulate, norm, 1e-5, plan=plan)
    return y


def plans(M, N, K):
    """The rule's plan; the same tile with half and twice its split; the other tiles with
    the rule's split; and without split-K, one block per tile (no walking)."""
    rows, nr, split, _, _ = gemv_v3_plan(M, N, K)
    out = {}

    def plan(r, n, s, walk=True):
        kc = 4 * min(cdiv(K // 4, s), max(32, kernels.GEMV_V3_SMEM // (16 * r) // 32 * 32))
        tiles = cdiv(N, 8 * n)
        per_sm = kernels.gemv_v3_blocks_per_sm(r, n, r * kc * 4)
        bx = tiles if s > 1 or not walk else min(tiles, max(1, per_sm * kernels.sm_count()
                                                            // cdiv(M, r)))
        return r, n, s, kc, bx
    for s in sorted({1, split, min(16, split * 2), max(1, split // 2)}):
        s = max(1, min(s, K // 4 // 32 or 1))
        out[f"v3 split {s}"] = plan(rows, nr, s)
    for r, n in kernels.GEMV_V3_TILES.items():
        if r != rows:
            out[f"v3 rows {r}"] = plan(r, n, split)
    if split == 1:
        out["v3 no walk"] = plan(rows, nr, 1, walk=False)
    return out


def check(cp, shapes=None, plans_of=plans):
    """shapes: (M, N, K) to check; by default odd ones and the stories layers' at 8, 32, 64 rows.
    plans_of(M, N, K): {label: gemv_v3 plan} to check at each, by default this tool's plans."""
    stories = [(M, N, K) for M in (8, 32, 64) for shape in ("15M", "110M")
               for _, N, K in products(shape)[:4]]
    shapes = shapes or [(8, 37, 72), (13, 70, 300), (32, 20, 1032), (40, 9, 260),
                        (64, 333, 4100), (17, 4097, 12)] + stories
    worst = 0.0
    for M, N, K in shapes:
        x, w, g = rng.standard_normal((M, K)), rng.standard_normal((N, K)), \
            1 + 0.1 * rng.standard_normal(K)
        h, y0 = 2 * rng.standard_normal((M, 2 * K)), rng.standard_normal((M, N))
        xg, wg, gg, hg = (cp.asarray(a, dtype=np.float32) for a in (x, w, g, h))
        # the float64 references of the float32 inputs
        x, w, g, h = (a.astype(np.float32).astype(np.float64) for a in (x, w, g, h))
        cases = [({}, xg, x @ w.T), ({"norm": gg}, xg, rms_norm(x, g, 1e-5) @ w.T),
                 ({"swiglu": True}, hg, (silu(h[:, :K]) * h[:, K:]) @ w.T),
                 ({"accumulate": True}, xg, y0.astype(np.float32) + x @ w.T)]
        for name, plan in plans_of(M, N, K).items():
            for kw, xin, ref in cases:
                def run():
                    y = cp.asarray(y0, dtype=np.float32) if "accumulate" in kw \
                        else cp.full((M, N), np.nan, dtype=np.float32)
                    return launch_v3(xin, wg, y, plan, **kw).get()
                got = run()
                assert np.isfinite(got).all(), f"{name} {M}x{N}x{K} {kw}: an output not written"
                err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                assert err < 1e-5, f"{name} {plan} {M}x{N}x{K} {list(kw)}: error {err:.2e}"
                assert np.array_equal(run(), got), f"{name} {plan} {M}x{N}x{K}: not deterministic"
                worst = max(worst, err)
    print(f"checks: gemv_v3 matches float64 in {len(shapes)} shapes, {len(plans_of(8, 64, 256))} "
          f"plans a shape and every prologue "
          f"(worst relative error {worst:.1e}), the same bits on every launch")


def time_products(cp, shapes, batches):
    rows = []
    for shape in shapes:
        for name, N, K in products(shape):
            w = cp.asarray(rng.standard_normal((N, K)), dtype=np.float32)
            copies = [w] + [w.copy() for _ in range(min(63, cdiv(400 << 20, w.nbytes)) - 1)]
            for M in batches:
                x = cp.asarray(rng.standard_normal((M, K)), dtype=np.float32)
                y = cp.empty((M, N), np.float32)
                variants = {"v1 gemv": lambda c: gemv(x, c, out=y, version=1),
                            "v2 qgemv_v2": lambda c: gemv(x, c, out=y, version=2),
                            "v3 (rule)": lambda c: gemv(x, c, out=y, version=3)}
                for label, plan in plans(M, N, K).items():
                    variants[label] = lambda c, plan=plan: launch_v3(x, c, y, plan)
                line = {}
                for label, call in variants.items():
                    t = cf.graph_time([lambda c=c, call=call: call(c) for c in copies],
                                      replays=3, repeats=3)
                    line[label] = t * 1e6
                calls = [lambda c=c: cp.matmul(x, c.T, out=y) for c in copies]
                line["cuBLAS"] = cf.median_time(lambda: [f() for f in calls], reps=3) \
                    / len(calls) * 1e6
                rows.append(dict(shape=shape, product=name, M=M, N=N, K=K,
                                 plan=gemv_v3_plan(M, N, K), us=line))
                best = min((v, k) for k, v in line.items() if k.startswith("v3"))
                print(f"{shape:>5} {name:5} M={M:<3} {N:>6}x{K:<5} "
                      + "  ".join(f"{k} {v:7.2f}" for k, v in line.items())
                      + f"   | v3 rule vs v1 {line['v1 gemv'] / line['v3 (rule)']:.2f}x, "
                      f"vs cuBLAS {line['cuBLAS'] / line['v3 (rule)']:.2f}x; best v3: {best[1]}",
                      flush=True)
            del copies, w
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def previous_rule(x, w, out=None, version=None, **kwargs):
    """kernels.gemv as it chose before gemv_v3: qgemv_v2 from 8 rows of x on matrices with
    N >= 4096 or N >= 2K (and float4-legal operands), gemv otherwise."""
    (M, K), N = x.shape, w.shape[0]
    vec = K % 4 == 0 and kernels._aligned(x, w)
    if version is None:
        version = 2 if vec and M >= 8 and (N >= 4096 or N >= 2 * w.shape[1]) else 1
    return gemv(x, w, out=out, version=version, **kwargs)


def steps(shapes):
    for shape in shapes:
        for label, patch in (("rule: v3 from 8 rows", gemv),
                             ("previous rule: v2 / v1", previous_rule)):
            print(f"\n#### {shape}, {label}", flush=True)
            fused.gemv = patch
            try:
                profile_step.profile(shape, "float32", [1, 32], None)
            finally:
                fused.gemv = gemv


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--shapes", default="15M,110M")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--out", type=Path, help="write the product timings as JSON")
    a = ap.parse_args()
    cp = cf.require_cupy()
    t0 = time.perf_counter()
    shapes = a.shapes.split(",")
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"{kernels.sm_count()} SMs", flush=True)
    if not a.no_check:
        check(cp)
    print(f"\nproducts, microseconds per call (graph over copies of W; cuBLAS eager) "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    rows = time_products(cp, shapes, [int(b) for b in a.batches.split(",")])
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    if not a.no_step:
        steps(shapes)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

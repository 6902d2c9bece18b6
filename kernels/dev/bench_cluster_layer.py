"""A bound: stories15M's layer as stages of one cluster of 16 SMs, against FusedDecoder's launches
(development tool, needs a GPU of compute capability 9.0 that takes clusters of 16; issue 13).

    PYTHONPATH=. python kernels/dev/bench_cluster_layer.py

kernels/dev/cluster_layer.cu runs the four products of a stories15M layer (attention left out)
as stages of one kernel whose 16 blocks meet at cluster barriers, each block's weights loaded
before the barrier, each output pushed into every block's shared memory. This prints its
microseconds a stage and a layer (the difference between 24 and 6 layers a launch, so that the
launch itself drops out), checked against float64, and, in the same run, FusedDecoder's one-row
step of the stories15M shape: its graph's microseconds a step and a launch. docs/kernels.md,
"Four that lost", has the figures.
"""
import ctypes
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from minillama.bench import gpu7b                           # noqa: E402
from minillama.bench.timing import gpu_ms                  # noqa: E402
from minillama.cuda import pdl, require_cupy               # noqa: E402
from minillama.cuda.kernels import KERNELS                 # noqa: E402

C = 16                              # blocks of the cluster (more than 8: a non-portable size)
CLUSTER_DIMENSION = 4               # CUlaunchAttributeID
NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14      # CUfunction_attribute
DIM, HIDDEN, QKV = 288, 768, 864


def source():
    """reduce.cu (warp_sum, sum_squares4), matmul.cu's silu, then cluster_layer.cu."""
    kernels = ROOT / "kernels"
    silu = next(line for line in (kernels / "matmul.cu").read_text().splitlines()
                if line.startswith("__device__ __forceinline__ float silu("))
    return "\n".join(((kernels / "reduce.cu").read_text(), silu,
                      (kernels / "dev" / "cluster_layer.cu").read_text()))


def launcher(cp):
    """launch(args, stream): cluster_layers<C> as one cluster of C blocks (cuLaunchKernelEx)."""
    fn = cp.RawModule(code=source(), options=("-std=c++17",),
                      name_expressions=[f"cluster_layers<{C}>"]).get_function(
                          f"cluster_layers<{C}>").kernel
    cp.cuda.driver.funcSetAttribute(fn.ptr, NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)

    def launch(args, stream):
        attr = pdl._Attribute(id=CLUSTER_DIMENSION)
        ctypes.memmove(ctypes.addressof(attr.value), (ctypes.c_uint * 3)(C, 1, 1), 12)
        config = pdl._Config((ctypes.c_uint * 3)(C, 1, 1), (ctypes.c_uint * 3)(512, 1, 1), 0,
                             stream.ptr, ctypes.pointer(attr), 1)
        values = [pdl._argument(a) for a in args]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        err = pdl._driver()(ctypes.byref(config), fn.ptr, params, None)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx: CUresult {err} (clusters of {C} refused?)")
    return launch


def reference(w, x0, layers):
    """The kernel's stand-in layer in float64: RMSNorm'd x @ wqkv.T, its first DIM values @
    wo.T, RMSNorm'd @ w13.T, silu(h1) * h3 @ w2.T."""
    wqkv, wo, w13, w2 = (a.astype(np.float64) for a in w)
    x = x0.astype(np.float64)
    for _ in range(layers):
        q = wqkv @ x / np.sqrt((x ** 2).mean() + 1e-5)
        y = wo @ q[:DIM]
        h = w13 @ y / np.sqrt((y ** 2).mean() + 1e-5)
        x = w2 @ (h[:HIDDEN] / (1 + np.exp(-h[:HIDDEN])) * h[HIDDEN:])
    return x


def cluster_us(cp):
    """(us a stage, us a layer, the largest relative error against float64)."""
    rng = np.random.default_rng(0)
    w = [(rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)
         for s in ((QKV, DIM), (DIM, DIM), (2 * HIDDEN, DIM), (DIM, HIDDEN))]
    x0 = rng.standard_normal(DIM).astype(np.float32)
    dev, out = [cp.asarray(a) for a in (*w, x0)], cp.full(DIM, np.nan, dtype=np.float32)
    launch, stream = launcher(cp), cp.cuda.Stream(non_blocking=True)
    err = 0.0
    for layers in (1, 6):
        out.fill(np.nan)
        launch((*dev, out, np.int32(layers)), stream)
        stream.synchronize()
        want = reference(w, x0, layers)
        err = max(err, float(np.abs(out.get() - want).max() / np.abs(want).max()))
    with stream:
        ms = {n: gpu_ms(lambda: launch((*dev, out, np.int32(n)), stream), reps=7, inner=20)
              for n in (6, 24)}
    layer = 1000 * (ms[24] - ms[6]) / 18
    return layer / 4, layer, err


def graph_us(cp):
    """FusedDecoder's one-row stories15M step (random weights): (us a step, launches a step)."""
    import profile_step
    forward, fused = profile_step.random_decoder("15M", "float32")
    tokens = np.ones((1, 1), dtype=np.int64)
    for pos in range(4):
        forward(tokens, pos)
    before = KERNELS.launches
    fused.run(1)
    launches = KERNELS.launches - before
    graph = profile_step.captured(cp, lambda s: fused.run(1), programmatic=True)
    sync = cp.cuda.Device().synchronize
    us = 1000 * min(profile_step.ms_per_step(lambda i: graph.launch(), sync, 50, warmup=5)
                    for _ in range(5))
    gpu7b.release_gpu()
    return us, launches


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    cp = require_cupy()
    stage, layer, err = cluster_us(cp)
    print(f"one cluster of {C} blocks, stories15M's 4 products a layer as stages: {stage:.2f} us "
          f"a stage, {layer:.2f} us a layer; against float64 {err:.1e}"
          + ("" if err < 1e-4 else "  MISMATCH"))
    us, launches = graph_us(cp)
    print(f"FusedDecoder's graph, stories15M, one row: {us:.1f} us a step, {launches} launches, "
          f"{us / launches:.2f} us a launch (the classifier's ~12 us among them)")
    print(f"a stage against a launch: {stage / (us / launches):.2f}x the time")


if __name__ == "__main__":
    main()

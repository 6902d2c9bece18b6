"""GPU speed: minillama's kernels against cuBLAS and a device copy, and decode tokens/s.

    python -m minillama.bench gpu [--section all|7b] [--quick] [--no-reference] [--json PATH]

Everything is measured side by side in one run on one GPU. Kernel times are CUDA events around
the launch, after warm-up, the median of repeats; inputs are random (never zeros) and, where it
matters, larger than the L2 cache. The ceilings come from the same run:

    copy      device-to-device cudaMemcpy of 1 GiB: bytes read + bytes written per second
    cuBLAS    cupy.matmul in float32 (CUPY_TF32 unset: true float32, no tensor cores)

Decode runs a random-weight model of the stories15M / stories110M shapes one token per forward
call from position 0, greedy (argmax on the GPU, the token back on the host each step, as a
generation loop does), the median of timing.PASSES timed passes after one to warm up,
through the decoder(model) of CudaOps in four settings:

    generic     the unchanged model: CuPy array API + minillama's linear/matmul/softmax kernels
    fused       FusedDecoder: 6 kernels per layer, launched one by one from Python
    graph       FusedDecoder replayed as one CUDA graph per token
    persistent  PersistentDecoder: the step as one kernel (the default where it covers the
                model; FusedDecoder's graph for the batches it does not fit)

and, as generate decodes greedily once no row has prompt left, the default decoder taking
generation.AHEAD steps per call (greedy_steps: one graph launch and one wait for them all).
And, when torch is installed, two PyTorch models of the same shape in float32 (TF32 off) on
the same GPU: transformers' LlamaForCausalLM in eager mode, for scale, and the gpt-fast-style
compiled reference (torch_compiled.py, the token through the host every step, as in the
modes above). The last table compares each figure with the targets of issues 2 and 13: the
tokens/s both ways (AHEAD steps a call, generate's, and one token a call), the ratio to the
compiled reference like for like (one token a call on both sides), and AHEAD's beside it.
`--section decode` runs only this. Between the kernels and the decode runs gpu7b.py's section
(alone with --section 7b): Llama-2-7B's shape in every storage format, the seed case of a
12 GiB card, and the compiled PyTorch reference, against the targets of issue 10.
docs/benchmarks.md records the runs; timing.py holds the measuring helpers.
"""
import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

from ..cuda import CudaOps, gemv, require_cupy, sgemm, softmax
from ..cuda.kernels import SGEMM_CONFIGS, pick_sgemm_config
from ..errors import DeviceError
from ..generation import AHEAD
from ..checkpoints.random import random_weights
from ..model import ModelArgs, Transformer
from . import gpu7b, subset_of, torch_compiled
from .cpu import SHAPES
from .timing import copy_bandwidth, decode_rate, fmt, gpu_ms, median_rate, tflops

SECTIONS = ("all", "7b", "decode")

TARGETS = {   # issue 2, on an H100 in float32
    "sgemm": 0.75,          # of cuBLAS TFLOP/s at 4096^3
    "gemv": 0.80,           # of copy bandwidth, (11008 x 4096) weight, batch 1
    "softmax": 0.70,        # of copy bandwidth, (4096 x 32000)
    "15M": 1200.0,          # tokens/s decode, batch 1 (and batch 32 aggregate)
    "110M": 1500.0,
}
TARGETS_13 = {   # issue 13, on an H200: batch-1 tokens/s; batch 32 against compiled PyTorch
    "15M": 15000.0,
    "110M": 5000.0,
    "b32_vs_compiled": 1.2,
    "of_floor": {"110M": 0.5},    # "stories110M shape >= 5,000 (>= 0.5 of the floor)"
}

cp = None                   # cupy, once main() has found a GPU


def randn(*shape):
    return cp.random.standard_normal(shape, dtype=cp.float32)


def rel(a, b):
    return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))


# ----------------------------------------------------------------------------
# kernels

def bench_sgemm(quick):
    """(name, M, N, K) rows: ours (v4, size-picked tiles) against cuBLAS; every version and tile
    shape at 1024 and 4096."""
    shapes = [("4096^3", 4096, 4096, 4096), ("1024^3", 1024, 1024, 1024),
              ("110M prefill wqkv", 1024, 2304, 768), ("110M prefill wo", 1024, 768, 768),
              ("110M prefill w13", 1024, 4096, 768), ("110M prefill w2", 1024, 768, 2048),
              ("110M prefill output", 1024, 32000, 768)]
    rows, variants = [], []
    for name, M, N, K in shapes:
        a, w = randn(M, K), randn(N, K)
        c = cp.empty((M, N), dtype=cp.float32)
        reps, inner = (5, 2) if M * N * K >= 4096 ** 3 else (20, 10)
        blas_ms = gpu_ms(lambda: cp.matmul(a, w.T), reps=reps, inner=inner)
        ours_ms = gpu_ms(lambda: sgemm(a, w, out=c), reps=reps, inner=inner)
        err = rel(c, cp.matmul(a, w.T))
        rows.append(dict(name=name, M=M, N=N, K=K, config=pick_sgemm_config(M, N),
                         ours=tflops(M, N, K, ours_ms), cublas=tflops(M, N, K, blas_ms),
                         rel_err_vs_cublas=err))
        if name in ("4096^3", "1024^3") and not quick:
            for version in (1, 2, 3):
                ms = gpu_ms(lambda: sgemm(a, w, out=c, version=version), reps=3, warmup=1,
                            inner=1)
                variants.append(dict(name=name, kernel=f"v{version}", tflops=tflops(M, N, K, ms)))
            for config in SGEMM_CONFIGS:
                ms = gpu_ms(lambda: sgemm(a, w, out=c, config=config), reps=reps, inner=inner)
                variants.append(dict(name=name, kernel=f"v4 {config}",
                                     tflops=tflops(M, N, K, ms)))
    return rows, variants


def bench_gemv(copy_gbs):
    rows = []
    for M in (1, 8):
        x, W = randn(M, 4096), randn(11008, 4096)
        y = cp.empty((M, 11008), dtype=cp.float32)
        nbytes = W.nbytes + x.nbytes + y.nbytes
        ours = gpu_ms(lambda: gemv(x, W, out=y), inner=20)
        blas = gpu_ms(lambda: cp.matmul(x, W.T), inner=20)
        rows.append(dict(name=f"gemv 11008x4096, batch {M}", ours=nbytes / ours / 1e6,
                         cublas=nbytes / blas / 1e6, copy=copy_gbs,
                         rel_err_vs_cublas=rel(y, cp.matmul(x, W.T))))
    return rows


def bench_softmax(copy_gbs):
    x = randn(4096, 32000) * 4
    y = cp.empty_like(x)
    nbytes = 2 * x.nbytes

    def composed():                        # what the CuPy array API does: 5 kernels
        e = cp.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    row = dict(name="softmax 4096x32000", copy=copy_gbs)
    for kernel in ("block", "warp"):
        row[kernel] = nbytes / gpu_ms(lambda: softmax(x, out=y, kernel=kernel)) / 1e6
    row["cupy"] = nbytes / gpu_ms(composed) / 1e6
    row["rel_err_vs_cupy"] = rel(softmax(x), composed())
    return row


# ----------------------------------------------------------------------------
# decode

def random_model(shape, ops, max_batch_size):
    p = ModelArgs(**SHAPES[shape], max_batch_size=max_batch_size)
    w = random_weights(p, tied=True)                       # tied, as the stories models are
    return Transformer(p, w, ops)


def kernels_per_step(forward, bsz, pos):
    """The GPU kernels one forward call executes, seen by CUPTI through torch.profiler (it sees
    CuPy's launches too, and the kernels inside a graph): (count, {kernel: microseconds}).
    (None, {}) without torch."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.init()
    except Exception:
        return None, {}
    tokens = np.ones((bsz, 1), dtype=np.int64)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward(tokens, pos)
        cp.cuda.Device().synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"
               and not e.name.startswith(("Memcpy", "Memset"))]
    times = {}
    for e in kernels:
        name = e.name.split("(")[0]
        times[name] = times.get(name, 0.0) + e.time_range.elapsed_us()
    return len(kernels), times


def hf_decode_rate(shape, bsz, steps):
    """The same loop with transformers' LlamaForCausalLM (eager attention, float32, KV cache)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    s = SHAPES[shape]
    cfg = transformers.LlamaConfig(
        hidden_size=s["dim"], intermediate_size=s["hidden_dim"], num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"], num_key_value_heads=s.get("n_kv_heads", s["n_heads"]),
        vocab_size=s["vocab_size"], max_position_embeddings=s["max_seq_len"],
        tie_word_embeddings=True, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float32).eval()

    @torch.no_grad()
    def run():
        ids = torch.ones((bsz, 1), dtype=torch.long, device="cuda")
        past = None
        for _ in range(steps):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ids = out.logits[:, -1].argmax(-1, keepdim=True).cpu().to("cuda")
    return median_rate(run, bsz * steps, torch.cuda.synchronize)


# mode -> the CudaOps settings (fused_decode, graphs, persistent) whose decoder(model) runs it
MODES = {"generic": (False, False, False), "fused": (True, False, False),
         "graph": (True, True, False), "persistent": (True, True, True)}


def bench_decode(steps, batches):
    """Tokens/s for every model, batch and mode; then the PyTorch models; then, with
    torch.profiler, the kernels of one step. In that order because CUPTI, once the profiler has
    started it, stays hooked into every later launch and slows it."""
    rows, decoders = [], {}
    for shape in ("15M", "110M"):
        backends = {mode: CudaOps(*settings) for mode, settings in MODES.items()}
        model = random_model(shape, backends["graph"], max(batches))
        decoders[shape] = {mode: ops.decoder(model) for mode, ops in backends.items()}
        fused = backends["graph"]._decoders.get(model)      # the FusedDecoder of graph mode
        persistent = backends["persistent"]._decoders.get(model)
        one_row_bytes = gpu7b.bytes_per_step(model, 1, steps)     # issue 13's floor
        for bsz in batches:
            row = dict(model=shape, bsz=bsz, bytes_per_token=one_row_bytes)
            for mode, forward in decoders[shape].items():
                row[mode] = decode_rate(forward, bsz, steps)
            # generate's way: the default decoder, AHEAD greedy steps a wait once past the prompt
            row["ahead"] = decode_rate(decoders[shape]["persistent"], bsz, steps, AHEAD)
            row["fused_launches"] = fused.launches_per_step.get(bsz) if fused else None
            row["persistent_launches"] = (persistent.launches_per_step.get(bsz)
                                          if persistent else None)
            # GPU time of one step alone: graph replays back to back (at the last position)
            for mode, decoder in (("graph", fused), ("persistent", persistent)):
                graph = decoder.graphs.get(bsz) if decoder else None
                row[f"{mode}_gpu_us"] = 1000 * gpu_ms(graph.launch, inner=20) if graph else None
            rows.append(row)
            print(f"  stories{shape} bsz {bsz}: " + ", ".join(     # as measured: a run cut
                f"{mode} {row[mode]:.0f}" for mode in (*MODES, "ahead")) + " tokens/s",
                flush=True)                                  # short

    for row in rows:
        try:
            row["hf_eager"] = hf_decode_rate(row["model"], row["bsz"], min(steps, 64))
        except Exception as e:                           # a transformers API change, say
            row["hf_eager"], row["hf_error"] = None, f"{type(e).__name__}: {e}"
    compiled_rates(rows, steps, (min(batches), max(batches)))   # its compiles take minutes
    for row in rows:
        for mode, forward in decoders[row["model"]].items():
            row[f"{mode}_kernels"], times = kernels_per_step(forward, row["bsz"], steps // 2)
            if mode == "graph":
                row["graph_kernel_us"] = times
        print(f"  decode {row['model']} bsz {row['bsz']}: " + ", ".join(
            f"{k} {v:.0f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


def compiled_rates(rows, steps, batches):
    """row["compiled"]: the gpt-fast-style reference (torch_compiled.measure) at the row's shape
    and batch, float32 with TF32 off, the token through the host each step as minillama's loop
    does; None, with row["compiled_error"], where it cannot run."""
    for shape in ("15M", "110M"):
        print(f"compiled PyTorch reference, stories{shape} ...", flush=True)
        result, reason = torch_compiled.measure(shape, batches=batches, steps=steps,
                                                dtype="float32", prefill_len=None, to_host=True)
        by_bsz = {d["bsz"]: d for d in result["decode"]} if result else {}
        print("  " + ", ".join(f"bsz {b}: {d.get('tokens_per_s') or d.get('error')}"
                               for b, d in by_bsz.items()), flush=True)
        for row in rows:
            if row["model"] == shape:
                d = by_bsz.get(row["bsz"], {})
                row["compiled"] = d.get("tokens_per_s")
                if row["compiled"] is None:
                    row["compiled_error"] = reason or d.get("error")


# ----------------------------------------------------------------------------
# report

def print_header(r):
    print(f"\nminillama GPU benchmark, {r['date']}, {r['device']} ({r['sms']} SMs), "
          f"CuPy {r['cupy']}, CUDA runtime {r['cuda']}, CUPY_TF32={r['tf32']}")
    print(f"device-to-device copy: {r['copy_gbs']:.0f} GB/s (read + write)")


def print_report(r):
    """The kernels, the TinyStories shapes, and issue 2's targets."""
    print(f"\n{'SGEMM (x @ W.T), TFLOP/s':32} {'M x N x K':>18} {'tiles':>10} {'ours':>7} "
          f"{'cuBLAS':>7} {'ratio':>6} {'err':>8}")
    for s in r["sgemm"]:
        print(f"{s['name']:32} {s['M']:>5}x{s['N']:>5}x{s['K']:>5} {s['config']:>10} "
              f"{s['ours']:7.1f} {s['cublas']:7.1f} {s['ours'] / s['cublas']:6.2f} "
              f"{s['rel_err_vs_cublas']:8.1e}")
    for v in r["sgemm_variants"]:
        print(f"  {v['name']:8} {v['kernel']:16} {v['tflops']:7.2f} TFLOP/s")

    print(f"\n{'GEMV, GB/s':32} {'ours':>7} {'cuBLAS':>7} {'copy':>7} {'of copy':>8}")
    for g in r["gemv"]:
        print(f"{g['name']:32} {g['ours']:7.0f} {g['cublas']:7.0f} {g['copy']:7.0f} "
              f"{g['ours'] / g['copy']:8.2f}")
    s = r["softmax"]
    print(f"\n{'softmax, GB/s':32} {'block':>7} {'warp':>7} {'cupy':>7} {'copy':>7} {'of copy':>8}")
    print(f"{s['name']:32} {s['block']:7.0f} {s['warp']:7.0f} {s['cupy']:7.0f} {s['copy']:7.0f} "
          f"{s['block'] / s['copy']:8.2f}")

    print_targets("target (issue 2)", targets(r))


def print_decode(r):
    """The TinyStories shapes in every decode mode beside PyTorch, and issue 13's targets."""
    print(f"\n{'decode, tokens/s':18} {'bsz':>4} {'generic':>8} {'fused':>8} {'graph':>8} "
          f"{'persist.':>8} {f'{AHEAD} ahead':>8} {'compiled':>9} {'HF eager':>9} | "
          f"{'kernels/token: generic':>22} "
          f"{'fused':>6} {'graph':>6} {'persist.':>8}")
    for d in r["decode"]:
        print(f"{'stories' + d['model']:18} {d['bsz']:>4} {d['generic']:8.0f} {d['fused']:8.0f} "
              f"{d['graph']:8.0f} {d['persistent']:8.0f} {d['ahead']:8.0f} "
              f"{fmt(d.get('compiled'), '.0f'):>9} "
              f"{fmt(d['hf_eager'], '.0f'):>9} | {fmt(d['generic_kernels'], 'd'):>22} "
              f"{fmt(d['fused_launches'], 'd'):>6} {fmt(d['graph_kernels'], 'd'):>6} "
              f"{fmt(d['persistent_kernels'], 'd'):>8}")
    print("  (every mode picks each token greedily and brings it to the host; graph: those"
          " kernels in 1 graph launch per token, which also copies the token in and writes the"
          " picked ids out (FusedDecoder.greedy_steps); persist.: 1 kernel in 1 graph launch where"
          f" the batch fits it, else graph's; {AHEAD} ahead: persist.'s decoder, {AHEAD} steps"
          " in one graph launch, each fed the one before's picks, as generate takes them past"
          " the prompt (the targets' figure); compiled: gpt-fast-style torch.compile, float32,"
          " TF32 off)")
    for d in r["decode"]:
        if d.get("compiled_error"):
            print(f"  stories{d['model']} bsz {d['bsz']}: compiled reference n/a: "
                  f"{d['compiled_error']}")
        for mode in ("graph", "persistent"):
            if d[f"{mode}_gpu_us"] is None:
                continue
            line = (f"  stories{d['model']} bsz {d['bsz']}, {mode}: one replay takes "
                    f"{d[f'{mode}_gpu_us']:.0f} us on the GPU; the whole step "
                    f"{1e6 * d['bsz'] / d[mode]:.0f} us")
            if mode == "graph":
                line += "; kernel time per step (us): " + ", ".join(
                    f"{k} {v:.0f}" for k, v in sorted(d["graph_kernel_us"].items(),
                                                      key=lambda kv: -kv[1])[:6])
            print(line)
    print_targets("target (issue 13)", targets_13(r))


def print_targets(title, rows):
    print(f"\n{title:56} {'measured':>10} {'target':>10} {'ratio':>6}  met")
    for name, value, target in rows:
        if value is None:
            print(f"{name:56} {'n/a':>10} {target:10.2f}")
            continue
        print(f"{name:56} {value:10.2f} {target:10.2f} {value / target:6.2f}  "
              f"{'yes' if value >= target else 'NO'}")


def generate_rate(d):
    """The rate generate gets: the default decoder (PersistentDecoder where it covers the
    model, else graph's), AHEAD greedy steps a call."""
    return d["ahead"]


def targets(r):
    big = r["sgemm"][0]
    gemv1 = r["gemv"][0]
    out = [("SGEMM 4096^3, fraction of cuBLAS", big["ours"] / big["cublas"], TARGETS["sgemm"]),
           ("GEMV 11008x4096, fraction of copy bandwidth", gemv1["ours"] / gemv1["copy"],
            TARGETS["gemv"]),
           ("softmax 4096x32000, fraction of copy bandwidth",
            r["softmax"]["block"] / r["softmax"]["copy"], TARGETS["softmax"])]
    for d in r["decode"]:
        out.append((f"decode stories{d['model']} batch {d['bsz']}, tokens/s, {AHEAD} ahead",
                    generate_rate(d), TARGETS[d["model"]]))
    return out


def targets_13(r):
    """Issue 13's rows, each figure both ways: AHEAD steps a call (what generate gets) and one
    token a call (the default decoder, the token through the host every step, as the compiled
    reference takes it: the like-for-like ratio)."""
    out = []
    for d in r["decode"]:
        name = f"stories{d['model']} batch {d['bsz']}"
        if d["bsz"] == 1:
            out.append((f"{name}, tokens/s, {AHEAD} ahead", generate_rate(d),
                        TARGETS_13[d["model"]]))
            out.append((f"{name}, tokens/s, one a call", d["persistent"], TARGETS_13[d["model"]]))
        if d["bsz"] == 1 and d["model"] in TARGETS_13["of_floor"]:
            # the issue's other form of the same target: the weight-read floor's time over the
            # step's, at this run's copy bandwidth
            of_floor = gpu7b.of_floor(d["bytes_per_token"], generate_rate(d), 1, r["copy_gbs"])
            out.append((f"{name}, fraction of floor, {AHEAD} ahead", of_floor,
                        TARGETS_13["of_floor"][d["model"]]))
        if d["bsz"] == 32:
            for label, ours in (("one a call", d["persistent"]),
                                (f"{AHEAD} ahead", generate_rate(d))):
                ratio = ours / d["compiled"] if d.get("compiled") else None
                out.append((f"{name}, x compiled PyTorch, {label}", ratio,
                            TARGETS_13["b32_vs_compiled"]))
    return out


def main(argv=None):
    global cp
    parser = argparse.ArgumentParser(prog="python -m minillama.bench gpu")
    parser.add_argument("--section", choices=SECTIONS, default="all",
                        help="7b: only the Llama-2-7B shape (every storage format, the seed "
                        "case, compiled PyTorch); decode: only the TinyStories shapes (every "
                        "decode mode, compiled PyTorch); all: the kernels, 7b, then decode")
    parser.add_argument("--quick", action="store_true", help="skip SGEMM versions 1-3 and "
                        "tile variants; fewer decode steps")
    parser.add_argument("--steps", type=int, default=200, help="decode steps per pass (the "
                        f"TinyStories shapes; the 7B section takes {gpu7b.STEPS})")
    parser.add_argument("--no-reference", action="store_true", help="7B section without the "
                        "compiled PyTorch reference (its compiles take minutes)")
    formats = subset_of(gpu7b.DTYPES, "a storage format of the 7B section")
    parser.add_argument("--formats", type=formats, default=tuple(gpu7b.DTYPES),
                        help="7B section: only these storage formats, comma-separated (e.g. "
                        "int8,q4_0: the two the compiled reference is a target for); default "
                        f"all: {','.join(gpu7b.DTYPES)}")
    parser.add_argument("--json", help="also write every figure to this file (rewritten after "
                        "each 7B model, so a run cut short keeps what it measured)")
    args = parser.parse_args(argv)
    try:
        cp = require_cupy()
    except DeviceError as e:
        print(f"minillama.bench gpu: {e}", file=sys.stderr)
        return 2
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    r = dict(date=datetime.date.today().isoformat(), device=props["name"].decode(),
             sms=props["multiProcessorCount"], cupy=cp.__version__,
             cuda=cp.cuda.runtime.runtimeGetVersion(), tf32=os.environ.get("CUPY_TF32", "unset"))

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=1)
    cp.random.seed(int(time.time()))
    steps = 50 if args.quick else args.steps
    print("copy ...", flush=True)
    r["copy_gbs"] = copy_bandwidth()
    if args.section == "all":
        print("sgemm ...", flush=True)
        r["sgemm"], r["sgemm_variants"] = bench_sgemm(args.quick)
        print("gemv, softmax ...", flush=True)
        r["gemv"] = bench_gemv(r["copy_gbs"])
        r["softmax"] = bench_softmax(r["copy_gbs"])
        save()
    if args.section in ("all", "7b"):
        print("Llama-2-7B shape ...", flush=True)
        gpu7b.run(r, save, dtypes=args.formats, reference=not args.no_reference)
    if args.section in ("all", "decode"):
        # last: its profiler (CUPTI) stays hooked into every later launch and would slow them
        print("decode ...", flush=True)
        r["decode"] = bench_decode(steps, (1, 8, 32))
    print_header(r)
    if args.section == "all":
        print_report(r)
    if args.section in ("all", "decode"):
        print_decode(r)
    if args.section in ("all", "7b"):
        gpu7b.print_report(r)
    save()
    return 0

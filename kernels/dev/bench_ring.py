"""decode_ring (kernels/dev/ring.cu) against FusedDecoder's graph and decode_persistent at one row.

    PYTHONPATH=. python kernels/dev/bench_ring.py [--rounds 5] [--shapes 15M,110M] [--json PATH]

A development harness for issue 13's batch-1 rows (llm.c dev/cuda style: the kernel lives here,
not in the package, until it wins). decode_ring is decode_persistent at one row with each
block's weights streamed ahead into a ring in its shared memory by bulk copies; RingDecoder
below is PersistentDecoder with one row launched as it. Per shape (random float32 weights, a
tied classifier as the stories models have):

1. checks: its logits against the CPU path's over 25 steps after a prompt, with the whole ring
   and 32 KiB items, then with a small ring and small items (items waiting for space, starting
   again at the ring's start, more items than RING_SLOTS): 1e-4;
2. times, each step's graph replayed back to back at position 64 (CUDA events), the variants
   interleaved over `rounds`, medians: FusedDecoder's graph of launches, decode_persistent<1>,
   decode_ring with 32 KiB items and with 16 and 64 KiB;
3. where the ring's step time goes: one eager launch with timestamps (thread 0 of each block
   writes %globaltimer at each stage's end of input, end of sums and end of barrier), the
   median over blocks and layers of each phase per kind of stage, in us.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from minillama.bench.cpu import SHAPES                      # noqa: E402
from minillama.bench.timing import copy_bandwidth, gpu_ms   # noqa: E402
from minillama.checkpoints.random import random_weights     # noqa: E402
from minillama.cuda import CudaOps, PersistentDecoder, require_cupy   # noqa: E402
from minillama.cuda.persistent import BLOCK, shared_bytes   # noqa: E402
from minillama.cuda.runtime import i32, kernel_source, sm_count       # noqa: E402
from minillama.model import ModelArgs, Transformer          # noqa: E402
from minillama.ops import CPU                               # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {"260K": {}, "15M": {}, "42M": {}, "110M": {},
        "7B-4layers": dict(dim=4096, hidden_dim=11008, n_layers=4, n_heads=32, vocab_size=32000,
                           max_seq_len=256)}
RING_SHARED = 224 * 1024    # the ring's kernel's dynamic shared memory: pointers, ring, input
RING_CHUNK = 32 * 1024      # the most weight bytes one bulk copy (an item) moves
STAMPS = 512                # ring.cu's RING_STAMPS
# (ring, item bytes): the default; then rings of 3 and 1 times the largest item (a ring that
# cannot hold an item would wait for space forever), with small items
CHECKS = [(None, None), (3, 1024), (1, 256)]
STAGES = ("qkv", "attn", "wo", "w13", "w2")


def table_bytes(p):
    return -(-p.n_layers * 64 // 128) * 128             # the layers' pointers, 128-aligned


def largest_unit(p):
    """The bytes of the fewest rows an item may hold, at most: a pair of wqkv rows, or one row
    of wo (q_dim), w13 (dim) or w2 (hidden)."""
    return max(8 * p.dim, 4 * p.hidden_dim, 4 * p.n_heads * p.head_dim)


def ring_bytes(p):
    """What RING_SHARED leaves for the ring beside the pointers and a stage's input (0 if it
    would not hold one item: RING_CHUNK, or largest_unit)."""
    ring = (RING_SHARED - table_bytes(p) - shared_bytes(p, 1)) // 16 * 16
    return ring if ring >= max(RING_CHUNK, largest_unit(p)) else 0


_MODULE = {}


def ring_kernel(cp):
    if "f" not in _MODULE:
        src = kernel_source() + '\n#line 1 "dev/ring.cu"\n' + (HERE / "ring.cu").read_text()
        _MODULE["f"] = cp.RawModule(code=src).get_function("decode_ring")
        _MODULE["f"].max_dynamic_shared_size_bytes = RING_SHARED
    return _MODULE["f"]


class RingDecoder(PersistentDecoder):
    """PersistentDecoder with a one-row step launched as decode_ring (ring.cu)."""

    def __init__(self, model):
        super().__init__(model)
        self.ring, self.ring_chunk, self.stamps = ring_bytes(self.p), RING_CHUNK, None

    def run(self, bsz):
        if bsz != 1 or not self.ring:
            return super().run(bsz)
        # an item is at most ring_chunk bytes or one unit of rows: a ring that cannot hold the
        # largest would leave its copy unissued and the kernel waiting for it forever
        largest_item = max(largest_unit(self.p), self.ring_chunk)
        if self.ring < largest_item or self.ring % 16:
            raise ValueError(f"ring {self.ring}: must hold {largest_item} bytes (an item), in 16s")
        p, cp = self.p, self.cp
        cp.cuda.runtime.memsetAsync(self.counter.data.ptr, 0, 4,
                                    cp.cuda.get_current_stream().ptr)
        stamps = self.stamps if self.stamps is not None else np.uint64(0)
        ring_kernel(cp)((min(self.grid, sm_count()),), (BLOCK,),
                        (self.step, self.tok_embeddings, self.norm, self.output, self.freqs_cos,
                         self.freqs_sin, self.layer_pointers, self.h, self.q, self.att, self.h13,
                         self.logits, self.counter, i32(p.dim), i32(p.hidden_dim),
                         i32(p.n_layers), i32(p.n_heads), i32(p.n_kv_heads), i32(p.head_dim),
                         i32(p.max_seq_len), i32(p.vocab_size), np.float32(p.norm_eps),
                         np.float32(1.0 / np.sqrt(p.head_dim)), i32(self.ring),
                         i32(self.ring_chunk), stamps),
                        shared_mem=table_bytes(p) + self.ring + shared_bytes(p, 1))


def decoder_of(p, w, kind):
    """(forward, decoder) of one row: "graph" FusedDecoder, "persistent" decode_persistent<1>,
    "ring" RingDecoder."""
    ops = CudaOps(persistent=kind != "graph")
    model = Transformer(p, w, ops)
    if kind == "ring":
        ops._decoders[model] = RingDecoder(model)
    forward = ops.decoder(model)
    d = ops._decoders[model]
    if kind == "persistent":
        d.min_rows, d.min_dim = 1, 0
    return forward, d


def check(p, w, rng):
    """decode_ring against the CPU path, each setting of CHECKS; returns the worst error."""
    worst = 0.0
    cpu = Transformer(p, w, CPU)
    for ring, chunk in CHECKS:
        forward, d = decoder_of(p, w, "ring")
        if not d.ring:
            return None
        if ring:
            d.ring, d.ring_chunk = ring * largest_unit(p), chunk
        prompt = rng.integers(0, p.vocab_size, size=(1, 5))
        forward(prompt, 0)
        cpu.forward(prompt, 0)
        for pos in range(5, 30):
            tok = rng.integers(0, p.vocab_size, size=(1, 1))
            ref = cpu.forward(tok, pos)
            got = forward(tok, pos).get()
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            worst = max(worst, err if np.isfinite(got).all() else np.inf)
            if not err < 1e-4:
                print(f"MISMATCH ring {ring} chunk {chunk} pos {pos}: {err:.2e}", flush=True)
                break
    return worst


def breakdown(cp, p, w):
    """Median us of each phase (input, sums, barrier) per kind of stage, over blocks and layers,
    from one eager decode_ring step with timestamps."""
    forward, d = decoder_of(p, w, "ring")
    forward(np.ones((1, 5), dtype=np.int64), 0)
    d.stamps = cp.zeros(sm_count() * STAMPS, dtype=np.uint64)
    forward(np.ones((1, 1), dtype=np.int64), 64)     # eager: the first step of a size
    cp.cuda.get_current_stream().synchronize()
    t = d.stamps.get().reshape(-1, STAMPS).astype(np.int64)[: min(d.grid, sm_count())]
    out, L = {}, p.n_layers
    for i, stage in enumerate(STAGES):
        phases = {"input": [], "sums": [], "barrier": []}
        for l in range(L):
            base = 2 + 15 * l + 3 * i
            start = t[:, base - 1] if base > 2 else t[:, 1]
            for j, name in enumerate(phases):
                phases[name] += list((t[:, base + j] - (start if j == 0 else t[:, base + j - 1]))
                                     / 1000)
        out[stage] = {k: float(np.median(v)) for k, v in phases.items()}
    c = 2 + 15 * L
    out["cls"] = {"input": float(np.median((t[:, c] - t[:, c - 1]) / 1000)),
                  "sums": float(np.median((t[:, c + 1] - t[:, c]) / 1000))}
    out["step"] = float(np.median((t[:, c + 1] - t[:, 0]) / 1000))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(RUNS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cp = require_cupy()
    rng = np.random.default_rng()
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        p = ModelArgs(**{**SHAPES.get(shape, {}), **RUNS[shape]}, max_batch_size=1)
        w = random_weights(p, tied=True)
        row = dict(shape=shape, err=check(p, w, rng) if p.dim < 4096 else None)
        variants = {"graph": ("graph", {}), "persistent<1>": ("persistent", {}),
                    "ring": ("ring", {}), "ring 16K items": ("ring", {"ring_chunk": 16384}),
                    "ring 64K items": ("ring", {"ring_chunk": 65536})}
        graphs = {}
        for name, (kind, settings) in variants.items():
            forward, d = decoder_of(p, w, kind)
            for k, v in settings.items():
                setattr(d, k, v)
            forward(np.ones((1, 1), dtype=np.int64), 64)          # eager, then the graph
            forward(np.ones((1, 1), dtype=np.int64), 64)
            graphs[name] = (d.graphs[1], d)
        times = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, (g, _) in graphs.items():
                times[name].append(1000 * gpu_ms(g.launch, reps=10, inner=20))
        d = graphs["graph"][1]
        wbytes = d.output.nbytes + sum(a.nbytes for layer in d.layers for a in layer[:6])
        row["weight_mb"] = wbytes / 1e6
        for name, ts in times.items():
            us = float(np.median(ts))
            row[name] = dict(us=us, of_copy=wbytes / (us * 1e-6) / 1e9 / copy)
        row["breakdown"] = breakdown(cp, p, w)
        rows.append(row)
        err = "n/a" if row["err"] is None else f"{row['err']:.1e}"
        print(f"{shape:11} {wbytes / 1e6:7.1f} MB  err {err}  " + ", ".join(
            f"{n} {row[n]['us']:.1f} us ({row[n]['of_copy']:.2f})" for n in times), flush=True)
        b = row["breakdown"]
        print("    ring, one eager step, us (median over blocks and layers): " + ", ".join(
            f"{s} " + "/".join(f"{v:.2f}" for v in b[s].values()) for s in (*STAGES, "cls"))
            + f"  [input/sums/barrier]; step {b['step']:.1f}", flush=True)
        del graphs
        cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gbs=copy, rows=rows), indent=1))


if __name__ == "__main__":
    main()

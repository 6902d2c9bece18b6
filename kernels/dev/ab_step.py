"""A/B of whole decode steps in one process: the shared part of the ab_*.py tools (needs a GPU).

A rule of minillama.cuda.kernels (a tile set, a launch plan, blocks an SM) is measured where it
matters, on the step it runs in: one model of the shape (random weights made on the GPU,
minillama.bench.gpu7b), its FusedDecoder step captured as a CUDA graph once per variant (each
variant a context manager that patches the rule while the step is run eagerly and captured),
the logits of each variant's step checked against the first's, then the graphs replayed in
interleaved rounds, so that clocks and neighbours weigh on all alike: medians, ms a step. The
graphs are captured as FusedDecoder captures its own (programmatic launches where
FusedDecoder.programmatic says so), unless a variant patches capture_programmatic.
"""
import contextlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:       # this checkout first, as check_formats.py puts it
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step                 # noqa: E402
from minillama.bench import gpu7b                           # noqa: E402

# logits further than this from the first variant's (relative): flagged. At 4 rows and more of
# f16, q8_0 or q4_0 weights the step takes x in one float16 part (x16_batches, the default),
# and a variant that only adds in another order moves them by up to ~2e-4 (docs/kernels.md,
# "One part by default"): run with MINILLAMA_X16_BATCHES=0 to hold such variants to 1e-4.
MISMATCH = 1e-4


def capture_programmatic(fused, bsz):
    """Whether a variant's graph is captured with programmatic launches: as FusedDecoder
    captures its own (a variant may patch this)."""
    return fused.programmatic(bsz)


def arguments(doc):
    """The 7B tools' command line: --dtypes (storage formats, comma-separated), --rounds."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--dtypes", default="q4_0,int8")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    return a.dtypes.split(","), a.rounds


def add_instances(group, names):
    """Template instances compiled with a group of minillama's kernels beyond the package's own
    (a variant's), added before the group compiles (on its first launch)."""
    from minillama.cuda.kernels import KERNELS
    if group in KERNELS._modules:           # its module would not hold them: a failed lookup later
        raise RuntimeError(f"add_instances: the {group} group is compiled already")
    added = [n for n in dict.fromkeys(names) if n not in KERNELS.groups[group]]
    KERNELS.groups[group] += tuple(added)
    KERNELS._group.update(dict.fromkeys(added, group))


@contextlib.contextmanager
def patched(obj, name, value):
    """obj.name = value inside the block (a dict item where obj is a dict)."""
    get, put = (obj.__getitem__, obj.__setitem__) if isinstance(obj, dict) else \
        (lambda n: getattr(obj, n), lambda n, v: setattr(obj, n, v))
    before = get(name)
    put(name, value)
    try:
        yield
    finally:
        put(name, before)


def ab_steps(cp, shape, dtype, batches, variants, rounds=7, max_seq_len=64, steps=10, warmup=2,
             pos=3):
    """variants: {label: a function returning a context manager}. Prints, per batch, each
    variant's logits against the first's and the medians of the rounds (each round `steps`
    replays of each graph after `warmup`) of the step at position `pos` (the cache's rows from
    3 to pos - 1 left as they are: zeros, for a timing); returns {bsz: {label: ms}}."""
    sync = cp.cuda.Device().synchronize
    forward, fused = profile_step.random_decoder(shape, dtype, max(batches), max_seq_len)
    out = {}
    for bsz in batches:
        tokens = np.arange(1, bsz + 1, dtype=np.int64).reshape(bsz, 1)
        for before in range(3):
            forward(tokens, before)
        graphs, logits = {}, {}
        for label, variant in variants.items():
            with variant():
                fused.send_step(tokens, pos)
                fused.run(bsz)                      # eager: compiles, workspaces, attributes
                sync()
                logits[label] = fused.logits[:bsz].get().copy()
                graphs[label] = profile_step.captured(cp, lambda s: fused.run(bsz),
                                                      programmatic=capture_programmatic(fused, bsz))
        first = next(iter(logits.values()))
        diffs = {k: np.linalg.norm(v - first) / np.linalg.norm(first) for k, v in logits.items()}
        print(f"{shape} {dtype} batch {bsz} at {pos}, logits against the first variant's: " + ", ".join(
            f"{k} {diffs[k]:.1e}" + ("" if np.isfinite(v).all() else " NOT FINITE")
            + (" MISMATCH" if diffs[k] > MISMATCH else "") for k, v in logits.items()))
        times = {label: [] for label in graphs}
        for _ in range(rounds):
            for label, graph in graphs.items():
                times[label].append(profile_step.ms_per_step(lambda i: graph.launch(), sync,
                                                             steps, warmup=warmup))
        med = {k: float(np.median(v)) for k, v in times.items()}
        base = next(iter(med.values()))
        print(f"{shape} {dtype} batch {bsz} at {pos}, graph ms (median of {rounds} rounds): "
              + ", ".join(f"{k} {v:.4f} ({base / v:.2f}x)" for k, v in med.items()), flush=True)
        out[bsz] = med
    forward = fused = None
    gpu7b.release_gpu()
    return out

"""Bounds on the bench's token loop at one row (development tool, needs a GPU; issue 13).

    PYTHONPATH=. python kernels/dev/ab_token.py [--rounds 7] [--shapes 110M,15M] [--steps 200]

ab_step.py times a step's graph replayed back to back; what the bench counts is a token of
greedy_steps (8 steps a call, the next call queued), whose graph also holds greedy_pick and
the step-to-step edges. Here each variant is a decoder of its own (a model of random weights,
the package's FusedDecoder with one method replaced on the instance before its graphs are
captured), timed with bench.timing.decode_rate in interleaved rounds: medians, tokens/s.
Most variants are wrong on purpose (a bound: what a step would gain if a piece cost nothing):

- "embed programmatic": embed_tokens launched programmatically after greedy_pick, not the
  ordinary way. Unsafe (attention reads the position before its wait): the bound of the
  ordinary launch's edge.
- "no embed": run_halves without embed_tokens; layer 0 reads the residual the step before
  left (a stories110M or 15M step ends in the buffer it begins from, 2 n_layers % 3 == 0,
  and leaves the next one zeroed). Layer 0's attention launched the ordinary way ("ordinary")
  or programmatically ("programmatic", unsafe as above).
- "classifier 86%" (79%, 75%): the classifier over its first 86% of rows: the bound of a
  classifier that had 14% of its rows in before its wait. (At one row it walks 1056 blocks
  over 8-row groups: stories110M's 4000 groups are 4 rounds for some blocks at 86% too, 3 for
  all at 79%.)
- "no classifier": the logits as the step before left them.
- "wide of 69677fc": feed_forward_wide as it was at that commit (its warps reading x and
  norm_w from shared memory beside their rows), compiled beside the package's under another
  name: the A/B of stage_x_normed.
"""
import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:       # this checkout first
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from minillama.bench import gpu as bench_gpu, gpu7b     # noqa: E402
from minillama.bench.timing import decode_rate          # noqa: E402
from ab_step import add_instances                        # noqa: E402
from minillama.cuda import CudaOps, fused, require_cupy, runtime  # noqa: E402
from minillama.cuda.kernels import HALVES_MAX_P, KERNELS  # noqa: E402
from minillama.generation import AHEAD                  # noqa: E402


@contextlib.contextmanager
def launches(ordinary):
    """KERNELS.launch inside the block: the ordinary way (ordinary True) or programmatically,
    whatever each call asks."""
    launch = KERNELS.launch
    KERNELS.launch = lambda *a, **k: launch(*a, **{**k, "ordinary": ordinary})
    try:
        yield
    finally:
        KERNELS.launch = launch


def embed_programmatic(dec):
    def embed(bsz, h, clear=None):
        with launches(ordinary=False):
            fused.FusedDecoder.embed(dec, bsz, h, clear)
    dec.embed = embed


def no_embed(ordinary):
    def variant(dec):
        assert (2 * dec.p.n_layers) % 3 == 0, "the step must end in the buffer it begins from"
        first = dec.layers[0]

        def attention_half(layer, h, h_mid, clear):
            with launches(ordinary) if layer is first else contextlib.nullcontext():
                fused.FusedDecoder.attention_half(dec, layer, h, h_mid, clear)
        dec.embed = lambda bsz, h, clear=None: None
        dec.attention_half = attention_half
    return variant


def classifier_share(share):
    def variant(dec):
        rows = int(dec.p.vocab_size * share) // 32 * 32

        def classify(bsz, h):
            if rows:
                fused.matvec(h, dec.output[:rows], out=dec.logits[:bsz, :rows], norm=dec.norm,
                             eps=dec.p.norm_eps)
        dec.classify = classify
    return variant


OLD_WIDE = "69677fc"


def old_wide_source():
    """feed_forward_wide's template as it was at OLD_WIDE, renamed feed_forward_wide_OLD_WIDE."""
    text = subprocess.run(["git", "show", f"{OLD_WIDE}:kernels/halves.cu"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout
    start = text.index("template <int P>\n__global__ void __launch_bounds__(1024, 1)\n"
                       "feed_forward_wide(")
    return text[start:].replace("feed_forward_wide(", f"feed_forward_wide_{OLD_WIDE}(")


def old_wide(dec):
    def feed_forward_half(layer, h, h_next, clear):
        p, (_, _, _, ffn_norm, w13, w2, _, _) = dec.p, layer
        J, P, _ = dec.halves.feed_forward
        KERNELS.launch(f"feed_forward_wide_{OLD_WIDE}<{P}>", (p.hidden_dim // J,), (32 * J,),
                       (h, ffn_norm, np.float32(p.norm_eps), w13, w2, h_next, clear,
                        fused.i32(p.dim), fused.i32(p.hidden_dim)),
                       shared_mem=4 * (2 * J * p.dim + p.dim))
    assert dec.halves.feed_forward[2], "the plan takes feed_forward_half, not the wide one"
    dec.feed_forward_half = feed_forward_half


VARIANTS = {"package": None, "embed programmatic": embed_programmatic,
            "no embed (ordinary)": no_embed(True), "no embed (programmatic)": no_embed(False),
            "classifier 86%": classifier_share(0.86), "classifier 79%": classifier_share(0.792),
            "classifier 75%": classifier_share(0.75), "no classifier": classifier_share(0),
            f"wide of {OLD_WIDE}": old_wide}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="110M,15M")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--halves", help="a halves.cu to compile instead of the checkout's (another "
                    "tree's, the same kernels' signatures and shared memory): the process's A/B "
                    "against another run of this tool")
    a = ap.parse_args()
    bench_gpu.cp = require_cupy()
    source = runtime.kernel_source()
    if a.halves:
        ours = (runtime.kernel_dir() / "halves.cu").read_text()
        source = source.replace(ours, Path(a.halves).read_text())
    if f"wide of {OLD_WIDE}" in a.only:
        source += "\n" + old_wide_source()
        for P in range(1, HALVES_MAX_P + 1):
            add_instances(f"feed_forward_half{P}", [f"feed_forward_wide_{OLD_WIDE}<{P}>"])
    runtime.kernel_source = lambda: source      # for the process: every group the same text
    for shape in a.shapes.split(","):
        ops, forwards = CudaOps(), {}
        for label in a.only.split(","):
            model = bench_gpu.random_model(shape, ops, 1)
            forwards[label] = ops.decoder(model)
            if VARIANTS[label]:
                VARIANTS[label](ops._decoders[model])
        rates = {label: [] for label in forwards}
        for _ in range(a.rounds):
            for label, forward in forwards.items():
                rates[label].append(decode_rate(forward, 1, a.steps, AHEAD))
        med = {k: float(np.median(v)) for k, v in rates.items()}
        base = next(iter(med.values()))
        print(f"stories{shape}, one row, tokens/s (median of {a.rounds}): " + ", ".join(
            f"{k} {v:.0f} ({v / base:.3f}x)" for k, v in med.items()), flush=True)
        forwards = ops = None
        gpu7b.release_gpu()


if __name__ == "__main__":
    main()

"""Decoding one token in one launch: FusedDecoder's stages inside a single persistent kernel.

FusedDecoder (fused.py) is the previous lesson: a layer in 5 launches, the whole step replayed
as one CUDA graph. PersistentDecoder keeps everything of it (its buffers, the `step` array read
on the device, the graph per batch size, the logits copy) and changes only `run`: instead of
5 launches a layer, one launch of kernels/persistent.cu's `decode_persistent`, whose blocks stay
resident for the whole step and meet at a grid-wide barrier where a kernel boundary was.

It covers float32 weights and a float32 KV cache with every width a multiple of 4 (the
kernel's float4 loads). The rule for a step, measured on an H200 (docs/kernels.md, "One kernel
per token"): batches of 2 to 7 rows run as the one kernel, which was faster than FusedDecoder's
graph of gemv launches at every shape from stories260K to a 4-layer Llama-2-7B (by 5 to 35 %,
more at more rows); a single row stays with FusedDecoder's graph, which was as fast or faster
(the one kernel's stages each wait on a grid barrier and an L2 round trip for their input, about
2.7 us a stage, where a graph's kernel boundary costs about the same); from 8 rows the graph's
float32 GEMV is qgemv v2, which reads each weight once for up to 32 rows and beat this kernel
(stories15M at 8 rows: 253 against 268 us). Since the graph's gemv walks (the classifier's
loads evict-first, attention 16 warps: 2026-11-30), the graph is faster at 2 and 4 rows on every
stories shape measured (kernels/dev/bench_persistent.py: stories15M 127 against 150 us and 180
against 186, stories110M 391 against 447 and 501 against 554), and the one kernel only on the
4-layer Llama-2-7B shape (4 rows: 1641 against 1986 us): so it takes models of dim >= min_dim,
the narrowest shape where it was measured faster.
"""
import numpy as np

from .fused import FusedDecoder
from .kernels import KERNELS, PERSISTENT_ROWS
from .runtime import i32, sm_count

BLOCK = 512                 # PERSISTENT_BLOCK in persistent.cu
MAX_ROWS = max(PERSISTENT_ROWS)
MAX_SHARED = 200 * 1024     # dynamic shared memory a block may ask for (an H100/H200 SM has 227 KiB)


class PersistentDecoder(FusedDecoder):
    """FusedDecoder with the step as one persistent kernel (batches of min_rows..max_rows)."""

    min_rows = 2            # fewer rows, or more: FusedDecoder's graph (the module's docstring)
    max_rows = 7
    min_dim = 4096          # narrower models: FusedDecoder's graph at every batch (the same)

    @staticmethod
    def covers(model):
        """float32 weights and cache (the kernel reads nothing else), widths that are multiples
        of 4, and FusedDecoder's own conditions (its launches serve the larger batches)."""
        p = model.params
        dense = all(getattr(w, "dtype", None) == np.float32
                    for w in FusedDecoder._weights(model))
        cache = all(layer.attention.cache_k.dtype == np.float32 for layer in model.layers)
        widths = (p.dim, p.hidden_dim, p.head_dim, p.n_heads * p.head_dim)
        return (dense and cache and all(w % 4 == 0 for w in widths)
                and shared_bytes(p, 1) <= MAX_SHARED and FusedDecoder.covers(model))

    def __init__(self, model, deterministic=False, x16_batches=True):
        super().__init__(model, deterministic, x16_batches)
        cp, p = self.cp, self.p
        # (n_layers, 8) device pointers to each layer's arrays, in persistent.cu's order; the
        # arrays themselves are kept alive by self.layers (FusedDecoder's tuples, same order)
        self.layer_pointers = cp.asarray(
            np.array([[a.data.ptr for a in layer] for layer in self.layers], dtype=np.uint64))
        self.counter = cp.zeros(1, dtype=np.uint32)         # the grid barrier's arrivals
        # rotated q, from the qkv stage to the attention stage (FusedDecoder's attention_decode
        # rotates q itself and needs no such buffer)
        self.q = cp.zeros((p.max_batch_size, p.n_heads * p.head_dim), dtype=np.float32)
        self.grid = sm_count()      # blocks: at most one per SM, so all are resident at once

    def fits(self, bsz):
        """Whether a step of bsz rows runs as one kernel (else as FusedDecoder's launches)."""
        return (self.min_rows <= bsz <= min(self.max_rows, MAX_ROWS)
                and self.p.dim >= self.min_dim and shared_bytes(self.p, bsz) <= MAX_SHARED)

    def run(self, bsz):
        """Launch one decode step for rows 0 .. bsz-1: zero the barrier, then one kernel."""
        if not self.fits(bsz):
            return super().run(bsz)
        p, cp = self.p, self.cp
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memsetAsync(self.counter.data.ptr, 0, 4, stream.ptr)
        rows = min(b for b in PERSISTENT_ROWS if b >= bsz)  # the kernel's registers for rows
        KERNELS.launch(f"decode_persistent<{rows}>", (min(self.grid, sm_count()),), (BLOCK,),
                       (self.step, self.tok_embeddings, self.norm, self.output, self.freqs_cos,
                        self.freqs_sin, self.layer_pointers, self.h, self.q, self.att, self.h13,
                        self.logits, self.counter, i32(bsz), i32(p.dim), i32(p.hidden_dim),
                        i32(p.n_layers), i32(p.n_heads), i32(p.n_kv_heads), i32(p.head_dim),
                        i32(p.max_seq_len), i32(p.vocab_size), np.float32(p.norm_eps),
                        self.scale),
                       shared_mem=shared_bytes(p, bsz))


def shared_bytes(p, bsz):
    """Dynamic shared memory of decode_persistent for bsz rows: the largest stage input (bsz
    rows of dim, n_heads * head_dim or hidden floats) or attention's (head_dim + 4 * BLOCK +
    max_seq_len floats), whichever is larger."""
    inputs = bsz * max(p.dim, p.n_heads * p.head_dim, p.hidden_dim)
    attention = p.head_dim + 4 * BLOCK + p.max_seq_len
    return 4 * max(inputs, attention)


"""One rank's decode step on the GPU: cuda/fused.py's FusedDecoder with the collectives.

FusedDecoder runs a one-token step as 5 launches per layer, recorded once into a CUDA graph.
A rank runs the same launches on its slices, plus what joins the ranks (NCCL's kernels go
into the graph like any other):

    embed_tokens                  its columns of the embedding     (bsz, dim / N)
    all_gather, then interleave   the residual stream h            (bsz, dim)
    per layer
      gemv(rmsnorm -> wqkv), attention_decode (with RoPE)          its heads only
      gemv(wo), all_reduce(h)                                      h + the sum over all heads
      gemv(rmsnorm -> w13)                                         its hidden units only
      gemv(swiglu -> w2), all_reduce(h)                            h + the sum over all units
    gemv(rmsnorm -> output)       its rows of the vocabulary       (bsz, vocab / N)
    all_gather, then interleave   the logits                       (bsz, vocab)

One rank alone adds the residual: rank 0's gemv accumulates its product into h (h += wo x, as
FusedDecoder's does), the other ranks' write theirs over h (h = wo x), so the all-reduce sums
one residual and N partial products.
FusedDecoder.run is the step; a rank changes only its hooks: `adds_residual` (rank 0),
`join` (the all-reduce), `embed` and `classify` (the gathers).
"""
import numpy as np

from ..checks import check_tokens
from ..cuda.fused import FusedDecoder, matvec
from ..cuda.kernels import KERNELS, NULL
from ..cuda.runtime import i32


class RankDecoder:
    """forward(tokens, start_pos) -> logits for a rank's ShardedTransformer: one-token steps
    through ShardedFusedDecoder where FusedDecoder covers the model on the GPU (a CUDA graph
    per batch size), prompts through model.forward; everything on the CPU is model.forward.
    Every rank must take the same path at the same step, and does: they decide from the same
    sizes. On the GPU each call ends with wait(stream), the step queued on `stream` done:
    stream.synchronize() by default (the workers); the parent, which runs rank 0, passes a wait
    that polls and watches the workers (workers.wait_polling)."""

    def __init__(self, model, wait=None):
        ops = self.ops = model.ops
        self.model = model
        covered = ops.name == "cuda" and ops.fused_decode and FusedDecoder.covers(model)
        self.fused = ShardedFusedDecoder(model, ops.deterministic, ops.x16_batches) \
            if covered else None
        self.wait = wait or (lambda stream: stream.synchronize())

    def __call__(self, tokens, start_pos):
        if self.ops.name != "cuda":
            return self.model.forward(tokens, start_pos)
        tokens = check_tokens(tokens, start_pos, self.model.params)  # (bsz, seqlen) int64, host
        if self.fused is None or tokens.shape[1] > 1:
            logits = self.model.forward(tokens, start_pos)
        else:
            logits = self.fused(tokens, start_pos, self.ops.graphs)
        # The ranks run NCCL without its graph-mixing support (workers.py: it costs every
        # captured collective time), which holds only if no collective is launched while a
        # graph launch is still running: so every rank waits for its step. Rank 0 waits for
        # its logits anyway; the others would only wait for the parent's next message.
        self.wait(self.ops.xp.cuda.get_current_stream())
        return logits

    def release_graphs(self):
        """Destroy the step's CUDA graphs now. An NCCL communicator, aborted or destroyed,
        waits until every graph that captured one of its collectives is gone (ncclCommAbort
        polls its graphs' references), so the parent drops rank 0's graphs before it aborts:
        a failed step's frames may still hold this decoder, but not the graphs. (One still
        running, stuck in a collective, is released by CUDA when the abort has ended it.)"""
        if self.fused is not None:
            self.fused.graphs.clear()


class ShardedFusedDecoder(FusedDecoder):
    """FusedDecoder on one rank of a ShardedTransformer (its params are slicing.RankArgs)."""

    # A rank's products are its columns' share, joined by the all-reduce after them: halves.cu's
    # launches, which add the heads' and hidden units' products into the next residual
    # themselves, do not take them
    takes_halves = False
    # nor the batches' deferred norms (FusedDecoder.defers_norms): the rank's embed_tokens
    # zeroes nothing for them
    deferred_norms = False

    def __init__(self, model, deterministic=False, x16_batches=True):
        # buffers of the rank's sizes; logits: whole. deterministic: CudaOps' (rank 0's products
        # that add the residual add their slices by atomics unless it is set); x16_batches:
        # CudaOps' (the batches' tensor-core products take x in one float16 part unless it is
        # False)
        super().__init__(model, deterministic, x16_batches)
        cp, p = self.cp, self.p
        self.comm, nb, world = model.comm, p.max_batch_size, p.world
        self.adds_residual = p.rank == 0         # one rank adds the residual, the others not
        self.embedded = cp.zeros((nb, p.dim // world), dtype=np.float32)
        self.logits_part = cp.zeros((nb, p.vocab_part), dtype=np.float32)
        # what all_gather writes, (world, bsz, width) for the step's bsz, in one flat buffer
        self.stacked = cp.zeros(world * nb * max(p.dim // world, p.vocab_part), dtype=np.float32)

    def gather_columns(self, part, out):
        """part (bsz, n / N) on every rank -> out (bsz, n), rank 0's columns first."""
        world, (bsz, width) = self.p.world, part.shape
        stacked = self.stacked[:world * bsz * width].reshape(world, bsz, width)
        self.comm.all_gather(part, out=stacked)
        out.reshape(bsz, world, width)[...] = stacked.transpose(1, 0, 2)

    def join(self, h):
        """h + the other ranks' partial products: each rank's gemv wrote its share (rank 0's
        added to the residual, the others' over it), so the sum is h as one GPU has it."""
        self.comm.all_reduce(h)

    def embed(self, bsz, h):
        """The rank's columns of the embedding rows, then all ranks' columns gathered into h.
        Launched the ordinary way, as FusedDecoder.embed says why."""
        KERNELS.launch("embed_tokens", (bsz,), (self.BLOCK,),
                       (self.step, self.tok_embeddings, self.embedded, NULL, i32(0),
                        i32(self.p.dim // self.p.world)), ordinary=True)
        self.gather_columns(self.embedded[:bsz], h)

    def classify(self, bsz, h):
        """The rank's rows of the vocabulary, then all ranks' logits gathered."""
        matvec(h, self.output, out=self.logits_part[:bsz], norm=self.norm, eps=self.p.norm_eps,
               x16=self.x16_batches)
        self.gather_columns(self.logits_part[:bsz], self.logits[:bsz])

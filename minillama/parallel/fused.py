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
`run` is FusedDecoder.run with these lines added: read the two side by side.
"""
import numpy as np

from ..checks import check_tokens
from ..cuda.fused import FusedDecoder, matvec
from ..cuda.kernels import CACHE_TYPES, KERNELS
from ..cuda.runtime import i32


def decoder(model):
    """forward(tokens, start_pos) -> logits for a rank's ShardedTransformer: one-token steps
    through ShardedFusedDecoder where FusedDecoder covers the model on the GPU (a CUDA graph
    per batch size), prompts (and everything on the CPU) through model.forward. Every rank
    must take the same path at the same step, and does: they decide from the same sizes."""
    ops = model.ops
    if ops.name != "cuda" or not ops.fused_decode or not FusedDecoder.covers(model):
        return model.forward
    fused = ShardedFusedDecoder(model)

    def forward(tokens, start_pos):
        tokens = check_tokens(tokens, start_pos, model.params)   # (bsz, seqlen) int64, host
        if tokens.shape[1] > 1:
            return model.forward(tokens, start_pos)
        return fused(tokens, start_pos, ops.graphs)
    return forward


class ShardedFusedDecoder(FusedDecoder):
    """FusedDecoder on one rank of a ShardedTransformer (its params are slicing.RankArgs)."""

    def __init__(self, model):
        super().__init__(model)                  # buffers of the rank's sizes; logits: whole
        cp, p = self.cp, self.p
        self.comm, nb, world = model.comm, p.max_batch_size, p.world
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

    def run(self, bsz):
        """Launch one decode step of this rank for rows 0 .. bsz-1 on the current stream."""
        p, B, block = self.p, self.BLOCK, (self.BLOCK,)
        nh, nkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
        h, qkv, att, h13 = (a[:bsz] for a in (self.h, self.qkv, self.att, self.h13))
        eps, all_reduce, first = p.norm_eps, self.comm.all_reduce, p.rank == 0
        width = 4 if hd % 4 == 0 else 1                     # float4 rows in attention_decode
        attn_smem = 4 * (3 * hd + width * B + p.max_seq_len)
        scale = np.float32(1.0 / np.sqrt(hd))

        KERNELS.launch("embed_tokens", (bsz,), block,
                       (self.step, self.tok_embeddings, self.embedded, i32(p.dim // p.world)))
        self.gather_columns(self.embedded[:bsz], h)
        for attn_norm, wqkv, wo, ffn_norm, w13, w2, cache_k, cache_v in self.layers:
            cache = CACHE_TYPES[cache_k.dtype.name]         # float, or float16 bits
            matvec(h, wqkv, out=qkv, norm=attn_norm, eps=eps)
            KERNELS.launch(f"attention_decode<{width},{cache}>", (nh, bsz), block,
                           (qkv, self.step, self.freqs_cos, self.freqs_sin, cache_k, cache_v,
                            att, i32(nh), i32(nkv), i32(hd), i32(p.max_seq_len), scale),
                           shared_mem=attn_smem)
            # rank 0: h += attention(...) of its heads; the others: h = theirs; then the sum
            matvec(att, wo, out=h, accumulate=first)
            all_reduce(h)
            matvec(h, w13, out=h13, norm=ffn_norm, eps=eps)
            matvec(h13, w2, out=h, accumulate=first, swiglu=True)  # the same for the units
            all_reduce(h)
        matvec(h, self.output, out=self.logits_part[:bsz], norm=self.norm, eps=eps)
        self.gather_columns(self.logits_part[:bsz], self.logits[:bsz])

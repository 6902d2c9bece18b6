"""One rank's part of the transformer: its slices of the weights, its heads of the KV cache,
and the collectives that join the ranks' parts (Meta's model-parallel Transformer).

The layers are model.py's own (Attention, FeedForward, TransformerBlock), built with the
rank's sizes (slicing.RankArgs: n_heads / N query heads, n_kv_heads / N kv heads and their
cache, hidden_dim / N hidden units). What a rank adds is where the ranks meet:

    tok_embeddings[tokens]        (bsz, seqlen, dim / N)   its columns of the table
      all_gather                  (bsz, seqlen, dim)       the whole residual stream
    per layer
      attention on its heads      (bsz, seqlen, dim)       wo's partial sum over its heads
      all_reduce                  (bsz, seqlen, dim)       the sum over all heads: h = x + ...
      feed-forward on its units   (bsz, seqlen, dim)       w2's partial sum over its units
      all_reduce                  (bsz, seqlen, dim)       out = h + ...
    norm, output                  (bsz, seqlen, vocab / N) its rows of the classifier
      all_gather                  (bsz, seqlen, vocab)     the logits, for rank 0 to sample

Everything between two collectives reads only the whole residual stream and the rank's own
slices, so two all-reduces per layer are enough (docs/parallel.md draws it).
"""
from ..checks import check_tokens
from ..model import TransformerBlock, precompute_freqs, rms_norm
from ..ops import float32_weight


class ShardedBlock(TransformerBlock):
    """TransformerBlock on a rank's heads and hidden units. wo and w2 multiply only the rank's
    slice of their inputs, so each gives a partial sum: one all-reduce after each (where
    Meta's RowParallelLinear does its reduce_from_model_parallel_region)."""

    def __init__(self, layer_id, args, weights, ops, comm, kv_dtype="float32"):
        super().__init__(layer_id, args, weights, ops, kv_dtype)
        self.comm = comm

    def __call__(self, x, start_pos, cos, sin):
        # the residual stream x: (bsz, seqlen, dim), the same on every rank
        h = x + self.comm.all_reduce(self.attention(
            rms_norm(x, self.attention_norm, self.eps, self.xp), start_pos, cos, sin))
        return h + self.comm.all_reduce(self.feed_forward(
            rms_norm(h, self.ffn_norm, self.eps, self.xp)))


class ShardedTransformer:
    """The rank's model: forward(tokens (bsz, seqlen), start_pos) -> logits (bsz, seqlen,
    vocab), the same on every rank after the last gather, as model.Transformer's.

    args: slicing.RankArgs; weights: the rank's slices under Meta's names, as
    dtypes.store_weights keeps them (slicing.shard_weights, then store_weights); comm: the
    collectives (comm.py). The KV cache of each layer holds only the rank's kv heads."""

    def __init__(self, args, weights, ops, comm, kv_dtype="float32"):
        self.params, self.ops, self.comm, self.kv_dtype = args, ops, comm, kv_dtype
        # gathered by row, so float32 whatever the storage: (vocab, dim / N)
        self.tok_embeddings = ops.weight(float32_weight(weights["tok_embeddings.weight"]))
        self.layers = [ShardedBlock(i, args, weights, ops, comm, kv_dtype)
                       for i in range(args.n_layers)]
        self.norm = ops.weight(weights["norm.weight"])
        self.output = ops.weight(weights["output.weight"])            # (vocab / N, dim)
        cos, sin = precompute_freqs(args.head_dim, args.max_seq_len, args.rope_theta)
        self.freqs_cos, self.freqs_sin = ops.asarray(cos), ops.asarray(sin)

    @property
    def device(self):
        return self.ops.name

    def forward(self, tokens, start_pos):
        tokens = check_tokens(tokens, start_pos, self.params)   # (bsz, seqlen) int64, host
        xp, seqlen = self.ops.xp, tokens.shape[1]
        h = self.gather_columns(self.tok_embeddings[self.ops.asarray(tokens)])  # (bsz, seqlen, dim)
        cos = self.freqs_cos[start_pos:start_pos + seqlen]      # (seqlen, head_dim // 2)
        sin = self.freqs_sin[start_pos:start_pos + seqlen]
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin)
        h = rms_norm(h, self.norm, self.params.norm_eps, xp)
        return self.gather_columns(self.ops.linear(h, self.output))   # (bsz, seqlen, vocab)

    __call__ = forward

    def gather_columns(self, x):
        """(..., n / N) on each rank -> (..., n): the ranks' columns side by side, rank 0's
        first (the order Meta's shards cut them in)."""
        parts = self.comm.all_gather(x)                          # (N, ..., n / N)
        return self.ops.xp.concatenate(list(parts), axis=-1)

"""Decoding one token on the CPU: the model's forward step with no allocation and few calls.

CpuDecoder computes what Transformer.forward computes for one token of one sequence (tokens of
shape (1, 1)), on the model's own weights and KV cache, as the CPU's counterpart of
cuda/fused.py. NumpyOps.decoder(model) hands it to the decoding loops when it covers the model;
prompts, batches and anything it does not cover go to model.forward.

Why a second copy of the forward step: at batch 1 a small model's step is a few milliseconds,
and the generic forward spends a good part of it in Python: hundreds of NumPy calls per token
for stories15M's six layers, each allocating its result. Here a layer is ~30 calls, each
writing into a buffer made once (`out=`), on 1-D vectors instead of (bsz, seqlen, ...) arrays,
so no reshape or transpose is left to do at run time; the views a step reads (the q, k, v
parts of the fused product, the q and k pairs RoPE turns, the cache's rows) are made once too.
The arithmetic is the model's, operation for operation, so the logits are model.forward's to
the bit (tests/test_cpu_decode.py holds them within 1e-6 relative).

The threads are OpenBLAS's own choice: it multiplies a vector by a matrix of 460,800 values
or more on all its threads and by a smaller one on one thread (NumPy's OpenBLAS 0.3.31,
measured). Both ways of giving the small products a second core were measured and left out:
a Python thread's hand-off costs more than the product, and zero rows that lift a weight over
the threshold win 0 to 8% on an idle machine and lose 2 to 6 times on a busy one.
docs/cpu.md says what each choice bought.
"""
import math

import numpy as np


class CpuDecoder:
    """Transformer.forward(tokens, start_pos) with one-token, one-row steps made cheap.

    Calling it with tokens of shape (1, 1) runs `step`; any other call (a prompt, a batch,
    an input out of range) goes to model.forward, whose checks name what is wrong.
    """

    @staticmethod
    def covers(model):
        """NumPy float32 weights (not Packed, not Q8Tensor) and a float32 KV cache; not a
        stand-in with forward and ops but no layers (the tests' scripted models)."""
        if model.ops.xp is not np or not hasattr(model, "layers"):
            return False
        weights = [model.output, model.norm]
        for layer in model.layers:
            weights += [layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                        layer.feed_forward.w2, layer.attention_norm, layer.ffn_norm,
                        layer.attention.cache_k, layer.attention.cache_v]
        return all(isinstance(w, np.ndarray) and w.dtype == np.float32 for w in weights)

    def __init__(self, model):
        p = self.params = model.params
        self.forward = model.forward
        nh, nkv, hd, hidden = p.n_heads, p.n_kv_heads, p.head_dim, p.hidden_dim
        self.eps, self.dim, self.hidden = p.norm_eps, p.dim, hidden
        self.tok_embeddings, self.norm = model.tok_embeddings, model.norm
        self.output_t = model.output.T                       # (dim, vocab): x @ W.T reads W
        # RoPE turns pair (x0, x1) into (x0 cos - x1 sin, x1 cos + x0 sin): the pairs times
        # (cos, cos), plus the pairs swapped times (-sin, sin). (max_seq_len, head_dim // 2, 2)
        self.rope_cos = np.stack([model.freqs_cos, model.freqs_cos], axis=-1)
        self.rope_sin = np.stack([-model.freqs_sin, model.freqs_sin], axis=-1)

        # the buffers of one step, and the views of them that the step reads and writes
        self.x = np.zeros(p.dim, np.float32)                   # the residual stream
        self.xn = np.zeros(p.dim, np.float32)                  # x normed
        self.y = np.zeros(p.dim, np.float32)                   # a block's output, added to x
        self.qkv = np.zeros((nh + 2 * nkv) * hd, np.float32)   # [q | k | v]
        # q and k as pairs (x[2i], x[2i+1]) of each head, (n_heads + n_kv_heads, hd // 2, 2),
        # the same pairs swapped, and RoPE's scratch
        self.pairs = self.qkv[:(nh + nkv) * hd].reshape(nh + nkv, hd // 2, 2)
        self.swapped = self.pairs[..., ::-1]
        self.turned = np.zeros(self.pairs.shape, np.float32)
        self.turned_swapped = np.zeros(self.pairs.shape, np.float32)
        # the n_rep query heads of a kv head stacked, as Attention does: (n_kv, n_rep, hd)
        self.q = self.qkv[:nh * hd].reshape(nkv, nh // nkv, hd)
        self.k = self.qkv[nh * hd:(nh + nkv) * hd].reshape(nkv, hd)
        self.v = self.qkv[(nh + nkv) * hd:].reshape(nkv, hd)
        # each query head's scores over the cache, as (n_kv, n_rep, .) for the products and as
        # rows for the softmax (ufunc.reduce on rows: half the time of np.max(keepdims=True))
        self.score_rows = np.zeros((nh, p.max_seq_len), np.float32)
        self.scores = self.score_rows.reshape(nkv, nh // nkv, p.max_seq_len)
        self.row_max = np.zeros(nh, np.float32)                      # then each row's sum
        self.att = np.zeros((nkv, nh // nkv, hd), np.float32)        # heads in order
        self.gate = np.zeros(hidden, np.float32)                     # silu(h1) * h3
        self.scale = np.float32(1.0 / math.sqrt(hd))
        self.layers = [self.layer_views(layer) for layer in model.layers]
        self.h13 = np.zeros(2 * hidden, np.float32)                  # [h1 | h3]

    def layer_views(self, layer):
        """What a step reads of one layer: the norms, each weight as the (in, out) matrix a
        vector multiplies, and row 0 of the cache, (max_seq_len, n_kv_heads, head_dim)."""
        attention, ffn = layer.attention, layer.feed_forward
        return (layer.attention_norm, attention.wqkv.T, attention.wo.T, layer.ffn_norm,
                ffn.w13.T, ffn.w2.T, attention.cache_k[0], attention.cache_v[0])

    def __call__(self, tokens, start_pos):
        if (type(start_pos) is int and isinstance(tokens, np.ndarray) and tokens.shape == (1, 1)
                and tokens.dtype.kind in "iu" and 0 <= start_pos < self.params.max_seq_len):
            token = int(tokens[0, 0])
            if 0 <= token < self.params.vocab_size:
                return self.step(token, start_pos)
        return self.forward(tokens, start_pos)

    def rms_norm(self, x, weight):
        """model.rms_norm into self.xn: x * (1 / sqrt(mean(x^2) + eps)) * weight."""
        mean_square = np.add.reduce(np.multiply(x, x, out=self.xn)) / self.dim
        np.multiply(x, 1.0 / np.sqrt(mean_square + self.eps), out=self.xn)
        return np.multiply(self.xn, weight, out=self.xn)

    def rope(self, cos, sin):
        """model.apply_rotary_emb on q and k in place, with the same products and sums:
        x0 cos + x1 (-sin) is x0 cos - x1 sin to the bit, and a sum does not care for order."""
        np.multiply(self.pairs, cos, out=self.turned)                  # (x0 cos, x1 cos)
        np.multiply(self.swapped, sin, out=self.turned_swapped)        # (x1 (-sin), x0 sin)
        np.add(self.turned, self.turned_swapped, out=self.pairs)

    def softmax(self, s):
        """ops.softmax of each row of s (n_heads, end), in place: exp(s - max) / sum."""
        row = self.row_max[:, None]                              # (n_heads, 1)
        np.maximum.reduce(s, axis=1, out=self.row_max)
        np.exp(np.subtract(s, row, out=s), out=s)
        np.add.reduce(s, axis=1, out=self.row_max)
        np.divide(s, row, out=s)

    def step(self, token, pos):
        """Logits (1, 1, vocab) of `token` at position `pos`; writes the cache at `pos`."""
        x, y, qkv, scores, score_rows, att, gate = (self.x, self.y, self.qkv, self.scores,
                                                    self.score_rows, self.att, self.gate)
        h13, hidden, rms_norm, matmul = self.h13, self.hidden, self.rms_norm, np.matmul
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]      # (head_dim // 2, 2)
        att_flat, end = att.reshape(-1), pos + 1
        np.copyto(x, self.tok_embeddings[token])
        for attn_norm, wqkv, wo, ffn_norm, w13, w2, cache_k, cache_v in self.layers:
            # attention: q, k, v in one product, q and k turned, k and v into the cache
            matmul(rms_norm(x, attn_norm), wqkv, out=qkv)
            self.rope(cos, sin)
            np.copyto(cache_k[pos], self.k)
            np.copyto(cache_v[pos], self.v)
            np.multiply(self.q, self.scale, out=self.q)          # Q / sqrt(head_dim)
            s = scores[:, :, :end]                               # (n_kv, n_rep, end)
            matmul(self.q, cache_k[:end].transpose(1, 2, 0), out=s)
            self.softmax(score_rows[:, :end])
            matmul(s, cache_v[:end].transpose(1, 0, 2), out=att)   # (n_kv, n_rep, head_dim)
            x += matmul(att_flat, wo, out=y)
            # SwiGLU: w2(silu(h1) * h3), silu(h1) = h1 * (0.5 + 0.5 tanh(h1 / 2)) as model.silu
            matmul(rms_norm(x, ffn_norm), w13, out=h13)
            h1, h3 = h13[:hidden], h13[hidden:2 * hidden]
            np.multiply(h1, np.float32(0.5), out=gate)
            np.tanh(gate, out=gate)
            np.multiply(gate, np.float32(0.5), out=gate)
            np.add(gate, np.float32(0.5), out=gate)
            np.multiply(h1, gate, out=gate)
            np.multiply(gate, h3, out=gate)
            x += matmul(gate, w2, out=y)
        # a new array each step: a caller may keep every step's logits
        logits = np.empty((1, 1, self.params.vocab_size), np.float32)
        matmul(rms_norm(x, self.norm), self.output_t, out=logits[0, 0])
        return logits


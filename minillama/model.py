"""The LLaMA transformer, written once against the NumPy API.

This mirrors Meta's `llama/model.py` (ModelArgs, RMSNorm, RoPE, Attention with a KV cache and
grouped-query heads, FeedForward with SwiGLU, Transformer.forward(tokens, start_pos)).
Array creation and elementwise math go through `ops.xp` (numpy or cupy); the two heavy
operations, `linear` (x @ W.T) and `softmax`, go through `ops`, where a backend may use its
own kernels. Shapes are written beside each tensor:

    bsz        prompts in the batch          seqlen    tokens fed in this call
    dim        model width                   head_dim  dim // n_heads
    n_heads    query heads                   n_kv_heads  key/value heads (GQA: fewer)
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .errors import ArgumentError, CheckpointError, GenerationError, check_positive_int
from .ops import CPU, to_host
from .quant import Q8Tensor


# ----------------------------------------------------------------------------
# hyperparameters

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256             # Meta's rule for hidden_dim when it is not given
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None   # llama2.c, GGUF and HF store it explicitly
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        self.validate()

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    def validate(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                     "max_batch_size", "max_seq_len"):
            check_positive_int(name, getattr(self, name))
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ArgumentError(f"dim: {self.dim} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ArgumentError(
                f"n_kv_heads: {self.n_kv_heads} must divide n_heads ({self.n_heads})")
        # a NaN here would make every logit NaN, silently: refuse it up front
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not (math.isfinite(value) and value >= 0) \
                    or (name == "rope_theta" and value == 0):
                raise ArgumentError(f"{name}: expected a finite number "
                                    f"{'> 0' if name == 'rope_theta' else '>= 0'}, got {value!r}")


def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's FeedForward width: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def weight_shapes(p: ModelArgs):
    """Every weight the model needs, by Meta's names, with its shape. (out, in) for linears."""
    shapes = {"tok_embeddings.weight": (p.vocab_size, p.dim),
              "norm.weight": (p.dim,),
              "output.weight": (p.vocab_size, p.dim)}
    for i in range(p.n_layers):
        pre = f"layers.{i}."
        shapes.update({
            pre + "attention_norm.weight": (p.dim,),
            pre + "attention.wq.weight": (p.n_heads * p.head_dim, p.dim),
            pre + "attention.wk.weight": (p.kv_dim, p.dim),
            pre + "attention.wv.weight": (p.kv_dim, p.dim),
            pre + "attention.wo.weight": (p.dim, p.n_heads * p.head_dim),
            pre + "ffn_norm.weight": (p.dim,),
            pre + "feed_forward.w1.weight": (p.hidden_dim, p.dim),
            pre + "feed_forward.w2.weight": (p.dim, p.hidden_dim),
            pre + "feed_forward.w3.weight": (p.hidden_dim, p.dim),
        })
    return shapes


def check_weights(p: ModelArgs, weights, source="checkpoint"):
    """Raise CheckpointError naming the first missing or mis-shaped tensor."""
    if len(weights) < 3 + 9 * p.n_layers:
        # Some tensor is missing. A header may claim 2**63 layers, so list shapes only as far
        # as the first missing one can be: among the first len(weights) + 1 names.
        p = replace(p, n_layers=min(p.n_layers, len(weights) // 9 + 1))
    for name, shape in weight_shapes(p).items():
        if name not in weights:
            raise CheckpointError(f"{source}: tensor {name!r} is missing")
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {got}, expected {shape}")


# ----------------------------------------------------------------------------
# the blocks, as functions of arrays

def rms_norm(x, weight, eps, xp=np):
    # x / sqrt(mean(x^2) + eps) * weight            x: (..., dim)
    return x * (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)) * weight


def precompute_freqs(head_dim, end, theta=10000.0):
    """cos and sin of position * frequency, each (end, head_dim // 2), float32.
    Pair i of a head turns at frequency theta^(-2i / head_dim). The angles are computed in
    float32, as Meta's precompute_freqs_cis and llama2.c both do, so they round the same way."""
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freqs = (f32(1.0) / np.power(f32(theta), exponents)).astype(f32)         # (head_dim // 2,)
    angles = np.outer(np.arange(end, dtype=f32), freqs).astype(f32)          # (end, head_dim // 2)
    return np.cos(angles), np.sin(angles)


def apply_rotary_emb(x, cos, sin):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle.
    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim // 2).
    Meta does this as a complex multiply: (x0 + i x1) * (cos + i sin)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]                  # (bsz, seqlen, n_heads, head_dim // 2)
    cos, sin = cos[:, None, :], sin[:, None, :]          # broadcast over heads
    out = x.copy()
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def silu(x, xp=np):
    # x * sigmoid(x), written with tanh so large |x| never overflows exp
    return x * (0.5 + 0.5 * xp.tanh(0.5 * x))


def fuse_rows(ws):
    """Stack (out_i, in) weights into one (sum out_i, in) weight: one matmul instead of several,
    the same arithmetic. Done on the host, before the backend places the result. Works for
    plain arrays and Q8Tensors (groups run along `in`)."""
    if isinstance(ws[0], Q8Tensor):
        return Q8Tensor(np.concatenate([to_host(w.q) for w in ws]),
                        np.concatenate([to_host(w.s) for w in ws]), ws[0].group_size, ws[0].w8a8)
    return np.concatenate([to_host(w) for w in ws])


# ----------------------------------------------------------------------------
# the layers

class Attention:
    """Grouped-query self-attention with a KV cache.

    cache_k, cache_v: (max_batch_size, max_seq_len, n_kv_heads, head_dim), as in Meta's model.
    wq, wk, wv are fused into one weight wqkv: (n_heads + 2 * n_kv_heads) * head_dim rows.
    """

    def __init__(self, p: ModelArgs, weights, prefix, ops):
        self.ops, xp = ops, ops.xp
        self.n_heads, self.n_kv_heads, self.head_dim = p.n_heads, p.n_kv_heads, p.head_dim
        self.n_rep = p.n_heads // p.n_kv_heads          # query heads sharing one kv head
        self.wqkv = ops.weight(fuse_rows([weights[prefix + w + ".weight"]
                                          for w in ("wq", "wk", "wv")]))
        self.wo = ops.weight(weights[prefix + "wo.weight"])
        cache_shape = (p.max_batch_size, p.max_seq_len, p.n_kv_heads, p.head_dim)
        self.cache_k = xp.zeros(cache_shape, dtype=xp.float32)
        self.cache_v = xp.zeros(cache_shape, dtype=xp.float32)

    def __call__(self, x, start_pos, cos, sin):
        ops, xp = self.ops, self.ops.xp
        bsz, seqlen, _ = x.shape
        nh, nkv, hd, rep = self.n_heads, self.n_kv_heads, self.head_dim, self.n_rep

        # xq, xk, xv = self.wq(x), self.wk(x), self.wv(x), in one matmul
        qkv = ops.linear(x, self.wqkv).reshape(bsz, seqlen, nh + 2 * nkv, hd)
        qk = apply_rotary_emb(qkv[:, :, :nh + nkv], cos, sin)       # rotate q and k together
        xq, xk = qk[:, :, :nh], qk[:, :, nh:]          # (bsz, seqlen, n_heads|n_kv_heads, hd)
        xv = qkv[:, :, nh + nkv:]                      # (bsz, seqlen, n_kv_heads, hd)

        self.cache_k[:bsz, start_pos:start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        end = start_pos + seqlen
        keys = self.cache_k[:bsz, :end].transpose(0, 2, 3, 1)     # (bsz, n_kv_heads, hd, end)
        values = self.cache_v[:bsz, :end].transpose(0, 2, 1, 3)   # (bsz, n_kv_heads, end, hd)

        # repeat_kv without the copy: line the query heads up under the kv head they share.
        # query head h uses kv head h // n_rep, so rows of group g are heads g*n_rep ... g*n_rep+rep-1
        q = xq.reshape(bsz, seqlen, nkv, rep, hd).transpose(0, 2, 3, 1, 4)
        q = q.reshape(bsz, nkv, rep * seqlen, hd) * xp.float32(1.0 / math.sqrt(hd))

        scores = ops.matmul(q, keys)                         # (bsz, n_kv, rep * seqlen, end)
        scores = ops.softmax(scores.reshape(bsz, nkv, rep, seqlen, end), start_pos)
        out = ops.matmul(scores.reshape(bsz, nkv, rep * seqlen, end), values)
        # (bsz, n_kv, rep * seqlen, hd) -> (bsz, seqlen, n_heads * hd), heads in their order
        out = out.reshape(bsz, nkv, rep, seqlen, hd).transpose(0, 3, 1, 2, 4)
        return ops.linear(out.reshape(bsz, seqlen, nh * hd), self.wo)


class FeedForward:
    """SwiGLU: w2(silu(w1(x)) * w3(x)), with w1 and w3 fused into one weight w13."""

    def __init__(self, p: ModelArgs, weights, prefix, ops):
        self.ops, self.hidden_dim = ops, p.hidden_dim
        self.w13 = ops.weight(fuse_rows([weights[prefix + w + ".weight"]
                                         for w in ("w1", "w3")]))
        self.w2 = ops.weight(weights[prefix + "w2.weight"])

    def __call__(self, x):
        h = self.ops.linear(x, self.w13)                 # (bsz, seqlen, 2 * hidden_dim)
        h1, h3 = h[..., :self.hidden_dim], h[..., self.hidden_dim:]
        return self.ops.linear(silu(h1, self.ops.xp) * h3, self.w2)


class TransformerBlock:
    def __init__(self, layer_id, p: ModelArgs, weights, ops):
        pre = f"layers.{layer_id}."
        self.xp, self.eps = ops.xp, p.norm_eps
        self.attention = Attention(p, weights, pre + "attention.", ops)
        self.feed_forward = FeedForward(p, weights, pre + "feed_forward.", ops)
        self.attention_norm = ops.weight(weights[pre + "attention_norm.weight"])
        self.ffn_norm = ops.weight(weights[pre + "ffn_norm.weight"])

    def __call__(self, x, start_pos, cos, sin):
        # the residual stream x: (bsz, seqlen, dim)
        h = x + self.attention(rms_norm(x, self.attention_norm, self.eps, self.xp),
                               start_pos, cos, sin)
        return h + self.feed_forward(rms_norm(h, self.ffn_norm, self.eps, self.xp))


class Transformer:
    """The whole model. forward(tokens (bsz, seqlen), start_pos) -> logits (bsz, seqlen, vocab).

    weights: a dict of arrays (or Q8Tensors) under Meta's names; see weight_shapes().
    The KV cache remembers positions < start_pos from earlier calls, so generation feeds the
    prompt once and then one token per call.
    """

    def __init__(self, params: ModelArgs, weights, ops=CPU):
        check_weights(params, weights)
        self.params, self.ops = params, ops
        embedding = to_host(_dense(weights["tok_embeddings.weight"]))
        self.tok_embeddings = ops.weight(embedding.astype(np.float32, copy=False))
        self.layers = [TransformerBlock(i, params, weights, ops) for i in range(params.n_layers)]
        self.norm = ops.weight(weights["norm.weight"])
        out = weights["output.weight"]
        shared = out is weights["tok_embeddings.weight"] and not isinstance(out, Q8Tensor)
        self.output = self.tok_embeddings if shared else ops.weight(out)
        cos, sin = precompute_freqs(params.head_dim, params.max_seq_len, params.rope_theta)
        self.freqs_cos, self.freqs_sin = ops.asarray(cos), ops.asarray(sin)

    @property
    def device(self):
        return self.ops.name

    def forward(self, tokens, start_pos):
        tokens = self._check_tokens(tokens, start_pos)         # (bsz, seqlen) int64, on the host
        tokens = self.ops.asarray(tokens)
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings[tokens]                        # (bsz, seqlen, dim)
        cos = self.freqs_cos[start_pos:start_pos + seqlen]     # (seqlen, head_dim // 2)
        sin = self.freqs_sin[start_pos:start_pos + seqlen]
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin)
        h = rms_norm(h, self.norm, self.params.norm_eps, self.ops.xp)
        return self.ops.linear(h, self.output)                 # (bsz, seqlen, vocab_size)

    __call__ = forward

    def locate_nonfinite(self, tokens, start_pos):
        """Where forward(tokens, start_pos) first makes a NaN or inf: forward's steps, checked
        after each. Replaying a step leaves the KV cache as it was: a call reads the positions
        below start_pos, which it never writes, and rewrites positions start_pos.. with values
        computed from the same input, i.e. the same values."""
        xp = self.ops.xp
        finite = lambda a: bool(xp.isfinite(a).all())
        tokens = self.ops.asarray(self._check_tokens(tokens, start_pos))
        seqlen = tokens.shape[1]
        h = self.tok_embeddings[tokens]                        # (bsz, seqlen, dim)
        if not finite(h):
            return "it first appears in tok_embeddings, the embedding rows of the input tokens"
        cos = self.freqs_cos[start_pos:start_pos + seqlen]
        sin = self.freqs_sin[start_pos:start_pos + seqlen]
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, cos, sin)
            if not finite(h):
                return f"it first appears in layer {i} (layers.{i}); {_weights_note(layer, xp)}"
        h = rms_norm(h, self.norm, self.params.norm_eps, xp)
        if not finite(h):
            return "it first appears in the final norm (norm.weight)"
        if not finite(self.ops.linear(h, self.output)):
            return "it first appears in the classifier (output.weight)"
        return "a replay of the same step was finite (a nondeterministic fault?)"

    def _check_tokens(self, tokens, start_pos):
        """Validate on the host, before anything indexes with them: NumPy would read
        tok_embeddings[-1] for a pad id of -1 without complaint."""
        p = self.params
        host = np.asarray(tokens.get() if hasattr(tokens, "get") else tokens)
        if host.ndim != 2 or host.size == 0 or host.dtype.kind not in "iu":
            raise ArgumentError(f"tokens: expected a non-empty (bsz, seqlen) integer array, "
                                f"got shape {host.shape} dtype {host.dtype}")
        bsz, seqlen = host.shape
        if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)):
            raise ArgumentError(f"start_pos: expected an integer, got {start_pos!r}")
        if bsz > p.max_batch_size:
            raise ArgumentError(f"tokens: batch of {bsz} is larger than max_batch_size "
                                f"{p.max_batch_size}")
        if not 0 <= start_pos or start_pos + seqlen > p.max_seq_len:
            raise GenerationError(f"start_pos: positions {start_pos}..{start_pos + seqlen - 1} "
                                  f"do not fit max_seq_len {p.max_seq_len}")
        bad = (host < 0) | (host >= p.vocab_size)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            raise ArgumentError(f"tokens: id {int(host[row, col])} at row {row}, column {col} is "
                                f"outside the vocabulary [0, {p.vocab_size}); a pad id must never "
                                f"reach the embedding")
        return host.astype(np.int64, copy=False)


def check_finite(logits, model, tokens, start_pos):
    """Raise GenerationError if `logits` (what model.forward(tokens, start_pos) returned, or a
    slice of it) hold a NaN or an infinity, naming the layer where it first appeared.
    Cheap while all is well: one pass over the logits. Only on failure is the step re-run,
    stage by stage, to find where (Transformer.locate_nonfinite)."""
    logits = to_host(logits)
    if np.isfinite(logits).all():
        return
    kind = "NaN" if np.isnan(logits).any() else "an infinity"
    seqlen = np.shape(tokens)[1]
    where = model.locate_nonfinite(tokens, start_pos) if isinstance(model, Transformer) else ""
    raise GenerationError(f"the logits hold {kind} at positions {start_pos}.."
                          f"{start_pos + seqlen - 1}{'; ' if where else ''}{where}")


def _weights_note(layer, xp):
    """Which weights of a block hold NaN or inf: a damaged checkpoint, or else an overflow."""
    weights = {"attention_norm": layer.attention_norm, "attention.wq/wk/wv": layer.attention.wqkv,
               "attention.wo": layer.attention.wo, "ffn_norm": layer.ffn_norm,
               "feed_forward.w1/w3": layer.feed_forward.w13,
               "feed_forward.w2": layer.feed_forward.w2}
    bad = [name for name, w in weights.items()
           if not bool(xp.isfinite(w.s if isinstance(w, Q8Tensor) else w).all())]
    if bad:
        return f"its weights {', '.join(bad)} are not finite (a damaged checkpoint?)"
    return "its weights are finite, so the activations overflowed there"


def _dense(w):
    """The embedding table is gathered by row, so it is kept as float32 even when quantized."""
    from .quant import dequantize_q8
    return dequantize_q8(w.q, w.s, w.group_size) if isinstance(w, Q8Tensor) else w

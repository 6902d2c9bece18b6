"""The LLaMA transformer, written once against the NumPy API.

This mirrors Meta's `llama/model.py` (ModelArgs, RMSNorm, RoPE, Attention with a KV cache and
grouped-query heads, FeedForward with SwiGLU, Transformer.forward(tokens, start_pos)).
Array creation and elementwise math go through `ops.xp` (numpy or cupy); the heavy operations,
`linear` (x @ W.T), `matmul` and `softmax`, go through `ops`, where a backend may use its own
kernels. The checks on the input (and the NaN locator) are in minillama/checks.py.
Shapes are written beside each tensor:

    bsz        prompts in the batch          seqlen    tokens fed in this call
    dim        model width                   head_dim  dim // n_heads
    n_heads    query heads                   n_kv_heads  key/value heads (GQA: fewer)
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import formats
from .checks import check_kv_dtype, check_model_args, check_tokens, check_weights
from .formats import Packed
from .ops import CPU, float32_weight, to_host
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
    rope_scaling: Optional["RopeScaling"] = None       # Llama 3.1 and later (Meta's, HF files)
    rope_freq_factors: Optional[tuple] = None          # the same, as a GGUF stores it
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        check_model_args(self)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim


def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's FeedForward width: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------
# the weights, by Meta's names, and the tied classifier

def weight_shapes(p: ModelArgs):
    """Every weight the model needs, by Meta's names, with its shape. (out, in) for linears."""
    return dict(iter_weight_shapes(p))


def iter_weight_shapes(p: ModelArgs):
    """weight_shapes one (name, shape) at a time, in the same order; lazy, so checks.check_weights
    can stop at the first missing tensor of a header that claims 2**63 layers."""
    yield "tok_embeddings.weight", (p.vocab_size, p.dim)
    yield "norm.weight", (p.dim,)
    yield "output.weight", (p.vocab_size, p.dim)
    for i in range(p.n_layers):
        pre = f"layers.{i}."
        yield pre + "attention_norm.weight", (p.dim,)
        yield pre + "attention.wq.weight", (p.n_heads * p.head_dim, p.dim)
        yield pre + "attention.wk.weight", (p.kv_dim, p.dim)
        yield pre + "attention.wv.weight", (p.kv_dim, p.dim)
        yield pre + "attention.wo.weight", (p.dim, p.n_heads * p.head_dim)
        yield pre + "ffn_norm.weight", (p.dim,)
        yield pre + "feed_forward.w1.weight", (p.hidden_dim, p.dim)
        yield pre + "feed_forward.w2.weight", (p.dim, p.hidden_dim)
        yield pre + "feed_forward.w3.weight", (p.hidden_dim, p.dim)


def classifier_is_embedding(weights):
    """Is the classifier the embedding table itself (a tied classifier, as in the TinyStories
    models and SmolLM2)? A reader says so by putting one object under both names. Whoever
    counts, stores or writes weights asks this: count the table once, keep it tied, write it
    once. Whether the model may then use one array for both is reuses_embedding's question."""
    out = weights.get("output.weight")
    return out is not None and out is weights.get("tok_embeddings.weight")


def reuses_embedding(weights):
    """May the model use its float32 embedding table as the classifier? Only when tied and
    stored as float32. The embedding is gathered by row, so the model keeps it as float32
    whatever the storage; but a classifier stored in fewer bytes stays so. A tied Packed table
    (a GGUF's Q8_0 token_embd) is read by the classifier's product as stored, the fewest bytes
    per token. A tied Q8 table comes from a llama2.c version-2 file, and runq's classifier is
    that quantized embedding, multiplied W8A8 (the activations rounded to int8 groups too): to
    get runq's logits the model keeps the Q8Tensor as its classifier. Either way the float32
    copy the model gathers from sits beside it (and the memory plan counts both)."""
    return classifier_is_embedding(weights) and \
        not isinstance(weights["output.weight"], (Q8Tensor, Packed))


# ----------------------------------------------------------------------------
# the blocks, as functions of arrays

def rms_norm(x, weight, eps, xp=np):
    # x / sqrt(mean(x^2) + eps) * weight            x: (..., dim)
    return x * (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)) * weight


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (Llama 3.1 and later), which stretches the context the
    model was trained on (original_max_position_embeddings) by `factor`. Each pair's wavelength,
    2 pi / frequency, in positions, decides what happens to it:

        wavelength < original / high_freq_factor    fast pairs: unchanged (they resolve
                                                     nearby positions, which stay as they were)
        wavelength > original / low_freq_factor     slow pairs: frequency / factor (they now
                                                     turn no further over the longer context
                                                     than they did over the original one)
        in between                                  a blend of the two, moving from one to the
                                                     other as original / wavelength goes from
                                                     low_freq_factor to high_freq_factor

    The defaults are Meta's (llama_models' apply_scaling, used when params.json says
    use_scaled_rope); a Hugging Face config.json names all four (rope_type "llama3")."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def scale_freqs(freqs, s: RopeScaling):
    """Meta's apply_scaling, in float32 as Meta and transformers compute it. freqs: (pairs,)."""
    f32 = np.float32
    old_context = s.original_max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor          # longer than this: slow pairs
    high_freq_wavelen = old_context / s.high_freq_factor        # shorter than this: fast pairs
    wavelen = f32(2 * math.pi) / freqs                                      # (pairs,)
    scaled = np.where(wavelen > low_freq_wavelen, freqs / f32(s.factor), freqs)
    smooth = (f32(old_context) / wavelen - f32(s.low_freq_factor)) / \
        f32(s.high_freq_factor - s.low_freq_factor)             # 0 at the slow end, 1 at the fast
    blended = (1 - smooth) * scaled / f32(s.factor) + smooth * scaled
    between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(between, blended, scaled).astype(f32)


def precompute_freqs(head_dim, end, theta=10000.0, scaling=None, freq_factors=None):
    """cos and sin of position * frequency, each (end, head_dim // 2), float32.
    Pair i of a head turns at frequency theta^(-2i / head_dim). The angles are computed in
    float32, as Meta's precompute_freqs_cis and llama2.c both do, so they round the same way.
    Llama 3.1 and later slow some pairs down: `scaling` (a RopeScaling) says how, as Meta's
    params.json and Hugging Face's config.json do; a GGUF file stores the result instead, as
    `freq_factors` (its rope_freqs tensor, (head_dim // 2,)): pair i's frequency divided by
    factor i, as llama.cpp applies it."""
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freqs = (f32(1.0) / np.power(f32(theta), exponents)).astype(f32)         # (head_dim // 2,)
    if scaling is not None:
        freqs = scale_freqs(freqs, scaling)
    if freq_factors is not None:
        freqs = (freqs / np.asarray(freq_factors, dtype=f32)).astype(f32)
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
    plain arrays, Packed weights of one format and Q8Tensors (blocks and groups run along `in`)."""
    if isinstance(ws[0], Packed):
        return formats.concat_rows([w.map(to_host) for w in ws])
    if isinstance(ws[0], Q8Tensor):
        return Q8Tensor(np.concatenate([to_host(w.q) for w in ws]),
                        np.concatenate([to_host(w.s) for w in ws]), ws[0].group_size, ws[0].w8a8)
    return np.concatenate([to_host(w) for w in ws])


# ----------------------------------------------------------------------------
# the layers

class Attention:
    """Grouped-query self-attention with a KV cache, each head computing

        softmax(Q K^T / sqrt(head_dim) + M) V

    Q: the queries of this call's positions, (seqlen, head_dim) per head.
    K, V: the keys and values of every position so far, start_pos + seqlen of them, read from
       the cache after this call's are written into it.
    M: the causal mask, ops.causal_mask(seqlen, start_pos): 0 where query i may see key j
       (j <= start_pos + i), -inf where it may not, so those weights come out exactly 0.
    Grouped-query heads: n_rep = n_heads // n_kv_heads query heads share one key/value head.
    Meta copies each kv head n_rep times (repeat_kv); here the n_rep query heads of a kv head
    are stacked into the rows of one Q, so a single product serves the group and nothing is
    copied.

    Where it is computed: Q K^T and the product with V are ops.matmul (on the GPU bmm_strided,
    kernels/matmul.cu); the softmax, M included, is ops.softmax (softmax_warp / softmax_block,
    kernels/softmax.cu, which build M from start_pos instead of reading it). For one new token
    the GPU runs all of it as one kernel, attention_decode (kernels/decode.cu).

    cache_k, cache_v: (max_batch_size, max_seq_len, n_kv_heads, head_dim), as in Meta's model.
    wq, wk, wv are fused into one weight wqkv: (n_heads + 2 * n_kv_heads) * head_dim rows.
    """

    def __init__(self, p: ModelArgs, weights, prefix, ops, kv_dtype="float32"):
        self.ops, xp = ops, ops.xp
        self.n_heads, self.n_kv_heads, self.head_dim = p.n_heads, p.n_kv_heads, p.head_dim
        self.n_rep = p.n_heads // p.n_kv_heads          # query heads sharing one kv head
        self.wqkv = ops.weight(fuse_rows([weights[prefix + w + ".weight"]
                                          for w in ("wq", "wk", "wv")]))
        self.wo = ops.weight(weights[prefix + "wo.weight"])
        cache_shape = (p.max_batch_size, p.max_seq_len, p.n_kv_heads, p.head_dim)
        self.cache_k = xp.zeros(cache_shape, dtype=kv_dtype)        # float32, or float16 for
        self.cache_v = xp.zeros(cache_shape, dtype=kv_dtype)        # long contexts

    def __call__(self, x, start_pos, cos, sin):
        ops, xp = self.ops, self.ops.xp
        bsz, seqlen, _ = x.shape
        nh, nkv, hd, rep = self.n_heads, self.n_kv_heads, self.head_dim, self.n_rep

        # xq, xk, xv = self.wq(x), self.wk(x), self.wv(x), in one matmul
        qkv = ops.linear(x, self.wqkv).reshape(bsz, seqlen, nh + 2 * nkv, hd)
        qk = apply_rotary_emb(qkv[:, :, :nh + nkv], cos, sin)       # rotate q and k together
        xq, xk = qk[:, :, :nh], qk[:, :, nh:]          # (bsz, seqlen, n_heads|n_kv_heads, hd)
        xv = qkv[:, :, nh + nkv:]                      # (bsz, seqlen, n_kv_heads, hd)

        # the KV cache: write this call's positions, then read every position so far (a
        # float16 cache is read back as float32: attention computes in float32)
        self.cache_k[:bsz, start_pos:start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos:start_pos + seqlen] = xv
        end = start_pos + seqlen
        keys = self.cache_k[:bsz, :end].astype(xp.float32, copy=False)
        values = self.cache_v[:bsz, :end].astype(xp.float32, copy=False)
        keys = keys.transpose(0, 2, 3, 1)              # K^T: (bsz, n_kv_heads, hd, end)
        values = values.transpose(0, 2, 1, 3)          # V: (bsz, n_kv_heads, end, hd)

        # repeat_kv without the copy: line the query heads up under the kv head they share.
        # query head h uses kv head h // n_rep, so rows of group g are heads g*n_rep ... g*n_rep+rep-1
        q = xq.reshape(bsz, seqlen, nkv, rep, hd).transpose(0, 2, 3, 1, 4)
        q = q.reshape(bsz, nkv, rep * seqlen, hd) * xp.float32(1.0 / math.sqrt(hd))   # Q / sqrt(hd)

        # softmax(Q K^T / sqrt(head_dim) + M) V; ops.softmax adds the causal mask M from start_pos
        scores = ops.matmul(q, keys)                         # (bsz, n_kv, rep * seqlen, end)
        probs = ops.softmax(scores.reshape(bsz, nkv, rep, seqlen, end), start_pos)
        out = ops.matmul(probs.reshape(bsz, nkv, rep * seqlen, end), values)
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
    def __init__(self, layer_id, p: ModelArgs, weights, ops, kv_dtype="float32"):
        pre = f"layers.{layer_id}."
        self.xp, self.eps = ops.xp, p.norm_eps
        self.attention = Attention(p, weights, pre + "attention.", ops, kv_dtype)
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

    weights: a dict under Meta's names (see weight_shapes()) of arrays, Packed weights or
    Q8Tensors, as minillama.dtypes stores them.
    The KV cache remembers positions < start_pos from earlier calls, so generation feeds the
    prompt once and then one token per call. kv_dtype: "float32", or "float16" for half the
    cache (attention still computes in float32).
    """

    def __init__(self, params: ModelArgs, weights, ops=CPU, kv_dtype="float32"):
        check_weights(iter_weight_shapes(params), weights)
        self.params, self.ops, self.kv_dtype = params, ops, check_kv_dtype(kv_dtype)
        # gathered by row, so float32 however it is stored (a tied classifier keeps the stored)
        self.tok_embeddings = ops.weight(float32_weight(weights["tok_embeddings.weight"]))
        self.layers = [TransformerBlock(i, params, weights, ops, kv_dtype)
                       for i in range(params.n_layers)]
        self.norm = ops.weight(weights["norm.weight"])
        self.output = (self.tok_embeddings if reuses_embedding(weights)
                       else ops.weight(weights["output.weight"]))
        cos, sin = precompute_freqs(params.head_dim, params.max_seq_len, params.rope_theta,
                                    params.rope_scaling, params.rope_freq_factors)
        self.freqs_cos, self.freqs_sin = ops.asarray(cos), ops.asarray(sin)

    @property
    def device(self):
        return self.ops.name

    def forward(self, tokens, start_pos):
        tokens = check_tokens(tokens, start_pos, self.params)  # (bsz, seqlen) int64, on the host
        for _, h in self.forward_stages(tokens, start_pos):
            pass                                 # each stage in turn; the last is the classifier
        return h                                               # (bsz, seqlen, vocab_size)

    __call__ = forward

    def forward_stages(self, tokens, start_pos):
        """forward one stage at a time: yields (name, output) after the embedding, each layer,
        the final norm and the classifier, named "tok_embeddings", "layers.0", ..., "norm",
        "output", as their weights are. forward runs them all; checks.locate_nonfinite stops at
        the first that is not finite. tokens: (bsz, seqlen) ids, checked (checks.check_tokens)."""
        tokens = self.ops.asarray(tokens)
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings[tokens]                        # (bsz, seqlen, dim)
        yield "tok_embeddings", h
        cos = self.freqs_cos[start_pos:start_pos + seqlen]     # (seqlen, head_dim // 2)
        sin = self.freqs_sin[start_pos:start_pos + seqlen]
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, cos, sin)
            yield f"layers.{i}", h
        h = rms_norm(h, self.norm, self.params.norm_eps, self.ops.xp)
        yield "norm", h
        yield "output", self.ops.linear(h, self.output)        # (bsz, seqlen, vocab_size)

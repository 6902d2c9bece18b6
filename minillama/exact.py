"""llama2.c's forward pass in llama2.c's order of operations: run.c's and runq.c's logits, bit
for bit. `minillama run --exact` (`exact=True` in the API) decodes with ExactDecoder instead of
model.forward: the same model, the same mathematics, other last bits. docs/generate.md tells why
that matters when sampling; in short:

Floating-point addition is not associative: (a + b) + c and a + (b + c) can round differently.
run.c sums a dot product left to right, one term at a time; BLAS sums in blocks, several lanes
at once, with fused multiply-adds; NumPy's sum adds in pairs. Each is as accurate as the others,
and they differ in the last bits. A sampled token is chosen where a random number falls in the
running sum of the probabilities, so one day the two programs' sums fall on either side of it,
pick different tokens, and from there the stories differ.

Nor do the C library's exp, sin, cos and pow round as NumPy's do: IEEE 754 fixes + - * / and sqrt
to the bit, not those. (On glibc 2.36, expf differs from the correctly rounded value for about 1
float in 1,500 and cosf for 1 in 75; NumPy's float32 exp differs from expf for 2 in 5.) So this
module calls the C library's own expf, cosf, sinf and powf, one value at a time through ctypes,
as the compiled program does.

Step for step, as run.c's forward() and runq.c's:
    rmsnorm     a left-to-right sum of squares, / dim, + eps, 1 / sqrtf, weight * (ss * x)
    matmul      each output a left-to-right sum of w[i, j] * x[j] (matvec_c); for llama2.c's
                int8 files, runq.c's integer groups (ops.linear_q8, quant.matmul_q8)
    RoPE        freq = 1 / powf(theta, i / head_size); cosf and sinf of pos * freq
    attention   each score a left-to-right dot product / sqrtf(head_size), softmax with expf,
                the values weighted and summed position after position
    SwiGLU      h1 * (1 / (1 + expf(-h1))) * h3
That gives the logits of run.c and runq.c built with `gcc -O3` (no -ffast-math, no fused
multiply-adds; tests/test_runq_parity.py builds and compares them). It is a reference, slower
than model.forward (one NumPy call per column of each matrix), so never the default, except for
llama2.c's int8 files (runs_runq), where reproducing runq is the point.
"""
import ctypes
import ctypes.util

import numpy as np

from .checks import check_tokens
from .errors import ArgumentError
from .quant import Q8Tensor


# ----------------------------------------------------------------------------
# the C library's float functions, applied value by value as a C loop does

def _load_libm():
    name = ctypes.util.find_library("m")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


LIBM = _load_libm()


def c_function(name, n_args, fallback):
    """The C library's float function `name` (expf, cosf, ...) over float32 arrays, elementwise.
    Without a C library to call, NumPy's float64 `fallback` rounded to float32: the same value
    but for the last bit of a few inputs in a thousand."""
    if LIBM is None or not hasattr(LIBM, name):
        return lambda *args: fallback(*(np.asarray(a, np.float64) for a in args)).astype(np.float32)
    signature = ctypes.CFUNCTYPE(ctypes.c_float, *[ctypes.c_float] * n_args)   # float f(float...)
    f = signature((name, LIBM))

    def apply(*args):
        args = np.broadcast_arrays(*(np.asarray(a, np.float32) for a in args))
        values = map(f, *(a.ravel().tolist() for a in args))
        return np.fromiter(values, np.float32, args[0].size).reshape(args[0].shape)
    return apply


expf = c_function("expf", 1, np.exp)
cosf = c_function("cosf", 1, np.cos)
sinf = c_function("sinf", 1, np.sin)
powf = c_function("powf", 2, np.power)


# ----------------------------------------------------------------------------
# run.c's building blocks, in its order of operations (float32 throughout)

def sum_c(a, axis=-1):
    """a summed along `axis` as the C loop `s = 0.0f; for (...) s += a[i];` does: left to
    right. np.cumsum is such a running sum, so its last entry is the loop's result (the + 0 is
    the loop's start: it turns -0.0 into 0.0, as 0.0f + -0.0f does)."""
    running = np.cumsum(a, axis=axis, dtype=np.float32)
    return np.take(running, -1, axis=axis) + np.float32(0)


def matvec_c(w, x):
    """w @ x as run.c's matmul() computes it: out[i] = w[i, 0] * x[0] + w[i, 1] * x[1] + ...,
    left to right in float32. One column at a time over all rows at once: each row's sum still
    runs j = 0, 1, ..., n - 1. w: (d, n) (column-major is fastest here), x: (n,) -> (d,)."""
    out = np.zeros(w.shape[0], np.float32)
    term = np.empty_like(out)
    for j in range(w.shape[1]):
        np.multiply(w[:, j], x[j], out=term)
        out += term
    return out


def rmsnorm_c(x, weight, eps):
    """run.c's rmsnorm: weight * (x / sqrt(mean(x^2) + eps)), the mean a left-to-right sum."""
    ss = sum_c(x * x) / np.float32(x.shape[-1]) + np.float32(eps)
    return weight * ((np.float32(1) / np.sqrt(ss)) * x)


def softmax_c(x, exp=expf):
    """run.c's softmax over the last axis: exp(x - max), a left-to-right sum, a division.
    exp: the C library's expf by default (Llama2cSampler passes a faster stand-in)."""
    e = exp(x - x.max(axis=-1, keepdims=True))
    return e / sum_c(e)[..., None]


# ----------------------------------------------------------------------------
# the decoder

def decoder(model, exact=False):
    """The forward a decoding loop calls (run.py's, generation.py's): llama2.c's order of
    operations (exact), or the fastest the model's backend has, model.ops.decoder(model)."""
    return ExactDecoder(model) if exact else model.ops.decoder(model)


def runs_runq(model):
    """Does the model hold llama2.c's int8 weights (a version-2 file), whose arithmetic is runq's?
    Then `minillama run` decodes it as runq does, --exact or not."""
    return isinstance(model.layers[0].attention.wqkv, Q8Tensor) and \
        model.layers[0].attention.wqkv.w8a8


class ExactDecoder:
    """forward(tokens, start_pos) -> logits (bsz, seqlen, vocab), computed as run.c / runq.c
    compute them: one position at a time (a prompt too, as llama2.c feeds it), each row of the
    batch in turn. Reads the model's weights and writes its KV cache, so it can take over from
    model.forward at any position, and the other way round."""

    def __init__(self, model):
        if model.ops.xp is not np:
            raise ArgumentError(f"exact: llama2.c's order of operations runs on the CPU; this "
                                f"model is on {model.device}")
        for w in self.linears(model):
            if not ((isinstance(w, np.ndarray) and w.dtype == np.float32) or
                    (isinstance(w, Q8Tensor) and w.w8a8)):
                raise ArgumentError(f"exact: reproduces llama2.c's float32 weights and its int8 "
                                    f"files; this model stores a weight as {describe(w)} (load "
                                    f"it with dtype float32)")
        p = self.params = model.params
        self.model, self.ops = model, model.ops
        self.kv_head = np.arange(p.n_heads) // (p.n_heads // p.n_kv_heads)   # of each query head
        # run.c's RoPE frequencies: freq_i = 1 / powf(theta, 2i / head_size), per pair of a head
        exponents = np.arange(0, p.head_dim, 2, dtype=np.float32) / np.float32(p.head_dim)
        self.freqs = np.float32(1) / powf(np.float32(p.rope_theta), exponents)
        # the model's angles at position 1 are its frequencies: refuse scaled ones (Llama 3's)
        if p.max_seq_len > 1 and not np.allclose(
                np.arctan2(model.freqs_sin[1], model.freqs_cos[1]), self.freqs, rtol=1e-3):
            raise ArgumentError("exact: this model's RoPE frequencies are not llama2.c's "
                                "(scaled rotary embeddings)")

    @staticmethod
    def linears(model):
        yield model.output
        for layer in model.layers:
            yield from (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                        layer.feed_forward.w2)

    def __call__(self, tokens, start_pos):
        tokens = check_tokens(tokens, start_pos, self.params)    # (bsz, seqlen), on the host
        bsz, seqlen = tokens.shape
        logits = np.empty((bsz, seqlen, self.params.vocab_size), np.float32)
        for row in range(bsz):
            for i in range(seqlen):
                logits[row, i] = self.step(row, int(tokens[row, i]), start_pos + i)
        return logits

    def step(self, row, token, pos):
        """run.c's forward(token, pos) for one row of the batch: the logits (vocab,)."""
        model, eps = self.model, self.params.norm_eps
        x = model.tok_embeddings[token].copy()                          # (dim,)
        angle = np.float32(pos) * self.freqs                            # (head_dim // 2,)
        rope = cosf(angle), sinf(angle)
        for layer in model.layers:
            x = x + self.attention(layer.attention, rmsnorm_c(x, layer.attention_norm, eps),
                                   row, pos, rope)
            x = x + self.feed_forward(layer.feed_forward, rmsnorm_c(x, layer.ffn_norm, eps))
        return self.linear(rmsnorm_c(x, model.norm, eps), model.output)  # (vocab,)

    def linear(self, x, w):
        """W x: run.c's matmul for float32 weights, runq.c's (through ops) for int8 groups."""
        return self.ops.linear(x, w) if isinstance(w, Q8Tensor) else matvec_c(w, x)

    def attention(self, attn, x, row, pos, rope):
        nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        qkv = self.linear(x, attn.wqkv)
        q = qkv[:nh * hd].reshape(nh, hd)
        k = qkv[nh * hd:(nh + nkv) * hd].reshape(nkv, hd)
        v = qkv[(nh + nkv) * hd:].reshape(nkv, hd)
        cos, sin = rope
        for vec in (q, k):                  # rotate each pair (vec[2i], vec[2i+1]) by its angle
            v0, v1 = vec[:, 0::2].copy(), vec[:, 1::2].copy()
            vec[:, 0::2] = v0 * cos - v1 * sin
            vec[:, 1::2] = v0 * sin + v1 * cos
        attn.cache_k[row, pos], attn.cache_v[row, pos] = k, v
        # the key and value of each query head at positions 0..pos: (T, nh, hd), T = pos + 1
        keys = attn.cache_k[row][:pos + 1, self.kv_head].astype(np.float32)
        values = attn.cache_v[row][:pos + 1, self.kv_head].astype(np.float32)
        scores = sum_c(q * keys).T / np.sqrt(np.float32(hd))          # (nh, T)
        weights = softmax_c(scores)                                     # (nh, T)
        out = sum_c(weights.T[:, :, None] * values, axis=0)            # (nh, hd)
        return self.linear(out.reshape(-1), attn.wo)

    def feed_forward(self, ffn, x):
        h = self.linear(x, ffn.w13)                                     # (2 * hidden_dim,)
        h1, h3 = h[:ffn.hidden_dim], h[ffn.hidden_dim:]
        return self.linear((h1 * (np.float32(1) / (np.float32(1) + expf(-h1)))) * h3, ffn.w2)


def describe(w):
    """A weight's storage in words, for the error message."""
    if isinstance(w, Q8Tensor):
        return "int8 groups (--dtype int8)"
    return getattr(w, "format", None) or str(getattr(w, "dtype", type(w).__name__))

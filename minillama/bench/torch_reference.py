"""An independent LLaMA forward in plain PyTorch, written the way Meta's model.py computes it:
RoPE as a complex multiply (torch.polar), repeat_kv by repeat_interleave, an explicit -inf mask,
F.softmax. It shares no code with minillama's model, so agreeing with it means something.

The tests run it in float64 as the reference; the CPU benchmark runs it in float32 as the
"plain PyTorch eager" baseline. Needs torch (the `test` extra).
"""
import math

import torch
import torch.nn.functional as F


def t64(a, dtype=torch.float64):
    return torch.as_tensor(a).to(dtype)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def freqs_cis(head_dim, end, theta, dtype=torch.float64):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = torch.outer(torch.arange(end, dtype=dtype), freqs)
    return torch.polar(torch.ones_like(angles), angles)               # (end, head_dim // 2)


def rope(x, fc):
    # x: (bsz, seqlen, heads, head_dim); pairs (2i, 2i+1) as complex numbers
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * fc[None, :, None, :]).flatten(3)


def attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, fc, keys_cache, values_cache, start_pos):
    bsz, seqlen, dim = x.shape
    hd = dim // n_heads
    xq = (x @ wq.T).view(bsz, seqlen, n_heads, hd)
    xk = (x @ wk.T).view(bsz, seqlen, n_kv_heads, hd)
    xv = (x @ wv.T).view(bsz, seqlen, n_kv_heads, hd)
    xq, xk = rope(xq, fc), rope(xk, fc)
    keys_cache[:bsz, start_pos:start_pos + seqlen] = xk
    values_cache[:bsz, start_pos:start_pos + seqlen] = xv
    n_rep = n_heads // n_kv_heads
    keys = keys_cache[:bsz, :start_pos + seqlen].repeat_interleave(n_rep, dim=2)
    values = values_cache[:bsz, :start_pos + seqlen].repeat_interleave(n_rep, dim=2)
    q, k, v = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    scores = q @ k.transpose(2, 3) / math.sqrt(hd)
    if seqlen > 1:
        mask = torch.full((seqlen, seqlen), float("-inf"), dtype=x.dtype).triu(1)
        mask = torch.hstack([torch.zeros((seqlen, start_pos), dtype=x.dtype), mask])
        scores = scores + mask
    out = F.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(bsz, seqlen, -1) @ wo.T


def swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


class Reference:
    """forward(tokens, start_pos) with its own KV cache, like minillama.Transformer."""

    def __init__(self, p, weights, dtype=torch.float64):
        self.p = p
        self.w = {k: t64(v, dtype) for k, v in weights.items()}
        self.fc = freqs_cis(p.head_dim, p.max_seq_len, p.rope_theta, dtype)
        shape = (p.max_batch_size, p.max_seq_len, p.n_kv_heads, p.head_dim)
        self.cache = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                      for _ in range(p.n_layers)]

    @torch.inference_mode()
    def forward(self, tokens, start_pos):
        p, w = self.p, self.w
        tokens = torch.as_tensor(tokens)
        h = w["tok_embeddings.weight"][tokens]
        fc = self.fc[start_pos:start_pos + tokens.shape[1]]
        for i in range(p.n_layers):
            pre = f"layers.{i}."
            a = lambda n: w[pre + "attention." + n + ".weight"]
            f = lambda n: w[pre + "feed_forward." + n + ".weight"]
            x = rms_norm(h, w[pre + "attention_norm.weight"], p.norm_eps)
            h = h + attention(x, a("wq"), a("wk"), a("wv"), a("wo"), p.n_heads, p.n_kv_heads,
                              fc, *self.cache[i], start_pos)
            x = rms_norm(h, w[pre + "ffn_norm.weight"], p.norm_eps)
            h = h + swiglu(x, f("w1"), f("w2"), f("w3"))
        h = rms_norm(h, w["norm.weight"], p.norm_eps)
        return (h @ w["output.weight"].T).numpy()

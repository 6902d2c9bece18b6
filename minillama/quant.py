"""Q8_0 quantization: int8 values in groups, one float32 scale per group.

A weight (out, in) is cut along `in` into groups of `group_size`; each group stores
    q = round(w / s)  as int8, with  s = max|w| / 127  for that group,
so w ~= q * s. This is llama2.c's `runq.c` scheme and GGUF's Q8_0 (there with groups of 32).

runq.c also rounds each activation vector to int8 groups before a product (quantize_activation)
and multiplies group by group in integers (matmul_q8); both are written here exactly as runq.c
computes them, so that minillama's logits for a llama2.c int8 file are runq's, bit for bit.
"""
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError
from .formats.q8_0 import round_half_away

Q_MAX = 127.0


@dataclass
class Q8Tensor:
    """A quantized (out, in) weight. `w8a8` asks linear() to quantize activations too, the way
    llama2.c's runq does (needed to reproduce runq's output bit for bit).

    Only whole groups count: when `in` is not a multiple of group_size, the last in % group_size
    columns take no part in a product (runq.c behaves so; see checkpoints/llama2c.py)."""
    q: object          # (out, in) int8
    s: object          # (out, in // group_size) float32
    group_size: int
    w8a8: bool = False

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self):
        return self.q.nbytes + self.s.nbytes


def quantize_q8(w, group_size, xp=np):
    """(..., n) float -> (q int8 (..., n), s float32 (..., n // group_size)).
    Rounds half to even, as llama2.c's export.py (torch.round) does for the weights."""
    n = w.shape[-1]
    if group_size <= 0 or n % group_size:
        raise ArgumentError(f"group_size: {group_size} must be > 0 and divide the row length {n}")
    groups = w.reshape(*w.shape[:-1], n // group_size, group_size).astype(xp.float32)
    s = xp.abs(groups).max(axis=-1) / xp.float32(Q_MAX)          # (..., n_groups)
    # An all-zero group has scale 0; its values quantize to 0 instead of 0/0 = NaN.
    safe = xp.where(s == 0, xp.float32(1), s)
    q = xp.round(groups / safe[..., None]).astype(xp.int8)
    return q.reshape(w.shape), s.astype(xp.float32)


def dequantize_q8(q, s, group_size, xp=np):
    """Inverse of quantize_q8: int8 groups times their scales, as float32.
    q: (..., n), s: (..., n_groups) -> (..., n_groups * group_size), whole groups only."""
    n = s.shape[-1] * group_size
    groups = q[..., :n].reshape(*q.shape[:-1], s.shape[-1], group_size).astype(xp.float32)
    return (groups * s[..., None]).reshape(*q.shape[:-1], n)


# ----------------------------------------------------------------------------
# runq.c's arithmetic: int8 activations, integer group products

def quantize_activation(x, group_size, xp=np):
    """runq.c's quantize() of activations: x (..., n) float32 -> q (..., n_groups, group_size)
    int8 and s (..., n_groups) float32, whole groups only (runq.c's n / GS). s = max|x| / 127 in
    float32, q = round(x / s) with C's rounding (round_half_away); an all-zero group gets s = 0
    and q = 0 (runq.c's 0 / 0 is NaN, which x86's conversion to int8 turns into 0)."""
    n_groups = x.shape[-1] // group_size
    groups = x[..., :n_groups * group_size].reshape(*x.shape[:-1], n_groups, group_size)
    s = xp.abs(groups).max(axis=-1) / xp.float32(Q_MAX)          # (..., n_groups)
    safe = xp.where(s == 0, xp.float32(1), s)
    q = round_half_away(groups / safe[..., None], xp).astype(xp.int8)
    return q, s.astype(xp.float32)


def matmul_q8(xq, xs, w, xp=np):
    """runq.c's matmul(): rows of int8 activations times a Q8Tensor, as runq.c computes each out[i]:

        for each group g, in order:  val += ((float) ival_g * w.s[i, g]) * x.s[g]

    where ival_g is the exact integer dot product of group g. xq: (R, n_groups, group_size) int8,
    xs: (R, n_groups) from quantize_activation; w: (d, in) -> (R, d) float32.
    The integer products run through BLAS in floating point: every product of two int8 is below
    2**14 and every partial sum of a group below 2**24 (float32) or 2**53 (float64), so each one
    is an exact integer whatever order BLAS adds in. The float32 sum over groups is the part
    whose order matters, and it is runq.c's: one group after another."""
    R, n_groups, gs = xq.shape
    exact = xp.float32 if gs * 128 * 128 < 2 ** 24 else xp.float64
    a = xq.astype(exact).transpose(1, 0, 2)                             # (n_groups, R, gs)
    wq = w.q[:, :n_groups * gs].reshape(-1, n_groups, gs)                # (d, n_groups, gs)
    ival = xp.matmul(a, wq.astype(exact).transpose(1, 2, 0))            # (n_groups, R, d)
    terms = (ival.astype(xp.float32) * w.s.T[:, None, :]) * xs.T[:, :, None]
    out = terms[0] + xp.float32(0)                 # val = 0.0f; val += term, group after group
    for term in terms[1:]:
        out += term
    return out                                                          # (R, d)

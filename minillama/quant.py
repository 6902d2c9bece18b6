"""Q8_0 quantization: int8 values in groups, one float32 scale per group.

A weight (out, in) is cut along `in` into groups of `group_size`; each group stores
    q = round(w / s)  as int8, with  s = max|w| / 127  for that group,
so w ~= q * s. This is llama2.c's `runq.c` scheme and GGUF's Q8_0 (there with groups of 32).
"""
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError

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
    """(..., n) float -> (q int8 (..., n), s float32 (..., n // group_size))."""
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


def fake_quantize_q8(x, group_size, xp=np):
    """Round x through Q8_0 and back: what runq's int8 activations hold, as float32."""
    q, s = quantize_q8(x, group_size, xp)
    return dequantize_q8(q, s, group_size, xp)

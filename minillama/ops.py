"""The two operations that do the heavy lifting, behind one small interface.

The model is written once against the NumPy array API. Everything it computes goes through
`ops.xp` (numpy on the CPU, cupy on the GPU), except the two operations that dominate the run
time, which go through this module so a backend can swap in its own kernels:

    ops.linear(x, w)              x @ w.T for a weight stored row-major as (out, in), like nn.Linear
                                  (w: a float32 array, a Packed weight or a Q8Tensor)
    ops.matmul(a, b)              batched a @ b (attention scores and the weighted sum of values)
    ops.softmax(x, start_pos)     softmax over the last axis, optionally causal

and a loop that decodes asks its backend for the fastest way to run the model:

    ops.decoder(model)            forward(tokens, start_pos) -> logits: model.forward, or faster
                                  (on the CPU, cpu_decode.CpuDecoder for one-token steps)

`minillama.cuda.CudaOps` provides the same methods with hand-written CUDA kernels, and
`minillama.devices.get_ops` picks a backend by device name. The module
function `softmax` is the one softmax of the package: NumpyOps.softmax is it on the backend's
arrays, and generate's sampling and log-probabilities use it on the host.
"""
import numpy as np

from . import formats
from .cpu_decode import CpuDecoder
from .formats import Packed
from .quant import Q8Tensor, dequantize_q8, matmul_q8, quantize_activation


# float32 bytes of a Packed weight that linear() dequantizes at a time on the CPU: a block of
# rows that stays in the cache while it is multiplied (1.3x to 1.6x faster than 16 MiB chunks for
# SmolLM2's matrices, measured on the 2-core box)
LINEAR_CHUNK_BYTES = 1 << 20


def causal_mask(seqlen, start_pos, xp=np):
    """(seqlen, start_pos + seqlen) additive mask, as Meta builds it: query i (at absolute
    position start_pos + i) sees every cached key and the new keys up to itself."""
    mask = xp.triu(xp.full((seqlen, seqlen), -xp.inf, dtype=xp.float32), k=1)
    return xp.concatenate([xp.zeros((seqlen, start_pos), dtype=xp.float32), mask], axis=1)


def softmax(x, axis=-1, start_pos=None, log=False, xp=np):
    """exp(x - max) / sum(exp(x - max)) along `axis`: subtracting the max changes nothing
    mathematically and keeps exp from overflowing.

    start_pos: x holds attention scores (..., seqlen, start_pos + seqlen) and the causal mask
    is added first (a single row, seqlen 1, sees every key: no mask to add).
    log: log softmax instead, as x - max - log(sum(exp(x - max))); log(softmax(x)) would turn
    a probability that rounds to 0 into -inf."""
    if start_pos is not None and x.shape[-2] > 1:
        x = x + causal_mask(x.shape[-2], start_pos, xp)
    x = x - x.max(axis=axis, keepdims=True)
    e = xp.exp(x)
    total = e.sum(axis=axis, keepdims=True)
    return x - xp.log(total) if log else e / total


def to_host(a):
    """Any array (NumPy or CuPy) as a NumPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def float32_weight(w):
    """A stored weight (array, LazyTensor, Packed or Q8Tensor, on any device) as a float32 NumPy
    array: the embedding table the model gathers from, a weight stored again in another format."""
    if isinstance(w, Packed):
        return formats.dequantize(w.map(to_host))
    if isinstance(w, Q8Tensor):
        # columns past the last whole group take no part in a product (runq.c; see Q8Tensor):
        # as float32 they are zeros, which adds the same nothing
        w32 = np.zeros(w.shape, np.float32)
        w32[..., :w.s.shape[-1] * w.group_size] = dequantize_q8(to_host(w.q), to_host(w.s),
                                                                 w.group_size)
        return w32
    return np.asarray(to_host(w), dtype=np.float32)


class NumpyOps:
    """The CPU backend: NumPy, whose matmul calls the machine's BLAS. A GPU backend subclasses
    it with `xp = cupy` and overrides linear, matmul and softmax with its own kernels."""
    name = "cpu"
    xp = np

    def asarray(self, a, dtype=None):
        """Bring an array from anywhere (host or device) onto this backend."""
        return np.asarray(to_host(a), dtype=dtype)

    def weight(self, w):
        """Place a weight (array, Packed or Q8Tensor) on this backend, once, at load time. A
        Packed weight stays as stored, its planes on this backend."""
        if isinstance(w, Packed):
            return w.map(self.asarray)
        if isinstance(w, Q8Tensor):
            return Q8Tensor(self.asarray(w.q), self.asarray(w.s), w.group_size, w.w8a8)
        return self.matrix_layout(self.asarray(w))

    def matrix_layout(self, w):
        """Matrices are kept column-major: the same (out, in) array, but w.T, which linear()
        multiplies by, is then a row-major (in, out) matrix, the layout OpenBLAS runs fastest
        for decode's skinny products (1.3x to 2.4x on the 2-core box; docs/benchmarks.md)."""
        return np.asfortranarray(w) if w.ndim == 2 else w

    def decoder(self, model):
        """The fastest forward(tokens, start_pos) -> logits this backend has for `model`. A
        decoding loop asks once and calls it at every step. Here it is a CpuDecoder
        (cpu_decode.py), which runs one-token steps of one row with preallocated buffers and
        everything else through model.forward, where it covers the model (float32 weights and
        cache), else model.forward itself; CudaOps returns one that runs one-token steps as a
        CUDA graph. A subclass that overrides linear, matmul or softmax (to record or time them,
        as notebook 4 and bench/cpu.py do) keeps model.forward, which calls them."""
        own = all(getattr(type(self), name) is getattr(NumpyOps, name)
                  for name in ("linear", "matmul", "softmax"))
        return CpuDecoder(model) if own and CpuDecoder.covers(model) else model.forward

    def linear(self, x, w):
        # x: (..., in)   w: (out, in)   ->   (..., out)
        if isinstance(w, Q8Tensor):
            return self.linear_q8(x, w)
        if isinstance(w, Packed):
            return self.linear_packed(x, w)
        # As one 2-D product: NumPy would treat (bsz, seqlen, in) as bsz separate matrices and
        # read W once per row of the batch. w.T is a view: BLAS reads W as stored, no copy.
        return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])

    def linear_packed(self, x, w):
        """NumPy has no product of packed weights: dequantize a bounded block of rows at a time
        (formats.row_chunks), just before its product, so the peak is a chunk, not the matrix."""
        rows = x.reshape(-1, x.shape[-1])                           # (bsz * seqlen, in)
        y = np.empty((rows.shape[0], w.shape[0]), np.float32)       # (bsz * seqlen, out)
        for start, stop, w_rows in formats.row_chunks(w, LINEAR_CHUNK_BYTES):
            np.matmul(rows, w_rows.T, out=y[:, start:stop])         # no temporary product
            del w_rows                          # freed before the next chunk is made
        return y.reshape(*x.shape[:-1], w.shape[0])

    def linear_q8(self, x, w):
        """A Q8Tensor: dequantized and multiplied in float32; or, for llama2.c's int8 files
        (w8a8), as runq.c multiplies: x rounded to int8 groups too, integer products per group
        (quant.matmul_q8), a bounded block of W's rows at a time."""
        x = x[..., :w.s.shape[-1] * w.group_size]      # whole groups only (see Q8Tensor)
        if not w.w8a8:
            return self.linear(x, dequantize_q8(w.q, w.s, w.group_size, self.xp))
        xp, rows = self.xp, x.reshape(-1, x.shape[-1])                # (bsz * seqlen, in)
        xq, xs = quantize_activation(rows, w.group_size, xp)
        y = xp.empty((rows.shape[0], w.shape[0]), xp.float32)         # (bsz * seqlen, out)
        step = max(1, LINEAR_CHUNK_BYTES // (4 * rows.shape[1]))     # rows of W per block
        for start in range(0, w.shape[0], step):
            block = Q8Tensor(w.q[start:start + step], w.s[start:start + step], w.group_size)
            y[:, start:start + step] = matmul_q8(xq, xs, block, xp)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def matmul(self, a, b):
        return a @ b

    def softmax(self, x, start_pos=None):
        """Softmax over the last axis. With start_pos, x is (..., seqlen, start_pos + seqlen)
        attention scores and the causal mask is applied first."""
        return softmax(x, start_pos=start_pos, xp=self.xp)


CPU = NumpyOps()

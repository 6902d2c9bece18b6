"""CudaOps: the ops backend on the GPU, NumpyOps with `xp = cupy` and minillama's own kernels.

The model's own code (RMSNorm, RoPE, SwiGLU, the KV cache, sampling) runs through the CuPy
array API unchanged. The operations that go through `ops` run the kernels of kernels/*.cu:

    linear(x, w)        gemv for a few rows (decoding), sgemm_v4 otherwise    matmul.cu
    matmul(a, b)        bmm_strided, reading the KV cache views in place       matmul.cu
    softmax(x, pos)     softmax_warp / softmax_block, causal mask built in     softmax.cu
    decoder(model)      model.forward, with one-token steps through            decode.cu
                        FusedDecoder, one CUDA graph per batch size
"""
import weakref

import numpy as np

from ..checks import check_tokens
from ..ops import NumpyOps
from ..quant import Q8Tensor
from .fused import FusedDecoder
from .kernels import bmm, gemv, sgemm, softmax
from .runtime import require_cupy

GEMV_MAX_M = 32             # linear() multiplies up to this many rows with gemv, more with sgemm


class CudaOps(NumpyOps):
    """NumpyOps on the GPU: `xp` is cupy, and linear / matmul / softmax run minillama's kernels.

    fused_decode: decoder(model) runs one-token steps through FusedDecoder (6 launches per
        layer) instead of the generic path; graphs: FusedDecoder replays them as one CUDA graph
        per batch size.
    """
    name = "cuda"

    def __init__(self, fused_decode=True, graphs=True):
        self.xp = require_cupy()
        self.fused_decode, self.graphs = fused_decode, graphs
        self._decoders = weakref.WeakKeyDictionary()     # model -> FusedDecoder (or None)

    def matrix_layout(self, w):
        return w            # the kernels index weights row-major: (out, in), C-contiguous

    def asarray(self, a, dtype=None):
        """Bring an array onto the GPU: host arrays (NumPy, lists) are copied over, CuPy arrays
        pass through. Everything entering the model goes through here, so a host array mixed
        into a GPU model is moved, never rejected half-way through a forward pass."""
        if isinstance(a, self.xp.ndarray):
            return a if dtype is None else a.astype(dtype, copy=False)
        return self.xp.asarray(np.asarray(a), dtype=dtype)

    def linear(self, x, w):
        # x: (..., in)   w: (out, in)   ->   (..., out)
        if isinstance(w, Q8Tensor):
            return self.linear_q8(x, w)           # dequantizes, then comes back here
        x = self.asarray(x)
        rows = self.xp.ascontiguousarray(x.reshape(-1, x.shape[-1]))    # (bsz * seqlen, in)
        # float16 storage (--dtype float16) is computed in float32, like NumPy's upcast
        w = self.xp.ascontiguousarray(self.asarray(w), dtype=np.float32)
        y = gemv(rows, w) if rows.shape[0] <= GEMV_MAX_M else sgemm(rows, w)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def matmul(self, a, b):
        return bmm(self.asarray(a), self.asarray(b))

    def softmax(self, x, start_pos=None):
        return softmax(self.xp.ascontiguousarray(self.asarray(x)), start_pos=start_pos)

    def decoder(self, model):
        """The fastest forward(tokens, start_pos) -> logits for `model`: one new token per row
        (tokens (bsz, 1)) goes through FusedDecoder; prompts go through model.forward. Where
        FusedDecoder does not cover the model (see FusedDecoder.covers), or fused_decode is
        off, it is model.forward itself."""
        fused = self._fused_decoder(model) if self.fused_decode else None
        if fused is None:
            return model.forward
        graphs = self.graphs

        def forward(tokens, start_pos):
            tokens = check_tokens(tokens, start_pos, model.params)   # (bsz, seqlen) int64, host
            if tokens.shape[1] > 1:
                return model.forward(tokens, start_pos)
            return fused(tokens, start_pos, graphs)
        return forward

    def _fused_decoder(self, model):
        """The model's FusedDecoder, made on the first request (its buffers and CUDA graphs
        then serve every decoder(model) after); None for a model it does not cover."""
        if model not in self._decoders:
            self._decoders[model] = FusedDecoder(model) if FusedDecoder.covers(model) else None
        return self._decoders[model]

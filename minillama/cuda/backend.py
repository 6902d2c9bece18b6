"""CudaOps: the ops backend on the GPU, NumpyOps with `xp = cupy` and minillama's own kernels.

The model's own code (RMSNorm, RoPE, SwiGLU, the KV cache, sampling) runs through the CuPy
array API unchanged. The operations that go through `ops` run the kernels of kernels/*.cu:

    linear(x, w)        float32 w: gemv for a few rows (decoding), sgemm_v4     matmul.cu
                        otherwise; a Packed w (weights as stored): qgemv for     qgemv.cu
                        a few rows, gemm_v7 / gemm_v6 on the tensor cores        matmul.cu
                        otherwise (tensor_core_gemm)
    matmul(a, b)        bmm_strided, reading the KV cache views in place       matmul.cu
    softmax(x, pos)     softmax_warp / softmax_block, causal mask built in     softmax.cu
    decoder(model)      model.forward, with one-token steps through            decode.cu
                        FusedDecoder, one CUDA graph per batch size, or
                        PersistentDecoder, one kernel per step              persistent.cu
"""
import os
import weakref

import numpy as np

from ..checks import check_tokens
from ..errors import ArgumentError, GenerationError, shown
from ..formats import Packed, dequantize
from ..ops import NumpyOps
from ..quant import Q8Tensor
from .fused import FusedDecoder
from .persistent import PersistentDecoder
from .kernels import bmm, gemv, greedy_pick, qgemv, sgemm, softmax, tensor_core_gemm, to_16bit
from .runtime import require_cupy

GEMV_MAX_M = 32             # linear() multiplies up to this many rows with gemv, more with sgemm
QGEMV_MAX_M = 64            # and with a Packed weight, up to this many with qgemv, more with
                            # tensor_core_gemm (gemm_v7 or gemm_v6)


def environment_flag(name, default=False):
    """A setting of CudaOps from the environment: True where it sets `name` to 1, False where
    to 0, else `default`. How the command line and Llama.build, which make their CudaOps
    themselves, are told a setting other than its default."""
    return {"1": True, "0": False}.get(os.environ.get(name), default)


def deterministic_default():
    """CudaOps' `deterministic` where the caller does not say: MINILLAMA_DETERMINISTIC=1 asks
    for the same bits every run."""
    return environment_flag("MINILLAMA_DETERMINISTIC")


def x16_batches_default():
    """CudaOps' `x16_batches` where the caller does not say: x in one float16 part on the
    batches' tensor cores, unless MINILLAMA_X16_BATCHES=0 asks for its two parts."""
    return environment_flag("MINILLAMA_X16_BATCHES", default=True)


class CudaOps(NumpyOps):
    """NumpyOps on the GPU: `xp` is cupy, and linear / matmul / softmax run minillama's kernels.

    fused_decode: decoder(model) runs one-token steps through FusedDecoder (5 launches per
        layer, 2 for one row of float32 weights) instead of the generic path; graphs:
        FusedDecoder replays them as one CUDA graph per batch size; persistent: where
        PersistentDecoder covers the model, a step is one kernel (FusedDecoder's launches still
        serve the batches it does not fit);
        deterministic: the same bits every run, so no sums added in whatever order the blocks
        end: no one-row step through halves.cu's two launches a layer (FusedDecoder.run_halves),
        no split product adding its slices by atomics, no batch step leaving its norms to the
        kernel after (FusedDecoder.defers_norms). Without it the logits move in their last
        places from run to run, within 2e-6 of the deterministic step's, and a batch step's
        with x in one float16 part (x16_batches) by up to ~2e-4, where those last places carry
        a value of x across a float16 rounding boundary; None: deterministic_default(), the
        environment's say;
        x16_batches: FusedDecoder's batch steps on the tensor cores (MMA_MIN_ROWS rows or more
        of float16, q8_0 or q4_0 weights) take x in one float16 part, as a prompt's
        tensor-core GEMM takes it (kernels.qgemv_mma's x16): 11 significant bits of each value
        of x, each product within ~2e-4 of float64, the logits ~5e-4 of the CPU's, the 7B
        q4_0 batch-8 step 1.10x as fast. False: two parts, 22 bits, each product within 1e-5
        of float64, the logits within 1e-4 of the CPU's. One row, the CPU path and bfloat16
        weights keep float32's bits of x either way. None: x16_batches_default(), True unless
        the environment says MINILLAMA_X16_BATCHES=0.
    """
    name = "cuda"

    def __init__(self, fused_decode=True, graphs=True, persistent=True, deterministic=None,
                 x16_batches=None):
        self.xp = require_cupy()
        self.fused_decode, self.graphs, self.persistent = fused_decode, graphs, persistent
        self.deterministic = deterministic_default() if deterministic is None else deterministic
        self.x16_batches = x16_batches_default() if x16_batches is None else x16_batches
        self._decoders = weakref.WeakKeyDictionary()     # model -> FusedDecoder (or None)

    def matrix_layout(self, w):
        return w            # the kernels index weights row-major: (out, in), C-contiguous

    def weight(self, w):
        """Place a weight on the GPU once, at load time. A Packed weight keeps its format: its
        planes are copied over as they are (f32 becomes a plain float32 array). The one
        exception is an f16/bf16 weight whose rows are not a multiple of 8 values long, which
        the 16-byte loads of qgemv and gemm_v5 cannot read: it is widened to float32, once."""
        if not isinstance(w, Packed):
            return super().weight(w)
        if w.format == "f32" or w.shape[1] % 8:
            return self.asarray(dequantize(w))
        return w.map(self.asarray)

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
            return self.linear_q8(x, w)           # NumpyOps': runq's products, or dequantized
        if isinstance(w, Packed):
            return self.linear_packed(x, w)
        x = self.asarray(x)
        rows = self.xp.ascontiguousarray(x.reshape(-1, x.shape[-1]))    # (bsz * seqlen, in)
        # float16 storage (--dtype float16) is computed in float32, like NumPy's upcast
        w = self.xp.ascontiguousarray(self.asarray(w), dtype=np.float32)
        y = gemv(rows, w) if rows.shape[0] <= GEMV_MAX_M else sgemm(rows, w)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def linear_packed(self, x, w):
        """x @ w.T with w as stored (a Packed placed by weight()), never a float32 copy of it:
        up to QGEMV_MAX_M rows of x go through qgemv (float32 x, the weights dequantized in
        registers, float32 sums); more through the tensor cores (gemm_v7 on an sm_90 GPU,
        gemm_v6 otherwise: tensor_core_gemm), x rounded to float16 (bfloat16 for a bf16
        weight) first, since that many rows make the product bound by arithmetic rather than
        by reading W. Output float32."""
        x = self.asarray(x, dtype=np.float32)
        rows = x.reshape(-1, x.shape[-1])                                # (bsz * seqlen, in)
        if not rows.flags.c_contiguous or rows.data.ptr % 16:           # the kernels load
            rows = rows.copy()                                           # 16 bytes at a time
        if rows.shape[0] <= QGEMV_MAX_M:
            y = qgemv(rows, w)
        else:
            y = tensor_core_gemm(to_16bit(rows, bf16=w.format == "bf16"), w)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def matmul(self, a, b):
        return bmm(self.asarray(a), self.asarray(b))

    def softmax(self, x, start_pos=None):
        return softmax(self.xp.ascontiguousarray(self.asarray(x)), start_pos=start_pos)

    def greedy_pick(self, last):
        """(2 bsz,) int32 on the GPU: each row's argmax of last (bsz, vocab), then a flag per
        row, 1 where a logit is not finite (kernels.greedy_pick; generation.greedy's GPU path)."""
        return greedy_pick(self.asarray(last))

    def decoder(self, model):
        """The fastest forward(tokens, start_pos) -> logits for `model`: a CudaDecoder, which
        sends one new token per row (tokens (bsz, 1)) through FusedDecoder and prompts through
        model.forward, and has greedy_steps, greedy decoding's steps with the picks on the GPU.
        Where FusedDecoder does not cover the model (see FusedDecoder.covers), or fused_decode
        is off, it is model.forward itself."""
        fused = self._fused_decoder(model) if self.fused_decode else None
        return model.forward if fused is None else CudaDecoder(model, fused, self.graphs)

    def _fused_decoder(self, model):
        """The model's PersistentDecoder or FusedDecoder, made on the first request (its
        buffers and CUDA graphs then serve every decoder(model) after); None for a model
        neither covers."""
        if model not in self._decoders:
            kind = (PersistentDecoder if self.persistent and PersistentDecoder.covers(model)
                    else FusedDecoder if FusedDecoder.covers(model) else None)
            self._decoders[model] = (kind(model, self.deterministic, self.x16_batches)
                                     if kind else None)
        return self._decoders[model]


class CudaDecoder:
    """forward(tokens, start_pos) -> logits, as CudaOps.decoder hands it to a decoding loop:
    one new token per row through the model's FusedDecoder (or PersistentDecoder), one CUDA
    graph per batch size where graphs are on; prompts through model.forward."""

    def __init__(self, model, fused, graphs):
        self.model, self.fused, self.graphs = model, fused, graphs

    def __call__(self, tokens, start_pos):
        tokens = check_tokens(tokens, start_pos, self.model.params)   # (bsz, seqlen) int64, host
        if tokens.shape[1] > 1:
            self.fused.drop_queued()        # the prompt rewrites the cache the queued steps read
            return self.model.forward(tokens, start_pos)
        return self.fused(tokens, start_pos, self.graphs)

    def greedy_steps(self, tokens, start_pos, n=1, then=0):
        """(backs, last): n steps of greedy decoding from tokens (bsz, seqlen) at start_pos,
        each step after the first fed the ids the one before picked. backs (n, 2 bsz) int32 on
        the host, step j's row = each row's argmax of its last logits, then a flag per row,
        1 where one is not finite; last (bsz, vocab) the last step's logits on the GPU, or None
        where steps were queued behind them. One token a row goes through
        FusedDecoder.greedy_steps (the picks inside the CUDA graph, only the ids copied back);
        a prompt's step through model.forward and greedy_pick, and the steps after it through
        FusedDecoder.greedy_steps. then: steps to queue on the GPU behind these, for the next
        call to take (FusedDecoder.greedy_steps); 0 to 16, and they must fit max_seq_len too."""
        tokens = check_tokens(tokens, start_pos, self.model.params)   # (bsz, seqlen) int64
        (bsz, seqlen), max_seq_len = tokens.shape, self.model.params.max_seq_len
        steps = self.fused.MAX_STEPS
        for name, count, least in (("n", n, 1), ("then", then, 0)):
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) \
                    or not least <= count <= steps:
                raise ArgumentError(f"{name}: expected {least} to {steps} steps, got "
                                    f"{shown(count)}")
        first_pos = start_pos + seqlen - 1                      # the first step's position
        if first_pos + n > max_seq_len:
            raise GenerationError(f"n: {n} steps from position {first_pos} do not fit "
                                  f"max_seq_len {max_seq_len}")
        if first_pos + n + then > max_seq_len:
            raise GenerationError(f"then: {then} steps queued behind {n} from position "
                                  f"{first_pos} do not fit max_seq_len {max_seq_len}")
        if seqlen == 1:
            return self.fused.greedy_steps(tokens, start_pos, n, self.graphs, then=then)
        self.fused.drop_queued()
        last = self.model.forward(tokens, start_pos)[:, -1]               # (bsz, vocab)
        first = greedy_pick(last).get()[None]                              # (1, 2 bsz)
        if n == 1:               # (nothing queued: the pick is not where a graph would read it)
            return first, last
        rest, last = self.fused.greedy_steps(first[0, :bsz, None].astype(np.int64),
                                             start_pos + seqlen, n - 1, self.graphs,
                                             then=then)
        return np.concatenate([first, rest]), last


"""The GPU backend: CuPy arrays, and minillama's own CUDA kernels for the heavy operations.

    ops = get_ops("cuda")          # minillama.devices: CudaOps(); DeviceError without CuPy or a GPU
    model = Transformer(params, weights, ops)      # or load_model(path, device="cuda")
    forward = ops.decoder(model)   # model.forward, with one-token steps as one CUDA graph

Four modules, one idea each, each importing only the ones listed before it:

    runtime.py   finding CuPy and the GPU; compiling kernels/*.cu as one module; launching
    kernels.py   the checked entry points sgemm, gemv, bmm, softmax, and qgemv, gemm_v5,
                 to_16bit for weights kept as stored (formats.Packed); their variant tables
    fused.py     FusedDecoder: the one-token forward step in 5 launches per layer (one row of
                 float32 weights: 2, kernels/halves.cu), as a CUDA graph
    persistent.py  PersistentDecoder: FusedDecoder's step as one persistent kernel (float32)
    backend.py   CudaOps: NumpyOps with xp = cupy, the kernels, and decoder(model)

The package builds on minillama.ops (CudaOps is a NumpyOps), never the other way round.
`import minillama.cuda` works without CuPy; CuPy is imported when a GPU is first needed.
"""
from .backend import CudaOps
from .fused import FusedDecoder
from .persistent import PersistentDecoder
from .kernels import bmm, gemm_v5, gemv, qgemv, sgemm, softmax, to_16bit
from .runtime import require_cupy

__all__ = ["CudaOps", "FusedDecoder", "PersistentDecoder", "bmm", "gemm_v5", "gemv", "qgemv", "require_cupy", "sgemm",
           "softmax", "to_16bit"]

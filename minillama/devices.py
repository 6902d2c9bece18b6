"""Device names to backends: 'cpu' is NumpyOps (ops.py), 'cuda' is CudaOps (the cuda package).

This sits above both backends, so neither has to know the other: the cuda package builds on
ops.py, and ops.py imports nothing from it. Importing the cuda package does not import CuPy;
CudaOps() does, and raises DeviceError when CuPy or a GPU is missing.
"""
from .cuda import CudaOps
from .errors import ArgumentError
from .ops import CPU


def get_ops(device="cpu"):
    """The backend for a device name: 'cpu' (or None) or 'cuda'."""
    if device in (None, "cpu"):
        return CPU
    if device == "cuda":
        return CudaOps()
    raise ArgumentError(f"device: expected 'cpu' or 'cuda', got {device!r}")

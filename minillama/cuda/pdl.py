"""Programmatic dependent launch: the next kernel starts while this one finishes.

Between two kernels of a CUDA graph the GPU drains the first grid, then starts the second: a
microsecond or two with the SMs idle, and then the second kernel's first loads still have to
travel. A decode step of Llama-2-7B is ~200 kernels, of stories15M ~40, so the gaps add up
(docs/kernels.md measures them). Hopper lets a kernel be launched with the attribute
"programmatic stream serialization": it may then start before the kernel ahead of it in the
stream has finished. Its blocks take SMs as they free up, issue the work that does not depend
on the previous kernel (a GEMV's first weight loads), and wait at `griddepcontrol.wait`
(reduce.cu's grid_dependency_wait) until the previous grid has completed and its writes are
visible. Recorded into a CUDA graph, the attribute becomes a programmatic edge.

CuPy launches through cuLaunchKernel, which takes no attributes, so this module calls the
driver's cuLaunchKernelEx through ctypes. Only kernels that call grid_dependency_wait before
touching an activation may be launched this way: KernelModule.launch does so inside
`with KERNELS.programmatic():`, which FusedDecoder.run uses, and only on GPUs of compute
capability 9.0 or later (elsewhere the launches are the ordinary ones).
"""
import ctypes
import functools
import os

import numpy as np

# CUlaunchAttributeID (cuda.h)
PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _AttributeValue(ctypes.Union):                   # CUlaunchAttributeValue: 64 bytes
    _fields_ = [("allowed", ctypes.c_int), ("pad", ctypes.c_char * 64)]


class _Attribute(ctypes.Structure):                    # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttributeValue)]


class _Config(ctypes.Structure):                       # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attribute)), ("num_attrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=None)
def _driver():
    """libcuda's cuLaunchKernelEx, or None where the driver lacks it."""
    prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_Config), ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
    try:
        return prototype(("cuLaunchKernelEx", ctypes.CDLL("libcuda.so.1")))
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def supported(device_id):
    """Compute capability 9.0 or later, a driver with cuLaunchKernelEx, and not switched off
    with MINILLAMA_PDL=0 (for measuring what it buys, or to rule it out)."""
    if os.environ.get("MINILLAMA_PDL", "1") == "0":
        return False
    import cupy
    major = cupy.cuda.Device(device_id).compute_capability[:-1] or "0"
    return int(major) >= 9 and _driver() is not None


def _argument(a):
    """A kernel argument as the ctypes value whose address cuLaunchKernelEx reads."""
    if hasattr(a, "data") and hasattr(a.data, "ptr"):          # a CuPy array
        return ctypes.c_void_p(a.data.ptr)
    if isinstance(a, np.int32):
        return ctypes.c_int32(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_int64(int(a))
    if isinstance(a, np.uint64):                               # an address (page-locked memory)
        return ctypes.c_uint64(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    raise TypeError(f"pdl: cannot pass a {type(a).__name__} to a kernel")


def launch(function_ptr, grid, block, args, shared_mem, stream_ptr):
    """cuLaunchKernelEx of the CUfunction `function_ptr` with programmatic stream
    serialization allowed. Raises RuntimeError with the driver's code if the launch fails."""
    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    attr = _Attribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=_AttributeValue(allowed=1))
    config = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                     stream_ptr, ctypes.pointer(attr), 1)
    values = [_argument(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    err = _driver()(ctypes.byref(config), function_ptr, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")

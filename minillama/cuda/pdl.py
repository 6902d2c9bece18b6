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

cuLaunchKernelEx takes one more attribute that the kernels use: the cluster shape, blocks
that Hopper runs at the same time and that read each other's shared memory (reduce.cu's
cluster_split_sum; `clusters` says where the callers may ask for it).
"""
import ctypes
import functools
import os

import numpy as np

# CUlaunchAttributeID (cuda.h)
CLUSTER_DIMENSION = 4
PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _AttributeValue(ctypes.Union):                   # CUlaunchAttributeValue: 64 bytes
    _fields_ = [("allowed", ctypes.c_int), ("dims", ctypes.c_uint * 3),
                ("pad", ctypes.c_char * 64)]


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


def supported(device_id):
    """Compute capability 9.0 or later, a driver with cuLaunchKernelEx, and not switched off
    with MINILLAMA_PDL=0 (for measuring what it buys, or to rule it out)."""
    return _hopper(device_id, "MINILLAMA_PDL")


def clusters(device_id):
    """Whether launches may ask for clusters: as `supported`, switched off with
    MINILLAMA_CLUSTERS=0 (for measuring them)."""
    return _hopper(device_id, "MINILLAMA_CLUSTERS")


@functools.lru_cache(maxsize=None)
def _hopper(device_id, switch):
    if os.environ.get(switch, "1") == "0":
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


def launch(function_ptr, grid, block, args, shared_mem, stream_ptr, programmatic=True,
           cluster=None):
    """cuLaunchKernelEx of the CUfunction `function_ptr`, with programmatic stream
    serialization allowed (programmatic) and in clusters of `cluster` blocks (a tuple of up to
    three sizes that divide the grid's; Hopper's, for reduce.cu's cluster_split_sum; None: no
    clusters). Raises RuntimeError with the driver's code if the launch fails."""
    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    attrs = []
    if programmatic:
        attrs.append(_Attribute(id=PROGRAMMATIC_STREAM_SERIALIZATION,
                                value=_AttributeValue(allowed=1)))
    if cluster:
        dims = (ctypes.c_uint * 3)(*(tuple(cluster) + (1, 1))[:3])
        attrs.append(_Attribute(id=CLUSTER_DIMENSION, value=_AttributeValue(dims=dims)))
    array = (_Attribute * max(len(attrs), 1))(*attrs)
    config = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                     stream_ptr, array, len(attrs))
    values = [_argument(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    err = _driver()(ctypes.byref(config), function_ptr, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")


def max_active_clusters(function_ptr, block, shared_mem, cluster):
    """How many clusters of `cluster` blocks of the CUfunction `function_ptr` (block threads,
    shared_mem bytes of dynamic shared memory) the GPU runs at once
    (cuOccupancyMaxActiveClusters): a cluster takes its blocks' places on SMs of one GPC
    together, so this can be fewer than the blocks an SM times the SMs, over the cluster size."""
    prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                 ctypes.POINTER(_Config))
    query = prototype(("cuOccupancyMaxActiveClusters", ctypes.CDLL("libcuda.so.1")))
    block = (tuple(block) + (1, 1))[:3]
    dims = (ctypes.c_uint * 3)(*(tuple(cluster) + (1, 1))[:3])
    attr = _Attribute(id=CLUSTER_DIMENSION, value=_AttributeValue(dims=dims))
    grid = [d * 64 for d in (tuple(cluster) + (1, 1))[:3]]           # a multiple of the cluster
    config = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                     None, ctypes.pointer(attr), 1)
    count = ctypes.c_int(0)
    err = query(ctypes.byref(count), function_ptr, ctypes.byref(config))
    if err:
        raise RuntimeError(f"cuOccupancyMaxActiveClusters failed with CUresult {err}")
    return count.value

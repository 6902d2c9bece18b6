"""Running CUDA C from Python: find CuPy and a GPU, compile kernels/*.cu, launch kernels by name.

CuPy is imported the first time a GPU is needed (require_cupy), not when this package is, so
`import minillama.cuda` works on a machine without CuPy; using the GPU there raises DeviceError,
saying what to install.

The .cu files are compiled together, as one `cupy.RawModule`, by NVRTC (CUDA's compiler at
run time). A template kernel such as `gemv<ROWS, VEC, PRO, PREFETCH>` is compiled only for the
instantiations named when compiling (kernels.py lists them, from its tables, in groups: those
of float32 models, and those of each storage format), and a launch names one of them:
"gemv<1,true,0,0>". Each group is compiled on the first launch of one of its kernels, once per
process (CuPy does not take a module with template instances from its disk cache), so a float32
model never waits for the kernels of the quantized formats.

The sources come from the kernels/ folder of the checkout this code runs from (installed with
`pip install -e .`, or just on PYTHONPATH), or from the installed package minillama.kernels
after `pip install .`.
"""
import contextlib
import functools
import importlib.resources
from pathlib import Path

import numpy as np

from ..errors import DeviceError
from . import pdl

# in compile order: qgemv.cu, qgemv_k.cu and qgemv_mma.cu use matmul.cu's float16 helpers and
# GEMV prologues (qgemv_mma.cu also qgemv.cu's loads), gemv_batch.cu those prologues and
# qgemv.cu's warp sums, decode.cu matmul.cu's float16 conversions, halves.cu decode.cu's
# attention pieces and matmul.cu's cp.async and silu, persistent.cu matmul.cu's silu; all use
# reduce.cu's reductions
KERNEL_FILES = ("reduce.cu", "matmul.cu", "qgemv.cu", "gemv_batch.cu", "qgemv_k.cu",
                "qgemv_mma.cu", "softmax.cu", "decode.cu", "halves.cu", "persistent.cu")
SHARED_DEFAULT = 48 * 1024  # dynamic shared memory a launch gets without asking for more
# CUfunction_attribute CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (the CUDA driver API)
MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1     # a function's static shared memory

i32 = np.int32              # sizes and indices reach the kernels as 32-bit ints


def cdiv(a, b):
    """Blocks of b needed to cover a: the grid size for a things, b per block."""
    return -(-a // b)


# ----------------------------------------------------------------------------
# finding CuPy, the GPU and the kernel sources

@functools.lru_cache(maxsize=None)
def require_cupy():
    """The cupy module, once a GPU has been seen; otherwise a DeviceError saying what to do."""
    try:
        import cupy
    except ImportError:
        raise DeviceError("device 'cuda' needs CuPy: pip install 'minillama[cuda12]' "
                          "(or 'minillama[cuda13]' for CUDA 13), or use --device cpu") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:               # CUDARuntimeError: no driver, or no device
        raise DeviceError(f"device 'cuda': CuPy is installed but finds no usable NVIDIA GPU "
                          f"({e}); use --device cpu") from None
    if count == 0:
        raise DeviceError("device 'cuda': CuPy is installed but finds no NVIDIA GPU; "
                          "use --device cpu")
    return cupy


def kernel_dir():
    """The kernels/ folder beside minillama/ when this code runs from a checkout, so that a
    checkout on PYTHONPATH compiles its own sources even where another one is pip-installed
    (-e); else the installed package minillama.kernels (pip install .)."""
    beside = Path(__file__).resolve().parents[2] / "kernels"
    if all((beside / name).is_file() for name in KERNEL_FILES):
        return beside
    return importlib.resources.files("minillama.kernels")


def kernel_source():
    """The text of kernels/*.cu, in compile order. #line keeps compiler messages pointing at
    the right file and line."""
    root = kernel_dir()
    return "\n".join(f'#line 1 "{name}"\n' + root.joinpath(name).read_text(encoding="utf-8")
                     for name in KERNEL_FILES)


def sm_count():
    """Streaming multiprocessors of the current GPU (asked once per device: CuPy's
    Device.attributes queries every attribute, tens of microseconds)."""
    return _sm_count(require_cupy().cuda.Device().id)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    return require_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"]


# ----------------------------------------------------------------------------
# compiling and launching

class KernelModule:
    """kernels/*.cu compiled for groups of template instantiations, {group: names} (e.g.
    "gemv<1,true,0,0>"; NVRTC compiles only those named). Each group is a module of its own,
    compiled on the first launch of one of its kernels, once per process: CuPy compiles a
    module with template instances again in every process (it recompiles to learn NVRTC's
    names for them), so a model pays only for the groups it uses. The kernels that are not
    templates are in every module; they are taken from the first group's. It counts the
    launches made through it, in all groups."""

    def __init__(self, groups, archs=None):
        self.groups = {group: tuple(names) for group, names in groups.items()}
        self.archs = dict(archs or {})  # group -> the architecture it needs (e.g. "sm_90a")
        self.templates = tuple(name for names in self.groups.values() for name in names)
        self._group = {name: group for group, names in self.groups.items() for name in names}
        self.launches = 0       # kernels launched so far; CuPy's own array operations (such
        self._functions = {}    # as the model's elementwise math) are not counted
        self._modules = {}      # group -> its compiled module
        self._shared = {}       # name -> dynamic shared memory granted beyond the default
        self._static = {}       # name -> its static shared memory (__shared__ arrays)
        self._programmatic = False      # inside programmatic(): launch with pdl.launch

    @contextlib.contextmanager
    def programmatic(self):
        """Launches inside this block may overlap the kernel before them (pdl.py), on GPUs
        that allow it. Only for kernels that call grid_dependency_wait (reduce.cu) before
        they read an activation or write anything: the decode step's."""
        before, self._programmatic = self._programmatic, True
        try:
            yield
        finally:
            self._programmatic = before

    def module(self, group):
        """The compiled module of `group`, compiled now if it is not yet."""
        if group not in self._modules:
            cupy = require_cupy()
            if group in self.archs:
                self._modules[group] = ArchModule(self.groups[group], self.archs[group])
                return self._modules[group]
            try:
                self._modules[group] = cupy.RawModule(code=kernel_source(),
                                                      name_expressions=self.groups[group])
            except cupy.cuda.compiler.CompileException as e:
                raise DeviceError(f"kernels/*.cu failed to compile: {e}") from None
        return self._modules[group]

    def use(self, module):
        """Launch every group's kernels from `module` instead of compiling (one module holding
        all the instances, e.g. kernels/dev/nvrtc_build.py's cubin as the dev harness loads it;
        its get_function takes the names of `templates`). The groups of another architecture
        (`archs`) are left to compile on their own."""
        self._modules = dict.fromkeys((g for g in self.groups if g not in self.archs), module)
        self._functions = {}
        self._shared = {}       # an attribute of each function: module's are granted anew

    def launch(self, name, grid, block, args, shared_mem=0, ordinary=False):
        """Launch kernel `name` on the current stream: grid and block are tuples of up to three
        sizes, args the kernel's parameters in order (arrays, and numpy scalars of its types).
        shared_mem: bytes of dynamic shared memory; over 48 KiB the kernel is first allowed
        that much (an attribute of the function, set outside any CUDA graph capture as long as
        the first launch of each size runs eagerly, as FusedDecoder's does). ordinary: the
        ordinary way even inside programmatic(), so that it starts only once all before it
        has ended."""
        if name not in self._functions:          # looking a function up costs a driver call
            if "<" in name and name not in self._group:
                # a template instance exists only where a group names it (compiled on its
                # first launch): a setting outside the compiled ones (e.g. a patched QGEMV_V4)
                raise DeviceError(f"kernel {name[:120]!r} is not among minillama's compiled "
                                  f"template instances (kernels._templates' groups)")
            group = self._group.get(name, next(iter(self.groups)))
            self._functions[name] = self.module(group).get_function(name)
            self._static[name] = _static_shared(self._functions[name])
        function = self._functions[name]
        # the 48 KiB hold static and dynamic together (qgemv's RMSNorm scratch: 128 bytes)
        if shared_mem > max(SHARED_DEFAULT - self._static[name], self._shared.get(name, 0)):
            # only ever raised: lowering it for a smaller launch would fail a later larger one.
            # (What RawKernel's max_dynamic_shared_size_bytes setter does, as a call.)
            require_cupy().cuda.driver.funcSetAttribute(
                function.kernel.ptr, MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem)
            self._shared[name] = shared_mem
        self.launches += 1
        if self._programmatic and not ordinary and pdl.supported(require_cupy().cuda.Device().id):
            pdl.launch(function.kernel.ptr, grid, block, args, shared_mem,
                       require_cupy().cuda.get_current_stream().ptr)
        else:
            function(grid, block, args, shared_mem=shared_mem)


class ArchModule:
    """A group compiled for an architecture of its own (e.g. "sm_90a", whose wgmma the generic
    "sm_90" that CuPy compiles for does not have; CuPy's RawModule adds its own -arch, which
    NVRTC refuses twice), by NVRTC through CuPy's bindings. get_function(name) as RawModule's."""

    def __init__(self, names, arch):
        cupy = require_cupy()
        cc, needs = cupy.cuda.Device().compute_capability, arch[3:].rstrip("a")   # "90", "90"
        if needs != cc:                                         # sm_90a runs on 9.0 only
            raise DeviceError(f"kernels {', '.join(names)[:120]} need a GPU of compute "
                              f"capability {_dotted(needs)}; this one is {_dotted(cc)}")
        from cupy_backends.cuda.libs import nvrtc
        prog = nvrtc.createProgram(kernel_source(), "kernels.cu", (), ())
        try:
            for name in names:
                nvrtc.addNameExpression(prog, name)
            try:
                nvrtc.compileProgram(prog, ("-ftz=true", f"-arch={arch}"))
            except nvrtc.NVRTCError:
                raise DeviceError(f"kernels/*.cu failed to compile for {arch}: "
                                  f"{nvrtc.getProgramLog(prog)[:2000]}") from None
            self._lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
            self._module = cupy.cuda.function.Module()
            self._module.load(nvrtc.getCUBIN(prog))
        finally:
            nvrtc.destroyProgram(prog)

    def get_function(self, name):
        return _Launchable(self._module.get_function(self._lowered[name]))


def _dotted(capability):
    """A compute capability as CuPy writes it ("90", "120") as NVIDIA does ("9.0", "12.0")."""
    return f"{capability[:-1]}.{capability[-1]}"


class _Launchable:
    """A cupy.cuda.function.Function as KernelModule.launch calls RawModule's kernels:
    .kernel (the function, for its attributes) and a call (grid, block, args, shared_mem)."""

    def __init__(self, function):
        self.kernel = function

    def __call__(self, grid, block, args, shared_mem=0):
        self.kernel(grid, block, args, shared_mem=shared_mem)


def _static_shared(function):
    """Bytes of static shared memory (__shared__ arrays) of a CuPy kernel function."""
    return require_cupy().cuda.driver.funcGetAttribute(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                                                        function.kernel.ptr)

"""Compile kernels/*.cu as one module with NVRTC through ctypes, with no GPU and no CuPy.

    python kernels/dev/nvrtc_build.py [--out DIR] [--std c++17] [--ptxas-v]

What minillama compiles, all its groups as one module (minillama.cuda: the source
runtime.kernel_source() and every template instance of kernels.py, KERNELS.templates), for
sm_90 (--arch; a group that needs another, gemm_v7's sm_90a, only with that one), by the
NVRTC library named by $NVRTC_LIB or found next to a pip-installed nvidia-cuda-nvrtc. Compiler errors print with file and line. With --out, writes module.cubin
and names.json (template name -> mangled name), which check_formats.py --cubin loads instead
of compiling again on the GPU machine. --ptxas-v prints registers, shared memory and spills
per kernel.
"""
import argparse
import ctypes
import glob
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from minillama.cuda.kernels import KERNELS          # noqa: E402  (imports no CuPy)
from minillama.cuda.runtime import kernel_source    # noqa: E402


def find_cuda_file(env, tool, folder, pattern):
    """$env, else the newest `pattern` in `folder` of a pip-installed nvidia-cuda-`tool` on
    sys.path (nvidia/cu1*/ in CUDA 13's wheels, nvidia/cuda_`tool`/ in CUDA 12's)."""
    if os.environ.get(env):
        return os.environ[env]
    for root in sys.path + ["/tmp/cu13"]:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "cu1*", folder, pattern)))
        hits += sorted(glob.glob(os.path.join(root, "nvidia", f"cuda_{tool}", folder, pattern)))
        hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
        if hits:
            return hits[-1]
    sys.exit(f"no {tool} found: pip install nvidia-cuda-{tool}, or set {env}")


def find_nvrtc():
    return find_cuda_file("NVRTC_LIB", "nvrtc", "lib", "libnvrtc.so.*")


def compile_module(source, names, options):
    lib = ctypes.CDLL(find_nvrtc())
    prog = ctypes.c_void_p()

    def check(status, what):
        if status != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None,
                                 None), "nvrtcCreateProgram")
    for name in names:
        check(lib.nvrtcAddNameExpression(prog, name.encode()), f"name {name}")
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if status != 0:
        print(log.value.decode(errors="replace"))
        raise SystemExit("compilation failed")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    lowered = {}
    for name in names:
        out = ctypes.c_char_p()
        check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)), f"lowered {name}")
        lowered[name] = out.value.decode()
    return cubin.raw, lowered, log.value.decode(errors="replace")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--std", default="c++17")
    ap.add_argument("--ptxas-v", action="store_true")
    ap.add_argument("--only", help="compile only the template instances containing this text")
    args = ap.parse_args()
    options = [f"-arch={args.arch}", f"-std={args.std}"]
    if args.ptxas_v:
        options.append("-Xptxas=-v")
    # a group that needs its own architecture (KERNELS.archs: gemm_v7's sm_90a) only with it
    other_arch = {n for g, names in KERNELS.groups.items() if KERNELS.archs.get(g, args.arch)
                  != args.arch for n in names}
    names = [n for n in KERNELS.templates
             if (not args.only or args.only in n) and n not in other_arch]
    t = time.perf_counter()
    cubin, lowered, log = compile_module(kernel_source(), names, options)
    print(f"compiled {len(names)} template instances in {time.perf_counter() - t:.1f} s, "
          f"{len(cubin)} bytes of cubin")
    if log.strip():
        print(log)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "module.cubin").write_bytes(cubin)
        (args.out / "names.json").write_text(json.dumps(lowered, indent=1))


if __name__ == "__main__":
    main()

"""Which global loads of each kernel come before its grid_dependency_wait, in the SASS.

    python kernels/dev/wait_order.py [--only attention_decode]

A development tool (no GPU): it compiles what minillama compiles, as nvrtc_build.py does (sm_90),
disassembles the cubin with nvdisasm ($NVDISASM, or next to a pip-installed
nvidia-cuda-nvdisasm) and prints, for each kernel that waits (griddepcontrol.wait, ACQBULK in
SASS), the loads the SASS issues before the wait and after it, in order: L an ordinary load,
R a read-only one (ld.global.nc: __ldg, or a `const __restrict__` pointer), 4 or 8 for 16- and
8-byte loads, WAIT the wait.

Why: a load that the source places before the wait is there to overlap the previous kernel's
end, and one after it may read what that kernel wrote. ptxas keeps ordinary loads on their side
of the wait but moves read-only ones across it, both ways: attention_decode's first chunk of
cached keys went after the wait, and in one version some of its qkv loads before it
(kernels/decode.cu, "Every global load of attention_decode").
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nvrtc_build                                  # noqa: E402  (puts the checkout on sys.path)
from minillama.cuda.kernels import KERNELS          # noqa: E402
from minillama.cuda.runtime import kernel_source    # noqa: E402


def load_orders(sass):
    """{kernel: 'L4 L4 R WAIT L ...'} for the kernels whose SASS holds an ACQBULK."""
    orders, name = {}, None
    for line in sass.splitlines():
        start = re.match(r"\s*\.text\.(\S+):", line)
        if start:
            name = start.group(1)
            orders[name] = []
        elif name and "ACQBULK" in line:
            orders[name].append("WAIT")
        elif name and re.search(r"\bLDG\.", line):
            op = re.search(r"\bLDG[.\w]*", line).group()         # e.g. LDG.E.128.CONSTANT
            size = "4" if ".128" in op else "8" if ".64" in op else ""
            orders[name].append(("R" if ".CONSTANT" in op else "L") + size)
    return {k: " ".join(v) for k, v in orders.items() if "WAIT" in v}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="only the template instances containing this text")
    args = ap.parse_args()
    names = [n for n in KERNELS.templates if not args.only or args.only in n]
    cubin, _, _ = nvrtc_build.compile_module(kernel_source(), names, ["-arch=sm_90", "-std=c++17"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        nvdisasm = nvrtc_build.find_cuda_file("NVDISASM", "nvdisasm", "bin", "nvdisasm")
        sass = subprocess.run([nvdisasm, "-c", f.name], check=True, capture_output=True,
                              text=True).stdout
    for name, order in load_orders(sass).items():
        print(f"{name}\n    {order}")


if __name__ == "__main__":
    main()

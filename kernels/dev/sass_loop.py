"""Count the SASS instructions of a kernel's inner loop, by kind, per 512 bytes of weights a warp loads.

    python kernels/dev/sass_loop.py ["qgemv_mma<MmaQ8_0,1,0,2,1,16>" ...] [--variants] [--sass FILE]

A development tool (no GPU): it compiles what minillama compiles (with --variants, also
kernels/dev/variants.cu and its instances, as bench_variants.py names them), for sm_90 with
NVRTC, disassembles the cubin with nvdisasm (-hex, so the control bits come too) and, for each
template instance named, finds its inner loop: of the backward branches, the one whose range
holds the most products (the tensor cores' HMMA and IMMA, or the one-row kernels' dp4a, IDP),
the shortest among equals. For that range it prints

    the instructions by kind, and per 512 bytes of codes the warp loads (one LDG.128 a lane;
    the loads of 4, 8 and 16 bytes a lane are counted, the 2-byte scale loads are not);
    the stall cycles the compiler wrote into the control bits (the cycles before the next
    instruction may issue: fixed latencies and pipe throughput), summed: a warp's issue time
    for one pass of the loop when no scoreboard wait holds it;
    how many instructions wait on a scoreboard (variable latency: LDG, LDS, SHFL, ...).

Why: a kernel that reads the weights once is bound either by the bytes (the copy bandwidth),
by the instructions issued per byte (an H200 issues ~1.05e12 warp-instructions a second
against 4.2e12 bytes: ~4 bytes per warp-instruction, ~127 per LDG.128 of 512 bytes), or by the
latency the loads in flight cannot cover. The counts say which, with no GPU (docs/kernels.md,
"What bounds qgemv_mma at 8 rows: the SASS").

The loop is a static range: its branches that skip code (the last pass's prefetch, a break
past the slice's end) are counted as if they fall through, as they do in the steady state.
"""
import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nvrtc_build                                  # noqa: E402  (puts the checkout on sys.path)
from minillama.cuda.kernels import KERNELS, _qgemv_mma_name      # noqa: E402
from minillama.cuda.runtime import kernel_source    # noqa: E402

# kinds, in the order printed: (name, opcodes; a prefix matches)
KINDS = [
    ("LDG.128", ()), ("LDG other", ("LDG",)), ("LDS", ("LDS",)), ("STS", ("STS",)),
    ("SHFL", ("SHFL",)), ("HMMA/IMMA", ("HMMA", "IMMA")), ("IDP (dp4a)", ("IDP",)),
    ("SEL", ("SEL",)),
    ("unpack: PRMT LOP3 SHF HADD2 HFMA2", ("PRMT", "LOP3", "SHF", "HADD2", "HFMA2", "HSUB2")),
    ("conversions: I2F I2FP F2F", ("I2F", "I2FP", "F2F", "F2FP", "F2I")),
    ("FFMA FMUL FADD", ("FFMA", "FMUL", "FADD")),
    ("moves: MOV IMAD.MOV CS2R", ("MOV", "CS2R", "UMOV")),
    ("integer, address: IMAD IADD3 LEA ISETP ...", ("IMAD", "IADD3", "LEA", "ISETP", "VIADD",
                                                    "IABS", "IMNMX", "VIMNMX", "PLOP3", "P2R",
                                                    "R2P", "VIADDMNMX", "SGXT", "BMSK")),
    ("local memory (spills): LDL STL", ("LDL", "STL")),
    ("branches: BRA", ("BRA", "BSSY", "BSYNC", "WARPSYNC")),
]

PRODUCTS = ("HMMA", "IMMA", "IDP")          # what an inner loop is made of

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);"
                  r".*/\*\s*0x([0-9a-f]{16})\s*\*/")
CTRL = re.compile(r"^\s*/\*\s*0x([0-9a-f]{16})\s*\*/\s*$")
LABEL = re.compile(r"^(\.L_x_\d+):")


def kind_of(op):
    if op.startswith("LDG") and ".128" in op:
        return "LDG.128"
    if op.startswith("IMAD.MOV"):
        return "moves: MOV IMAD.MOV CS2R"
    for name, prefixes in KINDS:
        if any(op == p or op.startswith(p + ".") or op.startswith(p) and p in ("LDG", "LDS")
               for p in prefixes):
            return name
    return "other: " + op.split(".")[0]


def parse(sass):
    """{kernel: [(address, opcode, operands, control bits)], labels {label: index}}."""
    kernels, name, pending = {}, None, None
    for line in sass.splitlines():
        start = re.match(r"\s*\.text\.(\S+):", line)
        if start:
            name = start.group(1)
            kernels[name] = ([], {})
            continue
        if name is None:
            continue
        insts, labels = kernels[name]
        lab = LABEL.match(line)
        if lab:
            labels[lab.group(1)] = len(insts)
            continue
        m = LINE.search(line)
        if m:
            pending = (int(m.group(1), 16), m.group(2), m.group(3).strip())
            continue
        c = CTRL.match(line)
        if c and pending:
            hi = int(c.group(1), 16)
            insts.append(pending + ((hi >> 41) & 0x1FFFFF,))
            pending = None
    return kernels


def inner_loop(insts, labels):
    """(first, last) instruction indices of the backward branch range with the most products."""
    best = None
    for i, (_, op, args, _) in enumerate(insts):
        target = re.search(r"\(?(\.L_x_\d+)\)?", args) if op.startswith("BRA") else None
        if not target or target.group(1) not in labels or labels[target.group(1)] > i:
            continue
        first = labels[target.group(1)]
        products = sum(op2.startswith(PRODUCTS) for _, op2, _, _ in insts[first:i + 1])
        key = (products, -(i - first))
        if best is None or key > best[0]:
            best = (key, first, i)
    return None if best is None else (best[1], best[2])


def all_loops(template, insts, labels):
    """One line per backward branch: its range, instructions, and the kinds that matter for
    where a block spends its time outside the inner loop (loads, barriers, shuffles)."""
    print(f"{template}: {len(insts)} instructions, {sum(op.startswith('BAR') for _, op, _, _ in insts)} "
          f"BAR in all; its loops (backward branches):")
    for i, (_, op, args, _) in enumerate(insts):
        target = re.search(r"(\.L_x_\d+)", args) if op.startswith("BRA") else None
        if not target or target.group(1) not in labels or labels[target.group(1)] > i:
            continue
        body = insts[labels[target.group(1)]:i + 1]
        kinds = collections.Counter(op2.split(".")[0] for _, op2, _, _ in body)
        wide = sum(op2.startswith("LDG") and ".128" in op2 for _, op2, _, _ in body)
        print(f"    {body[0][0]:#06x}..{body[-1][0]:#06x} {len(body):5d} instructions: "
              f"LDG {kinds['LDG']} ({wide} of 16 bytes), LDS {kinds['LDS']}, STS {kinds['STS']}, "
              f"BAR {kinds['BAR']}, SHFL {kinds['SHFL']}, "
              f"products {sum(kinds[k] for k in PRODUCTS)}")


def code_bytes(insts):
    """Bytes a warp's LDG of 4, 8 or 16 bytes a lane load in these instructions (the codes;
    the 2-byte scale loads are left out)."""
    total = 0
    for _, op, _, _ in insts:
        if op.startswith("LDG") and not re.search(r"\.(U|S)(8|16)\b", op):
            total += 32 * (16 if ".128" in op else 8 if ".64" in op else 4)
    return total


def count(insts):
    kinds = collections.Counter(kind_of(op) for _, op, _, _ in insts)
    stall = sum(c & 0xF for *_, c in insts)
    waits = sum(1 for *_, c in insts if (c >> 11) & 0x3F)
    return kinds, stall, waits


def report(template, insts, labels):
    loop = inner_loop(insts, labels)
    if loop is None:
        print(f"{template}: no loop with a backward branch")
        return
    body = insts[loop[0]:loop[1] + 1]
    kinds, stall, waits = count(body)
    units = code_bytes(body) / 512
    per = (lambda n: f"{n / units:6.1f}") if units else (lambda n: "     -")
    print(f"{template}: inner loop {body[0][0]:#06x}..{body[-1][0]:#06x}, {len(body)} "
          f"instructions, {code_bytes(body)} bytes of codes a warp loads (right column: per 512 "
          f"of them, one LDG.128 a lane)")
    names = [n for n, _ in KINDS] + sorted(k for k in kinds if k.startswith("other"))
    for name in names:
        if kinds.get(name):
            print(f"    {name:44s} {kinds[name]:5d} {per(kinds[name])}")
    print(f"    {'all':44s} {len(body):5d} {per(len(body))}")
    print(f"    {'stall cycles (control bits), summed':44s} {stall:5d} {per(stall)}")
    print(f"    {'instructions waiting on a scoreboard':44s} {waits:5d} {per(waits)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="template instances, exact (default: qgemv_mma's "
                                             "q8_0 and q4_0 instances without a prologue)",
                    default=[_qgemv_mma_name(f, nr, 0) for f in ("q8_0", "q4_0")
                             for nr in (1, 2)])
    ap.add_argument("--variants", action="store_true",
                    help="compile kernels/dev/variants.cu too, with its instances")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--loops", action="store_true", help="list every loop of each instance too")
    ap.add_argument("--sass", type=Path, help="also write the disassembly here")
    args = ap.parse_args()
    names = args.names
    source = kernel_source()
    if args.variants:
        source += '\n#line 1 "dev/variants.cu"\n' + (HERE / "variants.cu").read_text()
    else:
        unknown = [n for n in names if n not in KERNELS.templates]
        if unknown:
            sys.exit(f"{unknown} are not instances minillama compiles (--variants?)")
    cubin, lowered, log = nvrtc_build.compile_module(
        source, names, [f"-arch={args.arch}", "-std=c++17", "-Xptxas=-v"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        nvdisasm = nvrtc_build.find_cuda_file("NVDISASM", "nvdisasm", "bin", "nvdisasm")
        sass = subprocess.run([nvdisasm, "-c", "-hex", f.name], check=True,
                              capture_output=True, text=True).stdout
    if args.sass:
        args.sass.write_text(sass)
    kernels = parse(sass)
    for name in names:
        regs = re.search(rf"Compiling entry function '{re.escape(lowered[name])}'.*?"
                         r"(\d+) bytes spill stores.*?Used (\d+) registers", log, re.S)
        if regs:
            print(f"{name}: {regs.group(2)} registers, {regs.group(1)} bytes spilled")
        report(name, *kernels[lowered[name]])
        if args.loops:
            all_loops(name, *kernels[lowered[name]])


if __name__ == "__main__":
    main()

"""python -m minillama.bench cpu|gpu [options]"""
import importlib
import sys

TARGETS = ("cpu", "gpu")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TARGETS:
        print(f"usage: python -m minillama.bench {{{'|'.join(TARGETS)}}} [options]", file=sys.stderr)
        return 2
    # imported lazily: the gpu benchmark needs CuPy, the cpu one needs torch for its baseline
    return importlib.import_module(f"minillama.bench.{argv[0]}").main(argv[1:])


sys.exit(main())

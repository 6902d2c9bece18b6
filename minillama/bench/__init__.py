"""Benchmarks: `python -m minillama.bench cpu` and `python -m minillama.bench gpu`.

Each prints one table of figures measured side by side in one run (ratios, not timed tests).
"""
import argparse

from ..errors import shown


def subset_of(known, what):
    """An argparse type for a comma-separated choice among `known` (the bench commands' model
    shapes, storage formats): the chosen names in known's order; an unknown name, or none,
    is refused naming it and the choices (argparse then exits with status 2)."""
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{shown(unknown[0]) if unknown else 'nothing'} is not {what} (one or more of "
                f"{', '.join(known)})")
        return tuple(name for name in known if name in names)
    return parse

"""Benchmarks: `python -m minillama.bench cpu` and `python -m minillama.bench gpu`.

Each prints one table of figures measured side by side in one run (ratios, not timed tests).
"""

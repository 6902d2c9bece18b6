"""The float64 PyTorch reference lives in the package (the CPU benchmark runs it too)."""
from minillama.bench.torch_reference import *  # noqa: F401,F403
from minillama.bench.torch_reference import Reference, freqs_cis, rms_norm, rope, swiglu, t64  # noqa: F401

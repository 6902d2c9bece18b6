"""CUDA C sources for minillama's GPU kernels, compiled at run time with cupy.RawModule."""

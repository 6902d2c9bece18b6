"""Tensor parallelism on GPUs (issue 14): a 13B-shaped model in float16, batch-1 decode on one
GPU and on two, greedy tokens compared, and the NCCL version.

    python -m minillama.bench.tp [--gpus 2] [--shape 13B] [--layers 40] [--steps 64] [--dtype float16]
    python -m minillama.bench.tp --gpus 4 --shape 70B --dtype int8      # issue 14's 70B run

Llama-2-13B's shape (dim 5120, hidden 13824, 40 layers, 40 heads, vocab 32000), or with
--shape 70B Llama-2-70B's (dim 8192, hidden 28672, 80 layers, 64 heads, 8 KV heads: about 70 GB
in int8, which one H200 still holds, so the one-GPU figure is measured too), random weights
made on the GPU in their storage format as bench/gpu7b.py makes them, but each from a seed of
its own name (SeededGpuWeights), so the one-GPU model in this process and every worker's slices
come from the same numbers. Both are timed the way a generation loop runs: one token per
forward call, the logits back on the host, greedy; the first pass warms up (kernels compiled,
CUDA graphs captured), the second is timed. One GPU is the plain path (Transformer on CudaOps,
FusedDecoder's CUDA graph); N GPUs are this process as rank 0 on GPU 0 and N - 1 worker
processes (parallel/workers.py), each rank running its slices through ShardedFusedDecoder's
graph with NCCL's all-reduces inside.
"""
import argparse
import gc
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..cuda import CudaOps, require_cupy
from ..dtypes import role
from ..loading import Checkpoint
from ..model import ModelArgs, Transformer, weight_shapes
from ..ops import to_host
from ..parallel.comm import nccl_version
from ..parallel.loading import open_shard
from ..parallel.model import ShardedTransformer
from ..parallel.workers import TensorParallel
from .gpu7b import random_linear

SHAPE_13B = dict(dim=5120, hidden_dim=13824, n_layers=40, n_heads=40, vocab_size=32000)
SHAPES = {"13B": SHAPE_13B,         # Meta's params.json of Llama-2-13B and -70B
          "70B": dict(dim=8192, hidden_dim=28672, n_layers=80, n_heads=64, n_kv_heads=8,
                      vocab_size=32000)}
TARGET = 1.5                # issue 14: 2 GPUs at least 1.5x one GPU's decode tokens/s


class SeededGpuWeights(Mapping):
    """Random weights under Meta's names, made on the GPU when asked for (gpu7b's
    random_linear), each from a seed of its own name: every process makes the same ones."""

    def __init__(self, p, dtype, seed=0):
        self.shapes, self.dtype, self.seed = weight_shapes(p), dtype, seed

    def __getitem__(self, name):
        cp = require_cupy()
        cp.random.seed((zlib.crc32(name.encode()) + self.seed) % 2**32)
        shape = self.shapes[name]
        if len(shape) == 1:
            return 1.0 + 0.1 * cp.random.standard_normal(shape, dtype=cp.float32)
        return random_linear(*shape, "float32" if role(name) == "embedding" else self.dtype)

    def __contains__(self, name):
        return name in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


@dataclass
class RandomJob:
    """What each rank loads: its slices of SeededGpuWeights (parallel/workers.py's job)."""
    params: ModelArgs
    dtype: str

    def open(self, rank, world, ops, comm):
        ckpt = Checkpoint(self.params, SeededGpuWeights(self.params, self.dtype), "random",
                          "random")
        args, weights, _ = open_shard(ckpt, rank, world, device="cuda")
        return ShardedTransformer(args, weights, ops, comm)


def params_13b(n_layers=40, max_seq_len=256):
    return params_of("13B", n_layers, max_seq_len)


def params_of(shape, n_layers=None, max_seq_len=256):
    """ModelArgs of a SHAPES entry at batch 1; n_layers: the shape's own when None."""
    dims = SHAPES[shape]
    return ModelArgs(**{**dims, "n_layers": n_layers or dims["n_layers"]},
                     max_seq_len=max_seq_len, max_batch_size=1)


def greedy_tokens(forward, steps, first=1):
    """Greedy ids from a one-token prompt, one forward per token, logits through the host."""
    ids = [first]
    for pos in range(steps):
        logits = to_host(forward(np.array([[ids[-1]]]), pos))
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[1:]


def decode_rate(forward, steps):
    """(tokens/s of the second pass, its tokens); the first pass warms up."""
    greedy_tokens(forward, steps)
    start = time.perf_counter()
    tokens = greedy_tokens(forward, steps)
    return steps / (time.perf_counter() - start), tokens


def one_gpu(p, dtype, steps):
    cp = require_cupy()
    ops = CudaOps()
    model = Transformer(p, SeededGpuWeights(p, dtype), ops)
    rate, tokens = decode_rate(ops.decoder(model), steps)
    del model, ops
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()       # rank 0, here, needs GPU 0 next
    return rate, tokens


def n_gpus(p, dtype, steps, world):
    with TensorParallel(p, RandomJob(p, dtype), world) as tp:
        return decode_rate(tp.forward, steps)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillama.bench.tp", description=__doc__)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--shape", default="13B", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's (default: all)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16",
                                                                "int8", "q4_0"])
    args = parser.parse_args(argv)
    cp = require_cupy()
    p = params_of(args.shape, args.layers, max_seq_len=max(256, args.steps + 1))
    print(f"NCCL {nccl_version() or 'not found'}; {cp.cuda.runtime.getDeviceCount()} GPUs: "
          f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{args.shape} shape ({p.n_layers} layers), {args.dtype}, batch 1, {args.steps} decode "
          f"steps")
    one, want = one_gpu(p, args.dtype, args.steps)
    print(f"  1 GPU   {one:8.1f} tokens/s")
    many, got = n_gpus(p, args.dtype, args.steps, args.gpus)
    print(f"  {args.gpus} GPUs  {many:8.1f} tokens/s   {many / one:.2f}x one GPU "
          f"(target >= {TARGET}x: {'met' if many / one >= TARGET else 'MISSED'})")
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    print(f"  greedy tokens equal to one GPU's: {len(want) - len(differ)} of {len(want)}"
          + (f" (first difference at step {differ[0]})" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A rank's model from a checkpoint: only its slices read, its memory planned first.

    open_shard(ckpt, rank, world, ...)  -> (RankArgs, the rank's weights as stored, MemoryPlan)
    load_shard(ckpt, rank, world, ops, comm, ...) -> ShardedTransformer
    plan_rank(p, args, weights, ...)    -> the MemoryPlan of one GPU

A Meta checkpoint saved with as many shards as ranks is read shard k on rank k: Meta cut it
exactly as slicing.py does, so nothing is merged. Any other file (or a Meta checkpoint with
another shard count) is opened as loading.read_checkpoint opens it, its weights still
LazyTensors, and each is cut (slicing.shard_weights) as it is read: a rank keeps only its
slice. Where the reader maps its file (.safetensors, GGUF, .pth: LazyTensor.raw) the slice
reads only its own bytes from disk; otherwise (a llama2.c file, a merged Meta weight, an
unpermuted Hugging Face wq) the whole tensor is read once and the slice kept.
"""
import os
from dataclasses import replace

from ..checkpoints.meta import read_shard, shard_paths
from ..dtypes import check_dtype, role, source_format, storage_name, storage_plan, stored_nbytes
from ..dtypes import WEIGHT_DTYPES, store_weights
from ..errors import ArgumentError
from ..loading import read_checkpoint
from ..memory import (CUDA_RESERVE, F32, MemoryPlan, fmt_bytes, free_memory, kv_cache_bytes,
                      working_bytes)
from .model import ShardedTransformer
from .slicing import check_world, shard_args, shard_weights, split_axis


def open_shard(ckpt, rank, world, dtype=None, device="cpu", budget=None, kv_dtype="float32",
               prompt_len=None):
    """Rank `rank`'s sizes, weights (stored per dtypes.store_weights) and memory plan.
    ckpt: a loading.Checkpoint from read_checkpoint (weights still on disk), or one whose
    weights are a mapping made on the fly (bench/tp.py's random GPU weights). With a device,
    the plan must fit its free memory before any weight is read (OutOfMemoryError)."""
    args, weights = shard_checkpoint(ckpt, rank, world)
    plan = plan_rank(ckpt.params, args, weights, dtype, device, budget, kv_dtype, prompt_len)
    if device is not None:
        plan.check()
    return args, store_weights(weights, dtype), plan


def shard_checkpoint(ckpt, rank, world):
    """(RankArgs, the rank's weights, still as lazy as the checkpoint's): nothing is read."""
    args = shard_args(ckpt.params, rank, world)
    return args, meta_shard(ckpt, rank, world) or shard_weights(ckpt.weights, ckpt.params,
                                                                rank, world)


def load_shard(path, rank, world, ops, comm, max_seq_len=None, max_batch_size=1, dtype=None,
               kv_dtype="float32", budget=None, prompt_len=None):
    """The ShardedTransformer of rank `rank` for the checkpoint at `path` on backend `ops`."""
    ckpt = read_checkpoint(path, max_seq_len, max_batch_size)
    args, weights, _ = open_shard(ckpt, rank, world, dtype, ops.name, budget, kv_dtype,
                                  prompt_len)
    return ShardedTransformer(args, weights, ops, comm, kv_dtype)


def meta_shard(ckpt, rank, world):
    """Shard `rank` of a Meta checkpoint saved for `world` ranks, as read from its own file;
    None for any other checkpoint, or when the file's slices are not the ones slicing.py cuts
    (then the merged weights are sliced instead)."""
    if ckpt.fmt != "meta" or world == 1:
        return None
    paths = shard_paths(os.fspath(ckpt.path))
    if len(paths) != world:
        return None
    weights = read_shard(paths[rank])
    for name, w in ckpt.weights.items():
        expected = list(w.shape)
        axis = split_axis(name)
        if axis is not None:
            expected[axis] //= world
        if name not in weights or list(weights[name].shape) != expected:
            return None
    return {name: weights[name] for name in ckpt.weights}


# ----------------------------------------------------------------------------
# the memory plan of one GPU

def plan_rank(p, args, weights, dtype, device="cuda", budget=None, kv_dtype="float32",
              prompt_len=None, options=True):
    """The MemoryPlan of rank args.rank: its slices as stored (the embedding as the float32
    table it gathers from), 1/N of the KV cache, and the working buffers of the whole model
    (an upper bound: the activations between collectives are as wide as the residual stream).
    Checked against the free memory of the rank's own device (budget, else measured); when it
    does not fit, options lists what would (unless options=False)."""
    check_dtype(dtype)
    prompt_len = min(prompt_len or p.max_seq_len, p.max_seq_len)
    sources = {name: (source_format(w), tuple(w.shape)) for name, w in weights.items()}
    storage = storage_plan(sources, dtype)
    weight_bytes = sum(F32 * shape[0] * shape[1] if role(name) == "embedding"
                       else stored_nbytes(storage[name], shape)
                       for name, (_, shape) in sources.items())
    working = working_bytes(p, dtype, p.max_seq_len, p.max_batch_size, prompt_len, kv_dtype,
                            storage, device or "cpu")
    working += CUDA_RESERVE if device == "cuda" else 0
    source = "given"
    if budget is None:
        budget, source = free_memory(device or "cpu")
    plan = MemoryPlan(args, f"{device or 'cpu'} (per GPU: rank {args.rank} of {args.world})",
                      storage_name(storage, dtype), p.max_seq_len, p.max_batch_size, prompt_len,
                      False, weight_bytes,
                      kv_cache_bytes(p, p.max_seq_len, p.max_batch_size, kv_dtype) // args.world,
                      working, budget, source, kv_dtype=kv_dtype, load_dtype=dtype,
                      storage=storage,
                      note=f"1/{args.world} of every matrix (Meta's layout), norms whole")
    if plan.fits or not options:
        return plan
    return replace(plan, options=_options(p, args, weights, plan))


def _options(p, args, weights, plan):
    """Smaller dtypes that fit this GPU, and more GPUs where Meta's layout allows them."""
    options = []
    for d in WEIGHT_DTYPES[WEIGHT_DTYPES.index(plan.load_dtype or "float32") + 1:]:
        smaller = plan_rank(p, args, weights, d, "cuda", plan.budget, plan.kv_dtype,
                            plan.prompt_len, options=False)
        if smaller.fits:
            options.append(f"--dtype {d} ({fmt_bytes(smaller.total)} per GPU)")
    for more in (2 * args.world, 4 * args.world):
        try:
            check_world(p, more)
        except ArgumentError:            # Meta's layout cannot cut the model that finely
            continue
        share = plan.total * args.world // more
        if share <= plan.budget:
            options.append(f"--tensor-parallel {more} (about {fmt_bytes(share)} per GPU)")
            break
    return options


"""One entry point from a path on disk to a ready model: find the format, read, place on a device.

    read_checkpoint(path) -> Checkpoint(params, weights, tokenizer, fmt)  (weights may still be
                                    LazyTensors on disk: enough to plan memory)
    open_checkpoint(path, dtype=...) -> Checkpoint with every weight read, in its storage dtype
                                    (minillama.dtypes), and the memory plan that chose it
    load_model(path, device, max_seq_len, max_batch_size, dtype, kv_dtype) -> Transformer,
                                    after checking that the memory plan fits (minillama.memory)
    build_model(ckpt, ops, kv_dtype) -> Transformer of an opened checkpoint, within its plan

Each format module provides `load_<format>(path, max_seq_len, max_batch_size)` returning
(ModelArgs, weights[, tokenizer path[, which files were read[, the parsed header]]]). New
formats register themselves in FORMATS.
"""
import importlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .devices import get_ops
from .dtypes import store_weights
from .errors import CheckpointError
from .memory import MemoryPlan, plan_checkpoint
from .model import ModelArgs, Transformer


@dataclass
class Checkpoint:
    params: ModelArgs
    weights: dict
    fmt: str                          # "llama2c", ...
    path: str
    tokenizer_path: Optional[str] = None   # a tokenizer that ships with the model, if any
    source: Optional[str] = None           # which files were read, where a format has a choice
    plan: Optional[MemoryPlan] = None      # how open_checkpoint stored the weights, and why
    # the file's header as the reader parsed it, where more than the weights live in it (a
    # GGUF's GGUFFile: the tokenizer and the chat sampling too), so nothing parses it again
    header: Optional[object] = None


def detect_format(path):
    """Name of the format of `path`, from its magic bytes or directory contents."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not (os.path.isfile(path) or os.path.isdir(path)):      # a FIFO would block the probes
        raise CheckpointError(f"{path}: not a regular file or a directory (a pipe or a device "
                              f"cannot be read as a model)")
    for name, module, probe, _ in FORMATS:
        if _function(module, probe)(path):
            return name
    raise CheckpointError(f"{path}: not a model file minillama knows "
                          f"(expected one of: {', '.join(f[0] for f in FORMATS)})")


def read_checkpoint(path, max_seq_len=None, max_batch_size=1):
    fmt = detect_format(path)
    module, loader = {name: (module, load) for name, module, _, load in FORMATS}[fmt]
    result = _function(module, loader)(os.fspath(path), max_seq_len=max_seq_len,
                                       max_batch_size=max_batch_size)
    params, weights = result[:2]
    tokenizer_path = result[2] if len(result) > 2 else None
    source = result[3] if len(result) > 3 else None
    header = result[4] if len(result) > 4 else None
    return Checkpoint(params, weights, fmt, os.fspath(path), tokenizer_path, source=source,
                      header=header)


def open_checkpoint(path, max_seq_len=None, max_batch_size=1, dtype=None, device=None,
                    budget=None, prompt_len=None, kv_dtype="float32"):
    """dtype: 'float32', 'float16', 'bfloat16', 'int8', 'q4_0' or None (as the checkpoint
    stores it; see dtypes.py). The memory plan decides how the weights are stored: for None on
    the CPU (device None counts as the CPU), Packed weights are expanded to float32 when that
    fits (memory.plan_checkpoint). With a device ('cpu' or 'cuda'), first checks that the plan
    fits there, raising OutOfMemoryError before any weight is read; budget: free bytes to plan
    for (default: measured); prompt_len: the most tokens one forward call will take (default:
    max_seq_len); kv_dtype: the KV cache's, which the plan counts."""
    ckpt = read_checkpoint(path, max_seq_len, max_batch_size)
    ckpt.plan = plan_checkpoint(ckpt, dtype, device or "cpu", budget, kv_dtype,
                                prompt_len=prompt_len)
    if device is not None:
        ckpt.plan.check()
    ckpt.weights = store_weights(ckpt.weights, ckpt.plan.load_dtype)
    return ckpt


def build_model(ckpt, ops, kv_dtype="float32"):
    """The Transformer of an opened checkpoint, built within its memory plan: the float32
    matrices laid out first as `ops` keeps them, and the checkpoint's weights let go once the
    model holds what it needs (ckpt.weights becomes None: the separate wq, wk, wv, w1, w3
    would otherwise live beside the fused wqkv and w13 for the whole run)."""
    lay_out(ckpt.weights, ops)
    model = Transformer(ckpt.params, ckpt.weights, ops, kv_dtype)
    ckpt.weights = None
    return model


def lay_out(weights, ops):
    """Lay float32 matrices out as `ops` keeps them (NumpyOps: column-major), in place, one at
    a time: ops.weight would otherwise copy each while the checkpoint's own is still alive,
    twice the weights at the peak. A tied classifier stays the embedding's object."""
    done = {}
    for name, w in weights.items():
        if id(w) not in done:
            done[id(w)] = ops.matrix_layout(w) if isinstance(w, np.ndarray) else w
        weights[name] = done[id(w)]


def load_model(path, device="cpu", max_seq_len=None, max_batch_size=1, dtype=None, budget=None,
               kv_dtype="float32"):
    ckpt = open_checkpoint(path, max_seq_len, max_batch_size, dtype, device or "cpu", budget,
                           kv_dtype=kv_dtype)
    return build_model(ckpt, get_ops(device), kv_dtype)


# (name, module in minillama.checkpoints, probe(path) -> bool, loader). Probed in order; the
# llama2.c probe comes last: its legacy format has no magic, only a header to sanity-check.
# Modules are imported on first use, so reading a llama2.c file never imports the others.
FORMATS = [
    ("meta", "meta", "is_meta_dir", "load_meta"),
    ("hf", "hf", "is_hf", "load_hf"),
    ("gguf", "gguf", "is_gguf", "load_gguf"),
    ("llama2c", "llama2c", "is_llama2c", "read_llama2c"),
]


def _function(module, name):
    return getattr(importlib.import_module(f".checkpoints.{module}", __package__), name)

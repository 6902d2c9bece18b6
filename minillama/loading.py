"""One entry point from a path on disk to a ready model: find the format, read, place on a device.

    open_checkpoint(path) -> Checkpoint(params, weights, tokenizer, fmt)   (nothing on a device yet)
    load_model(path, device, max_seq_len, max_batch_size) -> Transformer

Each format module provides `load_<format>(path, max_seq_len, max_batch_size)` returning
(ModelArgs, weights). New formats register themselves in FORMATS.
"""
import os
from dataclasses import dataclass
from typing import Optional

from .errors import CheckpointError
from .model import ModelArgs, Transformer
from .ops import get_ops


@dataclass
class Checkpoint:
    params: ModelArgs
    weights: dict
    fmt: str                          # "llama2c", ...
    path: str
    tokenizer_path: Optional[str] = None   # a tokenizer that ships with the model, if any


def detect_format(path):
    """Name of the format of `path`, from its magic bytes or directory contents."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    for name, probe, _ in FORMATS:
        if probe(path):
            return name
    raise CheckpointError(f"{path}: not a model file minillama knows "
                          f"(expected one of: {', '.join(n for n, _, _ in FORMATS)})")


def open_checkpoint(path, max_seq_len=None, max_batch_size=1):
    fmt = detect_format(path)
    loader = {name: load for name, _, load in FORMATS}[fmt]
    result = loader(os.fspath(path), max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    params, weights = result[:2]
    tokenizer_path = result[2] if len(result) > 2 else None
    return Checkpoint(params, weights, fmt, os.fspath(path), tokenizer_path)


def load_model(path, device="cpu", max_seq_len=None, max_batch_size=1):
    ckpt = open_checkpoint(path, max_seq_len, max_batch_size)
    return Transformer(ckpt.params, ckpt.weights, get_ops(device))


def _is_llama2c(path):
    return os.path.isfile(path) and not path.endswith((".gguf", ".safetensors", ".pth", ".json"))


def _load_llama2c(path, max_seq_len=None, max_batch_size=1):
    from .checkpoints.llama2c import load_llama2c
    return load_llama2c(path, max_seq_len, max_batch_size)


# (name, probe(path) -> bool, loader). Probed in order; llama2.c (headerless legacy) comes last.
FORMATS = [
    ("llama2c", _is_llama2c, _load_llama2c),
]

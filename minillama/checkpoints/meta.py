"""Meta's checkpoint directory (what `download.sh` gives for llama-2-7b and friends):

    params.json               {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": -1, ...}
    consolidated.00.pth       weights of model-parallel rank 0 (bfloat16), under Meta's names
    consolidated.01.pth ...   one file per rank for the larger models (13B: 2, 70B: 8)
    tokenizer.model           SentencePiece (Meta's download puts it one folder up; pass it)

Meta's model-parallel layers each hold a slice of a weight; merging puts the slices back:
    ColumnParallelLinear  wq wk wv w1 w3 output   split the outputs: concatenate along dim 0
    RowParallelLinear     wo w2                   split the inputs:  concatenate along dim 1
    ParallelEmbedding     tok_embeddings          split the width:   concatenate along dim 1
    norms                                         the same on every rank: take rank 0's
The .pth files are read by torchzip without torch. Nothing large is read here: each merged
weight is a LazyTensor that reads and concatenates its slices when stored.
"""
import glob
import os
import re
from dataclasses import replace

import numpy as np

from ..dtypes import LazyTensor
from . import json_field, read_json_object
from ..errors import ArgumentError, CheckpointError, shown
from ..checks import check_weights
from ..model import ModelArgs, iter_weight_shapes
from .rope import meta_rope_scaling
from .torchzip import load_state_dict

SHARD = re.compile(r"consolidated\.(\d+)\.pth$")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
IGNORED = ("rope.freqs",)        # Llama 1/2 files carry the RoPE table; we compute our own


def shard_paths(ckpt_dir):
    """consolidated.NN.pth files of a directory, in rank order."""
    found = {}
    for p in glob.glob(os.path.join(glob.escape(ckpt_dir), "consolidated.*.pth")):
        m = SHARD.search(os.path.basename(p))
        if m:
            found[int(m.group(1))] = p
    return [found[r] for r in sorted(found)]


def is_meta_dir(path):
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "params.json"))
            and bool(shard_paths(path)))


def concat_axis(name):
    """How rank slices of `name` join: 0 or 1, or None for a weight every rank holds whole."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight" or name.endswith(ROW_PARALLEL):
        return 1
    return 0


def load_meta(path, max_seq_len=None, max_batch_size=1):
    """(ModelArgs, weights under Meta's names as LazyTensors, tokenizer.model path or None)."""
    ckpt_dir = os.fspath(path)
    shards = shard_paths(ckpt_dir)
    if not shards:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.NN.pth files")
    if len(shards) != int(SHARD.search(shards[-1]).group(1)) + 1:
        raise CheckpointError(f"{ckpt_dir}: consolidated.NN.pth files must be numbered 00 to "
                              f"{len(shards) - 1:02d} without gaps; found "
                              f"{', '.join(os.path.basename(s) for s in shards)}")
    weights = merge_shards([read_shard(s) for s in shards], shards)
    p = read_params(os.path.join(ckpt_dir, "params.json"), weights, max_seq_len, max_batch_size)
    check_weights(iter_weight_shapes(p), weights, source=ckpt_dir)
    tokenizer = os.path.join(ckpt_dir, "tokenizer.model")
    return p, weights, tokenizer if os.path.isfile(tokenizer) else None


def read_shard(path):
    """One consolidated.NN.pth as {name: LazyTensor}, rope.freqs left out (tensor parallelism
    reads shard k on rank k with this, no merge)."""
    return load_state_dict(path, IGNORED)


def merge_shards(state_dicts, paths):
    """One weight per name, joining the rank slices as Meta's parallel layers split them."""
    if len(state_dicts) == 1:
        return state_dicts[0]
    merged = {}
    for name in state_dicts[0]:
        for sd, p in zip(state_dicts, paths):
            if name not in sd:
                raise CheckpointError(f"{p}: tensor {shown(name)} is missing (present in "
                                      f"{os.path.basename(paths[0])})")
        merged[name] = _merge(name, [sd[name] for sd in state_dicts], paths)
    return merged


def _merge(name, parts, paths):
    axis = concat_axis(name)
    shapes = [p.shape for p in parts]
    if axis is None:
        if len(set(shapes)) != 1:
            raise CheckpointError(f"{paths[0]}: {name} differs in shape across ranks {shapes}")
        return parts[0]
    others = {s[:axis] + s[axis + 1:] for s in shapes}
    if any(len(s) != 2 for s in shapes) or len(others) != 1:
        raise CheckpointError(f"{paths[0]}: {name} slices {shapes} do not join along dim {axis}")
    shape = list(shapes[0])
    shape[axis] = sum(s[axis] for s in shapes)
    if len({p.format for p in parts}) > 1:      # ranks saved in different types: as float32
        return LazyTensor(shape, "f32", lambda: np.concatenate(
            [np.asarray(p, np.float32) for p in parts], axis=axis))
    return LazyTensor(shape, parts[0].format,         # the slices joined as stored
                      lambda: np.concatenate([p.read() for p in parts], axis=axis))


def read_params(path, weights, max_seq_len=None, max_batch_size=1):
    """params.json -> ModelArgs. vocab_size -1 (Llama 2's file) is the embedding's row count;
    hidden_dim is w1's row count (Meta derives it from multiple_of and ffn_dim_multiplier)."""
    cfg = read_json_object(path, "params")
    sizes = {key: json_field(cfg, path, key, "a positive integer")
             for key in ("dim", "n_layers", "n_heads")}
    rope_scaling = meta_rope_scaling(cfg, path)
    for name in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if name not in weights:
            raise CheckpointError(f"{os.path.dirname(path)}: tensor {shown(name)} is missing")
    emb_rows = weights["tok_embeddings.weight"].shape[0]
    vocab = emb_rows if cfg.get("vocab_size") == -1 else \
        json_field(cfg, path, "vocab_size", "a positive integer", emb_rows)
    numbers = {key: float(json_field(cfg, path, key, "a finite number", default))
               for key, default in (("norm_eps", 1e-5), ("rope_theta", 10000.0))}
    try:
        p = ModelArgs(
            **sizes, n_kv_heads=json_field(cfg, path, "n_kv_heads", "a positive integer", None),
            vocab_size=vocab,
            multiple_of=json_field(cfg, path, "multiple_of", "a positive integer", 256),
            ffn_dim_multiplier=json_field(cfg, path, "ffn_dim_multiplier", "a finite number",
                                          None),
            hidden_dim=weights["layers.0.feed_forward.w1.weight"].shape[0],
            **numbers, rope_scaling=rope_scaling)
    except ArgumentError as e:                  # ModelArgs' own checks, as faults of the file
        raise CheckpointError(f"{path}: {e}") from None
    # the caller's sizes, checked as arguments (not as faults of the file)
    return replace(p, max_seq_len=max_seq_len or p.max_seq_len, max_batch_size=max_batch_size)

"""Hugging Face Llama checkpoints: config.json + model.safetensors (or shards listed in
model.safetensors.index.json), read with NumPy alone.

A .safetensors file is
    8 bytes        N, little-endian uint64
    N bytes        JSON: {name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [b, e]},
                          "__metadata__": {...}}
    the data       tensor `name` is bytes [b, e) of this part, row-major, little-endian

Hugging Face names and layout differ from Meta's in two ways:
- names: model.layers.{i}.self_attn.q_proj.weight is layers.{i}.attention.wq.weight, etc. (HF_NAMES)
- q_proj and k_proj have their rows permuted. Meta's RoPE rotates adjacent pairs (x[2i], x[2i+1]);
  Hugging Face's rotates (x[i], x[i + head_dim/2]), and its conversion script reorders the rows of
  wq and wk so the two give the same attention. Within each head, Meta's row 2i moved to row i and
  row 2i+1 to row i + head_dim/2. `unpermute_rows` moves them back, so minillama's RoPE is unchanged.
"""
import json
import os
from dataclasses import replace

import numpy as np

from ..dtypes import LazyTensor
from . import read_json_object
from ..errors import CheckpointError, shown
from ..checks import check_weights
from ..model import ModelArgs, iter_weight_shapes

DTYPES = {"F32": ("<f4", "f32"), "F16": ("<f2", "f16"), "BF16": ("<u2", "bf16")}   # bf16 as bits
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 << 20          # a header is a few hundred kB even for large models

HF_LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


# ----------------------------------------------------------------------------
# the safetensors container

def read_safetensors(path):
    """{name: LazyTensor} from the header of one .safetensors file; the data is read later."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors header")
        n = int(np.frombuffer(head, "<u8")[0])
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {n} does not fit the file "
                                  f"({size} bytes); not a safetensors file, or truncated")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    base, data_len = 8 + n, size - 8 - n
    return {name: _tensor(path, name, info, base, data_len)
            for name, info in header.items() if name != "__metadata__"}


def _tensor(path, name, info, base, data_len):
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError, OverflowError):     # OverflowError: int(inf)
        raise CheckpointError(f"{path}: tensor {shown(name)} has a malformed header entry") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {shown(name)} is {shown(dtype, quote=False)}; minillama reads "
                              f"{', '.join(DTYPES)}")
    np_dtype, fmt = np.dtype(DTYPES[dtype][0]), DTYPES[dtype][1]
    count = int(np.prod(shape))
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len \
            or end - begin != count * np_dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {shown(name)} ({dtype} {shown(list(shape))}) has data offsets "
                              f"[{begin}, {end}) that do not fit its size or the file "
                              f"({data_len} data bytes; truncated?)")

    def read():             # the stored values: float32, float16, or bfloat16 bits (uint16)
        return np.fromfile(path, dtype=np_dtype, count=count, offset=base + begin).reshape(shape)
    return LazyTensor(shape, fmt, read)


# ----------------------------------------------------------------------------
# the Llama layout

def is_hf(path):
    """A directory with config.json and .safetensors files, or a .safetensors file beside one."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "config.json")) and any(
            n.endswith(".safetensors") for n in os.listdir(path))
    return path.endswith(".safetensors") and os.path.isfile(
        os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))


def safetensors_files(path):
    """The files holding the model: the index's shards, or model.safetensors, or the file given."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: cannot read the shard list ({e})") from None
        for n in names:
            if not isinstance(n, str) or os.path.basename(n) != n or not n.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard name {shown(n)} is not a file in its folder")
            if not os.path.isfile(os.path.join(path, n)):
                raise CheckpointError(f"{index}: lists {n}, which is missing")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    raise CheckpointError(f"{path}: several .safetensors files but no {INDEX} saying which "
                          f"make up the model")


def meta_name(hf_name):
    """Meta's name for a Hugging Face tensor name, or None for one the model does not use."""
    if hf_name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if hf_name == "model.norm.weight":
        return "norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")         # model.layers.{i}.{module...}.weight
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        module = HF_LAYER_NAMES.get(".".join(parts[3:-1]))
        if module:
            return f"layers.{parts[2]}.{module}.weight"
    return None


def unpermute_rows(w, n_heads):
    """Undo Hugging Face's q/k row order: per head, rows [0, hd/2) and [hd/2, hd) interleave
    back into adjacent pairs.  w: (n_heads * head_dim, dim)."""
    rows, cols = w.shape
    hd = rows // n_heads
    # (n_heads, 2 halves, hd/2, dim) -> (n_heads, hd/2, 2, dim): row i of half h goes to 2i + h
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def load_hf(path, max_seq_len=None, max_batch_size=1):
    """(ModelArgs, weights under Meta's names as LazyTensors, tokenizer.model path or None)."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    p, tied = read_config(os.path.join(folder, "config.json"), max_seq_len, max_batch_size)
    if os.path.isfile(path) and os.path.isfile(os.path.join(folder, INDEX)):
        path = folder                  # one shard of a sharded model: load the whole model
    weights = {}
    for file in safetensors_files(path):
        for hf_name, t in read_safetensors(file).items():
            name = meta_name(hf_name)
            if name is not None:
                weights[name] = t
    if tied and "tok_embeddings.weight" in weights:      # the classifier is the embedding
        weights["output.weight"] = weights["tok_embeddings.weight"]
    check_weights(iter_weight_shapes(p), weights, source=path)
    for i in range(p.n_layers):
        for name, heads in (("wq", p.n_heads), ("wk", p.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            weights[key] = _unpermuted(weights[key], heads)
    tokenizer = os.path.join(folder, "tokenizer.model")
    return p, weights, tokenizer if os.path.isfile(tokenizer) else None


def _unpermuted(t, n_heads):
    return LazyTensor(t.shape, t.format, lambda: unpermute_rows(t.read(), n_heads))


def read_config(path, max_seq_len=None, max_batch_size=1):
    """config.json -> (ModelArgs, tie_word_embeddings), refusing the Llama variants minillama
    does not compute."""
    cfg = read_json_object(path, "model config")
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: model_type {shown(cfg['model_type'])} is not supported "
                              f"(expected 'llama')")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{path}: {key} = {shown(cfg[key])} is not supported "
                                  f"(expected {shown(ok)})")
    # transformers 4 writes rope_theta / rope_scaling; transformers 5 writes rope_parameters
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                          else None)
    if scaling:
        raise CheckpointError(f"{path}: RoPE scaling {shown(scaling)} is not supported")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise CheckpointError(f"{path}: field {shown(key)} must be an integer, got {shown(cfg.get(key))}")
    heads = cfg["num_attention_heads"]
    if heads > 0 and cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        raise CheckpointError(f"{path}: head_dim {shown(cfg['head_dim'])} differs from hidden_size / "
                              f"num_attention_heads; minillama needs them equal")
    try:
        p = ModelArgs(dim=cfg["hidden_size"], hidden_dim=cfg["intermediate_size"],
                      n_layers=cfg["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
                      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta))
        max_pos = int(cfg.get("max_position_embeddings", p.max_seq_len))
    except (TypeError, ValueError, OverflowError) as e:         # OverflowError: int(inf)
        raise CheckpointError(f"{path}: {e}") from None
    # the caller's sizes, checked as arguments (not as faults of the file)
    p = replace(p, max_seq_len=max_seq_len or max_pos, max_batch_size=max_batch_size)
    return p, bool(cfg.get("tie_word_embeddings", False))

"""Hugging Face Llama checkpoints: a folder with config.json and the weights in one of the two
files Hugging Face has used, read with NumPy alone:

    model.safetensors           safetensors.py; sharded: model-0000N-of-0000M.safetensors,
                                listed in model.safetensors.index.json
    pytorch_model.bin           torch.save's zip, torchzip.py (tensors only, never code);
                                sharded: pytorch_model-0000N-of-0000M.bin, listed in
                                pytorch_model.bin.index.json (OpenLLaMA and many models of 2023)

When a folder holds both (many repositories do), safetensors is read: the same weights, and
nothing in it can be a program. Either way the tensors are the same, and the same two changes
turn them into Meta's:
- names: model.layers.{i}.self_attn.q_proj.weight is layers.{i}.attention.wq.weight, etc.
  (HF_LAYER_NAMES)
- q_proj and k_proj have their rows permuted. Meta's RoPE rotates adjacent pairs (x[2i], x[2i+1]);
  Hugging Face's rotates (x[i], x[i + head_dim/2]), and its conversion script reorders the rows of
  wq and wk so the two give the same attention. Within each head, Meta's row 2i moved to row i and
  row 2i+1 to row i + head_dim/2. `unpermute_rows` moves them back, so minillama's RoPE is unchanged.
"""
import fnmatch
import json
import os
from dataclasses import replace
from typing import Callable, NamedTuple

from ..dtypes import LazyTensor
from . import json_field, read_json_object
from ..errors import ArgumentError, CheckpointError, shown
from ..checks import check_weights
from ..model import ModelArgs, iter_weight_shapes
from .rope import hf_rope_scaling, vision_note
from .safetensors import read_safetensors
from .torchzip import load_state_dict

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


class WeightStore(NamedTuple):
    """One way Hugging Face stores the weights."""
    name: str               # "safetensors", "pytorch_model.bin"
    single: str             # the file of an unsharded model
    index: str              # the shard list of a sharded one: {"weight_map": {tensor: file}}
    pattern: str            # the names of its files (a .bin must be named so: llama2.c's are not)
    read: Callable          # path -> {Hugging Face name: LazyTensor}


STORES = [                  # preferred first
    WeightStore("safetensors", "model.safetensors", "model.safetensors.index.json",
                "*.safetensors", read_safetensors),
    WeightStore("pytorch_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "pytorch_model*.bin", load_state_dict),
]


# ----------------------------------------------------------------------------
# which files hold the weights

def is_hf(path):
    """A directory with config.json and weight files, or one weight file beside a config.json."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "config.json")) and any(
            _found(path, store) for store in STORES)
    return _store_of(path) is not None and os.path.isfile(
        os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))


def _store_of(path):
    return next((s for s in STORES if fnmatch.fnmatch(os.path.basename(path), s.pattern)), None)


def _found(folder, store):
    return sorted(n for n in os.listdir(folder) if fnmatch.fnmatch(n, store.pattern))


def weight_files(path):
    """(the files holding the model, the store they are in, a line saying which were read).
    path: a folder, or one of its weight files (one shard of a sharded model means them all)."""
    if os.path.isfile(path):
        store, folder = _store_of(path), os.path.dirname(os.path.abspath(path))
        if store is None:
            raise CheckpointError(f"{path}: not a Hugging Face weight file (expected a name "
                                  f"like {' or '.join(s.pattern for s in STORES)})")
        if not os.path.isfile(os.path.join(folder, store.index)):
            return [path], store, os.path.basename(path)
        path = folder
    present = [s for s in STORES if _found(path, s)]
    if not present:
        raise CheckpointError(f"{path}: no weights (expected "
                              f"{' or '.join(s.single for s in STORES)}, or their shards)")
    store = present[0]
    files = _files(path, store)
    source = ", ".join(os.path.basename(f) for f in files) if len(files) < 3 else \
        f"{len(files)} shards listed in {store.index}"
    for other in present[1:]:
        source += f"; {other.name} files also here, not read: {store.name} is preferred"
    return files, store, source


def _files(folder, store):
    """The index's shards, or the single file, or the one file of the store's kind."""
    index = os.path.join(folder, store.index)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: cannot read the shard list ({e})") from None
        for n in names:
            if not isinstance(n, str) or os.path.basename(n) != n \
                    or not fnmatch.fnmatch(n, store.pattern):
                raise CheckpointError(f"{index}: shard name {shown(n)} is not a {store.name} file in "
                                      f"its folder")
            if not os.path.isfile(os.path.join(folder, n)):
                raise CheckpointError(f"{index}: lists {n}, which is missing")
        return [os.path.join(folder, n) for n in names]
    if os.path.isfile(os.path.join(folder, store.single)):
        return [os.path.join(folder, store.single)]
    found = _found(folder, store)
    if len(found) == 1:
        return [os.path.join(folder, found[0])]
    raise CheckpointError(f"{folder}: several {store.name} files but no {store.index} saying "
                          f"which make up the model")


# ----------------------------------------------------------------------------
# the Llama layout

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
    """(ModelArgs, weights under Meta's names as LazyTensors, tokenizer.model path or None,
    a line saying which weight files were read)."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    p, tied = read_config(os.path.join(folder, "config.json"), max_seq_len, max_batch_size)
    files, store, source = weight_files(path)
    weights = {}
    for file in files:
        for hf_name, t in store.read(file).items():
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
    # Llama 3's repositories on the Hub keep Meta's tokenizer.model (tiktoken) in original/
    tokenizers = [os.path.join(folder, "tokenizer.model"),
                  os.path.join(folder, "original", "tokenizer.model")]
    return p, weights, next((t for t in tokenizers if os.path.isfile(t)), None), source


def _unpermuted(t, n_heads):
    return LazyTensor(t.shape, t.format, lambda: unpermute_rows(t.read(), n_heads))


def read_config(path, max_seq_len=None, max_batch_size=1):
    """config.json -> (ModelArgs, tie_word_embeddings), refusing the Llama variants minillama
    does not compute."""
    cfg = read_json_object(path, "model config")
    if cfg.get("model_type", "llama") != "llama":
        kind = cfg["model_type"]
        raise CheckpointError(f"{path}: model_type {shown(kind)}{vision_note(kind)} is not "
                              f"supported (expected 'llama')")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise CheckpointError(f"{path}: {key} = {shown(cfg[key])} is not supported "
                                  f"(expected {shown(ok)})")
    # transformers 4 writes rope_theta / rope_scaling; transformers 5 writes rope_parameters
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: field 'rope_parameters' must be an object, got "
                              f"{shown(rope)}")
    rope_scaling = hf_rope_scaling(cfg, path)
    sizes = {key: json_field(cfg, path, key, "a positive integer") for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "vocab_size")}
    heads = sizes["num_attention_heads"]
    if json_field(cfg, path, "head_dim", "a positive integer", None) not in (
            None, sizes["hidden_size"] // heads):
        raise CheckpointError(f"{path}: head_dim {shown(cfg['head_dim'])} differs from hidden_size / "
                              f"num_attention_heads; minillama needs them equal")
    kv_heads = json_field(cfg, path, "num_key_value_heads", "a positive integer", None)
    eps = json_field(cfg, path, "rms_norm_eps", "a finite number", 1e-6)
    theta = json_field(rope if rope.get("rope_theta") is not None else cfg, path, "rope_theta",
                       "a finite number", 10000.0)
    try:
        p = ModelArgs(dim=sizes["hidden_size"], hidden_dim=sizes["intermediate_size"],
                      n_layers=sizes["num_hidden_layers"], n_heads=heads, n_kv_heads=kv_heads,
                      vocab_size=sizes["vocab_size"], norm_eps=float(eps),
                      rope_theta=float(theta), rope_scaling=rope_scaling)
    except ArgumentError as e:                  # ModelArgs' own checks, as faults of the file
        raise CheckpointError(f"{path}: {e}") from None
    max_pos = json_field(cfg, path, "max_position_embeddings", "a positive integer",
                         p.max_seq_len)
    tied = json_field(cfg, path, "tie_word_embeddings", "true or false", False)
    # the caller's sizes, checked as arguments (not as faults of the file)
    return replace(p, max_seq_len=max_seq_len or max_pos, max_batch_size=max_batch_size), tied

"""The sampling a chat model's authors recommend, used by `minillama run` in chat mode when -t / -p
are not given (and shown by `minillama info`). A 135M-parameter model rambles at temperature 1.0;
SmolLM2's card asks for 0.2.

    chat_sampling(path) -> Sampling    the recommendation for the model at `path`, or llama2.c's
                                       defaults (temperature 1.0, top-p 0.9) when it has none
                                       (header=: the model's GGUF header, if already parsed)

Where a recommendation is found, the first one wins:

    generation_config.json        in a Hugging Face model directory: temperature and top_p, read
                                  as transformers reads them (1.0 when absent; do_sample false
                                  means greedy)
    general.sampling.temp/top_p   a GGUF's metadata, where llama.cpp's converter wrote them
    download.RECOMMENDED          the models minillama downloads, from their model cards

llama2.c checkpoints have none of these, so they keep llama2.c's defaults (and its outputs).
"""
import json
import math
import numbers
import os

import numpy as np

from .download import RECOMMENDED, Sampling
from .errors import CheckpointError, shown

LLAMA2C = Sampling(1.0, 0.9, "llama2.c's defaults")


def chat_sampling(path, header=None):
    """The sampling to chat with the model at `path` when -t / -p are not given. header: the
    model's GGUF header where its reader has parsed it (loading.Checkpoint.header)."""
    return recommended_sampling(path, header) or LLAMA2C


def recommended_sampling(path, header=None):
    """What the model's own files, or minillama's download registry, recommend; None if nothing."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = os.path.join(folder, "generation_config.json")
    if os.path.isfile(config):
        found = from_generation_config(config)
        if found is not None:
            return found
    if os.path.isfile(path):
        found = from_gguf(path, header)
        if found is not None:
            return found
    return RECOMMENDED.get(os.path.basename(path))


def from_generation_config(path):
    """temperature and top_p of a Hugging Face generation_config.json, if it sets either."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict) or not ({"temperature", "top_p", "do_sample"} & set(config)):
        return None
    if config.get("do_sample") is False:                    # transformers decodes greedily
        return Sampling(0.0, 1.0, f"{path}: do_sample false")
    temperature = checked(path, "temperature", config.get("temperature", 1.0), 0.0)
    top_p = checked(path, "top_p", config.get("top_p", 1.0), 0.0, high=1.0)
    return Sampling(temperature, top_p, path)


def from_gguf(path, header=None):
    """general.sampling.temp and general.sampling.top_p of a GGUF file, if it has them (read
    from `header`, its GGUFFile, where the file has been parsed already)."""
    from .checkpoints.gguf import is_gguf, read_gguf
    if header is None and not is_gguf(path):
        return None
    meta = (header or read_gguf(path)).metadata
    keys = ("general.sampling.temp", "general.sampling.top_p")
    if not any(key in meta for key in keys):
        return None
    temperature, top_p = (float32_decimal(meta.get(key, 1.0)) for key in keys)
    return Sampling(checked(path, keys[0], temperature, 0.0),
                    checked(path, keys[1], top_p, 0.0, high=1.0), f"{path}: general.sampling")


def float32_decimal(value):
    """A float32 from a file as its shortest decimal: 0.7, not 0.699999988079071."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def checked(path, key, value, low, high=None):
    """A recommended value as a float: a number, finite, at least `low` (above it for top-p,
    whose `high` is 1), at most `high`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value >= low and (high is None or low < value <= high)
    if not ok:
        limits = f"in ({low}, {high}]" if high is not None else f">= {low}"
        raise CheckpointError(f"{path}: {key} is {shown(value)}, expected a number {limits}")
    return float(value)

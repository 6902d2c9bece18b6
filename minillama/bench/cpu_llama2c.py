"""llama2.c's run.c beside minillama on the CPU: built here, timed on the same shapes.

    build_run_c(source, folder)        gcc -Ofast -march=native -fopenmp run.c -lm: llama2.c at
                                       its fastest on this machine, OpenMP over all cores
    write_legacy(path, p, weights)     a model in the legacy llama2.c format, the one run.c reads
    run_c_rate(binary, model, tokenizer, steps)
                                       tokens/s of greedy decoding, as run.c itself reports them

run.c is MIT-licensed llama2.c source from the shared folder (<shared>/oracles/llama2c/run.c): it
is compiled in a temporary folder and never copied into the repository.
"""
import os
import re
import shutil
import struct
import subprocess

import numpy as np

from ..checkpoints.llama2c import norm_names, tensor_names

FLAGS = ["-Ofast", "-march=native", "-fopenmp"]


def build_run_c(source, folder):
    """Path of run.c built with FLAGS in `folder`, or None (no gcc, or no source)."""
    gcc = shutil.which("gcc")
    if gcc is None or not os.path.isfile(source):
        return None
    binary = os.path.join(folder, "run")
    done = subprocess.run([gcc, *FLAGS, source, "-lm", "-o", binary], capture_output=True)
    return binary if done.returncode == 0 else None


def write_legacy(path, p, weights):
    """The legacy (version 0) llama2.c file of float32 weights under Meta's names, classifier
    shared when output.weight is the embedding array itself. (tests/tools/writers.py writes all
    three versions for the tests; the package does not import the tests, so this is its twin.)"""
    shared = weights["output.weight"] is weights["tok_embeddings.weight"]
    names = ["tok_embeddings.weight", *norm_names(p, "attention_norm")]
    names += [n for kind in ("wq", "wk", "wv", "wo") for n in tensor_names(p, kind)]
    names += norm_names(p, "ffn_norm")
    names += [n for kind in ("w1", "w2", "w3") for n in tensor_names(p, kind)]
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads,
                            p.vocab_size if shared else -p.vocab_size, p.max_seq_len))
        for name in names + ["norm.weight"]:
            f.write(np.ascontiguousarray(weights[name], np.float32).tobytes())
        f.write(bytes(4 * p.max_seq_len * p.head_dim))     # freq_cis_real/imag, which run.c skips
        if not shared:
            f.write(np.ascontiguousarray(weights["output.weight"], np.float32).tobytes())


def run_c_rate(binary, model, tokenizer, steps):
    """Tokens/s of run.c decoding `steps` tokens greedily after BOS (its own timer, which
    starts after the first token as minillama's decode_rate does), or None if it failed."""
    done = subprocess.run([binary, model, "-z", tokenizer, "-t", "0", "-n", str(steps + 1),
                           "-i", ""], capture_output=True, text=True)
    found = re.search(r"achieved tok/s: ([0-9.]+)", done.stderr)
    return float(found.group(1)) if done.returncode == 0 and found else None

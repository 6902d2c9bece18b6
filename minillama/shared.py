"""The shared folder: model files and llama2.c's golden outputs, kept beside a checkout (never in it).

    $MINILLAMA_SHARED      when it is set
    ROOT/../shared         otherwise, ROOT being a checkout's root (default: the working directory)

Its `models/` holds stories260K.bin, tok512.bin, tokenizer.bin and the other real files; its
`golden/` holds llama2.c's own outputs. The tests and their tools (tests/tools/), the notebooks
and `python -m minillama.bench cpu` all find it here, so one variable moves it for all of them.
"""
import os
from pathlib import Path


def shared_dir(root=None) -> Path:
    """The shared folder. It may not exist: each caller says what it needs from it."""
    if os.environ.get("MINILLAMA_SHARED"):
        return Path(os.environ["MINILLAMA_SHARED"])
    return Path(root or os.getcwd()).resolve().parent / "shared"

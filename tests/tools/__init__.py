"""Development tools beside the tests (not installed with the package). From the repository root:

    python -m tests.tools.fuzz --cases 10000      damage model and tokenizer files, check each reader
    python -m tests.tools.soak --tokens 10000     one model serving request after request

writers.py writes the files the tests read (llama2.c checkpoints, GGUF models, tokenizer.bin).
The tests import this package as `tests.tools` (setup.cfg puts the repository root on pytest's
path); the notebooks' story_files.py does the same.
"""
from pathlib import Path

from minillama.shared import shared_dir

ROOT = Path(__file__).resolve().parents[2]      # the checkout these tools belong to
SHARED = shared_dir(ROOT)                        # ../shared beside it, or $MINILLAMA_SHARED
MODELS = SHARED / "models"

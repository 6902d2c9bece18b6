"""load_tokenizer: the tokenizer in a file, whatever its format, recognised from its content.

Each format is a TokenizerFormat: a probe that looks at the file's first bytes (cheap, never
raises) and a builder that reads the whole file and checks it. To read another format, add one
to FORMATS; its builder returns a Tokenizer (base.py) with its chat format chosen.
"""
import os
from typing import Callable, NamedTuple

from ..checkpoints.gguf import is_gguf
from ..errors import TokenizerError
from .gguf import gguf_tokenizer
from .llama2c import Llama2cTokenizer, looks_like_tokenizer_bin
from .sentencepiece import SentencePieceTokenizer, looks_like_sentencepiece
from .tiktoken import looks_like_tiktoken, tiktoken_tokenizer


class TokenizerFormat(NamedTuple):
    name: str
    probe: Callable         # path -> bool: might this file be in this format?
    build: Callable         # path -> Tokenizer, or a TokenizerError


# Tried in order; the first whose probe says yes and whose builder succeeds wins.
FORMATS = [
    TokenizerFormat("gguf", is_gguf, gguf_tokenizer),       # the vocabulary in a model's metadata
    TokenizerFormat("tiktoken", looks_like_tiktoken, tiktoken_tokenizer),  # Llama 3's .model
    TokenizerFormat("sentencepiece", looks_like_sentencepiece, SentencePieceTokenizer),
    TokenizerFormat("llama2c", looks_like_tokenizer_bin, Llama2cTokenizer),
]


def load_tokenizer(path, vocab_size=None, header=None):
    """The tokenizer in `path`, whatever its format; checks it has `vocab_size` tokens if given.
    header: the GGUF header the model's reader parsed (loading.Checkpoint.header); when `path`
    is that file, its vocabulary is read from it, not parsed a second time."""
    path = os.fspath(path)
    if header is not None and header.path == path:
        tokenizer = gguf_tokenizer(path, header)
    else:
        tokenizer = read_tokenizer(path)
    if vocab_size is not None and tokenizer.n_words != vocab_size:
        raise TokenizerError(f"tokenizer {path} has {tokenizer.n_words} tokens but the model's "
                             f"vocab_size is {vocab_size}")
    return tokenizer


def read_tokenizer(path):
    """The tokenizer in the file `path`: the first format whose probe and builder accept it."""
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such tokenizer file")
    if os.path.isdir(path):
        raise TokenizerError(f"{path}: is a directory, expected a tokenizer file")
    if not os.path.isfile(path):                               # a FIFO would block the probes
        raise TokenizerError(f"{path}: not a regular file (a pipe or a device cannot be read "
                             f"as a tokenizer)")
    errors = []
    for fmt in FORMATS:
        if fmt.probe(path):
            try:
                tokenizer = fmt.build(path)
                break
            except TokenizerError as e:
                errors.append(e)    # maybe another format fits; else this is the best explanation
    else:
        if errors:
            raise errors[0]
        names = ", ".join(fmt.name for fmt in FORMATS)
        raise TokenizerError(f"{path}: not a tokenizer minillama knows (expected one of: {names})")
    return tokenizer

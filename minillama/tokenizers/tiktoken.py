"""Llama 3's tokenizer.model: a tiktoken BPE file, read into a byte-level BPETokenizer.

The file is text, one token a line, in rank order:

    IQ== 0                base64 of the token's bytes ("!"), a space, its rank
    Ig== 1
    ...
    IOKUgw== 127999       128,000 lines in Llama 3's file

There is no merges list: tiktoken joins the adjacent pair whose joined bytes are the token of
lowest rank (bpe.BPETokenizer with merges=None). Nor are the special tokens in the file: Meta's
Tokenizer appends 256 of them after the last rank, <|begin_of_text|> first (128000 in Llama 3),
and so do we. The pre-tokenizer is Meta's pattern (bpe.llama3_pattern).

As in llama_models' Tokenizer: encode(bos=True) starts with <|begin_of_text|>, and generation
stops at <|end_of_text|>, <|eom_id|> or <|eot_id|> (stop_tokens). One difference: encode()
turns a special token's name written in the text into that token, as Hugging Face's tokenizer
and llama.cpp do (chat formats need that); Meta's encode spells it out as text, which
encode_ordinary() does.
"""
import base64
import binascii
import re

from ..errors import TokenizerError
from .base import read_head, read_tokenizer_file
from .bpe import CONTROL, NORMAL, BPETokenizer, spell_bytes
from .chat import Llama3Chat

# Meta's names for the 256 special tokens, in id order after the file's ranks (llama_models'
# llama3/tokenizer.py). Llama 3.0's file called some of these reserved; the ids are the same.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",       # end of message: a tool call waits for its result
    "<|eot_id|>",       # end of turn
    "<|python_tag|>", "<|image|>",
]
NUM_SPECIAL_TOKENS = 256
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>"
    for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))]
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
STOP_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]    # Meta's order

_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]{1,18}")    # (a rank fits in an int64)


def read_tiktoken(path):
    """The tokens of a tiktoken file as bytes, in rank order; every line checked."""
    data = read_tokenizer_file(path)
    tokens = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue                    # Meta's reader skips empty lines too
        where = f"{path}: line {number}"
        if not _LINE.fullmatch(line):
            raise TokenizerError(f"{where} is {line[:40]!r}, expected base64 bytes, a space and "
                                 f"a rank")
        token, rank = line.split(b" ")
        if int(rank) != len(tokens):
            raise TokenizerError(f"{where}: rank {int(rank)}, expected {len(tokens)} (ranks "
                                 f"must count up from 0, one a line)")
        try:
            tokens.append(base64.b64decode(token, validate=True))
        except binascii.Error:
            raise TokenizerError(f"{where}: {token[:40]!r} is not base64") from None
    if len(tokens) < 256:
        raise TokenizerError(f"{path}: has {len(tokens)} tokens, expected at least the 256 "
                             f"single bytes")
    return tokens


def tiktoken_tokenizer(path):
    """Llama 3's tokenizer from its tokenizer.model: the file's ranks, then Meta's specials."""
    ranked = read_tiktoken(path)
    if len(set(ranked)) != len(ranked) or not {bytes([b]) for b in range(256)} <= set(ranked):
        raise TokenizerError(f"{path}: tokens must be distinct and include all 256 single bytes")
    tokens = [spell_bytes(t) for t in ranked] + SPECIAL_TOKENS
    types = [NORMAL] * len(ranked) + [CONTROL] * len(SPECIAL_TOKENS)
    special_id = {name: len(ranked) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return BPETokenizer(tokens, None, token_types=types, pre="llama-bpe", bos=special_id[BOS],
                        eos=special_id[EOS], pad=special_id[PAD], add_bos=True, path=path,
                        chat=Llama3Chat(), stop_tokens=[special_id[t] for t in STOP_TOKENS])


def looks_like_tiktoken(path):
    """A tiktoken file starts with a line of base64, a space and a rank."""
    head = read_head(path, 256)
    m = _LINE.match(head)
    return m is not None and head[m.end():m.end() + 1] in (b"\n", b"\r", b"")

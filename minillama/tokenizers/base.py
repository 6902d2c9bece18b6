"""The one tokenizer interface, and the rules every tokenizer decodes by, written once.

    encode(text, bos, eos) -> ids                 each family's own
    decode_piece(prev_token, token) -> bytes      llama2.c's decode(): a piece as run.c prints it
    piece(token) -> str                           a token's piece, for display
    decode(ids) -> str                            text, bad bytes as U+FFFD (see StreamDecoder)
    text_bytes(token, at_start) -> bytes          what a token adds to decoded text
    is_control(token), check_id(token)
    path, n_words, bos_id, eos_id, unk_id, pad_id (-1: none), chat (a format from chat.py)
    stop_tokens                                   the ids that end generation (Meta's name)

Llama's ids, which llama2.c hard-codes: 0 = <unk>, 1 = BOS, 2 = EOS, 3..258 = the 256 byte
tokens <0x00>..<0xFF>. Other vocabularies (a GGUF's) say where theirs are.
"""
import operator
import os

from ..errors import ArgumentError, TokenizerError
from .stream import StreamDecoder


class Tokenizer:
    """What every tokenizer is. The decoding rules here are SentencePiece's, which the other
    families follow where they apply: control tokens (BOS, EOS, ...) print nothing, <unk>
    prints `unk_surface` (" ⁇ ") where the vocabulary has one, and the first piece of the text
    goes through decode_piece as if it followed BOS (which drops the "dummy prefix" space that
    SentencePiece's encode added)."""

    unk_surface = None      # the text <unk> decodes to; None: its own piece
    # A model trained to collapse runs of spaces (SentencePiece's remove_extra_whitespaces, e.g.
    # tok512.model) also drops *every* leading "▁" piece when decoding, not just the first.
    drops_all_leading_spaces = False
    # Text that follows a special token inside a rendered chat template: encoded with the dummy
    # prefix (True: SentencePiece's "legacy" behaviour, transformers' LlamaTokenizer default) or
    # as it is (False: how transformers converts a GGUF's `llama` vocabulary). Only encoders that
    # add a dummy prefix (Llama2cTokenizer) look at it.
    prefix_after_special = True

    def __init__(self, path, n_words, *, bos_id, eos_id, unk_id, pad_id, control_ids, chat,
                 stop_tokens=None):
        self.path = os.fspath(path)
        self.n_words = n_words
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.control_ids = frozenset(control_ids)
        self.chat = chat
        # the ids that end a reply: EOS, and for Llama 3 also <|eot_id|> and <|eom_id|>
        self.stop_tokens = list(stop_tokens) if stop_tokens is not None else \
            [eos_id] if eos_id >= 0 else []

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, n_words={self.n_words})"

    # --- what each family writes its own way ----------------------------------------------------

    def encode(self, text, bos, eos):
        """Token ids of `text`, with BOS before it and EOS after it if asked."""
        raise NotImplementedError

    def decode_piece(self, prev_token, token):
        """The bytes `token` prints when it follows `prev_token`, as llama2.c's decode() gives
        them: a control token prints its own piece here (text_bytes() is what decode uses)."""
        raise NotImplementedError

    def piece(self, token):
        """The token's piece as text, for display."""
        raise NotImplementedError

    # --- what every tokenizer does alike --------------------------------------------------------

    def check_id(self, token):
        """`token` as an int, if it is a valid id of this tokenizer (a bool is not)."""
        if isinstance(token, bool) or not hasattr(type(token), "__index__"):
            raise ArgumentError(f"token id {token!r} is not an integer")
        token = operator.index(token)
        if not 0 <= token < self.n_words:
            raise ArgumentError(f"token id {token} is outside 0..{self.n_words - 1} "
                                f"of tokenizer {self.path}")
        return token

    def is_control(self, token):
        """Control tokens (BOS, EOS, <|im_start|> ...) mark structure and print nothing."""
        return self.check_id(token) in self.control_ids

    def text_bytes(self, token, at_start=False):
        """The bytes `token` adds to decoded text. `at_start`: no piece has been decoded yet."""
        token = self.check_id(token)
        if self.is_control(token):
            return b""
        if token == self.unk_id and self.unk_surface is not None:
            return self.unk_surface.encode()
        # decode_piece drops a piece's leading space right after BOS; at the start of the text is
        # the same situation, whether or not a BOS id is actually there. Elsewhere no token came
        # before (None, not -1: a vocabulary without BOS has bos_id -1).
        return self.decode_piece(self.bos_id if at_start else None, token)

    def decode(self, ids):
        """Text of a list of ids; bytes that are not valid UTF-8 become U+FFFD, one per byte."""
        stream = StreamDecoder(self)
        return "".join(stream.feed(t) for t in ids) + stream.flush()


def check_text(text):
    """encode()'s argument: a str (bytes would be a different text in every tokenizer)."""
    if not isinstance(text, str):
        raise ArgumentError(f"encode() needs a str, got {type(text).__name__}")
    return text


def read_tokenizer_file(path):
    """The bytes of a tokenizer file, or a TokenizerError saying why not."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such tokenizer file") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path}: is a directory, expected a tokenizer file") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None


def read_head(path, n):
    """The first `n` bytes of a file (fewer if it is shorter; none if it cannot be read), for
    the cheap probes that recognise a format."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""

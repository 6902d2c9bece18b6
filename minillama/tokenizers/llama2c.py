"""llama2.c's tokenizer.bin, encoded exactly as run.c's encode() does, merge for merge.

The tokenizer.bin format (all little-endian):

    int32 max_token_length               longest piece, in bytes
    then, for each token id 0, 1, 2, ...:
        float32 score                    merge priority: higher merges first
        int32   length
        length bytes                     the piece, UTF-8; SentencePiece's "▁" is already " " here

It is an export of a SentencePiece vocabulary, so it decodes by SentencePiece's rules.
"""
import math
import os
import struct

from ..errors import TokenizerError, check_positive_int
from .base import Tokenizer, check_text, read_head, read_tokenizer_file
from .chat import Llama2Chat
from .merge import merge_pairs
from .sentencepiece import piece_bytes
from .utf8 import utf8_bytes, utf8_chunks

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0    # Llama's special ids, which llama2.c hard-codes too
UNK_SURFACE = " \u2047 "             # SentencePiece's default text for <unk>: " ⁇ "
NO_MERGE_SCORE = -1e10               # llama2.c's starting best_score: pairs scoring <= this never merge


class Llama2cTokenizer(Tokenizer):
    """llama2.c's tokenizer.bin: a vocabulary of byte-string pieces, each with a merge score."""

    unk_surface = UNK_SURFACE

    def __init__(self, path, vocab_size=None):
        """The tokenizer.bin at `path`; with vocab_size, it must hold exactly that many tokens."""
        if vocab_size is not None:
            check_positive_int("vocab_size", vocab_size)
        path = os.fspath(path)
        pieces, scores = read_tokenizer_bin(path, read_tokenizer_file(path), vocab_size)
        # the file names no chat format; the one its models (Llama 2's) were trained with
        self._init_vocab(path, pieces, scores, BOS_ID, EOS_ID, UNK_ID, -1, Llama2Chat())

    @classmethod
    def from_pieces(cls, pieces, scores, path, *, bos_id, eos_id, unk_id, pad_id, chat,
                    prefix_after_special=True):
        """The same encoder over a vocabulary already in memory (a GGUF's `llama` metadata):
        pieces as bytes, SentencePiece's "▁" spelled as a space, and their merge scores.
        prefix_after_special: see Tokenizer."""
        self = cls.__new__(cls)
        self._init_vocab(path, list(pieces), list(scores), bos_id, eos_id, unk_id, pad_id, chat)
        self.prefix_after_special = prefix_after_special
        return self

    def _init_vocab(self, path, pieces, scores, bos_id, eos_id, unk_id, pad_id, chat):
        super().__init__(path, len(pieces), bos_id=bos_id, eos_id=eos_id, unk_id=unk_id,
                         pad_id=pad_id, control_ids=[i for i in (bos_id, eos_id) if i >= 0],
                         chat=chat)
        self.vocab, self.vocab_scores = pieces, scores
        # run.c sorts the vocabulary and binary-searches it; a dict is the same lookup. Were a piece
        # listed twice (it never is in real files), the lowest id wins.
        self._ids = {}
        for i, piece in enumerate(self.vocab):
            self._ids.setdefault(piece, i)

    # --- encoding: run.c's encode() -------------------------------------------------------------

    def encode(self, text, bos, eos, dummy_prefix=True):
        """Token ids of `text`, exactly as llama2.c's encode(text, bos, eos) gives them.
        dummy_prefix=False: without the leading space (text that follows a special token in a
        chat template, where prefix_after_special is False). A GGUF's vocabulary may name no
        BOS or EOS (id -1): then none is added, as BPETokenizer does."""
        check_text(text)
        tokens = [self.bos_id] if bos and self.bos_id >= 0 else []
        if text and dummy_prefix:
            # SentencePiece's add_dummy_prefix: the text is read as if it started with a space, so
            # "Hello" at the start encodes like " Hello" in the middle of a sentence.
            tokens.append(self._dummy_prefix_id())
        for chunk in utf8_chunks(utf8_bytes(text)):
            if chunk in self._ids:
                tokens.append(self._ids[chunk])
            else:
                tokens.extend(self._byte_id(b) for b in chunk)   # byte fallback: <0xXX> = byte + 3
        tokens = self.merge(tokens)
        if eos and self.eos_id >= 0:
            tokens.append(self.eos_id)
        return tokens

    def merge(self, tokens):
        """BPE: merge adjacent tokens into longer pieces until no adjacent pair is a piece.

        The rule (run.c's): among all adjacent pairs whose concatenation is in the vocabulary, merge
        the one whose piece has the highest score, the leftmost one on ties; repeat. run.c
        rescans the list for each merge; merge_pairs() gets the same result in O(n log n).
        """
        def best(a, b):
            merged = self._ids.get(self.vocab[a] + self.vocab[b])
            if merged is not None and self.vocab_scores[merged] > NO_MERGE_SCORE:
                return -self.vocab_scores[merged], merged      # highest score first
            return None
        return merge_pairs([self.check_id(t) for t in tokens], best)

    def _dummy_prefix_id(self):
        if b" " not in self._ids:
            raise TokenizerError(f"{self.path}: has no ' ' piece, which encode() needs "
                                 f"as the dummy prefix")
        return self._ids[b" "]

    def _byte_id(self, byte):
        # run.c assumes ids 3..258 are <0x00>..<0xFF>; a vocabulary without them cannot encode this.
        if byte + 3 >= self.n_words or self.vocab[byte + 3] != b"<0x%02X>" % byte:
            raise TokenizerError(f"{self.path}: has no byte-fallback token <0x{byte:02X}> "
                                 f"at id {byte + 3} for a character not in its vocabulary")
        return byte + 3

    # --- decoding -------------------------------------------------------------------------------

    def decode_piece(self, prev_token, token):
        """llama2.c's decode(): the bytes to print for `token` when it follows `prev_token`."""
        return piece_bytes(self.vocab[self.check_id(token)], prev_token == self.bos_id)

    def piece(self, token):
        """The piece as text, for display (byte pieces stay "<0xXX>")."""
        return self.vocab[self.check_id(token)].decode("utf-8", errors="replace")


def read_tokenizer_bin(path, data, vocab_size=None):
    """(pieces, scores) from the bytes of a tokenizer.bin.

    Reads to the end of the file, or exactly `vocab_size` tokens when given. Checks every field,
    so a wrong file fails here with the token index and offset rather than later as nonsense.
    """
    if len(data) < 4:
        raise TokenizerError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer "
                             f"(expected a 4-byte max_token_length header)")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    if not 1 <= max_token_length <= len(data):
        raise TokenizerError(f"{path}: max_token_length is {max_token_length}, expected between 1 "
                             f"and the file size ({len(data)}); not a llama2.c tokenizer?")
    pieces, scores, offset = [], [], 4

    def more_to_read():
        return offset < len(data) if vocab_size is None else len(pieces) < vocab_size

    while more_to_read():
        i = len(pieces)
        where = f"{path}: token {i} at byte offset {offset}"
        if offset + 8 > len(data):
            more = "" if vocab_size is None else f"; vocab_size {vocab_size} needs more tokens"
            raise TokenizerError(f"{where}: file ends inside the record header (score, length){more}")
        score, length = struct.unpack_from("<fi", data, offset)
        if not math.isfinite(score):
            raise TokenizerError(f"{where}: score is {score}, expected a finite number")
        if not 0 <= length <= max_token_length:
            raise TokenizerError(f"{where}: length is {length}, expected 0..{max_token_length} "
                                 f"(the file's max_token_length)")
        if offset + 8 + length > len(data):
            raise TokenizerError(f"{where}: a {length}-byte piece runs past the end of the file "
                                 f"({len(data)} bytes)")
        pieces.append(data[offset + 8:offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    if offset != len(data):
        raise TokenizerError(f"{path}: {len(data) - offset} bytes left after token {len(pieces) - 1}; "
                             f"the file has more than vocab_size={vocab_size} tokens")
    if len(pieces) < 3:
        raise TokenizerError(f"{path}: has {len(pieces)} tokens, expected at least 3 "
                             f"(<unk>, BOS, EOS)")
    return pieces, scores


def looks_like_tokenizer_bin(path):
    """A tokenizer.bin starts with a plausible int32 max_token_length and a plausible first record."""
    head = read_head(path, 12)
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    if len(head) < 12:
        return False
    max_token_length, score, length = struct.unpack("<ifi", head)
    return (1 <= max_token_length <= size and math.isfinite(score)
            and 0 <= length <= max_token_length and 12 + length <= size)

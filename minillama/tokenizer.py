"""Tokenizers: text <-> token ids, for llama2.c's tokenizer.bin and for SentencePiece models.

    Llama2cTokenizer(path)        llama2.c's tokenizer.bin; encode() is run.c's BPE encoder, id for id
    SentencePieceTokenizer(path)  a SentencePiece .model, used as Meta's llama/tokenizer.py uses it
    load_tokenizer(path, vocab_size=None)   picks the right one from the file's content
    StreamDecoder(tokenizer)      token ids in, finished text out, one token at a time

Both tokenizers share one interface: n_words, bos_id, eos_id, pad_id, encode(text, bos, eos),
decode(ids), decode_piece(prev_token, token) -> bytes (llama2.c's decode()), piece(id) for display.
Ids are Llama's: 0 = <unk>, 1 = BOS, 2 = EOS, 3..258 = the 256 byte tokens <0x00>..<0xFF>.

The tokenizer.bin format (all little-endian):

    int32 max_token_length               longest piece, in bytes
    then, for each token id 0, 1, 2, ...:
        float32 score                    merge priority: higher merges first
        int32   length
        length bytes                     the piece, UTF-8; SentencePiece's "▁" is already " " here
"""
import codecs
import heapq
import math
import operator
import os
import re
import struct

from .errors import ArgumentError, TokenizerError

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0    # Llama's special ids, which llama2.c hard-codes too
UNK_SURFACE = " \u2047 "             # SentencePiece's default text for <unk>: " ⁇ "
SP_SPACE = "\u2581"                  # SentencePiece writes a space as "▁"
NO_MERGE_SCORE = -1e10               # llama2.c's starting best_score: pairs scoring <= this never merge
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")   # byte-fallback pieces, "<0x0A>" is byte 10


def _replace_each_byte(err):
    """UTF-8 decode error handler: one U+FFFD per invalid byte, the way SentencePiece decodes.

    Python's errors="replace" gives one U+FFFD per *run* of bad bytes, so b"\\xe3\\x81" would become
    "\\ufffd" where SentencePiece (and so Meta's decode) gives "\\ufffd\\ufffd".
    """
    return "\ufffd" * (err.end - err.start), err.end


UTF8_ERRORS = "minillama.replace-each-byte"
codecs.register_error(UTF8_ERRORS, _replace_each_byte)



def merge_pairs(symbols, best):
    """The BPE loop: join the best adjacent pair, again and again, until no pair can be joined.

    best(a, b) -> (priority, joined) when the pair may be joined, else None; the lowest priority
    joins first, the leftmost pair on ties. (llama2.c ranks pairs by their piece's score,
    GPT-2-style BPE by the pair's place in the merges list.)

    Rescanning the whole list for the best pair after every join is quadratic in its length.
    Instead the symbols form a linked list (positions never move; right[i] is the next live
    position, left[i] the previous one), and a heap holds every joinable pair as
    (priority, position, a, b, joined), so its top is the next join. A join only changes the two
    pairs around it; an older entry that no longer matches the list is skipped when it comes up.
    """
    symbols = list(symbols)             # symbols[i]: the symbol at position i; None once joined
    n = len(symbols)
    left = list(range(-1, n - 1))       # -1 before the first
    right = list(range(1, n + 1))       # n after the last
    heap = []

    def push_pair(i):
        """Offer the pair (i, right[i]) to the heap if there is one and it may be joined."""
        if 0 <= i and right[i] < n:
            a, b = symbols[i], symbols[right[i]]
            rule = best(a, b)
            if rule is not None:
                heapq.heappush(heap, (rule[0], i, a, b, rule[1]))

    for i in range(n - 1):
        push_pair(i)
    while heap:
        _, i, a, b, joined = heapq.heappop(heap)
        j = right[i]
        if symbols[i] != a or j >= n or symbols[j] != b:
            continue                    # stale: position i or its neighbour changed since
        symbols[i], symbols[j] = joined, None       # i absorbs j ...
        right[i] = right[j]                         # ... and j leaves the list
        if right[i] < n:
            left[right[i]] = i
        push_pair(left[i])              # the two pairs that now contain the joined symbol
        push_pair(i)
    return [s for s in symbols if s is not None]

class _TextRules:
    """How token ids become text; shared by both tokenizers so they decode alike.

    These are SentencePiece's decoding rules: BOS/EOS print nothing, <unk> prints unk_surface
    (" ⁇ "), and the first piece of the text loses its leading space (the "dummy prefix" encode()
    added). Subclasses provide n_words, bos_id, eos_id, unk_id, unk_surface, path, decode_piece().
    """

    # A model trained to collapse runs of spaces (SentencePiece's remove_extra_whitespaces, e.g.
    # tok512.model) also drops *every* leading "▁" piece when decoding, not just the first.
    # Llama's tokenizer.model keeps them; a tokenizer.bin does not record which, so it keeps them.
    drops_all_leading_spaces = False

    def is_control(self, token):
        """BOS and EOS: they mark the text's ends and print nothing."""
        return token == self.bos_id or token == self.eos_id

    def text_bytes(self, token, at_start):
        """The bytes `token` adds to decoded text. `at_start`: no piece has been decoded yet."""
        token = self.check_id(token)
        if self.is_control(token):
            return b""
        if token == self.unk_id:
            return self.unk_surface.encode()
        # decode_piece drops a piece's leading space right after BOS; at the start of the text is
        # the same situation, whether or not a BOS id is actually there.
        return self.decode_piece(self.bos_id if at_start else -1, token)

    def decode(self, ids):
        """Text of a list of ids; bytes that are not valid UTF-8 become U+FFFD."""
        stream = StreamDecoder(self)
        return "".join(stream.feed(t) for t in ids) + stream.flush()

    def check_id(self, token):
        """`token` as an int, if it is a valid id of this tokenizer."""
        try:
            token = operator.index(token)
        except TypeError:
            raise ArgumentError(f"token id {token!r} is not an integer") from None
        if not 0 <= token < self.n_words:
            raise ArgumentError(f"token id {token} is outside 0..{self.n_words - 1} "
                                f"of tokenizer {self.path}")
        return token


def _byte_piece_value(piece):
    """The byte a "<0xXX>" piece stands for, or None for any other piece."""
    m = _BYTE_PIECE.fullmatch(piece)
    return int(m.group(1), 16) if m else None


def utf8_bytes(text):
    """`text` as UTF-8 bytes, whatever it holds. Bytes that were not UTF-8 where the text came
    from (a command-line argument, a file name) arrive as U+DC80..U+DCFF (Python's
    surrogateescape) and become those bytes again, as run.c would read them from argv; any other
    lone surrogate is written as its own 3 bytes (surrogatepass)."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass")


def _utf8_chunks(data):
    """Split UTF-8 bytes into code points, the way run.c does: a chunk starts at any byte that is
    not a continuation byte (0b10xxxxxx) and takes the continuation bytes after it, 4 bytes at most."""
    chunks, start = [], 0
    while start < len(data):
        end = start + 1
        while end < len(data) and data[end] & 0xC0 == 0x80 and end - start < 4:
            end += 1
        chunks.append(data[start:end])
        start = end
    return chunks


class Llama2cTokenizer(_TextRules):
    """llama2.c's tokenizer.bin: a vocabulary of byte-string pieces, each with a merge score."""

    bos_id, eos_id, unk_id, pad_id = BOS_ID, EOS_ID, UNK_ID, -1
    unk_surface = UNK_SURFACE

    def __init__(self, path, vocab_size=None):
        self.path = os.fspath(path)
        if vocab_size is not None:
            vocab_size = _positive_int(vocab_size, "vocab_size")
        data = _read_file(self.path)
        self.max_token_length, self.vocab, self.vocab_scores = _parse_tokenizer_bin(
            self.path, data, vocab_size)
        self._index_vocab()

    @classmethod
    def from_pieces(cls, pieces, scores, path="<memory>"):
        """The same encoder over a vocabulary already in memory (a GGUF's `llama` metadata):
        pieces as bytes, SentencePiece's "▁" spelled as a space, and their merge scores."""
        self = cls.__new__(cls)
        self.path = os.fspath(path)
        self.vocab, self.vocab_scores = list(pieces), list(scores)
        self.max_token_length = max(map(len, self.vocab), default=0)
        self._index_vocab()
        return self

    def _index_vocab(self):
        self.n_words = len(self.vocab)
        # run.c sorts the vocabulary and binary-searches it; a dict is the same lookup. Were a piece
        # listed twice (it never is in real files), the lowest id wins.
        self._ids = {}
        for i, piece in enumerate(self.vocab):
            self._ids.setdefault(piece, i)

    def __repr__(self):
        return f"Llama2cTokenizer({self.path!r}, n_words={self.n_words})"

    # --- encoding: run.c's encode() -------------------------------------------------------------

    def encode(self, text, bos, eos):
        """Token ids of `text`, exactly as llama2.c's encode(text, bos, eos) gives them."""
        if not isinstance(text, str):
            raise ArgumentError(f"encode() needs a str, got {type(text).__name__}")
        tokens = [self.bos_id] if bos else []
        if text:
            # SentencePiece's add_dummy_prefix: the text is read as if it started with a space, so
            # "Hello" at the start encodes like " Hello" in the middle of a sentence.
            tokens.append(self._dummy_prefix_id())
        for chunk in _utf8_chunks(utf8_bytes(text)):
            if chunk in self._ids:
                tokens.append(self._ids[chunk])
            else:
                tokens.extend(self._byte_id(b) for b in chunk)   # byte fallback: <0xXX> = byte + 3
        tokens = self.merge(tokens)
        if eos:
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
        token = self.check_id(token)
        piece = self.vocab[token]
        if prev_token == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]           # the dummy prefix's space: text starts after BOS
        byte = _byte_piece_value(piece)
        return piece if byte is None else bytes([byte])

    def piece(self, token):
        """The piece as text, for display (byte pieces stay "<0xXX>")."""
        token = self.check_id(token)
        return self.vocab[token].decode("utf-8", errors="replace")


def _positive_int(value, name):
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1 or isinstance(value, bool):
        raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    return number


def _read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such tokenizer file") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path}: is a directory, expected a tokenizer file") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None


def _parse_tokenizer_bin(path, data, vocab_size=None):
    """(max_token_length, pieces, scores) from the bytes of a tokenizer.bin.

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
    return max_token_length, pieces, scores


class SentencePieceTokenizer(_TextRules):
    """A SentencePiece model, used as Meta's llama/tokenizer.py uses it."""

    def __init__(self, path):
        from sentencepiece import SentencePieceProcessor
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        data = _read_file(self.path)    # read here: sentencepiece's own open() needs a UTF-8 path
        try:
            self.sp_model = SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError, ValueError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model "
                                 f"({str(e).splitlines()[0]})") from None
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.pad_id()
        self.unk_id = self.sp_model.unk_id()
        try:        # sentencepiece hands out pieces as str: a damaged model fails here, not later
            self.sp_model.id_to_piece(list(range(self.n_words)))
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{self.path}: a piece is not valid UTF-8 ({e.reason}); "
                                 f"damaged SentencePiece model?") from None
        # Usually " ⁇ ", but a model can set its own (tok512.model's is the escaped text
        # " \\342\\201\\207 ", a quirk of how it was trained).
        self.unk_surface = self.sp_model.decode([self.unk_id]) if self.unk_id >= 0 else ""
        # Ask the decoder itself whether it drops a second leading "▁" (see _TextRules).
        space = self.sp_model.piece_to_id(SP_SPACE)
        self.drops_all_leading_spaces = (space != self.unk_id
                                         and self.sp_model.decode([space, space]) == "")

    def __repr__(self):
        return f"SentencePieceTokenizer({self.path!r}, n_words={self.n_words})"

    def encode(self, text, bos, eos):
        if not isinstance(text, str):
            raise ArgumentError(f"encode() needs a str, got {type(text).__name__}")
        for wanted, name, token in ((bos, "BOS", self.bos_id), (eos, "EOS", self.eos_id)):
            if wanted and token < 0:        # sentencepiece gives -1 for a piece it lacks
                raise TokenizerError(f"{self.path}: has no {name} token, which encode() was "
                                     f"asked to add")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:      # lone surrogates: sentencepiece takes the raw bytes
            text = utf8_bytes(text)
        ids = self.sp_model.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids):
        return self.sp_model.decode([self.check_id(t) for t in ids])

    def is_control(self, token):
        return self.sp_model.is_control(self.check_id(token))

    def decode_piece(self, prev_token, token):
        """Same rules as Llama2cTokenizer.decode_piece, with "▁" read as a space."""
        token = self.check_id(token)
        piece = self.sp_model.id_to_piece(token).replace(SP_SPACE, " ").encode()
        if prev_token == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        byte = _byte_piece_value(piece)
        return piece if byte is None else bytes([byte])

    def piece(self, token):
        token = self.check_id(token)
        return self.sp_model.id_to_piece(token).replace(SP_SPACE, " ")


class StreamDecoder:
    """Decode ids one at a time for streaming output: feed(id) returns the text now complete.

    A character outside the vocabulary arrives as several byte tokens (e.g. "あ" is <0xE3> <0x81>
    <0x82>); its bytes wait here until the character is whole. Invalid bytes become U+FFFD, one
    per byte, so nothing is dropped and nothing raises. The pieces fed, joined with flush(), equal
    tokenizer.decode(ids) (for the SentencePiece tokenizer too: tests compare them).

    at_start=True: the first piece starts the text and loses its leading space (as in decode()).
    Pass at_start=False to continue text already shown, e.g. the tokens generated after a prompt.
    """

    def __init__(self, tokenizer, at_start=True):
        self.tokenizer = tokenizer
        self.at_start = at_start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=UTF8_ERRORS)

    def feed(self, token):
        token = self.tokenizer.check_id(token)
        if self.tokenizer.is_control(token):
            # BOS/EOS print nothing, and a character cannot span them: SentencePiece decodes each
            # unbroken run of byte tokens on its own, so bytes left unfinished are bad bytes now.
            return self.flush()
        data = self.tokenizer.text_bytes(token, self.at_start)
        if data or not self.tokenizer.drops_all_leading_spaces:
            self.at_start = False
        return self._utf8.decode(data)

    def flush(self):
        """The text still held back (an unfinished character comes out as U+FFFDs)."""
        return self._utf8.decode(b"", final=True)


# --- choosing the format ------------------------------------------------------------------------

def _head(path, n):
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _looks_like_sentencepiece(path):
    """A SentencePiece model is a ModelProto protobuf, which begins with its first piece:
    field 1 (tag 0x0A), a varint length, then that message's own field 1, the piece (tag 0x0A)."""
    head = _head(path, 16)
    if len(head) < 3 or head[0] != 0x0A:
        return False
    i = 1
    while i < len(head) and head[i] & 0x80:     # skip the varint length
        i += 1
    return i + 1 < len(head) and head[i] > 0 and head[i + 1] == 0x0A


def _looks_like_llama2c(path):
    """A tokenizer.bin starts with a plausible int32 max_token_length and a plausible first record."""
    head = _head(path, 12)
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    if len(head) < 12:
        return False
    max_token_length, score, length = struct.unpack("<ifi", head)
    return (1 <= max_token_length <= size and math.isfinite(score)
            and 0 <= length <= max_token_length and 12 + length <= size)


def _looks_like_gguf(path):
    return _head(path, 4) == b"GGUF"


def _gguf_tokenizer(path):
    from .checkpoints.gguf import gguf_tokenizer     # the vocabulary in a GGUF model's metadata
    return gguf_tokenizer(path)


# Extension point: (name, probe(path) -> bool, constructor(path) -> tokenizer), tried in order.
# A probe must be cheap and never raise; the constructor does the full validation. To read the
# tokenizer embedded in another file (e.g. a GGUF model's metadata), add an entry here whose
# constructor returns an object with the same interface as the two classes above.
TOKENIZER_FORMATS = [
    ("gguf", _looks_like_gguf, _gguf_tokenizer),
    ("sentencepiece", _looks_like_sentencepiece, SentencePieceTokenizer),
    ("llama2c", _looks_like_llama2c, Llama2cTokenizer),
]


def load_tokenizer(path, vocab_size=None):
    """The tokenizer in `path`, whatever its format; checks it has `vocab_size` tokens if given."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such tokenizer file")
    if os.path.isdir(path):
        raise TokenizerError(f"{path}: is a directory, expected a tokenizer file")
    errors = []
    for _, probe, make in TOKENIZER_FORMATS:
        if probe(path):
            try:
                tokenizer = make(path)
                break
            except TokenizerError as e:
                errors.append(e)    # maybe another format fits; else this is the best explanation
    else:
        if errors:
            raise errors[0]
        names = ", ".join(name for name, _, _ in TOKENIZER_FORMATS)
        raise TokenizerError(f"{path}: not a tokenizer minillama knows (expected one of: {names})")
    if vocab_size is not None and tokenizer.n_words != vocab_size:
        raise TokenizerError(f"tokenizer {path} has {tokenizer.n_words} tokens but the model's "
                             f"vocab_size is {vocab_size}")
    return tokenizer

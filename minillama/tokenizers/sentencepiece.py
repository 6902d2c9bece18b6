"""A SentencePiece model (.model), used as Meta's llama/tokenizer.py uses it; and SentencePiece's
piece rules, which llama2.c's tokenizer.bin (an export of the same vocabulary) follows too."""
import os
import re

from ..errors import TokenizerError, shown
from .base import Tokenizer, check_text, read_head, read_tokenizer_file
from .chat import chat_beside
from .utf8 import utf8_bytes

SP_SPACE = "\u2581"                  # SentencePiece writes a space as "▁"
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")   # byte-fallback pieces, "<0x0A>" is byte 10


def piece_bytes(piece, after_bos):
    """The bytes a piece prints (its "▁" already a space), as llama2.c's decode() gives them:
    right after BOS the dummy prefix's space goes, and a byte-fallback piece "<0xXX>" is that
    one byte (so "<0x20>" keeps its space)."""
    if after_bos and piece.startswith(b" "):
        piece = piece[1:]
    m = _BYTE_PIECE.fullmatch(piece)
    return piece if m is None else bytes([int(m.group(1), 16)])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model. Its decode() is the library's own: the reference that the shared
    rules (StreamDecoder, llama2.c's tokenizer.bin) are tested against."""

    def __init__(self, path):
        from sentencepiece import SentencePieceProcessor
        path = os.fspath(path)
        if not os.path.exists(path):
            raise TokenizerError(f"{path}: no such tokenizer file")
        data = read_tokenizer_file(path)    # read here: sentencepiece's own open() needs a UTF-8 path
        try:
            self.sp_model = SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError, ValueError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model "
                                 f"({shown(str(e).splitlines()[0], quote=False)})") from None
        sp = self.sp_model
        n_words = sp.vocab_size()
        try:        # sentencepiece hands out pieces as str: a damaged model fails here, not later
            sp.id_to_piece(list(range(n_words)))
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: a piece is not valid UTF-8 ({e.reason}); "
                                 f"damaged SentencePiece model?") from None
        super().__init__(path, n_words, bos_id=sp.bos_id(), eos_id=sp.eos_id(),
                         unk_id=sp.unk_id(), pad_id=sp.pad_id(),
                         control_ids=[i for i in range(n_words) if sp.is_control(i)],
                         chat=chat_beside(path))     # a Hugging Face directory's template
        # Usually " ⁇ ", but a model can set its own (tok512.model's is the escaped text
        # " \\342\\201\\207 ", a quirk of how it was trained).
        self.unk_surface = sp.decode([self.unk_id]) if self.unk_id >= 0 else ""
        # Ask the decoder itself whether it drops a second leading "▁" (see Tokenizer).
        space = sp.piece_to_id(SP_SPACE)
        self.drops_all_leading_spaces = space != self.unk_id and sp.decode([space, space]) == ""

    def encode(self, text, bos, eos):
        check_text(text)
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

    def decode_piece(self, prev_token, token):
        return piece_bytes(self.piece(token).encode(), prev_token == self.bos_id)

    def piece(self, token):
        return self.sp_model.id_to_piece(self.check_id(token)).replace(SP_SPACE, " ")


def looks_like_sentencepiece(path):
    """A SentencePiece model is a ModelProto protobuf, which begins with its first piece:
    field 1 (tag 0x0A), a varint length, then that message's own field 1, the piece (tag 0x0A)."""
    head = read_head(path, 16)
    if len(head) < 3 or head[0] != 0x0A:
        return False
    i = 1
    while i < len(head) and head[i] & 0x80:     # skip the varint length
        i += 1
    return i + 1 < len(head) and head[i] > 0 and head[i + 1] == 0x0A

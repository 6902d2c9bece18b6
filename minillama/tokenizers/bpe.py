"""Byte-level BPE, the GPT-2 way: the tokenizer of SmolLM2, of Llama 3 and of every `gpt2` GGUF
vocabulary.

encode(text) in four steps:

 1. Special tokens (control and user-defined ones, e.g. "<|im_start|>") are cut out of the text
    whole, the longest first where two start at the same place.
 2. The rest is split into pre-tokens by the pre-tokenizer the vocabulary was trained with
    (GGUF's `tokenizer.ggml.pre`). GPT-2's pattern keeps an English contraction ('s 't 're 've
    'm 'll 'd), a run of letters or of numbers or of other symbols with at most one space before
    it, and whitespace (a run before a word leaves its last space to the word) apart. SmolLM2
    ("smollm") first puts every digit on its own. Llama 3 ("llama-bpe") takes numbers three
    digits at a time, lets any one non-letter lead a word, and keeps line breaks together.
 3. Each pre-token's UTF-8 bytes are spelled as printable characters, one per byte (see
    bytes_to_unicode), so a token is an ordinary string: " hello" is "Ġhello".
 4. BPE: join the adjacent pair of symbols that comes first in the merges list, and repeat
    until no adjacent pair is in the list. Each symbol left is a token. A vocabulary without a
    merges list (tiktoken's, Llama 3's tokenizer.model) ranks a pair by the token it makes
    instead: the lower that token's rank, the earlier the join.

decode() turns each token's characters back into bytes and the bytes into UTF-8 text.

The patterns are written with the `regex` package, which knows \\p{L} (letters) and \\p{N}
(numbers) and, like the Rust and Oniguruma engines that Hugging Face tokenizers, tiktoken and
llama.cpp use, takes \\s to be Unicode's White_Space list.
"""
import functools
import re

import regex

from ..errors import TokenizerError, shown
from .base import Tokenizer, check_text
from .chat import Llama2Chat
from .merge import merge_pairs
from .utf8 import utf8_bytes

# GGUF token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def bytes_to_unicode():
    """GPT-2's spelling of bytes as characters: {byte: character}.

    Bytes that are printable Latin-1 characters (! to ~, ¡ to ¬, ® to ÿ) stand for themselves;
    the other 68 (control codes, space, soft hyphen ...) take the characters 256, 257, ... in
    byte order, so the space 0x20 becomes "Ġ" (256 + 32) and the newline 0x0A becomes "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def spell_bytes(data):
    """Bytes in GPT-2's spelling, one character per byte: b" hi" -> "Ġhi"."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


# ----------------------------------------------------------------------------
# pre-tokenizers

@functools.lru_cache(maxsize=None)
def gpt2_pattern():
    return regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                         r"|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=None)
def digit_pattern():
    return regex.compile(r"\p{N}")


@functools.lru_cache(maxsize=None)
def llama3_pattern():
    """Meta's pat_str for Llama 3 (llama_models' Tokenizer), which llama.cpp calls llama-bpe:
    contractions in any case, a word with at most one non-letter, non-digit before it, numbers
    of 1 to 3 digits, symbols with the line breaks after them, line breaks with the spaces
    before them, then whitespace as GPT-2 splits it."""
    return regex.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# llama.cpp's pre-tokenizer names -> the regexes it applies one after another for them
PRE_TOKENIZERS = {name: (gpt2_pattern,) for name in ("gpt-2", "gpt2", "mpt", "olmo")}
PRE_TOKENIZERS.update({name: (digit_pattern, gpt2_pattern) for name in (
    "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")})
PRE_TOKENIZERS.update({name: (llama3_pattern,) for name in ("llama-bpe", "llama3", "llama-v3")})


def split_isolated(pieces, pattern):
    """Split each piece at the matches of `pattern`, keeping both the matches and the text
    between them (the "isolated" behaviour of Hugging Face's Split and of llama.cpp)."""
    out = []
    for piece in pieces:
        pos = 0
        for m in pattern.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


# ----------------------------------------------------------------------------
# the tokenizer

class BPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary: token strings (in the byte spelling), merges "a b" in
    priority order, and optionally GGUF token types (control/user-defined tokens are special).

    merges=None: no merges list, as in a tiktoken file; a pair's priority is then the rank (the
    id) of the normal token it would make, the rule tiktoken applies.
    encode(bos=True) adds BOS only if the vocabulary wants one (add_bos): SmolLM2 does not.
    chat: the chat format its model was trained with (default: Llama 2's, as for any vocabulary
    that names none). stop_tokens: the ids that end a reply (default: EOS).
    """

    def __init__(self, tokens, merges, token_types=None, pre="gpt-2", bos=-1, eos=-1, unk=-1,
                 pad=-1, add_bos=False, path="<memory>", chat=None, stop_tokens=None):
        tokens = list(tokens)
        token_types = list(token_types) if token_types is not None else [NORMAL] * len(tokens)
        super().__init__(path, len(tokens), bos_id=bos, eos_id=eos, unk_id=unk, pad_id=pad,
                         control_ids=[i for i, kind in enumerate(token_types) if kind == CONTROL],
                         chat=chat or Llama2Chat(), stop_tokens=stop_tokens)
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"{self.path}: pre-tokenizer {shown(pre)} is not supported "
                                 f"(expected one of: {', '.join(PRE_TOKENIZERS)})")
        self.pre, self.patterns = pre, [make() for make in PRE_TOKENIZERS[pre]]
        self.tokens, self.token_types = tokens, token_types
        self.add_bos = add_bos
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        if merges is None:          # tiktoken: a pair may join if the token it makes exists
            self.ranks = None
            self.token_ranks = {t: i for i, (t, kind) in enumerate(zip(tokens, token_types))
                                if kind == NORMAL}
        else:
            self.ranks = self._parse_merges(merges)
        specials = [t for t, kind in zip(self.tokens, self.token_types)
                    if kind in (CONTROL, USER_DEFINED) and t]
        self.special = (re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
                        if specials else None)
        self._cache = {}

    def __repr__(self):
        return f"BPETokenizer({self.path!r}, n_words={self.n_words}, pre={self.pre!r})"

    def _parse_merges(self, merges):
        ranks = {}
        for rank, merge in enumerate(merges):
            pair = tuple(merge.split(" "))
            if len(pair) != 2 or not all(pair):
                raise TokenizerError(f"{self.path}: merge #{rank} is {shown(merge)}, expected two "
                                     f"symbols separated by one space")
            ranks.setdefault(pair, rank)
        return ranks

    # --- encoding --------------------------------------------------------------------------

    def encode(self, text, bos, eos):
        check_text(text)
        ids = [self.bos_id] if bos and self.add_bos and self.bos_id >= 0 else []
        for chunk, is_special in self._split_special(text):
            ids.extend([self.ids[chunk]] if is_special else self.encode_ordinary(chunk))
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def encode_ordinary(self, text):
        """The ids of `text` as plain text: a special token's name written in it is spelled
        out, not turned into the special token (tiktoken's encode_ordinary; what Meta's Llama 3
        Tokenizer.encode does by default). No BOS or EOS."""
        pieces = [check_text(text)]
        for pattern in self.patterns:
            pieces = split_isolated(pieces, pattern)
        return [i for piece in pieces for i in self._encode_piece(piece)]

    def _split_special(self, text):
        """(chunk, is_special) pairs: special tokens whole, the text between them as it is."""
        pos = 0
        if self.special is not None:
            for m in self.special.finditer(text):
                if m.start() > pos:
                    yield text[pos:m.start()], False
                yield m.group(), True
                pos = m.end()
        if pos < len(text):
            yield text[pos:], False

    def _encode_piece(self, piece):
        word = spell_bytes(utf8_bytes(piece))
        if word not in self._cache:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[word] = [self._symbol_id(s) for s in self.merge(word)]
        return self._cache[word]

    def merge(self, word):
        """BPE on one pre-token (a string in the byte spelling): the list of its symbols.

        The rule, as Hugging Face tokenizers and llama.cpp apply it: join the adjacent pair that
        comes first in the merges list, the leftmost one where a pair occurs twice; repeat until
        no adjacent pair is a merge (merge_pairs(), in O(n log n)). Without a merges list the
        rule is tiktoken's: the pair whose joined symbol is the token of lowest rank joins first.
        """
        def best(a, b):
            rank = self.ranks.get((a, b))
            return None if rank is None else (rank, a + b)

        def best_by_token_rank(a, b):       # tiktoken's rule
            rank = self.token_ranks.get(a + b)
            return None if rank is None else (rank, a + b)
        return merge_pairs(word, best if self.ranks is not None else best_by_token_rank)

    def _symbol_id(self, symbol):
        if symbol in self.ids:
            return self.ids[symbol]
        if self.unk_id >= 0:
            return self.unk_id
        raise TokenizerError(f"{self.path}: symbol {shown(symbol)} is not in the vocabulary and "
                             f"there is no unknown token")

    # --- decoding --------------------------------------------------------------------------

    def token_bytes(self, token):
        """The bytes a token stands for (special tokens: their text)."""
        token = self.check_id(token)
        text = self.tokens[token]
        if self.token_types[token] in (NORMAL, UNUSED, BYTE) and all(c in CHAR_TO_BYTE for c in text):
            return bytes(CHAR_TO_BYTE[c] for c in text)
        return text.encode("utf-8")

    def decode_piece(self, prev_token, token):
        """The bytes of `token`, whatever came before (byte-level BPE has no leading-space
        rule); as in llama2.c's decode(), a control token gives its own text."""
        return self.token_bytes(token)

    def piece(self, token):
        """The token as text, for display; control tokens show their name."""
        return self.token_bytes(token).decode("utf-8", errors="replace")

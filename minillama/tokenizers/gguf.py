"""The tokenizer a GGUF model carries in its metadata, built from checkpoints.gguf's GGUFVocab:
byte-level BPE for a `gpt2` vocabulary (Llama 3's among them, pre-tokenizer `llama-bpe`),
llama2.c's score-merging encoder for a `llama` one."""
import math

from ..checkpoints.gguf import read_gguf_vocab
from ..errors import TokenizerError
from .bpe import BPETokenizer
from .chat import chat_format
from .llama2c import Llama2cTokenizer
from .sentencepiece import SP_SPACE
from .tiktoken import STOP_TOKENS as LLAMA3_STOP_TOKENS


def gguf_tokenizer(path, header=None):
    """The tokenizer in the metadata of the GGUF file at `path` (header: its GGUFFile, if the
    model's reader has parsed it already)."""
    vocab = read_gguf_vocab(path, header)
    return {"gpt2": _bpe_tokenizer, "llama": _llama_tokenizer}[vocab.model](vocab)


def _bpe_tokenizer(vocab):
    return BPETokenizer(vocab.tokens, vocab.merges, token_types=vocab.token_types, pre=vocab.pre,
                        bos=vocab.bos_id, eos=vocab.eos_id, unk=vocab.unk_id, pad=vocab.pad_id,
                        add_bos=vocab.add_bos, path=vocab.path,
                        chat=chat_format(vocab.chat_template,
                                         f"{vocab.path}: tokenizer.chat_template"),
                        stop_tokens=_stop_tokens(vocab))


def _stop_tokens(vocab):
    """EOS, and Llama 3's other ends of a reply where the vocabulary has them (an instruct
    model's GGUF may name <|eot_id|> its EOS, a base model's <|end_of_text|>: both stop)."""
    stops = [vocab.eos_id] if vocab.eos_id >= 0 else []
    ids = {token: i for i, token in enumerate(vocab.tokens) if token in LLAMA3_STOP_TOKENS}
    return stops + [ids[t] for t in LLAMA3_STOP_TOKENS if t in ids and ids[t] not in stops]


def _llama_tokenizer(vocab):
    if not all(map(math.isfinite, vocab.scores)):
        raise TokenizerError(f"{vocab.path}: metadata 'tokenizer.ggml.scores' has a non-finite "
                             f"score")
    # llama2.c's encoder falls back to byte b as token b + 3: Llama's layout, checked here
    if vocab.tokens[3:259] != [f"<0x{b:02X}>" for b in range(256)]:
        raise TokenizerError(f"{vocab.path}: the 'llama' vocabulary does not have the byte tokens "
                             f"<0x00>..<0xFF> at ids 3..258, which minillama's encoder needs")
    # llama2.c's tokenizer.bin spells SentencePiece's "▁" as a space; the encoder expects that
    pieces = [t.replace(SP_SPACE, " ").encode("utf-8") for t in vocab.tokens]
    # The chat template's special tokens (<s>, </s>) are cut out of the rendered text by
    # chat.encode_rendered; the text after one is encoded without the dummy prefix, as
    # transformers encodes it with the tokenizer it converts from this vocabulary.
    return Llama2cTokenizer.from_pieces(pieces, vocab.scores, vocab.path, bos_id=vocab.bos_id,
                                        eos_id=vocab.eos_id, unk_id=vocab.unk_id,
                                        pad_id=vocab.pad_id,
                                        chat=chat_format(vocab.chat_template,
                                                         f"{vocab.path}: tokenizer.chat_template"),
                                        prefix_after_special=False)

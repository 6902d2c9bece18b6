"""Tokenizers: text <-> token ids, one module per family, one interface (base.Tokenizer).

    load_tokenizer(path, vocab_size=None)   the tokenizer in a file, whatever its format (loading.py)
    Llama2cTokenizer(path)        llama2.c's tokenizer.bin; encode() is run.c's, id for id
    SentencePieceTokenizer(path)  a SentencePiece .model, used as Meta's llama/tokenizer.py uses it
    BPETokenizer(tokens, merges)  GPT-2-style byte-level BPE, e.g. the vocabulary in SmolLM2's GGUF
                                  or Llama 3's tiktoken tokenizer.model (tiktoken.py)
    StreamDecoder(tokenizer)      token ids in, finished text out, one token at a time
    Llama2Chat, Llama3Chat,       chat formats (TemplateChat: the model's own chat template,
    TemplateChat                  template.py); every tokenizer carries one as `tokenizer.chat`
"""
from .base import Tokenizer
from .bpe import BPETokenizer
from .chat import Llama2Chat, Llama3Chat, TemplateChat
from .llama2c import Llama2cTokenizer
from .loading import load_tokenizer
from .sentencepiece import SentencePieceTokenizer
from .stream import StreamDecoder

__all__ = ["BPETokenizer", "Llama2Chat", "Llama2cTokenizer", "Llama3Chat",
           "SentencePieceTokenizer", "StreamDecoder", "TemplateChat", "Tokenizer",
           "load_tokenizer"]

"""The model files the notebooks use: the real ones when they are there, small stand-ins otherwise.

The real files are llama2.c's stories260K model and its 512-token tokenizer, in a `shared/models`
folder beside the checkout (../shared/models from the repository root), or at
$MINILLAMA_SHARED/models: where the tests find them too (tests/tools/__init__.py).

Without them, story_files() writes stand-ins of the same kinds to a temporary folder, so every
notebook still runs top to bottom: a SentencePiece model trained on a few sentences (with byte
fallback, as Llama's is), the same vocabulary as a llama2.c tokenizer.bin, and a model with
stories260K's shapes and random weights, in llama2.c's float32 and int8 formats. A random model
writes gibberish, of course; the notebooks say so where it matters.

Set MINILLAMA_NO_SHARED=1 to use the stand-ins even when the real files exist (the test suite
does, to check that the notebooks run without them).
"""
import io
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

# The checkout this folder belongs to, for tests/tools (the writers the stand-ins are made with,
# where the shared folder is) and for minillama itself when it is not installed. Appended, so
# an installed minillama still comes first.
CHECKOUT = str(Path(__file__).resolve().parents[1])
if CHECKOUT not in sys.path:
    sys.path.append(CHECKOUT)

from minillama.checkpoints.random import random_weights  # noqa: E402  (after the path is set)
from minillama.model import ModelArgs  # noqa: E402
from tests.tools import MODELS  # noqa: E402
from tests.tools.writers import tokenizer_bin_bytes, write_llama2c  # noqa: E402

# stories260K's shapes (see ../shared/README.md), vocab_size taken from the stand-in tokenizer
STORIES260K = dict(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, max_seq_len=512)

_CORPUS = """Once upon a time, there was a little girl named Lily.
She loved to play outside in the park with her red ball.
One day, Lily saw a big dog under a tree. The dog was sad.
Lily said, "Do not be sad. Let's play together!"
The dog wagged its tail and they played all day.
Tom was a happy boy who liked to run and jump.
His mom gave him a shiny stone and a blue hat.
They went home and ate a warm cake. The end."""


def find_shared_models():
    """The shared/models folder, or None. MINILLAMA_NO_SHARED=1 always gives None."""
    if os.environ.get("MINILLAMA_NO_SHARED") or not (MODELS / "stories260K.bin").is_file():
        return None
    return MODELS


def story_files():
    """Paths of the files the notebooks read, real or stand-in:
    model (llama2.c v0, float32), model_q8 (llama2.c v2, int8), tokenizer_bin (llama2.c),
    tokenizer_model (SentencePiece, the same vocabulary), llama2_tokenizer_bin and
    llama2_tokenizer_model (Llama 2's 32000-token vocabulary; None for the stand-ins),
    and real: True for the real files."""
    models = find_shared_models()
    if models is not None:
        return SimpleNamespace(
            real=True, folder=models,
            model=models / "stories260K.bin", model_q8=models / "stories260K-q8.bin",
            tokenizer_bin=models / "tok512.bin", tokenizer_model=models / "tok512.model",
            llama2_tokenizer_bin=models / "tokenizer.bin",
            llama2_tokenizer_model=models / "tokenizer.model")
    return _stand_ins()


_made = {}


def _stand_ins():
    """Write (once per process) the stand-in files to a temporary folder."""
    if "files" not in _made:
        folder = Path(tempfile.mkdtemp(prefix="minillama-stand-ins-"))
        sp_model = folder / "stand_in.model"
        sp_model.write_bytes(train_sentencepiece(_CORPUS.splitlines(), vocab_size=320))
        tok_bin = folder / "stand_in_tok.bin"
        write_tokenizer_bin(sp_model, tok_bin)
        model, model_q8 = folder / "stand_in.bin", folder / "stand_in-q8.bin"
        write_random_model(model, model_q8, vocab_size=_vocab_size(sp_model))
        _made["files"] = SimpleNamespace(
            real=False, folder=folder, model=model, model_q8=model_q8,
            tokenizer_bin=tok_bin, tokenizer_model=sp_model,
            llama2_tokenizer_bin=None, llama2_tokenizer_model=None)
    return _made["files"]


def train_sentencepiece(sentences, vocab_size):
    """Bytes of a BPE SentencePiece model trained the way Llama's was: byte fallback, digits
    split, no normalization, ids 0/1/2 = <unk>/<s>/</s> and no pad."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, hard_vocab_limit=False,
        normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return out.getvalue()


def _vocab_size(sp_model):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size()


def write_tokenizer_bin(sp_model, path):
    """A SentencePiece model as llama2.c's tokenizer.bin (what llama2.c's tokenizer.py export
    writes): int32 max_token_length, then per id float32 score, int32 length, the bytes."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    pieces, scores = [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    Path(path).write_bytes(tokenizer_bin_bytes(pieces, scores))


def write_random_model(path, path_q8, vocab_size, seed=260):
    """stories260K's shapes with random weights, in llama2.c's v0 (float32) and v2 (int8) formats."""
    p = ModelArgs(vocab_size=vocab_size, **STORIES260K)
    weights = random_weights(p, seed, tied=True)                   # shared, as stories260K's
    write_llama2c(path, p, weights, version=0)
    write_llama2c(path_q8, p, weights, version=2, group_size=8)

"""Llama 3's tokenizer: Meta's tiktoken tokenizer.model read into minillama's byte-level BPE,
checked id for id against Meta's own Tokenizer (llama_models, built on tiktoken) on varied text,
on random text and on the cases of llama_models' own test_tokenizer.py; the chat format against
Meta's ChatFormat; the same vocabulary as a GGUF `gpt2` vocabulary with the llama-bpe
pre-tokenizer; and broken files."""
import os

import pytest

from minillama.errors import ArgumentError, TokenizerError
from minillama.tokenizers import BPETokenizer, Llama3Chat, StreamDecoder, load_tokenizer
from minillama.tokenizers.tiktoken import SPECIAL_TOKENS, looks_like_tiktoken, read_tiktoken
from tests.tools.writers import finish_gguf, llama_bpe_vocab, write_tiktoken

llama3 = pytest.importorskip("llama_models.llama3")
tiktoken = pytest.importorskip("tiktoken")
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer  # noqa: E402

META_MODEL = os.path.join(os.path.dirname(llama3.__file__), "tokenizer.model")

VARIED = [
    "This is a test sentence.",
    "Hello world! It's 3.14159, they'll say; I'd've won $1,000,000.",
    "I'LL DON'T we'VE shouldn't 'S 'll",
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(2, 40))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\r\n",
    "Numbers: 0 7 42 1234567890 -3.5e-7 0x1F 2024-06-01 12:30 ١٢٣٤ ½ ²",
    "日本語のテキストです。東京タワーは333メートル。吾輩は猫である。",
    "emoji 🙂👍🏽 👨‍👩‍👧 🇯🇵 ❤️",
    "  leading, trailing and   inner   spaces  \n\n\t\ttabs\r\n  \n \n",
    "\n\n\n", "   ", " ", "", "a\u00a0b\u3000c\u2028d",
    "Ünïcödé façade naïve café — “quotes” … ſ K",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "text <|reserved_special_token_17|> <|eot_id|><|eot_id|> <|not_special|>",
]


@pytest.fixture(scope="module")
def meta():
    return MetaTokenizer.get_instance()


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(META_MODEL, vocab_size=128256)


def test_special_tokens_and_ids(ours, meta):
    assert isinstance(ours, BPETokenizer) and ours.pre == "llama-bpe"
    assert ours.n_words == meta.n_words == 128256
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id)
    assert ours.stop_tokens == meta.stop_tokens == [128001, 128008, 128009]
    for name, i in meta.special_tokens.items():
        assert ours.encode(name, bos=False, eos=False) == [i] and ours.piece(i) == name
        assert ours.is_control(i)
    assert isinstance(ours.chat, Llama3Chat)


@pytest.mark.parametrize("text", VARIED)
def test_encode_matches_meta(ours, meta, text):
    # Meta's encode spells special-token names out as text: encode_ordinary does the same
    assert [ours.bos_id] + ours.encode_ordinary(text) + [ours.eos_id] == \
        meta.encode(text, bos=True, eos=True)
    # encode() cuts them out as special tokens, as Meta's does when allowed to
    assert ours.encode(text, bos=True, eos=False) == \
        meta.encode(text, bos=True, eos=False, allowed_special="all")


@pytest.mark.parametrize("text", VARIED)
def test_decode_matches_meta(ours, meta, text):
    ids = meta.encode(text, bos=False, eos=False)
    assert ours.decode(ids) == meta.decode(ids) == text
    stream = StreamDecoder(ours)
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == text


def test_random_text_matches_meta(ours, meta):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    chars = st.characters(blacklist_categories=("Cn", "Cs", "Co"))
    tricky = st.sampled_from(list("aZé日ß 0٣½²\u00a0\u3000\t\n\r'sltrevmdSLTD!?.,-_$🙂") +
                             ["'s", "'LL", " '", "\r\n", "  \n", "123", "4567"])

    @settings(max_examples=300, deadline=None)
    @given(text=st.one_of(st.text(chars, max_size=40), st.lists(tricky, max_size=30).map("".join)))
    def check(text):
        assert ours.encode_ordinary(text) == meta.encode(text, bos=False, eos=False)
    check()


# ----------------------------------------------------------------------------
# llama_models' own tests (llama3/tests/api/test_tokenizer.py), case by case

SENTENCE_IDS = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]


def test_meta_case_special_tokens(ours):
    assert ours.encode("<|begin_of_text|>", bos=False, eos=False) == [128000]


def test_meta_case_encode(ours):
    assert ours.encode("This is a test sentence.", bos=True, eos=True) == SENTENCE_IDS


def test_meta_case_decode(ours):
    # Meta's decode writes the special tokens' names; minillama's decode, like SentencePiece's
    # and transformers' skip_special_tokens, prints control tokens as nothing; their pieces are
    # the names
    expected = "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert "".join(ours.piece(i) for i in SENTENCE_IDS) == expected
    assert ours.decode(SENTENCE_IDS) == "This is a test sentence."


def test_meta_case_encode_message(ours):
    # Meta's encode_message of one user message; here it is the dialog's middle
    ids = ours.chat.encode_dialog(ours, [{"role": "user", "content": "This is a test sentence."}])
    assert ids[1:12] == [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]


def test_meta_case_encode_dialog(ours):
    dialog = [{"role": "system", "content": "This is a test sentence."},
              {"role": "user", "content": "This is a response."}]
    assert ours.chat.encode_dialog(ours, dialog) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
        128006, 78191, 128007, 271]


# ----------------------------------------------------------------------------
# the chat format against Meta's ChatFormat

DIALOGS = [
    [{"role": "user", "content": "What is the largest animal?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "What is the largest animal?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. 🙂"},
     {"role": "user", "content": "  日本語で答えて。\n\n"}],
    [{"role": "user", "content": "a tag typed as text: <|eot_id|><|start_header_id|>"}],
]


@pytest.mark.parametrize("dialog", DIALOGS)
def test_chat_format_matches_meta(ours, meta, dialog):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    messages = [RawMessage(role=m["role"], content=m["content"]) for m in dialog]
    assert ours.chat.encode_dialog(ours, dialog) == \
        ChatFormat(meta).encode_dialog_prompt(messages).tokens


def test_chat_turn_for_the_llama2c_loop(ours, meta):
    """render_turn's text, encoded, is the same prompt as Meta's for a one-turn chat."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    text = ours.chat.render_turn("Be brief.", "Why is the sky blue?", first_turn=True)
    messages = [RawMessage(role="system", content="Be brief."),
                RawMessage(role="user", content="Why is the sky blue?")]
    assert ours.encode(text, bos=True, eos=False) == \
        ChatFormat(meta).encode_dialog_prompt(messages).tokens


def test_chat_refuses_a_dialog_not_ending_with_the_user(ours):
    with pytest.raises(ArgumentError, match="ending with a 'user' message"):
        ours.chat.encode_dialog(ours, [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "hello"}])


# ----------------------------------------------------------------------------
# a tiny tiktoken file, and the same vocabulary as a GGUF `gpt2` vocabulary (llama-bpe)

N_TINY = 3000          # Llama 3's first ranks: the 256 bytes, then the merges they make


@pytest.fixture(scope="module")
def tiny_ranked():
    return read_tiktoken(META_MODEL)[:N_TINY]


def tiktoken_oracle(ranked):
    """tiktoken itself over the same ranks, with Meta's pattern and special tokens."""
    return tiktoken.Encoding(name="tiny", pat_str=MetaTokenizer.pat_str,
                             mergeable_ranks={t: r for r, t in enumerate(ranked)},
                             special_tokens={s: len(ranked) + i for i, s in enumerate(SPECIAL_TOKENS)})


def test_tiny_tiktoken_file_matches_tiktoken(tmp_path, tiny_ranked):
    path = write_tiktoken(tmp_path / "tokenizer.model", tiny_ranked)
    assert looks_like_tiktoken(path)
    tok = load_tokenizer(path, vocab_size=N_TINY + 256)
    oracle = tiktoken_oracle(tiny_ranked)
    assert tok.bos_id == N_TINY and tok.stop_tokens == [N_TINY + 1, N_TINY + 8, N_TINY + 9]
    for text in VARIED:
        assert tok.encode_ordinary(text) == oracle.encode_ordinary(text), text
        assert tok.encode(text, bos=False, eos=False) == \
            oracle.encode(text, allowed_special="all"), text
        assert tok.decode(oracle.encode_ordinary(text)) == text


def write_vocab_gguf(path, ranked):
    """A GGUF holding only a Llama 3 style vocabulary (writers.llama_bpe_vocab)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    llama_bpe_vocab(w, ranked)
    finish_gguf(w)
    return path


def test_gguf_llama_bpe_vocabulary_matches_tiktoken(tmp_path, tiny_ranked):
    tok = load_tokenizer(write_vocab_gguf(tmp_path / "vocab.gguf", tiny_ranked))
    oracle = tiktoken_oracle(tiny_ranked)
    assert tok.pre == "llama-bpe"
    # EOS first, then Llama 3's other stop tokens
    assert tok.stop_tokens == [N_TINY + 9, N_TINY + 1, N_TINY + 8]
    for text in VARIED:
        assert tok.encode(text, bos=True, eos=False) == \
            [N_TINY] + oracle.encode(text, allowed_special="all"), text


# ----------------------------------------------------------------------------
# broken files

@pytest.mark.parametrize("content, match", [
    (b"IQ== 0\nIg== 2\n", "line 2: rank 2, expected 1"),
    (b"IQ== 0\nnot base64!! 1\n", "line 2 is"),
    (b"IQ== 0\nI=Q= 1\n", "line 2"),
    (b"IQ== 0\nIg== 1\n", "has 2 tokens, expected at least the 256"),
    (b"IQ== 0\nIg== " + b"9" * 5000 + b"\n", "line 2 is"),        # int() would refuse 5000 digits
])
def test_broken_tiktoken_files(tmp_path, content, match):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    assert looks_like_tiktoken(path)
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(path)


def test_tiktoken_file_missing_a_byte(tmp_path, tiny_ranked):
    path = write_tiktoken(tmp_path / "tokenizer.model",
                          [t for t in tiny_ranked if t != b"A"])
    with pytest.raises(TokenizerError, match="all 256 single bytes"):
        load_tokenizer(path)

"""Writers of the files minillama reads, for the tests, the fuzzer and the notebooks' stand-ins.

    write_llama2c         a llama2.c checkpoint: legacy (v0), v1 (float32) or v2 (int8 Q8_0)
    tokenizer_bin_bytes   a llama2.c tokenizer.bin
    write_gguf            a llama GGUF, through the `gguf` package (llama.cpp's own writer), with
                          a SentencePiece-style (llama_vocab) or byte-level BPE (gpt2_vocab) vocabulary
    write_tiktoken        a tiktoken BPE file (Llama 3's tokenizer.model format)
    tiktoken_merges       the merges list equivalent to a tiktoken file's ranks (for a `gpt2` GGUF)

The package only reads. The GGUF writer shares nothing with the reader, on purpose: it is the
oracle the reader is checked against, so even GGUF's tensor names are spelled here
(reference_gguf_name), not taken from minillama.checkpoints.gguf.
"""
import struct

import numpy as np

from minillama.checkpoints.llama2c import (HEADER_V1V2, MAGIC, matrices, norm_names,
                                           tensor_names)
from minillama.model import ModelArgs, classifier_is_embedding
from minillama.quant import quantize_q8


# ----------------------------------------------------------------------------
# llama2.c (the layouts are in minillama/checkpoints/llama2c.py's docstring)

def write_llama2c(path, p: ModelArgs, weights, version=0, group_size=64, seq_len=None):
    """Write weights (float32 arrays under Meta's names) in llama2.c format `version` (0, 1, 2).
    The classifier is stored only when output.weight is not the embedding array itself."""
    shared = classifier_is_embedding(weights)
    seq_len = seq_len or p.max_seq_len
    dims = [p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, seq_len]
    f32 = lambda name: np.ascontiguousarray(weights[name], dtype=np.float32).tobytes()
    with open(path, "wb") as f:
        if version == 0:
            dims[5] = p.vocab_size if shared else -p.vocab_size
            f.write(struct.pack("<7i", *dims))
            f.write(f32("tok_embeddings.weight"))
            for norm, kinds in (("attention_norm", ("wq", "wk", "wv", "wo")),
                                ("ffn_norm", ("w1", "w2", "w3"))):
                for name in norm_names(p, norm):
                    f.write(f32(name))
                for kind in kinds:
                    for name in tensor_names(p, kind):
                        f.write(f32(name))
            f.write(f32("norm.weight"))
            cos, sin = _legacy_freq_cis(p.head_dim, seq_len)
            f.write(cos.tobytes() + sin.tobytes())
            if not shared:
                f.write(f32("output.weight"))
            return
        f.write(struct.pack("<Ii7iB", MAGIC, version, *dims, int(shared)))
        if version == 2:
            f.write(struct.pack("<i", group_size))
        f.write(b"\0" * (HEADER_V1V2 - f.tell()))
        for kind in ("attention_norm", "ffn_norm"):
            for name in norm_names(p, kind):
                f.write(f32(name))
        f.write(f32("norm.weight"))
        names = [n for n, _ in matrices(p)] + ([] if shared else ["output.weight"])
        for name in names:
            if version == 1:
                f.write(f32(name))
            else:                       # one flat run of groups per tensor, as export.py does
                q, s = quantize_q8(np.asarray(weights[name], np.float32).reshape(-1), group_size)
                f.write(q.tobytes() + s.tobytes())


def _legacy_freq_cis(head_dim, seq_len):
    """The RoPE tables old llama2.c files carry (readers skip them; we recompute)."""
    freqs = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(seq_len), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def tokenizer_bin_bytes(pieces, scores):
    """A llama2.c tokenizer.bin: int32 max_token_length, then (float32 score, int32 length,
    bytes) per token."""
    out = [struct.pack("<i", max(len(piece) for piece in pieces))]
    for piece, score in zip(pieces, scores):
        out.append(struct.pack("<fi", score, len(piece)) + piece)
    return b"".join(out)


# ----------------------------------------------------------------------------
# GGUF

def write_gguf(path, p: ModelArgs, weights, qtype=None, vocab=None, tied=False, blocks=None,
               extra=None, alignment=None, arch="llama", tensors=None):
    """A GGUF of `weights` (Meta names, as numpy arrays), written under GGUF's names as this
    file spells them (reference_gguf_name, not the reader's mapping): matrices stored as `qtype`
    (a gguf.GGMLQuantizationType, default F32), norms as F32, the classifier left out when tied.
    The header comes from p (its sizes, norm_eps, rope_theta, head_dim).
    vocab(writer): the tokenizer's metadata (llama_vocab, gpt2_vocab, llama_bpe_vocab, or a
    test's own); None writes none.
    blocks: {Meta name: (qtype, uint8 (rows, bytes a row))}, tensors written as these blocks
    instead (k-quants, which gguf cannot quantize to).
    extra: {key: (value, gguf.GGUFValueType)}, more metadata; alignment: general.alignment;
    tensors: {GGUF name: array}, more tensors written as they are (e.g. rope_freqs). Returns
    path."""
    import gguf
    qtype = gguf.GGMLQuantizationType.F32 if qtype is None else qtype
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_context_length(p.max_seq_len)
    w.add_embedding_length(p.dim)
    w.add_block_count(p.n_layers)
    w.add_feed_forward_length(p.hidden_dim)
    w.add_head_count(p.n_heads)
    w.add_head_count_kv(p.n_kv_heads)
    w.add_layer_norm_rms_eps(p.norm_eps)
    w.add_rope_freq_base(p.rope_theta)
    w.add_rope_dimension_count(p.head_dim)
    if vocab is not None:
        vocab(w)
    for key, (value, vtype) in (extra or {}).items():
        w.add_key_value(key, value, vtype)
    for name, a in (tensors or {}).items():
        w.add_tensor(name, a)
    for name, a in weights.items():
        if tied and name == "output.weight":
            continue
        gname = reference_gguf_name(name)
        if blocks and name in blocks:
            btype, data = blocks[name]
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=btype)
        elif a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(a, qtype)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    finish_gguf(w)
    return path


def finish_gguf(w):
    """A gguf.GGUFWriter's four closing steps: the header, the metadata, the tensors, close."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Meta's names -> GGUF's, written here independently of minillama's checkpoints.gguf.gguf_name
# (tests that check minillama's own mapping write their files with this one)
GGUF_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}
GGUF_LAYER = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up"}


def reference_gguf_name(meta):
    if meta in GGUF_NAMES:
        return GGUF_NAMES[meta]
    _, i, rest = meta.split(".", 2)
    return f"blk.{i}.{GGUF_LAYER[rest[:-len('.weight')]]}.weight"


def llama_vocab(tokenizer):
    """A `llama` (SentencePiece-style) vocabulary for write_gguf, from a Llama2cTokenizer."""
    def add(w):
        w.add_tokenizer_model("llama")
        w.add_token_list([tokenizer.piece(i).replace(" ", "\u2581")
                          for i in range(tokenizer.n_words)])
        w.add_token_scores(tokenizer.vocab_scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    return add


GPT2_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_MERGES = ["\u0120 t", "h e", "\u0120t he", "i n", "\u0120 a", "o n", "\u0120a n"]


def gpt2_tokens():
    """A small byte-level BPE vocabulary: control tokens, the 256 byte symbols, the merges."""
    from minillama.tokenizers.bpe import BYTE_TO_CHAR
    return GPT2_CONTROL + [BYTE_TO_CHAR[b] for b in range(256)] + [m.replace(" ", "")
                                                                   for m in GPT2_MERGES]


def gpt2_vocab(w, chat_template="{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}",
               add_bos=None):
    """gpt2_tokens() as a `gpt2` vocabulary (SmolLM2's kind) for write_gguf, with a chat
    template (and tokenizer.ggml.add_bos_token when add_bos is given)."""
    tokens = gpt2_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(GPT2_CONTROL) + [1] * (len(tokens) - len(GPT2_CONTROL)))
    w.add_token_merges(GPT2_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(chat_template)


# ----------------------------------------------------------------------------
# tiktoken (the format is in minillama/tokenizers/tiktoken.py's docstring)

def llama_bpe_vocab(w, ranked):
    """`ranked` (token bytes, rank order) as a Llama 3 vocabulary for a GGUF writer, as
    llama.cpp's converter writes one: the `gpt2` model with the llama-bpe pre-tokenizer, the
    ranks as tokens with their merges, Meta's special tokens after them as control tokens,
    <|begin_of_text|> as BOS and <|eot_id|> as EOS (an instruct model's), BOS added."""
    from minillama.tokenizers.bpe import spell_bytes
    from minillama.tokenizers.tiktoken import SPECIAL_TOKENS
    n = len(ranked)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([spell_bytes(t) for t in ranked] + SPECIAL_TOKENS)
    w.add_token_types([1] * n + [3] * len(SPECIAL_TOKENS))
    w.add_token_merges(tiktoken_merges(ranked))
    w.add_bos_token_id(n + SPECIAL_TOKENS.index("<|begin_of_text|>"))
    w.add_eos_token_id(n + SPECIAL_TOKENS.index("<|eot_id|>"))
    w.add_add_bos_token(True)


def write_tiktoken(path, ranked):
    """A tiktoken file of `ranked` (token bytes, rank order): base64, a space, the rank."""
    import base64
    with open(path, "wb") as f:
        for rank, token in enumerate(ranked):
            f.write(base64.b64encode(token) + b" %d\n" % rank)
    return path


def tiktoken_merges(ranked):
    """The merges ("a b" in byte spelling, rank order) that rebuild each token of `ranked`, as
    Hugging Face's converter of tiktoken files finds them: BPE over the token's own bytes with
    the lower ranks only, which ends in the two halves the token was made from."""
    from minillama.tokenizers.bpe import spell_bytes
    rank = {t: r for r, t in enumerate(ranked)}
    merges = []
    for token in ranked:
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(rank.get(a + b, len(ranked)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank[token]:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(f"{spell_bytes(parts[0])} {spell_bytes(parts[1])}")
    return merges

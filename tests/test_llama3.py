"""Llama 3.x checkpoints: tiny random models written by the tests in Meta's format (torch.save +
params.json with use_scaled_rope), Hugging Face's (save_pretrained, rope_type llama3) and GGUF's
(the gguf writer, with the rope_freqs tensor and a llama-bpe vocabulary), each checked against
transformers' LlamaForCausalLM with Llama 3's RoPE scaling (logits within 1e-4, greedy
identical); the frequencies against Meta's own apply_scaling; generate's stop tokens; and the
parts of Llama 3 that minillama refuses (vision, tool calls, other RoPE scalings)."""
import ast
import json
import math
import os

import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.errors import ArgumentError, CheckpointError
from minillama.generation import Llama
from minillama.loading import load_model
from minillama.model import ModelArgs, RopeScaling, Transformer, precompute_freqs, scale_freqs
from minillama.tokenizers import Llama3Chat
from minillama.tokenizers.tiktoken import SPECIAL_TOKENS, read_tiktoken

from conftest import StubTokenizer, greedy, hf_greedy, hf_logits, max_rel_err, spread_weights
from tests.tools import writers
from tests.tools.writers import finish_gguf, llama_bpe_vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama3 = pytest.importorskip("llama_models.llama3")

N_RANKS = 512                       # the first ranks of Llama 3's tokenizer.model ...
VOCAB = N_RANKS + len(SPECIAL_TOKENS)      # ... and Meta's 256 special tokens after them
EOT = N_RANKS + SPECIAL_TOKENS.index("<|eot_id|>")
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
THETA = 500000.0                     # Llama 3's rope_theta
# Meta's defaults. With head_dim 16 and theta 500000 the 8 pairs have wavelengths 6, 32, 167,
# 869, 4500, ...: fast pairs kept, one blended (2048 < 4500 < 8192), the rest slowed down.
META_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
# A short original context: 6 is fast, 32 blended (16 < 32 < 64), the rest slow.
SHORT_SCALING = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)


def hf_model(scaling, seed=0):
    """A random LlamaForCausalLM with Llama 3's RoPE scaling, weights large enough for
    distinct logits."""
    torch.manual_seed(seed)
    rope = {"rope_type": "llama3", "rope_theta": THETA, **scaling}
    return spread_weights(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**CONFIG, rope_parameters=rope)))


def check_against(mine, reference):
    """Logits within 1e-4 (batch of 2, 20 positions); greedy identical for 30 tokens."""
    tokens = np.random.default_rng(5).integers(0, VOCAB, size=(2, 20))
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(reference, tokens)) < 1e-4
    prompt = [N_RANKS, 40, 7, 300]
    assert greedy(mine.forward, prompt, 30) == hf_greedy(reference, prompt, 30)


def load(path):
    return load_model(path, max_seq_len=64, max_batch_size=2)


# ----------------------------------------------------------------------------
# the three formats

def meta_weights(model):
    """A transformers model's weights under Meta's names, q and k rows back in Meta's order
    (the inverse of the permute in transformers' convert_llama_weights_to_hf.py)."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}

    def unpermute(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(CONFIG["num_hidden_layers"]):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        out[meta + "attention.wq.weight"] = unpermute(sd[hf + "self_attn.q_proj.weight"], 4)
        out[meta + "attention.wk.weight"] = unpermute(sd[hf + "self_attn.k_proj.weight"], 2)
        for ours, theirs in (("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                             ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                             ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                             ("ffn_norm", "post_attention_layernorm")):
            out[meta + ours + ".weight"] = sd[hf + theirs + ".weight"]
    return {k: v.contiguous() for k, v in out.items()}


def write_meta(folder, model, **params):
    os.makedirs(folder, exist_ok=True)
    torch.save(meta_weights(model), os.path.join(folder, "consolidated.00.pth"))
    with open(os.path.join(folder, "params.json"), "w") as f:     # as Llama 3.1's looks
        json.dump({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB,
                   "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5,
                   "rope_theta": THETA, "use_scaled_rope": True, **params}, f)
    return folder


def llamacpp_rope_factors(scaling, head_dim=16):
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py computes it for rope_type llama3: one
    divisor per pair, 1 for fast pairs, `factor` for slow ones, a blend between."""
    freqs = 1.0 / (THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def write_gguf(path, model, scaling, rope_freqs=True):
    """The model as llama.cpp's converter writes a Llama 3.1 GGUF: q/k in Meta's order, the
    rope_freqs tensor, a llama-bpe vocabulary with Llama 3's special tokens."""
    pytest.importorskip("gguf")
    ranked = read_tiktoken(os.path.join(os.path.dirname(llama3.__file__), "tokenizer.model"))
    p = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=VOCAB,
                  max_seq_len=64, rope_theta=THETA)
    weights = {name: t.numpy() for name, t in meta_weights(model).items()}
    freqs = {"rope_freqs.weight": llamacpp_rope_factors(scaling)} if rope_freqs else None
    return writers.write_gguf(path, p, weights, vocab=lambda w: llama_bpe_vocab(w, ranked[:N_RANKS]),
                              tensors=freqs)


@pytest.mark.parametrize("scaling", [META_SCALING, SHORT_SCALING], ids=["meta", "short"])
def test_hugging_face_rope_llama3_matches_transformers(tmp_path, scaling):
    reference = hf_model(scaling, seed=1)
    reference.save_pretrained(tmp_path)
    mine = load(tmp_path)
    assert mine.params.rope_scaling == RopeScaling(**scaling)
    check_against(mine, reference)


def test_hugging_face_transformers4_rope_scaling_key(tmp_path):
    """transformers 4 (and the Llama 3.1 files on the Hub) write rope_scaling beside rope_theta."""
    reference = hf_model(SHORT_SCALING, seed=2)
    reference.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=THETA, rope_scaling={"rope_type": "llama3", **SHORT_SCALING})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mine = load(tmp_path)
    assert mine.params.rope_scaling == RopeScaling(**SHORT_SCALING)
    check_against(mine, reference)


def test_meta_use_scaled_rope_matches_transformers(tmp_path):
    reference = hf_model(META_SCALING, seed=3)
    mine = load(write_meta(tmp_path / "scaled", reference))
    assert mine.params.rope_scaling == RopeScaling()          # Meta's defaults: 8, 1, 4, 8192
    check_against(mine, reference)
    # the scaling is not a no-op here: the same weights without it give other logits
    plain = load(write_meta(tmp_path / "plain", reference, use_scaled_rope=False))
    tokens = np.arange(40, 60)[None]
    assert max_rel_err(plain.forward(tokens, 0), hf_logits(reference, tokens)) > 1e-3


@pytest.mark.parametrize("scaling", [META_SCALING, SHORT_SCALING], ids=["meta", "short"])
def test_gguf_rope_freqs_matches_transformers(tmp_path, scaling):
    reference = hf_model(scaling, seed=4)
    mine = load(write_gguf(tmp_path / "m.gguf", reference, scaling))
    np.testing.assert_allclose(mine.params.rope_freq_factors, llamacpp_rope_factors(scaling))
    check_against(mine, reference)


def test_gguf_llama3_end_to_end_stops_at_eot(tmp_path):
    """Llama.build on the GGUF: its llama-bpe tokenizer (special tokens whole, BOS added), and
    generate stopping at <|eot_id|>, the file's EOS, or <|end_of_text|>. (The chat format of a
    GGUF comes from its chat template, which this file leaves out.)"""
    reference = hf_model(META_SCALING, seed=4)
    path = write_gguf(tmp_path / "m.gguf", reference, META_SCALING)
    llama = Llama.build(str(path), max_seq_len=64, max_batch_size=2)
    tok = llama.tokenizer
    assert tok.pre == "llama-bpe"
    assert tok.stop_tokens == [EOT, N_RANKS + 1, N_RANKS + 8]
    prompt = tok.encode("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n", bos=True, eos=False)
    header = N_RANKS + SPECIAL_TOKENS.index("<|start_header_id|>")
    assert prompt[:2] == [N_RANKS, header] and prompt.count(EOT) == 1
    out, _ = llama.generate([prompt], max_gen_len=20, temperature=0)
    assert out[0] == hf_greedy(reference, prompt, 20)[:len(out[0])]
    assert not set(out[0]) & set(tok.stop_tokens)


def test_hugging_face_llama3_directory_finds_metas_tokenizer(tmp_path):
    """A Llama 3 repository from the Hub keeps Meta's tokenizer.model in original/."""
    from tests.tools.writers import write_tiktoken
    reference = hf_model(META_SCALING, seed=9)
    reference.save_pretrained(tmp_path)
    os.makedirs(tmp_path / "original")
    ranked = read_tiktoken(os.path.join(os.path.dirname(llama3.__file__), "tokenizer.model"))
    write_tiktoken(tmp_path / "original" / "tokenizer.model", ranked[:N_RANKS])
    llama = Llama.build(str(tmp_path), max_seq_len=64)
    assert isinstance(llama.tokenizer.chat, Llama3Chat) and llama.tokenizer.bos_id == N_RANKS
    prompt = llama.tokenizer.encode("Hello", bos=True, eos=False)
    out, _ = llama.generate([prompt], max_gen_len=10, temperature=0)
    assert out[0] == hf_greedy(reference, prompt, 10)[:len(out[0])]


# ----------------------------------------------------------------------------
# the frequencies against Meta's reference

def meta_rope_functions():
    """apply_scaling and precompute_freqs_cis from llama_models' llama3/model.py, taken out of
    the file with ast: the module itself needs fairscale, which only its training needs."""
    path = os.path.join(os.path.dirname(llama3.__file__), "model.py")
    tree = ast.parse(open(path).read())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef)
              and n.name in ("apply_scaling", "precompute_freqs_cis")]
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module(wanted, []), path, "exec"), namespace)
    return namespace["apply_scaling"], namespace["precompute_freqs_cis"]


@pytest.mark.parametrize("head_dim, theta", [(128, 500000.0), (64, 500000.0), (16, 10000.0)])
def test_frequencies_match_metas_apply_scaling(head_dim, theta):
    apply_scaling, precompute_freqs_cis = meta_rope_functions()
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
    assert np.array_equal(scale_freqs(freqs.numpy(), RopeScaling()), apply_scaling(freqs).numpy())
    # The tables: torch's float32 pow and NumPy's differ in the last bit for a few pairs, which
    # moves some angles by ~1e-5 by position 255, scaled or not; scaling adds nothing to that.
    errors = []
    for scaling in (None, RopeScaling()):
        cis = precompute_freqs_cis(head_dim, 256, theta, use_scaled=scaling is not None)
        cos, sin = precompute_freqs(head_dim, 256, theta, scaling)
        errors.append(max(np.abs(cos - cis.real.numpy()).max(),
                          np.abs(sin - cis.imag.numpy()).max()))
    assert errors[1] <= errors[0] + 1e-7 and errors[1] < 2e-5


def test_gguf_factors_give_metas_frequencies():
    """llama.cpp's divisors and Meta's formula are the same frequencies, to float32 rounding."""
    cos, sin = precompute_freqs(16, 64, THETA, RopeScaling())
    cos_f, sin_f = precompute_freqs(16, 64, THETA, freq_factors=llamacpp_rope_factors(META_SCALING))
    np.testing.assert_allclose(cos_f, cos, atol=1e-6)
    np.testing.assert_allclose(sin_f, sin, atol=1e-6)


# ----------------------------------------------------------------------------
# generate: any of several stop tokens ends a row, as in llama_models' Llama 3 generate

def test_generate_stops_at_the_first_of_any_stop_token():
    p = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48,
                  max_seq_len=48, max_batch_size=2)
    model = Transformer(p, random_weights(p, seed=6))
    free = StubTokenizer(eos_id=-1)
    free.stop_tokens = []
    prompts = [[1, 5, 9], [1, 22]]
    full, _ = Llama(model, free).generate(prompts, max_gen_len=30, temperature=0)
    row = full[0]
    first, later = row[3], next(t for t in row[4:] if t not in row[:4])
    stops = StubTokenizer()
    stops.stop_tokens = [later, first]                  # Meta's order does not matter
    out, logprobs = Llama(model, stops).generate(prompts, max_gen_len=30, temperature=0,
                                                 logprobs=True)
    for got, whole in zip(out, full):
        cut = min([whole.index(t) for t in (first, later) if t in whole], default=len(whole))
        assert got == whole[:cut]
    assert [len(lp) for lp in logprobs] == [len(t) for t in out]


# ----------------------------------------------------------------------------
# what minillama refuses

def test_vision_and_quantized_meta_checkpoints_are_refused(tmp_path):
    reference = hf_model(META_SCALING)
    for extra, match in (({"vision_chunk_size": 560}, "vision"),
                         ({"vision_num_cross_attention_layers": 8}, "vision"),
                         ({"quantization_args": {"group_size": 32}}, "quantized"),
                         ({"lora_args": {"rank": 16, "scale": 2.0}}, "LoRA")):
        folder = write_meta(tmp_path / next(iter(extra)), reference, **extra)
        with pytest.raises(CheckpointError, match=f"{next(iter(extra))}.*{match}"):
            load_model(folder)
    # Meta's text models write vision_chunk_size -1 ("no vision"), which is fine
    load_model(write_meta(tmp_path / "text", reference, vision_chunk_size=-1), max_seq_len=8)


def test_vision_hf_and_gguf_models_are_refused(tmp_path):
    reference = hf_model(META_SCALING)
    reference.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "mllama"}))
    with pytest.raises(CheckpointError, match="'mllama' \\(Llama 3.2 Vision"):
        load_model(tmp_path / "hf")
    gguf = pytest.importorskip("gguf")
    finish_gguf(gguf.GGUFWriter(str(tmp_path / "v.gguf"), "mllama"))
    with pytest.raises(CheckpointError, match="'mllama' \\(Llama 3.2 Vision"):
        load_model(tmp_path / "v.gguf")


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "yarn", "factor": 4.0}, "type 'yarn' is not supported"),
    ({"type": "dynamic", "factor": 2.0}, "type 'dynamic' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "'llama3' needs low_freq_factor"),
    ({"rope_type": "llama3", **META_SCALING, "low_freq_factor": 4.0}, "low_freq_factor < high"),
    ({"rope_type": "llama3", **META_SCALING, "factor": float("nan")}, "positive numbers"),
])
def test_other_rope_scalings_are_refused(tmp_path, rope, match):
    hf_model(META_SCALING).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": rope}))
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path)


def test_tool_calls_are_refused(tmp_path):
    p = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, hidden_dim=48, max_seq_len=16)
    llama = Llama(Transformer(p, random_weights(p)), StubTokenizer())
    for role in ("ipython", "tool"):
        with pytest.raises(ArgumentError, match=f"role '{role}'.*tool calls"):
            llama.chat_completion([[{"role": role, "content": "{}"}]])


# ----------------------------------------------------------------------------
# the GPU: the same tables reach the CUDA kernels (FusedDecoder reads model.freqs_cos/sin)

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_llama3_on_the_gpu_matches_transformers(tmp_path, cp, fmt):
    from minillama.ops import to_host
    reference = hf_model(META_SCALING, seed=7)
    if fmt == "hf":
        reference.save_pretrained(tmp_path)
        path = tmp_path
    else:
        path = write_gguf(tmp_path / "m.gguf", reference, META_SCALING)
    mine = load_model(path, device="cuda", max_seq_len=64, max_batch_size=2)
    forward = mine.ops.decoder(mine)          # one-token steps through the fused decoder

    def host_forward(tokens, start_pos):
        return to_host(forward(tokens, start_pos))
    tokens = np.random.default_rng(8).integers(0, VOCAB, size=(2, 20))
    assert max_rel_err(host_forward(tokens, 0), hf_logits(reference, tokens)) < 1e-4
    prompt = [N_RANKS, 40, 7, 300]
    assert greedy(host_forward, prompt, 40) == hf_greedy(reference, prompt, 40)


@pytest.mark.parametrize("change, match", [
    (dict(rope_scaling=RopeScaling(factor=0.0)), "rope_scaling: .*positive"),
    (dict(rope_scaling=RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)), "low_freq_factor <"),
    (dict(rope_freq_factors=(1.0, 2.0)), "rope_freq_factors: expected 8"),
    (dict(rope_freq_factors=(1.0,) * 7 + (float("nan"),)), "rope_freq_factors"),
])
def test_model_args_refuse_rope_scaling_that_makes_nan_angles(change, match):
    with pytest.raises(ArgumentError, match=match):
        ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=10, hidden_dim=32, **change)


def test_info_names_the_rope_scaling(tmp_path):
    from minillama.cli import describe
    from minillama.loading import open_checkpoint
    reference = hf_model(META_SCALING)
    lines = describe(open_checkpoint(write_meta(tmp_path / "meta", reference)), 64, 1)
    assert "rope theta 500000 (llama3 scaling: factor 8, low/high freq factors 1/4, original " \
           "context 8192)" in "\n".join(lines)
    lines = describe(open_checkpoint(write_gguf(tmp_path / "m.gguf", reference, META_SCALING)), 64, 1)
    assert "(llama3 scaling: rope_freqs, slow pairs / 8)" in "\n".join(lines)

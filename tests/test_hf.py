"""Hugging Face Llama checkpoints (config.json + safetensors) against transformers' own forward:
the files are written by LlamaForCausalLM.save_pretrained, the logits computed by the same
transformers model, so the name mapping and the q/k row permutation are checked end to end."""
import copy
import json
import os
import struct

import numpy as np
import pytest

from minillama.checkpoints.hf import load_hf, unpermute_rows
from minillama.checkpoints.safetensors import read_safetensors
from minillama.errors import CheckpointError
from minillama.loading import detect_format, load_model, open_checkpoint

from conftest import greedy, hf_greedy, hf_logits, max_rel_err, spread_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# odd sizes, grouped-query attention (6 heads share 2 kv heads), a non-default rope_theta
CONFIG = dict(vocab_size=71, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=48,
              rope_theta=5000.0, rms_norm_eps=1e-5)


def hf_model(seed=0, **kw):
    """A random LlamaForCausalLM with weights large enough for distinct logits (its default
    init, std 0.02, gives nearly uniform ones, where greedy ties would prove nothing)."""
    torch.manual_seed(seed)
    return spread_weights(transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("shard, tied", [(None, False), ("20KB", False), (None, True),
                                         ("20KB", True)])
def test_logits_and_greedy_match_transformers(tmp_path, shard, tied):
    model = hf_model(seed=1, tie_word_embeddings=tied)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    assert detect_format(tmp_path) == "hf"

    mine = load_model(tmp_path, max_seq_len=40, max_batch_size=2)
    assert mine.params.max_seq_len == 40 and mine.params.n_kv_heads == 2
    assert (mine.output is mine.tok_embeddings) == tied
    tokens = np.random.default_rng(2).integers(0, 71, size=(2, 13))
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(model, tokens)) < 1e-4

    mine = load_model(tmp_path, max_seq_len=40, max_batch_size=1)
    prompt = [1, 30, 7, 64]
    assert greedy(mine.forward, prompt, 24) == hf_greedy(model, prompt, 24)


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_files(tmp_path, torch_dtype):
    dt = getattr(torch, torch_dtype)
    reference = hf_model(seed=3)
    with torch.no_grad():              # the values the file will hold, computed in float32
        for prm in reference.parameters():
            prm.copy_(prm.to(dt).float())
    # a copy in half precision for the file (Module.to converts in place, and would round
    # the reference's RoPE frequencies too)
    copy.deepcopy(reference).to(dt).save_pretrained(tmp_path)
    header = read_safetensors(tmp_path / "model.safetensors")
    stored = {"bfloat16": "bf16", "float16": "f16"}[torch_dtype]
    assert {t.format for t in header.values()} == {stored}
    mine = load_model(tmp_path, max_seq_len=32)
    tokens = np.random.default_rng(4).integers(0, 71, size=(1, 9))
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(reference, tokens)) < 1e-4


def test_unpermute_inverts_the_conversion_scripts_permutation():
    """HF's convert script: view(heads, hd/2, 2, dim).transpose(1, 2). Written here with
    torch, then undone with NumPy; also the documented row moves, one by one."""
    heads, hd, dim = 3, 8, 5
    meta = np.random.default_rng(0).standard_normal((heads * hd, dim)).astype(np.float32)
    hf = torch.from_numpy(meta).view(heads, hd // 2, 2, dim).transpose(1, 2).reshape(
        heads * hd, dim).numpy()
    np.testing.assert_array_equal(unpermute_rows(hf, heads), meta)
    for h in range(heads):
        for i in range(hd // 2):
            np.testing.assert_array_equal(hf[h * hd + i], meta[h * hd + 2 * i])
            np.testing.assert_array_equal(hf[h * hd + hd // 2 + i], meta[h * hd + 2 * i + 1])


def test_without_unpermuting_the_logits_differ(tmp_path, monkeypatch):
    """The permutation matters: skip it and the model no longer agrees with transformers."""
    import minillama.checkpoints.hf as hf
    model = hf_model(seed=5)
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(hf, "unpermute_rows", lambda w, n_heads: w)
    mine = load_model(tmp_path, max_seq_len=16)
    tokens = np.arange(1, 9)[None]
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(model, tokens)) > 1e-2


def test_single_file_path_and_tokenizer(tmp_path):
    hf_model(seed=6).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.fmt == "hf" and ckpt.tokenizer_path == str(tmp_path / "tokenizer.model")
    assert ckpt.params.max_seq_len == 48                 # max_position_embeddings


# ----------------------------------------------------------------------------
# damaged files and unsupported configs

def _write_safetensors(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_damaged_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_safetensors(path)
    good = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    _write_safetensors(path, good, bytes(20))                           # 4 bytes short
    with pytest.raises(CheckpointError, match="'w'.*data offsets"):
        read_safetensors(path)
    _write_safetensors(path, {"w": {**good["w"], "data_offsets": [0, 20]}}, bytes(24))
    with pytest.raises(CheckpointError, match="'w'.*data offsets"):
        read_safetensors(path)
    _write_safetensors(path, {"w": {**good["w"], "dtype": "I64"}}, bytes(24))
    with pytest.raises(CheckpointError, match="'w' is I64"):
        read_safetensors(path)
    _write_safetensors(path, {"w": {"dtype": "F32"}}, bytes(24))
    with pytest.raises(CheckpointError, match="malformed"):
        read_safetensors(path)
    _write_safetensors(path, good, np.arange(6, dtype="<f4").tobytes())
    np.testing.assert_array_equal(np.asarray(read_safetensors(path)["w"]),
                                  np.arange(6).reshape(2, 3))


def test_truncated_model_file_and_missing_shard(tmp_path):
    hf_model(seed=7).save_pretrained(tmp_path / "one")
    path = tmp_path / "one" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        open_checkpoint(tmp_path / "one")
    hf_model(seed=7).save_pretrained(tmp_path / "many", max_shard_size="20KB")
    os.remove(tmp_path / "many" / "model-00002-of-00012.safetensors")
    with pytest.raises(CheckpointError, match="lists model-00002-of-00012.safetensors"):
        open_checkpoint(tmp_path / "many")


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"num_attention_heads": 5}, "config.json.*heads"),
    ({"hidden_size": None}, "'hidden_size' must be a positive integer"),
])
def test_unsupported_configs_are_refused(tmp_path, change, match):
    hf_model(seed=8).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=match):
        load_hf(tmp_path)


@pytest.mark.parametrize("key, value, expected", [
    ("max_position_embeddings", 0, "a positive integer"),
    ("max_position_embeddings", -3, "a positive integer"),
    ("max_position_embeddings", 12.9, "a positive integer"),      # was cut to 12
    ("max_position_embeddings", True, "a positive integer"),      # was 1
    ("num_key_value_heads", 2.0, "a positive integer"),
    ("tie_word_embeddings", "false", "true or false"),            # was bool("false"): True
    ("rms_norm_eps", "1e-5", "a finite number"),                  # was float("1e-5")
    ("rope_theta", "x" * 3000, "a finite number"),                # was 1,000 characters
    ("rope_theta", 10**400, "a finite number"),
])
def test_config_fields_are_checked_naming_the_file_and_field(tmp_path, key, value, expected):
    from minillama.checkpoints.hf import read_config
    from minillama.errors import shown
    cfg = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
           "num_attention_heads": 4, "vocab_size": 37}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError) as e:
        read_config(str(path))
    assert str(e.value) == f"{path}: field '{key}' must be {expected}, got {shown(value)}"
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("rope", ["x", ["rope_theta"]])
def test_rope_parameters_not_an_object_are_refused_with_or_without_rope_scaling(tmp_path, rope):
    """transformers 5's rope_parameters must be an object: a string was taken as no parameters
    where rope_scaling was set, a list crashed on .get."""
    from minillama.checkpoints.hf import read_config
    cfg = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
           "num_attention_heads": 4, "vocab_size": 37, "rope_parameters": rope}
    for scaling in ({}, {"rope_scaling": {"rope_type": "default"}}):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**cfg, **scaling}))
        with pytest.raises(CheckpointError, match="field 'rope_parameters' must be an object"):
            read_config(str(path))


def test_a_null_rope_theta_in_rope_parameters_leaves_the_top_level_one(tmp_path):
    from minillama.checkpoints.hf import read_config
    cfg = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
           "num_attention_heads": 4, "vocab_size": 37, "rope_theta": 500000.0,
           "rope_parameters": {"rope_theta": None, "rope_type": "default"}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert read_config(str(path))[0].rope_theta == 500000.0

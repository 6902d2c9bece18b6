"""llama2.c checkpoints: round trips in all three formats, the real files, and bad files."""
import struct

import numpy as np
import pytest

from minillama.checkpoints.llama2c import MAGIC, load_llama2c
from minillama.checkpoints.random import random_weights
from minillama.errors import CheckpointError
from minillama.model import ModelArgs, Transformer
from minillama.quant import Q8Tensor, dequantize_q8

from tests.tools.writers import write_llama2c

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=67, hidden_dim=48,
            max_seq_len=24)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_float_round_trip(tmp_path, version, tied):
    p = ModelArgs(**ARGS)
    w = random_weights(p, seed=version, tied=tied)
    path = tmp_path / "m.bin"
    write_llama2c(path, p, w, version=version)
    p2, w2 = load_llama2c(path)
    assert (p2.dim, p2.hidden_dim, p2.n_layers, p2.n_heads, p2.n_kv_heads, p2.vocab_size,
            p2.max_seq_len) == (32, 48, 2, 4, 2, 67, 24)
    for name, value in w.items():
        np.testing.assert_array_equal(w2[name], value, err_msg=name)
    assert (w2["output.weight"] is w2["tok_embeddings.weight"]) == tied


@pytest.mark.parametrize("tied", [True, False])
def test_q8_round_trip(tmp_path, tied):
    p = ModelArgs(**ARGS)
    w = random_weights(p, seed=7, tied=tied)
    path = tmp_path / "q.bin"
    write_llama2c(path, p, w, version=2, group_size=16)
    _, w2 = load_llama2c(path)
    q = w2["layers.1.feed_forward.w2.weight"]
    assert isinstance(q, Q8Tensor) and q.q.dtype == np.int8 and q.s.shape == (32, 3)
    for name, value in w.items():
        if value.ndim == 2:
            back = dequantize_q8(w2[name].q, w2[name].s, 16)
            # the error of round-to-nearest is at most half a step: max|w| / 127 / 2 per group
            step = np.abs(value.reshape(-1, 16)).max(-1, keepdims=True) / 127
            assert np.all(np.abs(back.reshape(-1, 16) - value.reshape(-1, 16)) <= step / 2 + 1e-7)
        else:
            np.testing.assert_array_equal(w2[name], value)
    logits = Transformer(p, w2).forward(np.array([[1, 5, 9]]), 0)
    exact = Transformer(p, w).forward(np.array([[1, 5, 9]]), 0)
    assert np.corrcoef(logits.ravel(), exact.ravel())[0, 1] > 0.99


def test_real_files_have_the_documented_shapes(shared):
    p, w = load_llama2c(shared / "models" / "stories260K.bin")
    assert (p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size,
            p.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert w["output.weight"] is w["tok_embeddings.weight"]
    p8, w8 = load_llama2c(shared / "models" / "stories260K-q8.bin")
    assert p8 == p
    # the int8 file is the float file, quantized: the dequantized embedding agrees closely
    emb = dequantize_q8(w8["tok_embeddings.weight"].q, w8["tok_embeddings.weight"].s, 8)
    assert np.abs(emb - w["tok_embeddings.weight"]).max() < 0.02


# ----------------------------------------------------------------------------
# bad files: each names the file and what is wrong

def write(tmp_path, data, name="bad.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.bin: no such checkpoint file"):
        load_llama2c(tmp_path / "nope.bin")


def test_too_short_for_a_header(tmp_path):
    with pytest.raises(CheckpointError, match="too short"):
        load_llama2c(write(tmp_path, b"\x01\x02"))


def test_truncated_file(tmp_path, shared):
    data = (shared / "models" / "stories260K.bin").read_bytes()
    path = write(tmp_path, data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"bad.bin: file is 1056440 bytes but its header "
                                              r"\(dim=64.*needs 1056540 bytes \(truncated\?\)"):
        load_llama2c(path)


def test_header_inconsistent_with_size(tmp_path, shared):
    data = bytearray((shared / "models" / "stories260K.bin").read_bytes())
    data[8:12] = struct.pack("<i", 6)          # n_layers 5 -> 6: the file is now too small
    with pytest.raises(CheckpointError, match="n_layers=6.*needs"):
        load_llama2c(write(tmp_path, bytes(data)))


@pytest.mark.parametrize("field,index,value", [("dim", 0, 0), ("n_heads", 3, -8),
                                                ("seq_len", 6, 1 << 30)])
def test_implausible_header_fields(tmp_path, field, index, value):
    header = [64, 172, 5, 8, 4, 512, 512]
    header[index] = value
    with pytest.raises(CheckpointError, match=f"header field {field} = {value}"):
        load_llama2c(write(tmp_path, struct.pack("<7i", *header) + b"\0" * 64))


def test_heads_must_divide(tmp_path):
    with pytest.raises(CheckpointError, match="n_heads=5"):
        load_llama2c(write(tmp_path, struct.pack("<7i", 64, 172, 5, 5, 5, 512, 512)))


def test_bad_version(tmp_path):
    data = struct.pack("<Ii", MAGIC, 7) + b"\0" * 248
    with pytest.raises(CheckpointError, match="version 7 is not supported"):
        load_llama2c(write(tmp_path, data))


def test_bad_group_size(tmp_path):
    data = struct.pack("<Ii7iBi", MAGIC, 2, 64, 172, 5, 8, 4, 512, 512, 1, 0)
    with pytest.raises(CheckpointError, match="group_size 0"):
        load_llama2c(write(tmp_path, data + b"\0" * (256 - len(data))))

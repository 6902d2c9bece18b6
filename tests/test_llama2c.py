"""llama2.c checkpoints: round trips in all three formats, the real files, and bad files."""
import struct

import numpy as np
import pytest

from minillama.checkpoints.llama2c import MAGIC, load_llama2c
from minillama.checkpoints.random import random_weights
from minillama.errors import CheckpointError
from minillama.model import ModelArgs, Transformer
from minillama.ops import CPU
from minillama.formats.q8_0 import round_half_away
from minillama.quant import Q8Tensor, dequantize_q8, matmul_q8, quantize_activation

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


# ----------------------------------------------------------------------------
# runq.c's arithmetic, against its C loops transliterated one value at a time

def runq_quantize(x, gs):
    """runq.c's quantize(), line by line: float32 max, scale, then (int8_t) round(x / scale)."""
    q, s = np.zeros(len(x), np.int8), np.zeros(len(x) // gs, np.float32)
    for g in range(len(x) // gs):
        wmax = np.float32(0)
        for v in x[g * gs:(g + 1) * gs]:
            wmax = max(wmax, np.float32(abs(v)))
        s[g] = wmax / np.float32(127)
        for i in range(g * gs, (g + 1) * gs):
            quant = np.float32(x[i] / s[g]) if s[g] else np.float32(0)
            q[i] = int(np.sign(quant) * np.floor(abs(float(quant)) + 0.5))   # C's round()
    return q, s


def runq_matmul(xq, xs, wq, ws, gs):
    """runq.c's matmul(), line by line: int32 sums per group, val += ival * w.s * x.s."""
    out = np.zeros(wq.shape[0], np.float32)
    for i in range(wq.shape[0]):
        val = np.float32(0)
        for g in range(len(xs)):
            ival = sum(int(a) * int(b) for a, b in zip(xq[g * gs:(g + 1) * gs],
                                                         wq[i, g * gs:(g + 1) * gs]))
            val = val + np.float32(ival) * ws[i, g] * xs[g]
        out[i] = val
    return out


def test_round_half_away_is_cs_round():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, -126.5, 3.2],
                 np.float32)
    assert round_half_away(v).tolist() == [1, 2, 3, -1, -3, 0, 0, 127, -127, 3]
    assert np.round(v).tolist()[:5] == [0, 2, 2, -0, -2]              # NumPy: half to even


def test_quantize_activation_and_matmul_q8_are_runqs_loops():
    rng = np.random.default_rng(0)
    gs, n, d = 8, 44, 5                               # 44 = 5 whole groups and 4 left over
    x = rng.standard_normal(n).astype(np.float32)
    x[:8] = [127, 2.5, -2.5, 0.5, -0.5, 62.5, -4.5, 1]   # scale 1: x / s lands on .5 exactly
    x[16:24] = 0                                      # an all-zero group: scale 0, q 0
    q, s = quantize_activation(x[None], gs)
    want_q, want_s = runq_quantize(x, gs)
    np.testing.assert_array_equal(q.reshape(-1), want_q[:40])
    assert q[0, 0].tolist() == [127, 3, -3, 1, -1, 63, -5, 1]           # not NumPy's 2, -2, 0, ...
    np.testing.assert_array_equal(s[0], want_s)
    w = Q8Tensor(rng.integers(-127, 128, (d, n)).astype(np.int8),
                 rng.uniform(0.001, 0.02, (d, n // gs)).astype(np.float32), gs, w8a8=True)
    got = matmul_q8(q, s, w)[0]
    np.testing.assert_array_equal(got, runq_matmul(want_q, want_s, w.q, w.s, gs))
    np.testing.assert_array_equal(CPU.linear(x, w), got)               # the model's path too


@pytest.mark.parametrize("tied", [True, False])
def test_the_benchmarks_legacy_writer_is_the_tests_twin(tmp_path, tied):
    """bench cpu writes run.c's files itself (the package does not import tests/tools): the
    same bytes as writers.write_llama2c(version=0) but the freq_cis tables run.c skips."""
    from minillama.bench.cpu_llama2c import write_legacy
    p = ModelArgs(**ARGS)
    w = random_weights(p, seed=3, tied=tied)
    write_legacy(tmp_path / "bench.bin", p, w)
    write_llama2c(tmp_path / "tests.bin", p, w, version=0)
    assert (tmp_path / "bench.bin").stat().st_size == (tmp_path / "tests.bin").stat().st_size
    p2, w2 = load_llama2c(tmp_path / "bench.bin")
    assert p2 == load_llama2c(tmp_path / "tests.bin")[0]
    for name, value in w.items():
        np.testing.assert_array_equal(w2[name], value, err_msg=name)
    assert (w2["output.weight"] is w2["tok_embeddings.weight"]) == tied

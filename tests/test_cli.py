"""The command line as a user meets it: subprocesses, exact stdout, exit codes, one-line errors."""
import json
import subprocess
import sys

import pytest

from conftest import GOLDEN, MODELS, require_shared
from minillama.ops import CPU


def minillama(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minillama", *map(str, args)],
                          capture_output=True, input=stdin, timeout=300)


def golden_cases():
    if not GOLDEN.exists():
        return []
    return json.loads(GOLDEN.read_text())["generation"]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: f"{c['model']}-t{c['temperature']}")
def test_run_prints_exactly_what_llama2c_prints(case):
    require_shared()
    args = ["run", MODELS / case["model"], "-z", MODELS / case["tokenizer"],
            "-t", case["temperature"], "-p", case["topp"], "-s", case["seed"], "-n", case["steps"]]
    if case["prompt"]:
        args += ["-i", case["prompt"]]
    r = minillama(*args)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == case["stdout"]
    assert r.stderr.decode().startswith("achieved tok/s: ")


def test_run_with_a_prompt_and_few_steps(shared):
    r = minillama("run", MODELS / "stories260K.bin", "-z", MODELS / "tok512.bin", "-t", 0,
                  "-n", 20, "-i", "Once upon a time")
    assert r.returncode == 0
    out = r.stdout.decode()
    assert out.startswith("Once upon a time") and out.endswith("\n")
    assert len(out.split()) < 20


def test_chat_runs_and_ends_cleanly_at_end_of_input(shared):
    r = minillama("run", MODELS / "stories260K.bin", "-z", MODELS / "tok512.bin", "-m", "chat",
                  "-t", 0, "-n", 60, "-i", "Tell me a story", stdin=b"")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert out.startswith("Enter system prompt (optional): Assistant: ")


class EosAfter:
    """A stand-in model: logits pick token 300 at each position until `n` forwards since the
    last EOS, then EOS (2), so turns end where the test wants."""
    class params:
        max_seq_len = 200
    ops = CPU                   # its decoder is its own forward

    def __init__(self, n):
        self.n, self.count = n, 0

    def forward(self, tokens, pos):
        import numpy as np
        logits = np.zeros((1, 1, 512), np.float32)
        token = int(tokens[0, 0])
        self.count = 0 if token == 2 else self.count + 1
        logits[0, 0, 2 if self.count > self.n else 300] = 1.0
        return logits


def test_chat_alternates_turns_like_llama2c(shared):
    import io
    from minillama.run import chat
    from minillama.sampler import Llama2cSampler
    from minillama.tokenizers import load_tokenizer
    tok = load_tokenizer(MODELS / "tok512.bin")
    prompt_len = len(tok.encode("[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]", True, False))
    out = io.BytesIO()
    chat(EosAfter(prompt_len + 3), tok, Llama2cSampler(512, 0.0, 0.9, 1), "hi", "sys", 200,
         inp=io.StringIO("again\n"), out=out)
    text = out.getvalue().decode()
    p = tok.decode_piece(300, 300).decode()
    # As run.c: the answer streams until EOS (a newline), the token sampled after the EOS is
    # still printed, then the next user turn comes from stdin; end of input ends the chat.
    n2 = prompt_len + 3 - len(tok.encode("[INST] again [/INST]", True, False)) + 1
    first, second = "Assistant: " + p * 4 + "\n" + p, "Assistant: " + p * n2 + "\n" + p
    assert text == first + "User: " + second + "User: \n"


def test_tokenize_prints_ids_and_pieces(shared):
    r = minillama("tokenize", "-z", MODELS / "tokenizer.bin", "I believe the meaning of life is")
    assert r.stdout.decode() == "1 306 4658 278 6593 310 2834 338\n"
    r = minillama("tokenize", "-z", MODELS / "tokenizer.bin", "--pieces", "Hi")
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "1 6324" and "6324:' Hi'" in lines[1]


def test_info_reports_parameters_and_kv_cache(shared):
    r = minillama("info", MODELS / "stories260K.bin", "--max_seq_len", 128, "--max_batch_size", 4)
    out = r.stdout.decode()
    assert r.returncode == 0
    assert "dim 64, 5 layers, 8 heads (4 kv heads, head_dim 8), hidden_dim 172, vocab 512" in out
    # 512*64 embedding (shared) + 5 layers * (64*4 of norms... ) computed by hand:
    per_layer = 2 * 64 + 64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 172
    assert f"parameters      {512 * 64 + 5 * per_layer + 64:,}" in out
    assert f"kv cache        {2 * 5 * 4 * 128 * 4 * 8 * 4:,} bytes" in out


def test_complete_prints_each_prompt_and_completion(shared, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nLily went\n")
    r = minillama("complete", "--ckpt_dir", MODELS / "stories260K.bin", "--tokenizer_path",
                  MODELS / "tok512.bin", "--max_seq_len", 128, "--max_batch_size", 4,
                  "--prompts_file", prompts, "--prompt", "Tom", "--temperature", 0,
                  "--max_gen_len", 16, "--echo")
    assert r.returncode == 0, r.stderr.decode()
    blocks = r.stdout.decode().split("\n==================================\n")
    assert [b.strip().splitlines()[0] for b in blocks if b.strip()] == \
        ["Tom", "Once upon a time", "Lily went"]
    assert "> Once upon a time, there was" in blocks[1]            # echo keeps the prompt


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_complete_with_a_prompts_file_of_no_prompts_says_so(shared, tmp_path, text):
    """It ran Meta's four example prompts instead, silently."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    r = minillama("complete", "--ckpt_dir", MODELS / "stories260K.bin", "--tokenizer_path",
                  MODELS / "tok512.bin", "--prompts_file", prompts, "--max_gen_len", 4)
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr.decode() == (f"minillama: error: --prompts_file: {prompts} holds no prompts "
                                 f"(expected one a line; blank lines are skipped)\n")


def test_an_empty_tokenizer_path_is_refused_not_taken_as_none(shared):
    """-z "" (an unset variable in a script) and --tokenizer_path "" were taken as not given:
    the checkpoint's own tokenizer or tokenizer.bin beside it was used, or named in the error."""
    for args in (("run", MODELS / "stories260K.bin", "-z", "", "-n", 2, "-i", "hi"),
                 ("tokenize", "-z", "", "hi")):
        r = minillama(*args)
        assert (r.returncode, r.stdout) == (2, b"")
        assert r.stderr.decode() == ("minillama: error: -z: expected a tokenizer file, got an "
                                     "empty path\n")
    r = minillama("complete", "--ckpt_dir", MODELS / "stories260K.bin", "--tokenizer_path", "",
                  "--prompt", "hi", "--max_gen_len", 2)
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr.decode() == ("minillama: error: tokenizer_path: expected a tokenizer file, "
                                 "got an empty path\n")


def test_complete_logprobs(shared):
    r = minillama("complete", "--ckpt_dir", MODELS / "stories260K.bin", "--tokenizer_path",
                  MODELS / "tok512.bin", "--prompt", "Once upon a time", "--temperature", 0,
                  "--max_gen_len", 5, "--logprobs")
    lines = r.stdout.decode().splitlines()
    scores = [float(line.split()[-1]) for line in lines[2:7]]
    assert len(scores) == 5 and all(s <= 0 for s in scores)


def test_python_m_and_console_script_agree(shared):
    args = ["tokenize", "-z", str(MODELS / "tok512.bin"), "Hello"]
    console = subprocess.run(["minillama", *args], capture_output=True)
    assert console.stdout == minillama(*args).stdout and console.returncode == 0


# ----------------------------------------------------------------------------
# user errors: exit status 2, one line naming what is wrong, no traceback

@pytest.mark.parametrize("args,message", [
    (["run", "missing.bin", "-z", "tok.bin"], "missing.bin: no such file"),
    (["run", MODELS / "stories260K.bin", "-z", MODELS / "tokenizer.bin"],
     "has 32000 tokens but the model's vocab_size is 512"),
    (["run", MODELS / "stories260K.bin", "-t", "-1"], "argument -t: expected a value in [0.0"),
    (["run", MODELS / "stories260K.bin", "-p", "0"], "argument -p: expected a value in (0.0, 1.0]"),
    (["run", MODELS / "stories260K.bin", "-p", "1.5"], "argument -p"),
    (["run", MODELS / "stories260K.bin", "-n", "0"], "argument -n: expected a value in [1"),
    (["run", MODELS / "stories260K.bin", "-m", "poem"], "argument -m: invalid choice"),
    (["complete", "--ckpt_dir", MODELS / "stories260K.bin", "--tokenizer_path",
      MODELS / "tok512.bin", "--max_batch_size", "1", "--prompt", "a", "--prompt", "b"],
     "--max_batch_size: 2 prompts do not fit a batch of 1"),
    (["complete", "--ckpt_dir", MODELS / "stories260K.bin", "--tokenizer_path",
      MODELS / "tok512.bin", "--max_seq_len", "4", "--prompt", "Once upon a time there was"],
     "longer than max_seq_len (4)"),
    (["run", MODELS / "stories260K.bin", "-z", MODELS / "tok512.bin", "-n", "3", "-i",
      "Once upon a time there was"], "do not fit in 3 steps"),
    (["info", MODELS / "tok512.bin"], "tok512.bin"),
])
def test_user_errors_exit_2_with_one_line(args, message):
    require_shared()
    r = minillama(*args)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert message in err
    assert "Traceback" not in err

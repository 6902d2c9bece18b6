"""Every code block in README.md, docs/*.md and docs/ja/*.md runs here, so the docs cannot rot.

The convention: the first word of a fence's info string (its language) says what happens to it.

```python          Executed, in order, in one namespace per Markdown file, with cwd = the repository
                   root. Show results with `assert` or print(); when the next block is ```output,
                   what the block prints must match it.
```python <path>   A quotation of <path>, e.g. ```python minillama/generation.py: the block must
                   appear verbatim, as consecutive lines, in that file (indented uniformly by any
                   amount). A line `# ...` in the block stands for any number of lines left out.
                   Not executed. Any language may quote a file this way (```cuda kernels/x.cu).
```console         A terminal session. Each line starting with "$ " is a command, run by bash with
                   cwd = the repository root; the lines after it, up to the next "$ ", are what it
                   prints (stdout and stderr together, as a terminal shows them). In expected
                   output, a line "..." matches any number of lines and "..." inside a line matches
                   any text. A last line "[exit status N]" says the command must exit with N;
                   otherwise it must exit with 0. With no output lines only the status is checked.
```sh, ```bash,    A script: every line that is not blank or a # comment is a command and must exit
```shell           with 0; output is not compared.
```output          The expected output of the ```python block just before it.
```text,           Not run: prose, file layouts, diagrams, sample output shown for illustration.
```mermaid
A second word "gpu" (```python gpu, ```console gpu) runs the block only when CuPy and a GPU
are present; without them it is skipped.

In console and sh blocks, set-up steps are shown but not run, because the test environment has
done them already (CI runs the install and the test suite itself): lines starting with
`pip install`, `git clone`, `cd `, `python -m pytest`, `pytest` and `.ci/run`.
`minillama` and `python` run this checkout with this interpreter, installed or not.

A fence with no language, or one not listed above, fails the test: tag it.
"""
import contextlib
import io
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_shared

ROOT = Path(__file__).resolve().parents[1]
RUN = {"python", "console", "sh", "bash", "shell"}
SHOW = {"text", "output", "mermaid"}
SETUP_STEPS = ("pip install", "git clone", "cd ", "python -m pytest", "pytest", ".ci/run")
COMMAND_TIMEOUT = 300


@dataclass
class Block:
    lang: str          # first word of the info string
    args: list         # the other words
    text: str          # the content, dedented to the fence
    line: int          # 1-based line of the opening fence

    @property
    def where(self):
        return f"line {self.line} (```{' '.join([self.lang] + self.args)})"


# ----------------------------------------------------------------------------
# reading Markdown

FENCE = re.compile(r"^(\s*)(`{3,})(.*)$")


def parse_blocks(markdown):
    """Fenced code blocks of a Markdown text, in order."""
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, info = m.group(1), m.group(2), m.group(3).strip()
        words = info.split()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(ticks)
                                       and lines[j].strip().strip("`") == ""):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"line {i + 1}: code block is never closed")
        blocks.append(Block(words[0].lower() if words else "", words[1:],
                            "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks


def is_quotation(block):
    """```lang path: the second word names a file of the repository."""
    return bool(block.args) and block.args[0] != "gpu"


# ----------------------------------------------------------------------------
# checking

def output_pattern(expected):
    """A regex for expected output: "..." alone matches any lines, inside a line any text."""
    parts = []
    for line in normalize(expected).splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(r"[^\n]*?".join(re.escape(p) for p in line.split("...")) + r"\n")
    return re.compile("".join(parts))


def normalize(text):
    """Trailing spaces and trailing blank lines do not count; tabs are shown as spaces."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "".join(line + "\n" for line in lines)


def check_output(actual, expected, what):
    if not output_pattern(expected).fullmatch(normalize(actual)):
        raise AssertionError(f"{what}: output differs from the docs.\n--- expected\n"
                             f"{normalize(expected)}--- got\n{normalize(actual)}")


def check_quotation(block):
    """The block's lines appear in order, consecutively, in the quoted file (`# ...` skips)."""
    path = ROOT / block.args[0]
    assert path.is_file(), f"{block.where}: quoted file {block.args[0]} does not exist"
    source = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    want = [line.rstrip() for line in textwrap.dedent(block.text).splitlines()]
    while want and not want[-1]:
        want.pop()
    assert want, f"{block.where}: empty quotation"
    for start, line in enumerate(source):
        if line.endswith(want[0]) and not line[:len(line) - len(want[0])].strip():
            indent = line[:len(line) - len(want[0])]
            if _matches_from(source, start, want, indent):
                return
    raise AssertionError(f"{block.where}: these lines are not in {block.args[0]} (was the code "
                         f"changed? update the docs):\n" + "\n".join(want))


def _matches_from(source, i, want, indent):
    """Match quotation lines `want` against source from line i; `# ...` skips any lines."""
    for k, w in enumerate(want):
        if w.strip() == "# ...":
            rest = want[k + 1:]
            if not rest:
                return True
            return any(_matches_from(source, j, rest, indent) for j in range(i, len(source)))
        if i >= len(source):
            return False
        expected = indent + w if w else ""
        if source[i] != expected:
            return False
        i += 1
    return True


# ----------------------------------------------------------------------------
# running

def gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def shim_env(tmp_path):
    """PATH with `minillama` and `python` meaning this checkout and this interpreter."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in (("minillama", f'exec {shlex.quote(sys.executable)} -m minillama "$@"\n'),
                       ("python", f'exec {shlex.quote(sys.executable)} "$@"\n')):
        script = bindir / name
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    return env


def is_setup_step(command):
    return command.strip().startswith(SETUP_STEPS)


def run_command(command, env):
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT)
    return done.returncode, done.stdout.decode("utf-8", errors="replace")


def console_commands(block):
    """[(command, expected output lines)] of a ```console block."""
    sessions = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            sessions.append((line[2:], []))
        elif sessions:
            sessions[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"{block.where}: output before the first '$ ' command")
    assert sessions, f"{block.where}: a console block needs '$ ' commands (or tag it text)"
    return sessions


def run_console(block, env):
    for command, expected in console_commands(block):
        if is_setup_step(command):
            continue
        status = 0
        if expected and re.fullmatch(r"\[exit status (\d+)\]", expected[-1].strip()):
            status = int(expected.pop().strip()[13:-1])
        code, out = run_command(command, env)
        what = f"{block.where}: $ {command}"
        assert code == status, f"{what}: exit status {code}, expected {status}\n{out}"
        if expected:
            check_output(out, "\n".join(expected), what)


def run_script(block, env):
    for command in block.text.splitlines():
        if not command.strip() or command.lstrip().startswith("#") or is_setup_step(command):
            continue
        code, out = run_command(command, env)
        assert code == 0, f"{block.where}: {command}: exit status {code}\n{out}"


def run_python(block, namespace, expected_output=None):
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(block.text, f"<{block.where}>", "exec"), namespace)
    except Exception as e:
        raise AssertionError(f"{block.where}: {type(e).__name__}: {e}\n{stdout.getvalue()}") from e
    if expected_output is not None:
        check_output(stdout.getvalue(), expected_output, block.where)


def run_markdown(markdown, env, gpu=None):
    """Run or check every block of one Markdown text; raise AssertionError at the first failure."""
    gpu = gpu_available() if gpu is None else gpu
    blocks = parse_blocks(markdown)
    namespace = {"__name__": "__docs__"}
    for k, block in enumerate(blocks):
        if not block.lang:
            raise AssertionError(f"{block.where}: untagged code block; tag it (see "
                                 f"tests/test_docs.py for the convention)")
        if block.lang not in RUN | SHOW and not is_quotation(block):
            raise AssertionError(f"{block.where}: unknown block language {block.lang!r}; use "
                                 f"one of {sorted(RUN | SHOW)} or quote a file")
        if is_quotation(block):
            check_quotation(block)
            continue
        if block.lang == "output" and (k == 0 or blocks[k - 1].lang != "python"
                                       or is_quotation(blocks[k - 1])):
            raise AssertionError(f"{block.where}: an output block must follow a python block")
        if block.lang in SHOW:
            continue
        if "gpu" in block.args and not gpu:
            continue
        if block.lang == "python":
            following = blocks[k + 1] if k + 1 < len(blocks) else None
            expected = following.text if following and following.lang == "output" else None
            run_python(block, namespace, expected)
        elif block.lang == "console":
            run_console(block, env)
        else:
            run_script(block, env)
    return blocks


# ----------------------------------------------------------------------------
# the tests

def doc_files():
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) \
        + sorted((ROOT / "docs" / "ja").glob("*.md"))
    return [f for f in files if f.is_file()]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_blocks_run(path, tmp_path, monkeypatch):

    require_shared()                  # the docs use the real models in ../shared
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_markdown(path.read_text(encoding="utf-8"), shim_env(tmp_path))


def test_docs_exist():
    names = {str(p.relative_to(ROOT)) for p in doc_files()}
    for name in ("docs/architecture.md", "docs/generate.md", "docs/ja/generate.md",
                 "docs/checkpoints.md", "docs/troubleshooting.md"):
        assert name in names, f"{name} is missing"


def test_troubleshooting_covers_every_error_source():
    """Every MiniLlamaError class, and every module that raises one, has its place in
    docs/troubleshooting.md (a new module with new messages must be documented there)."""
    from minillama import errors
    text = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    classes = [name for name, c in vars(errors).items()
               if isinstance(c, type) and issubclass(c, errors.MiniLlamaError)]
    for name in classes:
        assert f"`{name}`" in text, f"docs/troubleshooting.md does not mention {name}"
    raises = re.compile(r"raise (?:%s)\(" % "|".join(classes))
    for path in sorted((ROOT / "minillama").rglob("*.py")):
        if raises.search(path.read_text(encoding="utf-8")):
            module = path.relative_to(ROOT / "minillama").as_posix()
            assert module in text, f"docs/troubleshooting.md does not cover minillama/{module}"


# --- the runner itself must catch what it claims to catch -----------------------------------

def md(*blocks):
    return "\n".join(f"```{info}\n{body}```\n" for info, body in blocks)


def test_runner_compares_python_output(tmp_path):
    env = shim_env(tmp_path)
    run_markdown(md(("python", "x = 6 * 7\nprint(x)\n"), ("output", "42\n"),
                    ("python", "assert x == 42\n")), env, gpu=False)
    with pytest.raises(AssertionError, match="output differs"):
        run_markdown(md(("python", "print(41)\n"), ("output", "42\n")), env, gpu=False)
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        run_markdown(md(("python", "1 / 0\n")), env, gpu=False)


def test_runner_checks_console_output_and_status(tmp_path):
    env = shim_env(tmp_path)
    run_markdown(md(("console", "$ echo hello world\nhello ...\n$ printf 'a\\nb\\nc\\n'\na\n...\n"
                                "$ exit 3\n[exit status 3]\n$ pip install nothing-at-all\n")),
                 env, gpu=False)
    with pytest.raises(AssertionError, match="output differs"):
        run_markdown(md(("console", "$ echo hello\ngoodbye\n")), env, gpu=False)
    with pytest.raises(AssertionError, match="exit status 1, expected 0"):
        run_markdown(md(("console", "$ false\n")), env, gpu=False)
    with pytest.raises(AssertionError, match="exit status 1"):
        run_markdown(md(("sh", "true\nfalse\n")), env, gpu=False)


def test_runner_checks_quotations_and_tags(tmp_path):
    env = shim_env(tmp_path)
    quote = "def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,\n"
    run_markdown(md(("python minillama/generation.py", quote)), env, gpu=False)
    run_markdown(md(("python minillama/generation.py",
                     "bsz = len(prompt_tokens)\n# ...\nprev_pos = 0\n")), env, gpu=False)
    with pytest.raises(AssertionError, match="not in minillama/generation.py"):
        run_markdown(md(("python minillama/generation.py", "prev_pos = 1\n")), env, gpu=False)
    with pytest.raises(AssertionError, match="untagged"):
        run_markdown(md(("", "anything\n")), env, gpu=False)
    with pytest.raises(AssertionError, match="unknown block language"):
        run_markdown(md(("pyhton", "1\n")), env, gpu=False)
    # a gpu block is skipped without a GPU, run with one
    run_markdown(md(("console gpu", "$ false\n")), env, gpu=False)
    with pytest.raises(AssertionError):
        run_markdown(md(("console gpu", "$ false\n")), env, gpu=True)

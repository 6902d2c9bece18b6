"""The notebooks run top to bottom, on a CPU, and carry no stale outputs.

Each notebook is executed with nbclient in a fresh python3 kernel (this interpreter), with
cwd = notebooks/ as Jupyter would have it, and fails the test on the first cell that raises.
The notebooks check their own results with asserts (e.g. the hand-run generate loop must equal
`generate`), so running them is a real test of the code they teach.

They read ../shared/models when it is there (CI has it) and otherwise build stand-ins
(notebooks/story_files.py); a second run with MINILLAMA_NO_SHARED=1 checks that path too.
Committed notebooks must have their outputs stripped: the suite re-executes them, so an output
saved in the file could only be stale.
"""
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_tokens", "02_checkpoint", "03_rmsnorm_rope", "04_attention",
            "05_swiglu_residual", "06_generate", "07_cuda_kernels", "08_story"]
# the notebooks whose content depends most on which model files they get
STAND_IN_RUN = ["01_tokens", "02_checkpoint", "04_attention", "06_generate"]
CELL_TIMEOUT_S = 300


def notebook_paths():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def kernel_env(monkeypatch, tmp_path):
    """The kernel is `python -m ipykernel_launcher`: make `python` this interpreter, make the
    checkout importable without an install, and draw plots off screen."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "python"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")


def execute(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    return nb


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
    kernel_env(monkeypatch, tmp_path)
    nb = execute(path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("name", STAND_IN_RUN)
def test_notebook_runs_without_shared_models(name, monkeypatch, tmp_path):
    kernel_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MINILLAMA_NO_SHARED", "1")
    nb = execute(NOTEBOOKS / f"{name}.ipynb")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "stand-in" in text          # it really ran on the stand-ins, not the real files


def test_all_notebooks_present_and_shaped():
    assert [p.stem for p in notebook_paths()] == EXPECTED
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
        assert "What you will learn" in markdown[0], f"{path.name}: must open with what you will learn"
        assert "## Exercises" in markdown[-1], f"{path.name}: must end with exercises"


def test_committed_notebooks_have_no_outputs():
    for path in notebook_paths():
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, \
                    f"{path.name} cell {i}: strip outputs before committing (the tests re-run it)"


def test_stand_in_files_are_consistent(monkeypatch):
    """The stand-ins the notebooks fall back on: the two tokenizers agree and fit the model."""
    monkeypatch.setenv("MINILLAMA_NO_SHARED", "1")
    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    import numpy as np
    from story_files import find_shared_models, story_files
    from minillama.loading import load_model
    from minillama.tokenizers import load_tokenizer

    assert find_shared_models() is None
    files = story_files()
    assert not files.real
    bin_tok = load_tokenizer(files.tokenizer_bin)
    sp_tok = load_tokenizer(files.tokenizer_model)
    for text in ["Once upon a time, Lily saw a dog.", "Tom 42 こんにちは 🙂"]:
        ids = bin_tok.encode(text, bos=True, eos=False)
        assert ids == sp_tok.encode(text, bos=True, eos=False)
        assert bin_tok.decode(ids) == text
    for path in (files.model, files.model_q8):
        model = load_model(path, max_seq_len=16)
        assert model.params.vocab_size == bin_tok.n_words
        logits = model.forward(np.array([ids[:8]]), 0)
        assert logits.shape == (1, 8, bin_tok.n_words) and np.isfinite(logits).all()

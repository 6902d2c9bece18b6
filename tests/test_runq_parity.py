"""minillama against llama2.c's own programs: runq (int8) and run (float32), sampled.

llama2.c's run.c and runq.c (../shared/oracles/llama2c, MIT) are compiled here, in a temporary
folder, when gcc is there (a clean skip otherwise), and both programs and minillama print a story
for many random seeds, temperatures, top-p values and prompts: the bytes must be the same.
A sampled story is the strictest test of the logits there is: one logit a last bit off moves a
probability across the coin of one step, and from there the stories differ.
The goldens recorded from runq (../shared/golden/runq_sampled.json) run without gcc.
"""
import io
import json
import shutil
import subprocess

import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.cli import main
from minillama.errors import ArgumentError
from minillama.exact import ExactDecoder, runs_runq
from minillama.loading import load_model
from minillama.model import ModelArgs
from minillama.run import generate
from minillama.sampler import Llama2cSampler
from minillama.tokenizers import load_tokenizer

from conftest import require_shared
from tests.tools import MODELS, SHARED
from tests.tools.writers import write_llama2c

ORACLES = SHARED / "oracles" / "llama2c"
PROMPTS = ["", "Once upon a time", "Lily and Ben", "One day, a cat", "The sun was hot. Tom",
           "Sue had a red ball", "\"Can we play?\" asked Max", "A bird, a dog and a frog"]


# ----------------------------------------------------------------------------
# the oracles, built here

@pytest.fixture(scope="module")
def llama2c(tmp_path_factory):
    """{"run": path, "runq": path}: llama2.c's programs, built as ../shared/README.md says
    (gcc -O3). -ffp-contract=off changes nothing on x86-64 (no FMA without -march) and keeps gcc
    from fusing a * b + c elsewhere, which would round once where run.c's source rounds twice."""
    require_shared()
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc to build llama2.c's run.c and runq.c")
    folder = tmp_path_factory.mktemp("llama2c")
    built = {}
    for name in ("run", "runq"):
        built[name] = folder / name
        subprocess.run([gcc, "-O3", "-ffp-contract=off", str(ORACLES / f"{name}.c"), "-lm",
                        "-o", str(built[name])], check=True, capture_output=True)
    return built


def oracle_story(program, model, tokenizer, case):
    args = [str(program), str(model), "-z", str(tokenizer), "-t", str(case["temperature"]),
            "-p", str(case["topp"]), "-s", str(case["seed"]), "-n", str(case["steps"]),
            "-i", case["prompt"]]
    return subprocess.run(args, capture_output=True, check=True).stdout


def minillama_story(model, tokenizer, case):
    """What `minillama run --exact` prints for the case (in-process, the model loaded once: each
    run writes its KV cache from position 0 and reads only what it wrote)."""
    sampler = Llama2cSampler(model.params.vocab_size, case["temperature"], case["topp"],
                             case["seed"], exact=True)
    out = io.BytesIO()
    generate(model, tokenizer, sampler, case["prompt"], case["steps"], out=out,
             err=io.StringIO(), exact=True)
    return out.getvalue()


def assert_same_story(got, want, case):
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        pytest.fail(f"{case}: differs at byte {at}: minillama ...{got[max(0, at - 40):at + 40]!r}"
                    f" vs llama2.c ...{want[max(0, at - 40):at + 40]!r}")


def random_cases(n, seed, steps=(96, 256)):
    """n cases from a seeded generator: seed, temperature (0 = greedy, and both sides of 1),
    top-p (1.0 = llama2.c's plain multinomial), prompt, steps."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        cases.append(dict(seed=int(rng.integers(1, 2**31)),       # llama2.c reads -s with atoi
                          temperature=float(rng.choice([0.0, 0.5, 0.8, 1.0, 1.3,
                                                        round(rng.uniform(0.1, 1.5), 3)])),
                          topp=float(rng.choice([0.5, 0.8, 0.9, 0.95, 1.0,
                                                 round(rng.uniform(0.05, 1.0), 3)])),
                          prompt=str(rng.choice(PROMPTS)),
                          steps=int(rng.integers(*steps))))
    return cases


# ----------------------------------------------------------------------------
# runq: llama2.c's int8 file

def test_the_goldens_recorded_from_runq(shared, capsysbinary):
    """The four runs of runq in runq_sampled.json, through the command line as a user types
    them: no --exact, since llama2.c's int8 files are decoded as runq decodes them."""
    golden = json.loads((shared / "golden" / "runq_sampled.json").read_text())["generation"]
    for case in golden:
        capsysbinary.readouterr()
        status = main(["run", str(MODELS / case["model"]), "-z", str(MODELS / case["tokenizer"]),
                       "-t", str(case["temperature"]), "-p", str(case["topp"]),
                       "-s", str(case["seed"]), "-n", str(case["steps"]), "-i", case["prompt"]])
        assert status == 0
        assert_same_story(capsysbinary.readouterr().out, case["stdout"].encode(), case)


@pytest.fixture(scope="module")
def stories260k():
    require_shared()
    tokenizer = load_tokenizer(MODELS / "tok512.bin", vocab_size=512)
    return tokenizer, {name: load_model(MODELS / name) for name in
                       ("stories260K-q8.bin", "stories260K.bin")}


@pytest.mark.slow
@pytest.mark.parametrize("case", random_cases(12, seed=12), ids=str)
def test_runq_on_random_cases(llama2c, stories260k, case):
    tokenizer, models = stories260k
    want = oracle_story(llama2c["runq"], MODELS / "stories260K-q8.bin", MODELS / "tok512.bin", case)
    assert_same_story(minillama_story(models["stories260K-q8.bin"], tokenizer, case), want, case)


# ----------------------------------------------------------------------------
# run: float32, the small model and a random one of stories15M's shape

@pytest.mark.slow
@pytest.mark.parametrize("case", random_cases(8, seed=15), ids=str)
def test_run_on_random_cases(llama2c, stories260k, case):
    tokenizer, models = stories260k
    want = oracle_story(llama2c["run"], MODELS / "stories260K.bin", MODELS / "tok512.bin", case)
    assert_same_story(minillama_story(models["stories260K.bin"], tokenizer, case), want, case)


STORIES15M = dict(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                  vocab_size=32000, max_seq_len=256)


@pytest.fixture(scope="module")
def stories15m_shape(tmp_path_factory):
    """A random model of stories15M's shape, as a llama2.c file, with Llama 2's 32000 tokens.
    Random weights give a nearly flat distribution over 32000 tokens: the hardest case for
    sampling, since the running sum of probabilities crosses the coin among thousands of
    near-equal neighbours. Untied, so the classifier is column-major (matvec_c's fast layout)."""
    require_shared()
    p = ModelArgs(**STORIES15M)
    path = tmp_path_factory.mktemp("stories15m") / "stories15M-shape.bin"
    write_llama2c(path, p, random_weights(p, seed=15))
    tokenizer = load_tokenizer(MODELS / "tokenizer.bin", vocab_size=p.vocab_size)
    return path, load_model(path), tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("case", random_cases(2, seed=32000, steps=(40, 64)), ids=str)
def test_run_on_a_stories15m_shaped_model(llama2c, stories15m_shape, case):
    path, model, tokenizer = stories15m_shape
    want = oracle_story(llama2c["run"], path, MODELS / "tokenizer.bin", case)
    assert_same_story(minillama_story(model, tokenizer, case), want, case)


def test_the_fast_path_differs_only_in_the_last_bits(stories15m_shape):
    """The lesson in numbers: model.forward (BLAS) and ExactDecoder (run.c's order) give
    logits that are almost all different, all within a few float32 roundings (measured: 98% of
    them differ, by at most 1.3e-6 of the largest)."""
    _, model, _ = stories15m_shape
    tokens = np.array([[1, 403, 407, 261, 9038]])
    fast = model.forward(tokens, 0)[0]
    exact = ExactDecoder(model)(tokens, 0)[0]
    assert (fast != exact).mean() > 0.5
    assert np.abs(fast - exact).max() < 1e-5 * np.abs(exact).max()


# ----------------------------------------------------------------------------
# ExactDecoder: a forward like any other

def test_exact_decoder_handles_batches_and_prompts_and_shares_the_cache(shared):
    """A (bsz, seqlen) call is each row, position after position; the KV cache is the model's,
    so model.forward can prefill and ExactDecoder continue (close, not equal: the prefill's
    keys were computed the fast way)."""
    model = load_model(MODELS / "stories260K.bin", max_batch_size=2)
    exact = ExactDecoder(model)
    tokens = np.array([[1, 403, 407], [1, 261, 9]])
    both = exact(tokens, 0)
    for row in range(2):
        for pos in range(3):
            one = exact(tokens[row:row + 1, pos:pos + 1], pos)      # row 0 of the cache
            np.testing.assert_array_equal(one[0, 0], both[row, pos])
    model.forward(tokens[:1], 0)
    after_fast = exact(np.array([[50]]), 3)[0, 0]
    exact(tokens[:1], 0)
    np.testing.assert_allclose(after_fast, exact(np.array([[50]]), 3)[0, 0], rtol=0, atol=1e-4)


def test_exact_refuses_what_llama2c_never_computed(shared):
    model = load_model(MODELS / "stories260K.bin", dtype="q4_0")
    with pytest.raises(ArgumentError, match="exact: reproduces llama2.c's float32 weights"):
        ExactDecoder(model)
    assert runs_runq(load_model(MODELS / "stories260K-q8.bin"))
    assert not runs_runq(load_model(MODELS / "stories260K.bin"))
    assert not runs_runq(load_model(MODELS / "stories260K-q8.bin", dtype="float32"))


def test_llama_build_and_the_command_line_take_exact(shared, capsysbinary):
    from minillama.generation import Llama
    fast = Llama.build(MODELS / "stories260K.bin", MODELS / "tok512.bin", max_seq_len=64,
                       max_batch_size=2)
    exact = Llama.build(MODELS / "stories260K.bin", MODELS / "tok512.bin", max_seq_len=64,
                        max_batch_size=2, exact=True)
    prompts = ["Once upon a time", "Lily and Ben"]
    assert exact.text_completion(prompts, temperature=0, max_gen_len=24) == \
        fast.text_completion(prompts, temperature=0, max_gen_len=24)       # greedy: the same
    assert main(["run", str(MODELS / "stories260K.bin"), "-z", str(MODELS / "tok512.bin"),
                 "-s", "7", "-n", "64", "-i", "Lily and Ben", "--exact"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"Lily and Ben are friends. They like to")

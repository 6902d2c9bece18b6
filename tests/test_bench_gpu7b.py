"""The arithmetic of the 7B section of `python -m minillama.bench gpu` (minillama/bench/gpu7b.py)
that needs no GPU: what a decode step reads, counted from the model, against the memory plan's
count from the hyperparameters."""
import numpy as np
import pytest

from minillama.bench.gpu7b import bytes_per_step, stored_weights
from minillama.checkpoints.random import random_weights
from minillama.memory import kv_cache_bytes, weights_bytes
from minillama.model import ModelArgs, Transformer

P = ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, hidden_dim=160,
              max_seq_len=40, max_batch_size=4)


@pytest.mark.parametrize("bsz, steps", [(1, 1), (1, 32), (4, 7)])
def test_a_step_reads_the_weights_once_and_per_row_one_embedding_row_and_the_cache(bsz, steps):
    model = Transformer(P, random_weights(P))               # untied: the classifier is read too
    table = 4 * P.vocab_size * P.dim
    assert sum(w.nbytes for w in stored_weights(model)) == weights_bytes(P, "float32") - table
    one_position = kv_cache_bytes(P, 1, 1)                  # k and v of one position, all layers
    per_row = 4 * P.dim + one_position * (steps + 1) / 2    # positions 0..steps-1 read 1..steps
    assert bytes_per_step(model, bsz, steps) == weights_bytes(P, "float32") - table + bsz * per_row


class NumpyRandom:
    """What random_linear asks of cupy.random and cupy, on NumPy (no GPU)."""
    uint8, int8, float16, float32 = np.uint8, np.int8, np.float16, np.float32

    class random:
        rng = np.random.default_rng(7)
        randint = staticmethod(lambda low, high, shape, dtype: NumpyRandom.random.rng.integers(
            low, high, shape, dtype=dtype))
        uniform = staticmethod(lambda low, high, shape, dtype: NumpyRandom.random.rng.uniform(
            low, high, shape).astype(dtype))


@pytest.mark.parametrize("dtype", ["q4_0", "int8"])
def test_random_block_weights_are_centred_with_std_about_one_over_root_cols(monkeypatch, dtype):
    """random_linear's block formats: codes whose mean is 0 (q4_0's nibbles 1..15, so code - 8
    is -7..7: from 0..15 it would average -0.5 in every weight, and a random 7B model's
    residual stream would go nearly constant), and weights of std ~cols^-0.5."""
    from minillama.bench import gpu7b
    from minillama.formats import dequantize
    monkeypatch.setattr(gpu7b, "require_cupy", lambda: NumpyRandom)
    rows, cols = 256, 4096
    w = gpu7b.random_linear(rows, cols, dtype)
    if dtype == "q4_0":
        qs = np.asarray(w.planes["qs"])
        nibbles = np.concatenate([qs & 15, qs >> 4]).ravel()
        assert nibbles.min() == 1 and nibbles.max() == 15
        assert abs(nibbles.mean() - 8) < 0.01
    values = dequantize(w)                                    # (rows, cols) float32
    assert abs(values.mean()) < 0.01 * values.std()
    assert values.std() == pytest.approx(cols ** -0.5, rel=0.05)


def test_formats_picks_a_subset_of_the_7b_section_in_its_order():
    import argparse
    from minillama.bench import gpu7b, subset_of
    storage_formats = subset_of(gpu7b.DTYPES, "a storage format of the 7B section")
    assert storage_formats("q4_0, int8") == ("int8", "q4_0")
    assert storage_formats("bfloat16") == ("bfloat16",)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'int4' is not a storage format"):
        storage_formats("int8,int4")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^nothing is not"):
        storage_formats(",")


def test_bench_gpu_refuses_an_unknown_format_with_status_2(capsys):
    from minillama.bench.gpu import main
    with pytest.raises(SystemExit) as e:
        main(["--section", "7b", "--formats", "q3_k"])
    assert e.value.code == 2
    assert "'q3_k' is not a storage format of the 7B section" in capsys.readouterr().err


def test_bench_cpu_refuses_an_unknown_model_shape_with_status_2(capsys):
    from minillama.bench.cpu import main
    with pytest.raises(SystemExit) as e:
        main(["--models", "15M,\x1b9M"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'\\x1b9M' is not a model shape (one or more of 260K, 15M, 42M, 110M" in err
    assert "\x1b" not in err                              # escaped, not printed raw


def test_the_report_puts_generates_steps_ahead_beside_one_token_a_call(capsys):
    """print_report and targets() with measured rows (no GPU): each target of batch 1 and of
    batch 8 / batch 1 is printed twice, one token a call and AHEAD steps a call, from the
    row's own figures, batch 8 with x in two float16 parts (x16_batches=False) beside, and a
    format that failed shows n/a instead of stopping the report."""
    from minillama.bench import gpu7b
    from minillama.generation import AHEAD

    def row(dtype, b1, b1_ahead, b8, b8_ahead, floor):
        return dict(dtype=dtype, weight_bytes=4e9, bytes_per_token=4e9, floor_ms=1.0,
                    b1=b1, b1_of_floor=floor * b1, b1_ahead=b1_ahead,
                    b1_ahead_of_floor=floor * b1_ahead, b8=b8, b8_of_floor=0.5,
                    b8_ahead=b8_ahead, b8_ahead_of_floor=0.5, prefill_ms=50.0, b1_sampled=420.0,
                    b1_path="graph", b8_path="graph")
    q4_0 = dict(row("q4_0", 600.0, 650.0, 2400.0, 2600.0, 1e-3), b8_two=2700.0,
                b8_two_ahead=2925.0)
    s = dict(steps=32, prefill=512, formats=[q4_0,
                                             dict(dtype="int8", error="out of memory")],
             gemm=dict(name="4096^3 float16", ours=None, cublas=700.0, error="n/a"),
             seed_case=dict(error="not run"))
    measured = {name: value for name, value, _ in gpu7b.targets(s)}
    assert measured["q4_0 batch 1, fraction of floor"] == pytest.approx(0.60)
    assert measured[f"q4_0 batch 1, fraction of floor, {AHEAD} ahead"] == pytest.approx(0.65)
    assert measured["q4_0 batch 8 / batch 1"] == pytest.approx(4.0)
    assert measured[f"q4_0 batch 8 / batch 1, {AHEAD} ahead"] == pytest.approx(4.0)
    assert measured["q4_0 batch 8 (two parts) / batch 1"] == pytest.approx(4.5)
    assert measured[f"q4_0 batch 8 (two parts) / batch 1, {AHEAD} ahead"] == pytest.approx(4.5)
    assert measured[f"int8 batch 1, fraction of floor, {AHEAD} ahead"] is None
    assert measured["int8 batch 8 (two parts) / batch 1"] is None
    gpu7b.print_report(dict(llama7b=s, copy_gbs=4000.0))
    out = capsys.readouterr().out
    assert f"q4_0 batch 1, fraction of floor, {AHEAD} ahead" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("q4_0 "))
    assert line.split()[-7:-1] == ["50.0", "650.0", "0.65", "2600.0", "4.00", "420.0"]
    assert "failed: out of memory" in out
    assert (f"q4_0      b8 with x in two float16 parts (x16_batches=False): 2700.0 tokens/s, "
            f"b8/b1 4.50; {AHEAD} ahead 2925.0, b8/b1 4.50") in out


def test_a_decode_rate_is_the_median_of_its_timed_passes_after_one_to_warm_up(monkeypatch):
    """median_rate (bench/timing.py) with a clock that moves only inside run(): the passes take
    1, 9, 2, 3 and 4 s after a warm-up of 100 s; the figure is tokens / the median pass, 3 s,
    not tokens / the first or the mean, and each timed pass sits between two syncs."""
    from minillama.bench import timing
    durations, now, calls = iter([100.0, 1.0, 9.0, 2.0, 3.0, 4.0]), [0.0], []

    def run():
        calls.append("run")
        now[0] += next(durations)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    rate = timing.median_rate(run, 30, lambda: calls.append("sync"), passes=5)
    assert rate == pytest.approx(30 / 3.0)
    assert calls == ["run"] + ["sync", "run", "sync"] * 5


def test_issue_13s_targets_give_stories110m_its_fraction_of_the_floor_beside_its_tokens_per_s():
    """targets_13 (bench/gpu.py) from measured rows, no GPU: stories110M at batch 1 also gets
    the issue's "(>= 0.5 of the floor)", its rate times the bytes a token over this run's copy
    bandwidth; stories15M, whose target has no such form, does not."""
    from minillama.bench import gpu
    rows = [dict(model=m, bsz=1, ahead=rate, persistent=rate * 0.9, bytes_per_token=nbytes)
            for m, rate, nbytes in (("15M", 16000.0, 61e6), ("110M", 5000.0, 440e6))]
    got = {name: (value, target) for name, value, target in
           gpu.targets_13(dict(decode=rows, copy_gbs=4000.0))}
    assert got["stories110M batch 1, fraction of floor, 8 ahead"] == \
        pytest.approx((5000.0 * 440e6 / 4000e9, 0.5))
    assert not any("15M batch 1, fraction" in name for name in got)
    assert got["stories110M batch 1, tokens/s, 8 ahead"] == (5000.0, 5000.0)

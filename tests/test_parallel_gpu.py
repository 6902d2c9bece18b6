"""Tensor parallelism on real GPUs through NCCL (marked gpu; each test skips cleanly where
there are fewer GPUs than it needs, or no CuPy). The lead runs them on the 2-GPU machine:

    PYTHONPATH=. MINILLAMA_SHARED=.kcarry/shared python -m pytest -q -m gpu tests/test_parallel_gpu.py

One GPU: N = 1 through a real NCCL communicator equals the plain GPU path, token for token.
Two: greedy (and seeded sampling) equals one GPU on stories260K, and on a 13B-shaped random
model in float16; a worker killed mid-generation ends it in one error, no process left: between
two steps, and while the parent (rank 0) waits in NCCL for it, which it must abort.
"""
import os
import signal
import time

import numpy as np
import pytest

from conftest import MODELS, greedy, require_shared
from minillama.generation import Llama
from minillama.loading import load_model, read_checkpoint
from minillama.parallel.workers import start

pytestmark = pytest.mark.gpu


def need_gpus(cp, n):
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("CuPy has no NCCL")
    count = cp.cuda.runtime.getDeviceCount()
    if count < n:
        pytest.skip(f"needs {n} GPUs, {count} here")


def stories(max_seq_len=64, max_batch_size=2):
    require_shared()
    return read_checkpoint(MODELS / "stories260K.bin", max_seq_len, max_batch_size)


@pytest.mark.parametrize("world", [1, 2])
def test_stories260k_greedy_equals_one_gpu(cp, world):
    need_gpus(cp, world)
    want = greedy(_plain_gpu_forward(), [1, 403, 407], 40)
    with start(stories(), world) as tp:
        assert greedy(tp.forward, [1, 403, 407], 40) == want


def _plain_gpu_forward():
    model = load_model(MODELS / "stories260K.bin", device="cuda", max_seq_len=64,
                       max_batch_size=2)
    return model.ops.decoder(model)           # FusedDecoder's CUDA graph, as generate uses


def test_stories260k_seeded_sampling_equals_one_gpu(cp):
    need_gpus(cp, 2)
    tok = MODELS / "tok512.bin"
    prompts = ["Once upon a time", "Lily and Ben"]
    one = Llama.build(MODELS / "stories260K.bin", tok, 64, 2, device="cuda", seed=7)
    want = one.text_completion(prompts, temperature=0.8, top_p=0.9, max_gen_len=30)
    two = Llama.build(MODELS / "stories260K.bin", tok, 64, 2, seed=7, tensor_parallel=2)
    try:
        assert two.text_completion(prompts, temperature=0.8, top_p=0.9, max_gen_len=30) == want
    finally:
        two.model.close()


def test_13b_shape_greedy_equals_one_gpu(cp):
    need_gpus(cp, 2)
    from minillama.bench.tp import n_gpus, one_gpu, params_13b
    p = params_13b(n_layers=40, max_seq_len=64)
    _, want = one_gpu(p, "float16", 16)
    _, got = n_gpus(p, "float16", 16, 2)
    assert got == want


def test_a_gpu_worker_killed_mid_generation_ends_it_cleanly(cp):
    need_gpus(cp, 2)
    from minillama.errors import DeviceError
    tp = start(stories(), 2)
    pids, steps = tp.pids, []                # {1: pid}: rank 0 is this process

    def forward(tokens, start_pos):
        steps.append(start_pos)
        if len(steps) == 5:
            os.kill(pids[1], signal.SIGKILL)     # rank 1, a worker, dies between two steps
            time.sleep(0.5)
        return tp.forward(tokens, start_pos)
    with pytest.raises(DeviceError, match=r"^tensor-parallel worker rank 1 .* died \(killed by "
                                          r"signal 9\); stopped the other 0 workers$"):
        greedy(forward, [1, 403], 30)
    _no_process_left(pids)
    _gpu_still_works(cp)


def test_a_worker_killed_while_rank_0_waits_in_nccl_ends_it_cleanly(cp):
    """Rank 1 is stopped (SIGSTOP) before a step, so rank 0's step, in this process, waits in
    its first collective for it; then rank 1 is killed. The parent, polling its GPU, sees the
    death, aborts its communicator (GPU 0's kernels end) and raises."""
    import threading
    need_gpus(cp, 2)
    from minillama.errors import DeviceError
    tp = start(stories(), 2)
    pids = tp.pids
    greedy(tp.forward, [1, 403], 4)              # the graphs captured, NCCL connected
    os.kill(pids[1], signal.SIGSTOP)
    killer = threading.Timer(1.0, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    start_time = time.monotonic()
    with pytest.raises(DeviceError, match=r"^tensor-parallel worker rank 1 .* died \(killed by "
                                          r"signal 9\); stopped the other 0 workers$"):
        tp.forward(np.array([[5]]), 6)
    killer.join()
    assert 1.0 <= time.monotonic() - start_time < 10.0
    _no_process_left(pids)
    _gpu_still_works(cp)


def _no_process_left(pids):
    time.sleep(0.5)
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _gpu_still_works(cp):
    """GPU 0 (this process's) runs new work: nothing of the aborted step still waits there.
    Polled with a deadline, so a GPU that is still stuck fails the test instead of hanging it."""
    x = cp.arange(1000, dtype=cp.float32)
    total = x.sum()
    done = cp.cuda.Event(disable_timing=True)
    done.record()
    deadline = time.monotonic() + 10.0
    while not done.done:
        assert time.monotonic() < deadline, "GPU 0 still busy 10 s after the abort"
        time.sleep(0.01)
    assert float(total) == 499500.0

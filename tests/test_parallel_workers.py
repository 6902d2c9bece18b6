"""The worker processes of tensor parallelism, on the CPU: the same parent and workers as on
GPUs (minillama/parallel/workers.py), with a stand-in for NCCL over pipes (PipeBackend, for
tests only). Tokens equal one process's; a worker killed mid-generation ends it all in one
error and leaves no process behind."""
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import StubTokenizer, greedy
from minillama.checkpoints.random import random_weights
from minillama.errors import ArgumentError, DeviceError
from minillama.generation import Llama
from minillama.loading import load_model, read_checkpoint
from minillama.model import ModelArgs
from minillama.parallel import workers
from minillama.parallel.workers import CheckpointJob, TensorParallel, start
from tests.tools.writers import write_llama2c


class PipeComm:
    """all_reduce and all_gather over a full mesh of pipes: every rank sends its array to every
    other (from a thread, so two big sends cannot block each other) and sums in rank order."""

    def __init__(self, rank, world, links):
        self.rank, self.world, self.links = rank, world, links

    def exchange(self, x):
        sender = threading.Thread(target=lambda: [c.send(x) for c in self.links.values()])
        sender.start()
        parts = {r: c.recv() for r, c in self.links.items()}
        sender.join()
        parts[self.rank] = x
        return [parts[r] for r in range(self.world)]

    def all_reduce(self, x):
        parts = self.exchange(x)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        x[...] = total
        return x

    def all_gather(self, x, out=None):
        if out is None:
            return np.stack(self.exchange(x))
        out[...] = np.stack(self.exchange(x))
        return out


class PipeBackend:
    """Workers on the CPU, joined by pipes that the parent makes before they start."""
    device = "cpu"

    def __init__(self, world):
        ctx = multiprocessing.get_context("spawn")
        self.links = [{} for _ in range(world)]
        for a in range(world):
            for b in range(a + 1, world):
                self.links[a][b], self.links[b][a] = ctx.Pipe()

    def check(self, world):
        pass

    def connect(self, rank, world):
        return PipeComm(rank, world, self.links[rank])


ARGS = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=64, hidden_dim=40,
            max_seq_len=32, max_batch_size=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "model.bin"
    p = ModelArgs(**ARGS)
    write_llama2c(path, p, random_weights(p, seed=3))
    return path


def alive(pids):
    return [pid for pid in pids if _exists(pid)]


def _exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_give_one_process_tokens(model_file):
    ckpt = read_checkpoint(model_file, max_seq_len=32, max_batch_size=2)
    with start(ckpt, 2, backend=PipeBackend(2)) as tp:
        pids = tp.pids
        want = greedy(load_model(model_file, max_seq_len=32, max_batch_size=2).forward,
                      [1, 7, 3], 12)
        assert greedy(tp.forward, [1, 7, 3], 12) == want
        # Meta's generate, seeded sampling: the parent samples, the same draws as one process
        prompts = [[1, 4, 9], [1, 2]]
        one = Llama(load_model(model_file, max_seq_len=32, max_batch_size=2), StubTokenizer(),
                    seed=5)
        two = Llama(tp, StubTokenizer(), seed=5)
        for temperature in (0.0, 0.8):
            assert two.generate(prompts, 10, temperature) == one.generate(prompts, 10,
                                                                          temperature)
    time.sleep(0.2)
    assert alive(pids) == []
    with pytest.raises(DeviceError, match="^tensor-parallel model: its workers are stopped"):
        tp.forward(np.array([[1]]), 0)


def test_a_worker_killed_mid_generation_ends_it_in_one_error(model_file):
    ckpt = read_checkpoint(model_file, max_seq_len=32, max_batch_size=2)
    tp = start(ckpt, 2, backend=PipeBackend(2))
    pids, steps = tp.pids, []
    forward = tp.forward

    def forward_then_kill(tokens, start_pos):
        steps.append(start_pos)
        if len(steps) == 4:
            os.kill(pids[1], signal.SIGKILL)        # rank 1 dies; rank 0 waits on it forever
            time.sleep(0.2)
        return forward(tokens, start_pos)
    with pytest.raises(DeviceError) as e:
        greedy(forward_then_kill, [1, 2, 3], 20)
    assert str(e.value) == (f"tensor-parallel worker rank 1 (pid {pids[1]}) died (killed by "
                            f"signal 9); stopped the other 1 worker")
    assert len(steps) == 4
    time.sleep(0.2)
    assert alive(pids) == []                     # rank 0 was stopped too


def test_an_error_in_a_worker_is_one_line_in_the_parent(model_file, tmp_path):
    ckpt = read_checkpoint(model_file, max_seq_len=32, max_batch_size=2)
    job = CheckpointJob(str(tmp_path / "gone.bin"), 32, 2)       # the workers cannot read it
    with pytest.raises(DeviceError, match=r"^tensor-parallel rank \d: .*gone.bin: no such file"):
        TensorParallel(ckpt.params, job, 2, PipeBackend(2))


def test_the_parent_refuses_before_starting_anything(model_file, monkeypatch):
    started = []
    monkeypatch.setattr(workers, "TensorParallel", lambda *a: started.append(a))
    ckpt = read_checkpoint(model_file)
    with pytest.raises(ArgumentError, match="4 GPUs cannot share 2 kv heads"):
        start(ckpt, 4)
    assert started == []


def test_no_nccl_and_too_few_gpus_are_refused(monkeypatch):
    """NcclBackend.check with a stand-in cupy: NCCL missing, then one GPU for two ranks."""
    import sys
    import types
    nccl = types.SimpleNamespace(available=False)
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(nccl=nccl, runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    monkeypatch.setattr("minillama.cuda.require_cupy", lambda: cupy)
    backend = workers.NcclBackend()
    with pytest.raises(DeviceError, match=r"^tensor_parallel: CuPy has no NCCL \(cupy.cuda.nccl"):
        backend.check(2)
    nccl.available = True
    with pytest.raises(DeviceError, match="^tensor_parallel: 2 GPUs asked for, 1 visible"):
        backend.check(2)


# ----------------------------------------------------------------------------
# the command line's --tensor-parallel, with the pipe backend standing in for NCCL

@pytest.mark.parametrize("command", ["run", "complete"])
def test_cli_tensor_parallel_prints_what_one_process_prints(shared, monkeypatch, capfd, command):
    from minillama import cli
    model, tok = shared / "models/stories260K.bin", shared / "models/tok512.bin"
    argv = (["run", model, "-z", tok, "-t", "0", "-n", "40", "-i", "Once upon a time"]
            if command == "run" else
            ["complete", "--ckpt_dir", model, "--tokenizer_path", tok, "--prompt", "Lily and Ben",
             "--prompt", "Once upon a time", "--max_gen_len", "20", "--temperature", "0.8"])
    argv = [str(a) for a in argv]

    def printed(args):
        assert cli.main(args) == 0
        out = capfd.readouterr().out
        return [line for line in out.splitlines() if not line.startswith("achieved tok/s")]
    want = printed(argv)
    monkeypatch.setattr(workers, "NcclBackend", lambda: PipeBackend(2))
    assert printed(argv + ["--tensor-parallel", "2"]) == want


@pytest.mark.parametrize("id_type", [bytes, tuple])
def test_nccl_backend_connects_through_torchruns_environment(monkeypatch, id_type):
    """NcclBackend.connect with a stand-in CuPy: the worker's environment is torchrun's, NVLS
    is off, the GPU is LOCAL_RANK's, and NCCL gets rank 0's unique id from the rendezvous, as
    the CuPy at hand takes it: bytes (CuPy 14) or a tuple of signed chars (earlier)."""
    import sys
    import types
    made, used = [], []
    uid = bytes(range(128)) if id_type is bytes else tuple(range(-64, 64))

    def communicator(world, comm_id, rank):
        if not isinstance(comm_id, id_type):
            raise TypeError(f"Argument 'commId' has incorrect type (expected {id_type.__name__})")
        made.append((world, comm_id, rank))
        return "comm"
    nccl = types.SimpleNamespace(available=True, get_unique_id=lambda: uid,
                                 NcclCommunicator=communicator)
    device = types.SimpleNamespace(use=lambda: None)
    cuda = types.SimpleNamespace(nccl=nccl, runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1), Device=lambda i: used.append(i) or device)
    cupy = types.SimpleNamespace(cuda=cuda)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    monkeypatch.setattr("minillama.cuda.require_cupy", lambda: cupy)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    backend = workers.NcclBackend()
    backend.check(1)
    comm = backend.connect(0, 1)
    assert made == [(1, uid, 0)] and used == [0] and comm.rank == 0 and comm.world == 1
    assert {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                       "LOCAL_RANK", "NCCL_NVLS_ENABLE",
                                       "NCCL_GRAPH_MIXING_SUPPORT")} == dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(backend.port), RANK="0", WORLD_SIZE="1",
        LOCAL_RANK="0", NCCL_NVLS_ENABLE="0", NCCL_GRAPH_MIXING_SUPPORT="0")


# ----------------------------------------------------------------------------
# the hand-offs of a step: polling the pipes, the logits through shared memory

def test_spin_wait_returns_what_is_readable_and_gives_up_after_its_time():
    a, b = multiprocessing.Pipe()
    start = time.perf_counter()
    assert workers.spin_wait([a], 0.05) == []
    assert 0.05 <= time.perf_counter() - start < 1.0
    b.send("x")
    assert workers.spin_wait([a], 10.0) == [a]          # at once, not after 10 s
    assert workers.spin_wait([a], 0.0) == [a]           # no polling: one look
    assert a.recv() == "x"


def test_processes_poll_only_with_a_core_each_and_one_to_spare(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert workers.spin_seconds(2) == workers.SPIN_SECONDS   # parent + 2 workers, 1 spare
    assert workers.spin_seconds(3) == 0.0
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert workers.spin_seconds(1) == 0.0


def test_the_logits_handoff_shares_what_fits_and_sends_the_rest():
    from multiprocessing import shared_memory
    shared = shared_memory.SharedMemory(create=True, size=4 * 2 * 64)
    try:
        handoff = workers.LogitsHandoff(shared.name)
        step = np.random.default_rng(1).standard_normal((2, 1, 64)).astype(np.float32)
        assert handoff.put(step) == (2, 1, 64)
        seen = np.ndarray((128,), np.float32, shared.buf)
        assert np.array_equal(seen.reshape(2, 1, 64), step)
        prompt = np.ones((1, 3, 64), dtype=np.float32)       # 192 values: bigger than 128
        sent = handoff.put(prompt)
        assert isinstance(sent, np.ndarray) and np.array_equal(sent, prompt)
        del seen, handoff
    finally:
        shared.close()
        shared.unlink()


def test_a_dead_workers_exit_status_is_read_after_it_is_reaped():
    """A process's sentinel fires a moment before its exit status is readable (measured: 127
    of 500 killed children still had exitcode None then); _fail_dead joins it first."""
    class Reaped:
        pid, exitcode = 4242, None

        def join(self, timeout=None):
            self.exitcode = -9                  # what the wait for the process reads

        def is_alive(self):
            return False
    tp = object.__new__(TensorParallel)
    tp.procs, tp.conns, tp.world, tp.shared = [Reaped()], [], 1, None
    with pytest.raises(DeviceError, match=r"rank 0 \(pid 4242\) died \(killed by signal 9\)"):
        tp._fail_dead(0)

"""The processes of tensor parallelism, on the CPU: the same parent (rank 0) and workers as on
GPUs (minillama/parallel/workers.py), with a stand-in for NCCL over pipes (PipeBackend, for
tests only). Tokens equal one process's; a worker killed mid-generation ends it all in one
error and leaves no process behind."""
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import StubTokenizer, greedy
from minillama.checkpoints.random import random_weights
from minillama.errors import ArgumentError, DeviceError
from minillama.generation import Llama
from minillama.loading import load_model, read_checkpoint
from minillama.model import ModelArgs
from minillama.parallel import workers
from minillama.parallel.comm import PeerGone
from minillama.parallel.workers import CheckpointJob, TensorParallel, start
from tests.tools.writers import write_llama2c


class PipeComm:
    """all_reduce and all_gather over a full mesh of pipes: every rank sends its array to every
    other (from a thread, so two big sends cannot block each other) and sums in rank order. A
    peer that has gone closes its pipes: that is PeerGone, as the parent expects of a comm."""

    def __init__(self, rank, world, links):
        self.rank, self.world, self.links = rank, world, links

    def exchange(self, x):
        failed = []

        def send():
            try:
                for c in self.links.values():
                    c.send(x)
            except OSError as e:                  # BrokenPipeError: the peer has gone
                failed.append(e)
        sender = threading.Thread(target=send)
        sender.start()
        try:
            parts = {r: c.recv() for r, c in self.links.items()}
        except (EOFError, OSError) as e:
            failed.append(e)
        sender.join()
        if failed:
            raise PeerGone(f"rank {self.rank}: a peer's pipe closed mid-collective "
                           f"({type(failed[0]).__name__})")
        parts[self.rank] = x
        return [parts[r] for r in range(self.world)]

    def abort(self):
        for c in self.links.values():
            c.close()

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
    """Ranks on the CPU, joined by pipes that the parent makes before the workers start; each
    rank, as it connects, closes its copies of the other ranks' ends (every process holds them
    all, and a pipe reads EOF only once no process holds its other end)."""
    device = "cpu"

    def __init__(self, world):
        ctx = multiprocessing.get_context("spawn")
        self.links = [{} for _ in range(world)]
        for a in range(world):
            for b in range(a + 1, world):
                self.links[a][b], self.links[b][a] = ctx.Pipe()

    def check(self, world):
        pass

    def connect(self, rank, world, environ=None, watch=None):
        for other, links in enumerate(self.links):
            if other != rank:
                for c in links.values():
                    c.close()
        return PipeComm(rank, world, self.links[rank])


ARGS = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=64, hidden_dim=40,
            max_seq_len=32, max_batch_size=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "model.bin"
    p = ModelArgs(**ARGS)
    write_llama2c(path, p, random_weights(p, seed=3))
    return path


@pytest.fixture(scope="module")
def model_file3(tmp_path_factory):
    """A model Meta's layout cuts into 3 ranks: 3 kv heads, every cut size a multiple of 3."""
    path = tmp_path_factory.mktemp("tp3") / "model.bin"
    p = ModelArgs(**{**ARGS, "n_kv_heads": 3, "vocab_size": 66, "hidden_dim": 42})
    write_llama2c(path, p, random_weights(p, seed=4))
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
        assert list(pids) == [1] and tp.model.params.rank == 0   # rank 0: this process
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
    assert alive(pids.values()) == []
    with pytest.raises(DeviceError, match="^tensor-parallel model: its workers are stopped"):
        tp.forward(np.array([[1]]), 0)


@pytest.mark.parametrize("world", [2, 3])
def test_a_worker_killed_mid_generation_ends_it_in_one_error(model_file, model_file3, world):
    ckpt = read_checkpoint(model_file if world == 2 else model_file3, max_seq_len=32,
                           max_batch_size=2)
    tp = start(ckpt, world, backend=PipeBackend(world))
    pids, steps = tp.pids, []
    forward = tp.forward

    def forward_then_kill(tokens, start_pos):
        steps.append(start_pos)
        if len(steps) == 4:
            os.kill(pids[1], signal.SIGKILL)        # rank 1 dies; rank 0 (this process) is left
            time.sleep(0.2)                         # with its pipes, in the step's collectives
        return forward(tokens, start_pos)
    with pytest.raises(DeviceError) as e:
        greedy(forward_then_kill, [1, 2, 3], 20)
    assert str(e.value) == (f"tensor-parallel worker rank 1 (pid {pids[1]}) died (killed by "
                            f"signal 9); stopped the other {world - 2} worker"
                            + ("s" if world == 2 else ""))
    assert len(steps) == 4 and list(pids) == list(range(1, world))  # rank 0 is this process
    time.sleep(0.2)
    assert alive(pids.values()) == []


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
    """NcclBackend.connect with a stand-in CuPy: a worker's environment is torchrun's, NVLS
    is off, the GPU is LOCAL_RANK's, and NCCL gets rank 0's unique id from the rendezvous, as
    the CuPy at hand takes it: bytes (CuPy 14) or a tuple of signed chars (earlier). The
    parent, rank 0 beside the user's program, meets them through a mapping of its own."""
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
    uses = []                                 # the threads that made the GPU theirs
    device = types.SimpleNamespace(use=lambda: uses.append(threading.current_thread().name))
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
    torchrun = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in torchrun})
    mine, watched = {}, []
    comm = backend.connect(0, 1, environ=mine, watch=lambda: watched.append(1))  # as the parent
    # GPU 0 taken by this thread, and by the one that makes the communicator (run_watched)
    assert made[1:] == [(1, uid, 0)] and used == [0, 0] and comm.rank == 0
    assert uses[-2:] == ["MainThread", "minillama-tp-watched"]
    assert [k for k in torchrun if k in os.environ] == [] and mine == dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(backend.port), RANK="0", WORLD_SIZE="1",
        LOCAL_RANK="0")


# ----------------------------------------------------------------------------
# the waits of a step: the workers poll their pipes, the parent its GPU and its workers

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
    assert workers.spin_seconds(3) == workers.SPIN_SECONDS   # rank 0 + 2 workers, 1 spare
    assert workers.spin_seconds(4) == 0.0
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert workers.spin_seconds(1) == 0.0


def _parent(procs, conns=None, done=None):
    """A TensorParallel as the parent holds it, its workers stand-ins (`procs`, `conns`): rank
    0's decoder (RankDecoder) and communicator (NcclComm) record into `done` what the failure
    path does to them; without `done`, rank 0 holds neither."""
    class Step:
        def release_graphs(self):
            done.append("graphs released")

    class Comm:
        def abort(self):
            done.append("communicator aborted")
    tp = object.__new__(TensorParallel)
    tp.procs, tp.conns, tp.world = procs, conns or {}, len(procs) + 1
    tp.comm, tp.step = (Comm(), Step()) if done is not None else (None, None)
    return tp


def test_a_dead_workers_exit_status_is_read_after_it_is_reaped():
    """A process's sentinel fires a moment before its exit status is readable (measured: 127
    of 500 killed children still had exitcode None then); _fail_dead joins it first."""
    class Reaped:
        pid, exitcode = 4242, None

        def join(self, timeout=None):
            self.exitcode = -9                  # what the wait for the process reads

        def is_alive(self):
            return False
    done = []
    tp = _parent({1: Reaped()}, done=done)
    with pytest.raises(DeviceError, match=r"^tensor-parallel worker rank 1 \(pid 4242\) died "
                                          r"\(killed by signal 9\); stopped the other 0 "
                                          r"workers$"):
        raise tp._dead(1)
    # GPU 0's step stuck in NCCL ends with the abort, which waits for the graphs to go first
    assert done == ["graphs released", "communicator aborted"] and tp.comm is None


@contextmanager
def _killed_child():
    """A child process, running (not exiting), then killed and left unreaped: a zombie, which
    has exited (PF_EXITING set) but not gone; reaped on the way out. Skips where that cannot be
    seen (SIGCHLD ignored reaps it at once; a /proc without the task flags)."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert not workers.exiting(child.pid)              # running
        child.kill()
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                pytest.skip("the killed child was reaped at once (SIGCHLD ignored?)")
            if fields[0] == "Z":
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if not int(fields[6]) & workers.PF_EXITING:
            pytest.skip("this /proc does not show the task flags")
        yield child
    finally:
        child.kill()
        child.wait()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")


@needs_proc
def test_a_worker_seen_exiting_is_dead_before_its_exit_ends_and_rank_0_aborts_first():
    """A killed worker's exit can wait for GPU 0 (workers.exiting's comment), so the parent
    takes a worker that has begun to exit for dead before its sentinel fires, and aborts rank
    0's communicator before it waits for the exit."""
    assert not workers.exiting(os.getpid())
    with _killed_child() as child:
        assert workers.exiting(child.pid)
        never, _ = multiprocessing.Pipe(duplex=False)    # a sentinel that has not fired
        done = []

        class Exiting:
            pid, sentinel, exitcode = child.pid, never, None

            def join(self, timeout=None):
                done.append("joined")
                self.exitcode = -9

            def is_alive(self):
                return False
        tp = _parent({1: Exiting()}, done=done)
        with pytest.raises(DeviceError, match=r"^tensor-parallel worker rank 1 .* died \(killed "
                                              r"by signal 9\)"):
            tp._next_message(0)
        assert done[:3] == ["graphs released", "communicator aborted", "joined"]
    assert not workers.exiting(child.pid)                  # reaped: no /proc entry


@needs_proc
def test_a_worker_whose_exit_does_not_end_is_said_to_be_still_exiting():
    """A worker seen exiting whose exit has not ended when the parent stops waiting for it
    (its exit status not yet readable): the error says so, not that its pipe closed."""
    with _killed_child() as child:
        never, _ = multiprocessing.Pipe(duplex=False)

        class Stuck:
            pid, sentinel, exitcode = child.pid, never, None

            def join(self, timeout=None):
                pass                                    # still in its exit

            def is_alive(self):
                return False
        tp = _parent({1: Stuck()}, done=[])
        with pytest.raises(DeviceError, match=r"^tensor-parallel worker rank 1 \(pid \d+\) died "
                                              r"\(still exiting\); stopped the other 0 workers$"):
            tp._next_message(0)


@needs_proc
def test_an_error_a_worker_sent_before_it_exited_is_what_the_parent_raises():
    """A worker that reports an error exits with status 0 right after; seen exiting before its
    message was looked at, the parent still raises its error, not a death."""
    with _killed_child() as child:
        never, _ = multiprocessing.Pipe(duplex=False)
        theirs, mine = multiprocessing.Pipe(duplex=False)

        class Exited:
            pid, sentinel, exitcode = child.pid, never, None

            def join(self, timeout=None):
                mine.send(("error", "its GPU has 1.0 GiB free"))   # sent as it exits
                self.exitcode = 0

            def is_alive(self):
                return False

            def kill(self):
                pass
        tp = _parent({1: Exited()}, {1: theirs})
        with pytest.raises(DeviceError, match=r"^tensor-parallel rank 1: its GPU has 1.0 GiB "
                                              r"free$"):
            tp._next_message(0)


def test_the_parent_waits_for_its_gpu_polling_and_watching_the_workers():
    """wait_polling: event.done (CuPy's Event: cudaEventQuery) until it is, check() every
    `every` seconds meanwhile; what check raises (a worker's death) ends the wait."""
    class Event:
        def __init__(self, busy):
            self.busy, self.queries = busy, 0

        @property
        def done(self):
            self.queries += 1
            time.sleep(0.001)                    # the GPU's step takes its time
            return self.queries > self.busy
    checks = []
    event = Event(busy=30)
    workers.wait_polling(event, lambda: checks.append(1), every=0.005)
    assert event.queries == 31 and 2 <= len(checks) < 30
    done = Event(busy=0)
    workers.wait_polling(done, lambda: checks.append(2))
    assert done.queries == 1 and 2 not in checks             # done at once: nothing to check

    def worker_died():
        raise DeviceError("tensor-parallel worker rank 1 (pid 1) died")
    with pytest.raises(DeviceError, match="rank 1 .* died"):
        workers.wait_polling(Event(busy=10**6), worker_died, every=0.0)


def test_a_call_that_blocks_in_c_runs_watched():
    """run_watched: fn in a thread, watch() meanwhile; fn's result or error comes back, and a
    watch that raises (a worker has failed) ends the wait, however long fn would block."""
    watched = []
    assert workers.run_watched(lambda: time.sleep(0.3) or "comm", lambda: watched.append(1),
                               every=0.05) == "comm"
    assert 2 <= len(watched) <= 8

    def fails():
        raise DeviceError("NCCL: no")
    with pytest.raises(DeviceError, match="NCCL: no"):
        workers.run_watched(fails, lambda: None)

    def worker_failed():
        raise DeviceError("tensor-parallel rank 1: out of memory")
    start = time.monotonic()
    with pytest.raises(DeviceError, match="rank 1: out of memory"):
        workers.run_watched(lambda: time.sleep(30), worker_failed, every=0.01)
    assert time.monotonic() - start < 5

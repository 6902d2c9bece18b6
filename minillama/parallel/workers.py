"""The processes of tensor parallelism: a parent that owns the loop, N workers that own a GPU.

    model = start(read_checkpoint(path), 2)      # starts 2 workers: a TensorParallel
    logits = model.forward(tokens, start_pos)     # (bsz, seqlen, vocab), NumPy, from rank 0
    model.close()

The parent (the command line, or Llama.build(..., tensor_parallel=N)) keeps the tokenizer, the
sampler and the output; it reads only the checkpoint's header (to refuse a world size the
model cannot be cut into before anything starts) and holds no GPU. It starts N worker
processes (multiprocessing's spawn: fresh interpreters, no forked CUDA state), rank r on GPU r.
Each worker gets the environment torchrun would give it (MASTER_ADDR=127.0.0.1, a free
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK); through it they meet at the TCP rendezvous
(comm.py), build one NCCL communicator, and each loads its slice of the model
(parallel/loading.py). Then, for every step, the parent sends (tokens, start_pos) down each
worker's pipe; every rank runs its part, the ranks meet in NCCL's collectives, and rank 0 hands
the gathered logits back. The parent is the only one who samples, so every rank sees the same
tokens without any broadcast.

The logits of a decode step ((bsz, 1, vocab): 128 KB for one row of a 32000-token vocabulary)
go through shared memory, and the pipe carries only their shape: pickled down a pipe they cost
a copy on each side and a few trips through the socket's buffer, every token. A prompt's logits
(every position's) are bigger than the shared buffer and take the pipe.

When anything goes wrong the parent ends it: a worker that dies (its process sentinel fires),
or one that reports an error, makes the parent stop every other worker (they would wait in
NCCL forever for the lost rank) and raise one DeviceError naming the rank; the command line
prints it and exits with status 2. A worker whose parent has gone exits by itself.

A backend says where the workers compute and how they meet: NcclBackend (GPUs, NCCL) here;
tests/test_parallel_workers.py has one over pipes on the CPU, to run all of this in CI.
"""
import multiprocessing
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import wait

import numpy as np

from ..errors import DeviceError, MiniLlamaError, shown
from ..ops import CPU, to_host
from .comm import NcclComm, Rendezvous, free_port, nccl_id_bytes

STOP_TIMEOUT = 5.0             # seconds a worker gets to exit after "close" before it is killed
SPIN_SECONDS = 0.05            # how long a waiting process polls its pipes before it sleeps


# ----------------------------------------------------------------------------
# backends: where the workers compute and how they meet

@dataclass
class NcclBackend:
    """One GPU per worker (rank r on GPU r), collectives through NCCL (comm.NcclComm)."""
    addr: str = "127.0.0.1"
    port: int = 0              # 0: a free port, chosen when the workers start
    device = "cuda"

    def check(self, world):
        """In the parent, before any worker starts: CuPy, NCCL, and enough GPUs."""
        from ..cuda import require_cupy
        cupy = require_cupy()
        try:
            from cupy.cuda import nccl
            available = nccl.available
        except ImportError:
            available = False
        if not available:
            raise DeviceError("tensor_parallel: CuPy has no NCCL (cupy.cuda.nccl.available is "
                              "False); install NCCL for your CUDA (pip install "
                              "nvidia-nccl-cu12), or run on one GPU without --tensor-parallel")
        count = cupy.cuda.runtime.getDeviceCount()
        if count < world:
            raise DeviceError(f"tensor_parallel: {world} GPUs asked for, {count} visible "
                              f"(CUDA_VISIBLE_DEVICES="
                              f"{shown(os.environ.get('CUDA_VISIBLE_DEVICES'), quote=False)})")
        if not self.port:
            self.port = free_port()

    def connect(self, rank, world):
        """In worker `rank`: take GPU `rank`, meet the others, return the communicator. The
        worker is given the environment torchrun gives its processes, and meets the others
        through it (comm.Rendezvous.from_env), as a worker on another machine would."""
        os.environ.update(MASTER_ADDR=self.addr, MASTER_PORT=str(self.port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        # NVLink SHARP multicast (NVLS) needs fabric support that not every host has, and the
        # all-reduces of one decode step (a few KiB) gain nothing from it: keep it off
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        # NCCL's support for mixing a graph's collectives with others that may run beside it
        # costs each captured collective ~10 us (80 all-reduces a step of a 13B model: 4.87 ->
        # 4.78 ms on 2 H200s). Nothing runs beside a step here: every rank waits for its step
        # to end before it takes the next message (parallel/fused.py), which is what NCCL then
        # asks of us
        os.environ["NCCL_GRAPH_MIXING_SUPPORT"] = "0"
        from ..cuda import require_cupy
        cupy = require_cupy()
        rendezvous = Rendezvous.from_env()
        cupy.cuda.Device(int(os.environ["LOCAL_RANK"])).use()       # this machine's GPU
        from cupy.cuda import nccl
        unique_id = rendezvous.share_bytes(lambda: nccl_id_bytes(nccl.get_unique_id()))
        return NcclComm(rendezvous.rank, rendezvous.world, unique_id)


@dataclass
class CheckpointJob:
    """What each worker loads: its slice of the checkpoint at `path` (parallel/loading.py)."""
    path: str
    max_seq_len: int = None
    max_batch_size: int = 1
    dtype: str = None
    kv_dtype: str = "float32"
    prompt_len: int = None

    def open(self, rank, world, ops, comm):
        from .loading import load_shard
        return load_shard(self.path, rank, world, ops, comm, self.max_seq_len,
                          self.max_batch_size, self.dtype, self.kv_dtype,
                          prompt_len=self.prompt_len)


# ----------------------------------------------------------------------------
# the parent

def start(ckpt, world, dtype=None, kv_dtype="float32", prompt_len=None, backend=None):
    """A TensorParallel model of `world` workers for the checkpoint `ckpt` (a Checkpoint from
    loading.read_checkpoint: its header is all the parent reads). A world size Meta's layout
    cannot cut the model into is refused here, before any process starts."""
    from .slicing import check_world
    p = ckpt.params
    check_world(p, world)
    job = CheckpointJob(ckpt.path, p.max_seq_len, p.max_batch_size, dtype, kv_dtype, prompt_len)
    return TensorParallel(p, job, world, backend)


class TensorParallel:
    """The model as the generation loops see it (params, ops, forward), run by `world` worker
    processes. params: the whole model's ModelArgs (the caller has read them from the header);
    job: what each worker loads (CheckpointJob, or bench/tp.py's random weights)."""

    def __init__(self, params, job, world, backend=None):
        self.params, self.world = params, world
        self.ops = CPU                      # the logits arrive here as NumPy arrays
        self.backend = backend or NcclBackend()
        self.backend.check(world)
        self.spin = spin_seconds(world)
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        # one decode step's logits, (max_batch_size, 1, vocab) float32, written by rank 0
        self.shared = shared_memory.SharedMemory(
            create=True, size=4 * params.max_batch_size * params.vocab_size)
        self.shared_logits = np.ndarray((self.shared.size // 4,), np.float32, self.shared.buf)
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main,
                               args=(rank, world, theirs, self.backend, job, self.shared.name),
                               name=f"minillama-tp-rank{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)
        ready = set()
        while len(ready) < world:            # every rank has loaded its slice
            rank, message = self._next_message()
            if message[0] == "ready":
                ready.add(rank)

    @property
    def device(self):
        return f"{self.backend.device} x {self.world} (tensor parallel)"

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def forward(self, tokens, start_pos):
        """logits (bsz, seqlen, vocab) for tokens (bsz, seqlen) at start_pos, from rank 0."""
        from ..checks import check_tokens
        tokens = check_tokens(tokens, start_pos, self.params)     # refused here, not in N places
        if not self.procs:
            raise DeviceError("tensor-parallel model: its workers are stopped (after close(), "
                              "or after a failure); build it again")
        for rank in range(self.world):
            self._send(rank, ("forward", tokens, int(start_pos)))
        logits = self._receive(0, "logits")
        if isinstance(logits, tuple):               # its shape: the values are in shared memory
            logits = self.shared_logits[:np.prod(logits)].reshape(logits).copy()
        return logits

    __call__ = forward

    def _send(self, rank, message):
        try:
            self.conns[rank].send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._next_message()                    # it has died: that raises, naming it

    def _receive(self, rank, kind):
        """The payload of the next `kind` message from `rank`."""
        while True:
            r, message = self._next_message()
            if r == rank and message[0] == kind:
                return message[1]

    def _next_message(self):
        """(rank, message): the next message of any worker, while watching them all. A death
        or an error from any of them stops them all and raises."""
        ready = spin_wait(self.conns, self.spin)
        if not ready:                             # asleep now, watching the processes too
            ready = wait(self.conns + [p.sentinel for p in self.procs])
        dead = [r for r, p in enumerate(self.procs) if p.sentinel in ready]
        if dead:
            self._fail_dead(dead[0])
        r = next(r for r, conn in enumerate(self.conns) if conn in ready)
        try:
            message = self.conns[r].recv()
        except (EOFError, OSError):
            self._fail_dead(r)
        if message[0] == "error":
            self.close(kill=True)
            raise DeviceError(f"tensor-parallel rank {r}: {message[1]}")
        if message[0] == "bug":
            self.close(kill=True)
            raise RuntimeError(f"tensor-parallel rank {r} failed:\n{message[1]}")
        return r, message

    def _fail_dead(self, rank):
        proc = self.procs[rank]
        # a process's sentinel fires (and its pipe closes) a moment before its exit status can
        # be read: without the join, "killed by signal 9" could read "its pipe closed"
        proc.join(1.0)
        code = proc.exitcode
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit status {code}" if code is not None else "its pipe closed")
        others = self.world - 1
        self.close(kill=True)
        raise DeviceError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) died ({how}); "
                          f"stopped the other {others} worker{'s' if others != 1 else ''}")

    def close(self, kill=False):
        """Stop every worker: ask them to exit (or, with kill, not), then make sure."""
        if not kill:
            for conn in self.conns:
                try:
                    conn.send(("close",))
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
        deadline = time.monotonic() + (0 if kill else STOP_TIMEOUT)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():             # in NCCL, waiting for a rank that is gone
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if self.shared is not None:
            del self.shared_logits                  # a view of it would keep it from closing
            self.shared.close()
            self.shared.unlink()
            self.shared = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------
# a worker

def worker_main(rank, world, conn, backend, job, shared_name):
    """Worker `rank`: meet the others, load the slice, then run each step the parent sends
    until it says close (or goes away). Errors go back to the parent as one message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the parent's to handle
    _exit_with_parent()
    try:
        handoff = LogitsHandoff(shared_name) if rank == 0 else None
        comm = backend.connect(rank, world)
        from ..devices import get_ops
        from .fused import decoder
        model = job.open(rank, world, get_ops(backend.device), comm)
        forward, spin = decoder(model), spin_seconds(world)
        conn.send(("ready", None))
        while True:
            try:
                spin_wait([conn], spin)
                message = conn.recv()
            except EOFError:                            # the parent has gone
                return
            if message[0] == "close":
                return
            _, tokens, start_pos = message
            logits = forward(tokens, start_pos)
            if rank == 0:
                conn.send(("logits", handoff.put(logits)))
    except MiniLlamaError as e:
        _report(conn, ("error", str(e)))
    except Exception:
        _report(conn, ("bug", traceback.format_exc()))


def spin_seconds(world):
    """SPIN_SECONDS where the machine has a core for each of the world's pollers (the parent
    and its workers) and one more, else 0: no polling."""
    return SPIN_SECONDS if (os.cpu_count() or 1) > world + 1 else 0.0


def spin_wait(conns, seconds):
    """The connections with something to read, polled for up to `seconds`; [] if none.

    A process asleep in the kernel takes tens to hundreds of microseconds to wake when its
    pipe becomes readable, and each token wakes two of them (rank 0's logits reach the parent,
    the parent's next token reaches the workers): on 2 H200s, from rank 0's logits sent to its
    next step begun took 405 us asleep and 234 polling, in a step of ~5 ms.
    So the waiting side polls, a core busy meanwhile, as the CUDA runtime itself spins while it
    waits for the GPU (cudaDeviceScheduleAuto) where the machine has more cores than GPUs: here,
    where it has more cores than processes polling (the parent and the workers; on fewer, the
    pollers would take turns on the cores and wake later, not sooner). After `seconds` of
    nothing (a long prompt, a user typing) it goes back to sleeping."""
    deadline = time.perf_counter() + seconds
    while True:
        ready = [conn for conn in conns if conn.poll()]
        if ready or time.perf_counter() > deadline:
            return ready


class LogitsHandoff:
    """Rank 0's side of the shared logits buffer (the parent created it, and unlinks it)."""

    def __init__(self, name):
        # (attaching registers the segment with the resource tracker again; a spawned worker
        # shares the parent's tracker, which keeps a set of names, so that changes nothing)
        self.shared = shared_memory.SharedMemory(name=name)
        self.flat = np.ndarray((self.shared.size // 4,), np.float32, self.shared.buf)
        self.pinned = False

    def put(self, logits):
        """What the parent is sent for `logits` (bsz, seqlen, vocab): their shape, once they
        are in the shared buffer, or the array itself where they do not fit (a prompt's)."""
        if logits.size > self.flat.size:
            return to_host(logits)
        out = self.flat[:logits.size].reshape(logits.shape)
        if isinstance(logits, np.ndarray):
            out[...] = logits
        else:
            self.pin()
            logits.get(out=out)                     # CuPy: the copy from the GPU lands here
        return tuple(logits.shape)

    def pin(self):
        """Page-lock the buffer for the GPU once (cudaHostRegister): a copy into pageable memory
        goes through a staging buffer, a registered one is written directly (a step's 128 KB
        on an H200: 102 us before, 74 after)."""
        if not self.pinned:
            import cupy
            cupy.cuda.runtime.hostRegister(self.flat.ctypes.data, self.flat.nbytes, 0)
            self.pinned = True


def _report(conn, message):
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, OSError):
        pass                                            # the parent has gone: nobody to tell


def _exit_with_parent():
    """Exit when the parent process is gone (killed, not just finished), so no worker is
    left holding a GPU: a daemon thread watches the parent's pid."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="watch-parent").start()

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
worker's pipe; every rank runs its part, the ranks meet in NCCL's collectives, and rank 0 sends
the gathered logits back. The parent is the only one who samples, so every rank sees the same
tokens without any broadcast.

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
from multiprocessing.connection import wait

from ..errors import DeviceError, MiniLlamaError, shown
from ..ops import CPU, to_host
from .comm import NcclComm, Rendezvous, free_port, nccl_id_bytes

STOP_TIMEOUT = 5.0             # seconds a worker gets to exit after "close" before it is killed


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
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, world, theirs, self.backend, job),
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
        return self._receive(0, "logits")

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
        ready = wait(self.conns + [p.sentinel for p in self.procs])
        dead = [r for r, p in enumerate(self.procs) if p.sentinel in ready or not p.is_alive()]
        if dead:
            self._fail_dead(dead[0])
        r = next(r for r, conn in enumerate(self.conns) if conn in ready)
        try:
            message = self.conns[r].recv()
        except (EOFError, OSError):
            self.procs[r].join(1.0)
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------
# a worker

def worker_main(rank, world, conn, backend, job):
    """Worker `rank`: meet the others, load the slice, then run each step the parent sends
    until it says close (or goes away). Errors go back to the parent as one message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the parent's to handle
    _exit_with_parent()
    try:
        comm = backend.connect(rank, world)
        from ..devices import get_ops
        from .fused import decoder
        model = job.open(rank, world, get_ops(backend.device), comm)
        forward = decoder(model)
        conn.send(("ready", None))
        while True:
            try:
                message = conn.recv()
            except EOFError:                            # the parent has gone
                return
            if message[0] == "close":
                return
            _, tokens, start_pos = message
            logits = forward(tokens, start_pos)
            if rank == 0:
                conn.send(("logits", to_host(logits)))
    except MiniLlamaError as e:
        _report(conn, ("error", str(e)))
    except Exception:
        _report(conn, ("bug", traceback.format_exc()))


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

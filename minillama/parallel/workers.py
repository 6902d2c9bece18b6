"""The processes of tensor parallelism: the parent is rank 0, a worker for every other rank.

    model = start(read_checkpoint(path), 2)      # rank 0 here, on GPU 0; 1 worker: a TensorParallel
    logits = model.forward(tokens, start_pos)     # (bsz, seqlen, vocab), NumPy, rank 0's own
    model.close()

The parent (the command line, or Llama.build(..., tensor_parallel=N)) keeps the tokenizer, the
sampler and the output, and is rank 0 too, as issue 14 asks: "the logits gathered for
sampling on rank 0, which owns the tokenizer, the sampler and the output". It reads the
checkpoint's header (to refuse a world size the model cannot be cut into before anything
starts) and starts N - 1 worker processes (multiprocessing's spawn: fresh interpreters, no
forked CUDA state), rank r on GPU r. Each worker gets the environment torchrun would give it
(MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK); the parent meets
them through the same variables, in a mapping of its own (its os.environ is the user's), at
the TCP rendezvous (comm.py), with one NCCL communicator; every rank loads its slice of the
model (parallel/loading.py), the parent rank 0's on GPU 0. Then, for every step, the parent
sends (tokens, start_pos) down each worker's pipe first, so that their wake-up overlaps its
own launch, runs rank 0's step itself, and has the gathered logits on its own GPU: nothing
comes back through a pipe, and one token makes no round trip between processes. The parent is
the only one who samples, so every rank sees the same tokens without any broadcast.

When anything goes wrong the parent ends it. The new difficulty of rank 0 in the parent: if a
worker dies mid-step, rank 0's GPU waits in NCCL for it forever, and a parent asleep in the
driver (stream.synchronize) would wait with it. So the parent never sleeps in the driver
while the workers run: it polls its step's CUDA event and looks at the workers' sentinels,
pipes and (on Linux) process flags every millisecond (wait_polling, exiting). A worker that
dies, or reports an error, makes it abort its communicator (so GPU 0's kernels end), stop
every other worker (they would wait in NCCL forever too) and raise one DeviceError naming the
rank; the command line prints it and exits with status 2. A worker whose parent has gone exits
by itself.

A backend says where the ranks compute and how they meet: NcclBackend (GPUs, NCCL) here;
tests/test_parallel_workers.py has one over pipes on the CPU, to run all of this in CI.
"""
import multiprocessing
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait

from ..errors import DeviceError, MiniLlamaError, shown
from ..ops import CPU, to_host
from .comm import NcclComm, PeerGone, Rendezvous, free_port, nccl_id_bytes

STOP_TIMEOUT = 5.0             # seconds a worker gets to exit after "close" before it is killed
SPIN_SECONDS = 0.05            # how long a waiting worker polls its pipe before it sleeps
WATCH_SECONDS = 0.001          # how often the parent looks at its workers while its GPU works
NAP_SECONDS = 0.0001           # its pause between two looks at the GPU where cores are few


# ----------------------------------------------------------------------------
# backends: where the ranks compute and how they meet

@dataclass
class NcclBackend:
    """One GPU per rank (rank r on GPU r), collectives through NCCL (comm.NcclComm)."""
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

    def torchrun_environ(self, rank, world):
        """The variables torchrun gives the process of `rank`: where to meet, who it is, its GPU."""
        return dict(MASTER_ADDR=self.addr, MASTER_PORT=str(self.port), RANK=str(rank),
                    WORLD_SIZE=str(world), LOCAL_RANK=str(rank))

    def connect(self, rank, world, environ=None, watch=None):
        """Take GPU `rank`, meet the others, return the communicator. environ: where torchrun's
        variables go, and are read from: None for os.environ (a worker, a process of its own,
        meets the others through its environment, as a worker on another machine would); the
        parent, rank 0 beside the user's program, passes a dict and keeps its os.environ as it
        was. watch: called while rank 0 waits for the others, at the rendezvous
        (Rendezvous.share_bytes) and in NCCL's creation of the communicator (run_watched)."""
        environ = os.environ if environ is None else environ
        environ.update(self.torchrun_environ(rank, world))
        # NCCL reads its settings from the process's environment, so these two go there:
        # NVLink SHARP multicast (NVLS) needs fabric support that not every host has, and the
        # all-reduces of one decode step (a few KiB) gain nothing from it: keep it off
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        # NCCL's support for mixing a graph's collectives with others that may run beside it
        # costs each captured collective ~10 us (80 all-reduces a step of a 13B model: 4.87 ->
        # 4.78 ms on 2 H200s). Nothing runs beside a step here: every rank waits for its step
        # to end before it takes the next one (parallel/fused.py), which is what NCCL then
        # asks of us
        os.environ["NCCL_GRAPH_MIXING_SUPPORT"] = "0"
        from ..cuda import require_cupy
        cupy = require_cupy()
        rendezvous = Rendezvous.from_env(environ)
        gpu = cupy.cuda.Device(int(environ["LOCAL_RANK"]))         # this machine's GPU
        gpu.use()
        from cupy.cuda import nccl
        unique_id = rendezvous.share_bytes(lambda: nccl_id_bytes(nccl.get_unique_id()),
                                           watch=watch)

        def communicator():
            gpu.use()                       # the current GPU is a thread's own
            return NcclComm(rendezvous.rank, rendezvous.world, unique_id)
        return communicator() if watch is None else run_watched(communicator, watch)


@dataclass
class CheckpointJob:
    """What each rank loads: its slice of the checkpoint at `path` (parallel/loading.py)."""
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
# the parent: rank 0, and the workers' keeper

def start(ckpt, world, dtype=None, kv_dtype="float32", prompt_len=None, backend=None):
    """A TensorParallel model over `world` GPUs for the checkpoint `ckpt` (a Checkpoint from
    loading.read_checkpoint: its header is all the parent reads before the ranks load). A world
    size Meta's layout cannot cut the model into is refused here, before any process starts."""
    from .slicing import check_world
    p = ckpt.params
    check_world(p, world)
    job = CheckpointJob(ckpt.path, p.max_seq_len, p.max_batch_size, dtype, kv_dtype, prompt_len)
    return TensorParallel(p, job, world, backend)


class TensorParallel:
    """The model as the generation loops see it (params, ops, forward): rank 0 in this process,
    ranks 1 .. world - 1 in worker processes. params: the whole model's ModelArgs (the caller
    has read them from the header); job: what each rank loads (CheckpointJob, or bench/tp.py's
    random weights)."""

    def __init__(self, params, job, world, backend=None):
        from ..devices import get_ops
        self.params, self.world = params, world
        self.ops = CPU                      # what forward returns: NumPy logits
        self.backend = backend or NcclBackend()
        self.backend.check(world)
        self.spin = spin_seconds(world)
        self.comm = self.model = self.step = self.failure = None
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = {}, {}     # rank -> its process, its pipe (ranks 1 .. N-1)
        self.ready = set()                  # the workers that have loaded their slices
        for rank in range(1, world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, world, theirs, self.backend, job),
                               name=f"minillama-tp-rank{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.procs[rank], self.conns[rank] = proc, mine
        with self._rank0():
            self.comm = self.backend.connect(0, world, environ={}, watch=self._check_workers)
            self.model = job.open(0, world, get_ops(self.backend.device), self.comm)
            self.step = self._rank0_decoder()
        while len(self.ready) < world - 1:  # every worker has loaded its slice
            self._check_workers(timeout=None)

    def _rank0_decoder(self):
        """Rank 0's forward (parallel/fused.py's RankDecoder) that waits for its GPU by polling
        the CUDA event it records after each step."""
        from .fused import RankDecoder
        if self.model.ops.name != "cuda":
            return RankDecoder(self.model)
        step_done = self.model.ops.xp.cuda.Event(disable_timing=True)

        def wait(stream):
            step_done.record(stream)
            wait_polling(step_done, self._check_workers, 0.0 if self.spin else NAP_SECONDS)
        return RankDecoder(self.model, wait)

    @property
    def device(self):
        return f"{self.backend.device} x {self.world} (tensor parallel)"

    @property
    def pids(self):
        """{rank: pid} of the worker processes (rank 0 is this process)."""
        return {rank: proc.pid for rank, proc in self.procs.items()}

    def forward(self, tokens, start_pos):
        """logits (bsz, seqlen, vocab) for tokens (bsz, seqlen) at start_pos: rank 0's."""
        from ..checks import check_tokens
        tokens = check_tokens(tokens, start_pos, self.params)     # refused here, not in N places
        if self.model is None:
            raise DeviceError("tensor-parallel model: its workers are stopped (after close(), "
                              "or after a failure); build it again")
        for rank in self.conns:                     # first, so they wake while rank 0 launches
            self._send(rank, ("forward", tokens, int(start_pos)))
        with self._rank0():
            return to_host(self.step(tokens, start_pos))

    __call__ = forward

    @contextmanager
    def _rank0(self):
        """Around rank 0's work in this process (its connect and load, each step): whatever
        goes wrong there stops the workers too, who would otherwise wait in a collective for
        rank 0. A link to a worker that closed mid-collective (PeerGone) means that worker has
        gone: the error then names it, from its pipe or its exit status."""
        try:
            yield
        except DeviceError as e:
            if e is self.failure:                   # a worker's failure, already reported
                raise
            if isinstance(e, PeerGone) and self.procs:
                self._next_message(STOP_TIMEOUT)    # the worker's error or death: raises
            raise self._stop(f"tensor-parallel rank 0: {e}") from e
        except MiniLlamaError as e:
            raise self._stop(f"tensor-parallel rank 0: {e}") from e
        except BaseException:                       # a bug, or Ctrl-C: raised as it is
            self.close(kill=True)
            raise

    def _send(self, rank, message):
        try:
            self.conns[rank].send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._next_message(STOP_TIMEOUT)        # it has died: that raises, naming it
            raise self._stop(f"tensor-parallel worker rank {rank}: its pipe closed") from None

    def _check_workers(self, timeout=0):
        """Raise if a worker has died or reported an error (waiting up to `timeout` seconds
        for news, None: until there is some); else return. A worker's "ready" (the only other
        message there is) is noted, whenever it comes."""
        got = self._next_message(timeout)
        if got is not None and got[1][0] == "ready":
            self.ready.add(got[0])

    def _next_message(self, timeout=None):
        """(rank, message): the next message of any worker, waiting up to `timeout` seconds
        (None: for as long as it takes), or None. A worker's error, or its death, stops them
        all and raises."""
        ready = wait(list(self.conns.values()) + [p.sentinel for p in self.procs.values()],
                     timeout)
        exited = [rank for rank, proc in self.procs.items()
                  if proc.sentinel in ready or exiting(proc.pid)]
        if exited:                  # GPU 0's collectives end first (a dying worker's exit
            self._end_rank0()       # may wait for them: exiting's comment), then its exit ends
            for rank in exited:
                self.procs[rank].join(STOP_TIMEOUT)
            ready += wait(list(self.conns.values()), 0)    # what it said before it went
        for rank in exited:         # a crash first: the other ranks' errors may only echo it
            if self.procs[rank].exitcode != 0:
                raise self._dead(rank)
        for rank, conn in self.conns.items():  # then a message: its sender exits after it
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    raise self._dead(rank) from None
                if message[0] == "error":
                    raise self._stop(f"tensor-parallel rank {rank}: {message[1]}")
                if message[0] == "bug":
                    self.close(kill=True)
                    raise RuntimeError(f"tensor-parallel rank {rank} failed:\n{message[1]}")
                return rank, message
        if exited:
            raise self._dead(exited[0])
        return None

    def _dead(self, rank):
        """The error for worker `rank`'s death, everything stopped."""
        proc = self.procs[rank]
        # a process's sentinel fires (and its pipe closes) a moment before its exit status can
        # be read: without the join, "killed by signal 9" could read "its pipe closed"
        proc.join(1.0)
        code = proc.exitcode
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit status {code}" if code is not None
               else "still exiting" if exiting(proc.pid) else "its pipe closed")
        others = len(self.procs) - 1
        return self._stop(f"tensor-parallel worker rank {rank} (pid {proc.pid}) died ({how}); "
                          f"stopped the other {others} worker{'s' if others != 1 else ''}")

    def _stop(self, message):
        """Stop everything at once; the DeviceError saying why, for the caller to raise."""
        self.close(kill=True)
        self.failure = DeviceError(message)
        return self.failure

    def close(self, kill=False):
        """Stop rank 0 and every worker: ask the workers to exit (or, with kill, not), then make
        sure. Rank 0's communicator is aborted, not destroyed: it waits for no peer."""
        self._end_rank0()
        if not kill:
            for conn in self.conns.values():
                try:
                    conn.send(("close",))
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
        deadline = time.monotonic() + (0 if kill else STOP_TIMEOUT)
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():             # in NCCL, waiting for a rank that is gone
                proc.kill()
                proc.join()
        for conn in self.conns.values():
            conn.close()
        self.procs, self.conns = {}, {}

    def _end_rank0(self):
        """Abort rank 0's communicator, so that a step of GPU 0 stuck in NCCL ends; its graphs
        are dropped first, else the abort would wait for them forever."""
        if self.step is not None:
            self.step.release_graphs()
        if self.comm is not None:
            self.comm.abort()
        self.comm = self.model = self.step = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_watched(fn, watch, every=0.1):
    """fn()'s result, fn run in a thread of its own while this one calls watch() every `every`
    seconds; fn's exception is raised here. For a call that blocks inside C without end if
    another rank has gone (NCCL's communicator creation waits for every rank): the parent's
    watch sees a worker that failed meanwhile and raises, leaving the stuck thread behind."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as e:          # noqa: BLE001  (raised in the caller's thread)
            outcome["error"] = e
    thread = threading.Thread(target=target, daemon=True, name="minillama-tp-watched")
    thread.start()
    thread.join(every)
    while thread.is_alive():
        watch()
        thread.join(every)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


PF_EXITING = 0x4               # Linux's task flag: the process has begun to exit


def exiting(pid):
    """Whether process `pid` has begun to exit (PF_EXITING in /proc/pid/stat's flags, set when
    it enters the kernel's exit: at once for a killed process, unless it sleeps uninterruptibly
    in a driver call); False where there is no /proc.

    A killed worker's sentinel fires only once its exit has ended, and that exit closes the
    worker's GPU context, which can wait for GPU 0: rank 0's collective still reads the
    worker's memory until the parent aborts it. On 2 H200s (2026-11-30) a worker killed while
    rank 0 waited in NCCL took 3.5 s to exit while the parent waited for the sentinel to abort
    (the test of it took 16.6 and 48.9 s in other runs), and under 0.6 s with the abort first.
    Seen exiting, the worker is dead at once."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()   # after the command's name
    except (OSError, IndexError):
        return False
    return len(fields) > 6 and int(fields[6]) & PF_EXITING != 0   # field 9, flags


def wait_polling(event, check, nap=0.0, every=WATCH_SECONDS):
    """Return once the GPU has passed `event`, calling check() every `every` seconds meanwhile.

    The parent is rank 0: its step's collectives wait on GPU 0 for the workers' GPUs. If a
    worker dies mid-step, GPU 0 waits for it forever, and so would a parent asleep in the
    driver (stream.synchronize, event.synchronize): nothing in this process would ever notice
    the death. So the parent polls event.done (cudaEventQuery: a few microseconds, no sleep) in
    a loop, and calls check() (the workers' sentinels and pipes, one select, and their process
    flags) every `every` seconds; check raises on a death or an error, after aborting the
    communicator so that GPU 0's kernels end.
    A core stays busy meanwhile, as the CUDA runtime's own spin-wait keeps one; `nap` seconds of
    sleep between two queries give it back where the machine has few cores."""
    next_check = time.perf_counter() + every
    while not event.done:
        if time.perf_counter() > next_check:
            check()
            next_check = time.perf_counter() + every
        if nap:
            time.sleep(nap)


# ----------------------------------------------------------------------------
# a worker

def worker_main(rank, world, conn, backend, job):
    """Worker `rank` (1 .. world - 1): meet the others, load the slice, then run each step the
    parent sends until it says close (or goes away). Errors go back to the parent as one
    message. Its logits (every rank has them) are rank 0's business: it sends nothing back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is the parent's to handle
    _exit_with_parent()
    try:
        comm = backend.connect(rank, world)
        from ..devices import get_ops
        from .fused import RankDecoder
        model = job.open(rank, world, get_ops(backend.device), comm)
        forward, spin = RankDecoder(model), spin_seconds(world)
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
            forward(tokens, start_pos)
    except MiniLlamaError as e:
        _report(conn, ("error", str(e)))
    except Exception:
        _report(conn, ("bug", traceback.format_exc()))


def spin_seconds(world):
    """SPIN_SECONDS where the machine has a core for each of the world's pollers (the parent,
    polling its GPU, and the N - 1 workers, polling their pipes) and one more, else 0: no
    polling."""
    return SPIN_SECONDS if (os.cpu_count() or 1) > world else 0.0


def spin_wait(conns, seconds):
    """The connections with something to read, polled for up to `seconds`; [] if none.

    A process asleep in the kernel takes tens to hundreds of microseconds to wake when its
    pipe becomes readable: on 2 H200s, with rank 0 in a worker of its own, from its logits sent
    to its next step begun took 405 us asleep and 234 polling, in a step of ~5 ms. So a
    worker polls for the parent's next token, a core busy meanwhile, as the CUDA runtime
    itself spins while it waits for the GPU (cudaDeviceScheduleAuto) where the machine has more
    cores than GPUs: here, where it has more cores than processes polling (on fewer, the
    pollers would take turns on the cores and wake later, not sooner). After `seconds` of
    nothing (a long prompt, a user typing) it goes back to sleeping."""
    deadline = time.perf_counter() + seconds
    while True:
        ready = [conn for conn in conns if conn.poll()]
        if ready or time.perf_counter() > deadline:
            return ready


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

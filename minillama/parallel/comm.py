"""The two collectives tensor parallelism needs, and how ranks find each other.

    comm.all_reduce(x)         x summed over the ranks, elementwise, in place: every rank's x
                               holds the sum (and is returned)
    comm.all_gather(x, out)    (world, *x.shape): every rank's x, stacked in rank order (into
                               out when given)

Three communicators give them:

    SimulatedWorld(n).comms  n ranks in one process, one thread each: the all-reduce is a sum
                             of the ranks' arrays in rank order (the CPU tests' world)
    NcclComm                 NCCL through CuPy (cupy.cuda.nccl): one process and one GPU per rank
    (tests/ holds a third, over pipes, to run the worker processes on a CPU)

Rendezvous: before NCCL can connect the ranks, they must share one NCCL unique id (128 bytes
that rank 0 makes). `share_bytes` hands it over TCP, as torchrun's rendezvous does: rank 0
listens on MASTER_ADDR:MASTER_PORT, every other rank connects there and reads it. The same
code serves one machine (workers.py sets MASTER_ADDR=127.0.0.1 and a free port) and several
(each machine's processes get the environment torchrun would give them: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT; `Rendezvous.from_env`).
"""
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError, DeviceError, shown

RENDEZVOUS_TIMEOUT = 120.0       # seconds for every rank to arrive
WATCH_SECONDS = 0.1              # how often rank 0's wait at the rendezvous calls its watch


# ----------------------------------------------------------------------------
# n ranks in one process

class SimulatedWorld:
    """n ranks as n threads of one process: each rank's forward runs in its own thread, and a
    collective waits at a barrier until every rank has put its array in, then each rank reads
    the same result. The all-reduce adds the arrays in rank order, so every rank holds the
    same bits, as after NCCL's all-reduce."""

    def __init__(self, world):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)
        self.comms = [SimulatedComm(self, rank) for rank in range(world)]

    def exchange(self, rank, x):
        """Every rank's x (a copy, which no rank writes), in rank order, once all have arrived."""
        self.slots[rank] = x.copy()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()              # nobody overwrites a slot before all have read it
        return everyone

    def run(self, fn):
        """[fn(rank, comm) for every rank], each in its own thread; an exception in any
        rank is raised here (the others are released from the barrier first)."""
        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(rank, self.comms[rank])
            except BaseException as e:          # noqa: BLE001  (re-raised below)
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                       errors[0])
        return results


class SimulatedComm:
    """One rank's view of a SimulatedWorld."""

    def __init__(self, world, rank):
        self._world, self.rank, self.world = world, rank, world.world

    def all_reduce(self, x):
        parts = self._world.exchange(self.rank, x)
        total = parts[0]
        for p in parts[1:]:              # rank order: the same bits on every rank
            total = total + p
        x[...] = total
        return x

    def all_gather(self, x, out=None):
        parts = self._world.exchange(self.rank, x)
        if out is None:
            return np.stack(parts)
        out[...] = np.stack(parts)
        return out


# ----------------------------------------------------------------------------
# NCCL, one GPU per process

class NcclComm:
    """The collectives on the current GPU's current stream, through NCCL. Both work on float32
    CuPy arrays (the activations), in place where they can; NCCL's kernels are recorded into a
    CUDA graph like any other, so parallel/fused.py can capture a whole step."""

    def __init__(self, rank, world, unique_id):
        from ..cuda import require_cupy
        self.cp = require_cupy()
        from cupy.cuda import nccl
        self.nccl, self.rank, self.world = nccl, rank, world
        try:                    # CuPy 14 takes the id as bytes, earlier ones as signed chars
            self.comm = nccl.NcclCommunicator(world, bytes(unique_id), rank)
        except TypeError:
            self.comm = nccl.NcclCommunicator(world, nccl_id_tuple(unique_id), rank)

    def all_reduce(self, x):
        x = self.cp.ascontiguousarray(x, dtype=np.float32)
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self.nccl.NCCL_FLOAT32,
                            self.nccl.NCCL_SUM, self.cp.cuda.get_current_stream().ptr)
        return x

    def all_gather(self, x, out=None):
        x = self.cp.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = self.cp.empty((self.world,) + x.shape, dtype=np.float32)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, self.nccl.NCCL_FLOAT32,
                            self.cp.cuda.get_current_stream().ptr)
        return out

    def abort(self):
        """End the communicator without waiting for any peer (ncclCommAbort): NCCL's kernels
        still waiting in a collective on this GPU for a rank that is gone return, so the
        GPU's work ends. The way the parent ends rank 0's communicator, always: after a
        failure it is the only way, and after a clean stop it never waits (destroy may)."""
        self.comm.abort()


class PeerGone(DeviceError):
    """A rank's link to another closed inside a collective: the other rank's process has gone.
    A communicator that can see this raises it (tests' pipes); NCCL cannot (the GPU just waits),
    so the parent, which runs rank 0, also watches the workers' processes while it waits."""


def nccl_version():
    """NCCL's version as "2.21.5", or "" without CuPy's NCCL."""
    try:
        from cupy.cuda import nccl
        v = nccl.get_version()
    except Exception:                     # no CuPy, no libnccl: nothing to report
        return ""
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else \
        f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def nccl_id_bytes(unique_id):
    """CuPy's unique id (bytes in CuPy 14, a tuple of 128 signed chars before) as 128 bytes,
    to send."""
    if isinstance(unique_id, (bytes, bytearray)):
        return bytes(unique_id)
    return bytes(c & 0xFF for c in unique_id)


def nccl_id_tuple(data):
    """And back: NcclCommunicator takes the signed chars."""
    return tuple(b - 256 if b > 127 else b for b in data)


# ----------------------------------------------------------------------------
# rendezvous: rank 0 hands a few bytes (the NCCL unique id) to every other rank over TCP

@dataclass
class Rendezvous:
    addr: str                 # MASTER_ADDR: where rank 0 listens
    port: int                 # MASTER_PORT
    rank: int                 # RANK
    world: int                # WORLD_SIZE

    @classmethod
    def from_env(cls, environ=None):
        """The rendezvous torchrun's environment describes: MASTER_ADDR, MASTER_PORT, RANK,
        WORLD_SIZE (a missing or malformed one is named)."""
        environ = os.environ if environ is None else environ
        values = {}
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            if not environ.get(var):
                raise ArgumentError(f"{var}: not set; tensor-parallel workers find each other "
                                    f"through MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE")
            values[var] = environ[var]
        ints = {}
        for var in ("MASTER_PORT", "RANK", "WORLD_SIZE"):
            try:
                ints[var] = int(values[var])
            except ValueError:
                raise ArgumentError(f"{var}: expected an integer, "
                                    f"got {shown(values[var])}") from None
        if not (0 < ints["MASTER_PORT"] < 65536 and 0 <= ints["RANK"] < ints["WORLD_SIZE"]):
            raise ArgumentError(f"RANK {ints['RANK']}, WORLD_SIZE {ints['WORLD_SIZE']}, "
                                f"MASTER_PORT {ints['MASTER_PORT']}: expected 0 <= RANK < "
                                f"WORLD_SIZE and a port in 1..65535")
        return cls(values["MASTER_ADDR"], ints["MASTER_PORT"], ints["RANK"], ints["WORLD_SIZE"])

    def share_bytes(self, make, timeout=RENDEZVOUS_TIMEOUT, watch=None):
        """Rank 0 calls make() and sends its bytes to every other rank; every rank returns
        them. A rank that does not arrive in `timeout` seconds is a DeviceError naming the
        address. watch: called every WATCH_SECONDS while rank 0 waits for the others (the
        parent's look at its workers: one that has failed raises there, long before the
        timeout)."""
        if self.rank == 0:
            payload = make()
            self._serve(payload, time.monotonic() + timeout, watch or (lambda: None))
            return payload
        return self._fetch(time.monotonic() + timeout)

    def _serve(self, payload, deadline, watch):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            local = self.addr in ("127.0.0.1", "localhost")
            server.bind((self.addr if local else "", self.port))
            server.listen(self.world)
            for arrived in range(self.world - 1):
                conn = self._accept(server, deadline, watch)
                if conn is None:
                    raise DeviceError(f"rendezvous: {arrived} of {self.world - 1} ranks reached "
                                      f"rank 0 at {shown(self.addr, quote=False)}:{self.port} "
                                      f"in time")
                with conn:
                    conn.settimeout(max(0.01, deadline - time.monotonic()))
                    rank, world = struct.unpack("!ii", _recv_exactly(conn, 8))
                    if world != self.world:
                        raise DeviceError(f"rendezvous: rank {rank} says WORLD_SIZE {world}, "
                                          f"rank 0 says {self.world}")
                    conn.sendall(struct.pack("!i", len(payload)) + payload)

    @staticmethod
    def _accept(server, deadline, watch):
        """The next rank's connection, or None at the deadline; watch() between short waits."""
        while time.monotonic() < deadline:
            server.settimeout(max(0.001, min(WATCH_SECONDS, deadline - time.monotonic())))
            try:
                return server.accept()[0]
            except socket.timeout:
                watch()
        return None

    def _fetch(self, deadline):
        while True:
            try:
                with socket.create_connection((self.addr, self.port), timeout=5) as conn:
                    conn.sendall(struct.pack("!ii", self.rank, self.world))
                    size, = struct.unpack("!i", _recv_exactly(conn, 4))
                    return _recv_exactly(conn, size)
            except (ConnectionRefusedError, ConnectionResetError, socket.timeout, EOFError):
                if time.monotonic() > deadline:
                    raise DeviceError(f"rendezvous: rank {self.rank} could not reach rank 0 at "
                                      f"{shown(self.addr, quote=False)}:{self.port} (MASTER_ADDR, "
                                      f"MASTER_PORT)") from None
                time.sleep(0.05)


def _recv_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("the other side closed the connection")
        data += chunk
    return data


def free_port():
    """A TCP port free on this machine now (for a rendezvous on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

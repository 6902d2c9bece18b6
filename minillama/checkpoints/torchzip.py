"""PyTorch `.pth` files (torch.save since torch 1.6) read without torch, and without running code:
Meta's consolidated.NN.pth and Hugging Face's pytorch_model.bin are both such files.

A .pth file is a zip archive (members stored uncompressed) under one top folder, e.g.
    consolidated/data.pkl        a pickle of the object that was saved (a dict of tensors)
    consolidated/data/0, /1 ...  raw bytes of each tensor storage, little-endian
    consolidated/byteorder       "little" (absent in older files: little)
In the pickle each tensor is a call
    torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)
whose storage is a persistent id ('storage', torch.BFloat16Storage, '0', 'cpu', numel) that
names the member data/0.

Unpickling can call any importable function, so a pickle from a stranger is a program. Ours
resolves only the globals listed in ALLOWED, each to a harmless stand-in defined here, and refuses
every other global with a CheckpointError before anything is called. No tensor bytes are read
while unpickling: each tensor comes back as a LazyTensor that reads its own bytes later.
"""
import io
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict

import numpy as np

from ..dtypes import LazyTensor
from ..errors import CheckpointError, shown


class _StorageType:
    """Stands in for torch.FloatStorage & co.: only says how the stored elements are laid out."""

    def __init__(self, name, numpy_dtype, dtype_name, fmt):
        self.name, self.numpy_dtype, self.dtype_name = name, np.dtype(numpy_dtype), dtype_name
        self.format = fmt                   # the formats name the weight is stored in


STORAGE_TYPES = {t.name: t for t in (
    _StorageType("FloatStorage", "<f4", "float32", "f32"),
    _StorageType("HalfStorage", "<f2", "float16", "f16"),
    _StorageType("BFloat16Storage", "<u2", "bfloat16", "bf16"),   # read as bits (uint16)
)}


class _Storage:
    """One data/N member: where its bytes start in the file, how many elements it holds, and
    the CRC-32 the zip directory records for them."""

    def __init__(self, path, stype, offset, numel, crc):
        self.path, self.stype, self.offset, self.numel, self.crc = path, stype, offset, numel, crc


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: a LazyTensor over the storage's bytes."""
    ints = lambda t: isinstance(t, tuple) and all(isinstance(n, int) and n >= 0 for n in t)
    if not (isinstance(storage, _Storage) and isinstance(storage_offset, int)
            and storage_offset >= 0 and ints(size) and ints(stride) and len(size) == len(stride)):
        raise CheckpointError("tensor record in the pickle is malformed "
                              "(expected storage, offset, size tuple, stride tuple)")
    # the last element the view touches must lie inside the storage
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if 0 not in size and last >= storage.numel:
        raise CheckpointError(f"{storage.path}: tensor of size {size}, stride {stride} at offset "
                              f"{storage_offset} reaches past its storage of {storage.numel} "
                              f"elements")
    itemsize = storage.stype.numpy_dtype.itemsize
    row_major = stride == tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    raw = (lambda: np.memmap(storage.path, np.uint8, "r", storage.offset + storage_offset *
                             itemsize, (int(np.prod(size)) * itemsize,))) if row_major else None
    return LazyTensor(size, storage.stype.format,
                      lambda: _read_view(storage, storage_offset, size, stride), raw)


def _read_view(storage, offset, size, stride):
    """The tensor's elements as stored, a new row-major array (float32, float16, or bfloat16
    bits as uint16)."""
    dt = storage.stype.numpy_dtype
    if 0 in size:
        return np.zeros(size, dt)
    extent = 1 + sum((n - 1) * s for n, s in zip(size, stride))
    flat = np.fromfile(storage.path, dtype=dt, count=extent,
                       offset=storage.offset + offset * dt.itemsize)
    if flat.size != extent:
        raise CheckpointError(f"{storage.path}: file ends inside a tensor storage (truncated?)")
    # a tensor that spans its whole storage (every tensor Meta saves) is checked against the
    # zip's CRC, so damaged bytes are an error instead of quietly wrong weights
    if offset == 0 and extent == storage.numel and zlib.crc32(flat) != storage.crc:
        raise CheckpointError(f"{storage.path}: tensor data fails its CRC check (damaged file)")
    view = np.lib.stride_tricks.as_strided(flat, size, tuple(s * dt.itemsize for s in stride))
    return view.copy()                                      # copy: row-major, own memory


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    **{("torch", name): stype for name, stype in STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data, path, members):
        super().__init__(io.BytesIO(data))
        self.path, self.members = path, members      # key -> (data offset, nbytes, crc)

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"{self.path}: tensor storage {shown('torch.' + name, quote=False)} is not supported "
                                  f"(expected {', '.join(STORAGE_TYPES)}: float32, float16, "
                                  f"bfloat16)")
        raise CheckpointError(f"{self.path}: refusing to load global {shown(f'{module}.{name}')} from the "
                              f"pickle: a checkpoint needs only tensors, and loading must never "
                              f"run code")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise CheckpointError(f"{self.path}: unexpected persistent id {shown(pid)} in the pickle")
        _, stype, key, _, numel = pid
        if key not in self.members:
            raise CheckpointError(f"{self.path}: storage data/{key} is missing from the archive")
        offset, nbytes, crc = self.members[key]
        if nbytes != numel * stype.numpy_dtype.itemsize:
            raise CheckpointError(f"{self.path}: storage data/{key} has {nbytes} bytes, its "
                                  f"record says {numel} x {stype.dtype_name}")
        return _Storage(self.path, stype, offset, numel, crc)


def load_pth(path):
    """The object a .pth file holds (for a checkpoint, a dict name -> LazyTensor).
    Reads the zip directory and the pickle only."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        _refuse_truncated(path)
        raise CheckpointError(f"{path}: not a zip archive; minillama reads .pth files written by "
                              f"torch.save (torch >= 1.6), which are zip archives")
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            prefix = _archive_prefix(path, z)
            data = _read_member(path, z, prefix + "data.pkl")
            byteorder = (_read_member(path, z, prefix + "byteorder").decode().strip()
                         if prefix + "byteorder" in z.namelist() else "little")
            members = {info.filename[len(prefix) + 5:]: _member_data(path, f, info)
                       for info in z.infolist()
                       if info.filename.startswith(prefix + "data/")}
    # zipfile also raises NotImplementedError ("zip file version 19.5"), RuntimeError (an
    # encrypted member) and ValueError; a byteorder member of junk fails to decode
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, UnicodeDecodeError,
            NotImplementedError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged zip archive ({shown(str(e), quote=False)})") \
            from None
    if byteorder != "little":
        raise CheckpointError(f"{path}: byteorder {shown(byteorder)}: only little-endian files are read")
    try:
        _check_pickle_sizes(path, data)
        return _RestrictedUnpickler(data, path, members).load()
    except CheckpointError:
        raise
    except Exception as e:       # a damaged pickle fails in many ways; all mean the same here
        raise CheckpointError(f"{path}: damaged pickle in data.pkl "
                              f"({type(e).__name__}: {shown(str(e), quote=False)})") from None


def _refuse_truncated(path):
    """A file that starts as a zip archive but has lost its end (the central directory, which
    zipfile looks for first) is a truncated download, not a file of another kind."""
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise CheckpointError(f"{path}: truncated: it starts as a zip archive but its end "
                                  f"(the central directory) is missing; download it again")


def load_state_dict(path, ignored=()):
    """{name: LazyTensor} from a .pth file that must hold a state_dict (a dict of tensors);
    entries named in `ignored` may be anything and are dropped."""
    sd = load_pth(path)
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict), "
                              f"got {type(sd).__name__}")
    for k, v in sd.items():
        if k not in ignored and not isinstance(v, LazyTensor):
            raise CheckpointError(f"{path}: entry {shown(k)} is a {type(v).__name__}, not a tensor")
    return {k: v for k, v in sd.items() if k not in ignored}


def _read_member(path, z, name):
    """A small member's bytes, refusing one that would inflate past the file's own size
    (torch.save stores members uncompressed; a compressed one could be a zip bomb)."""
    size = z.getinfo(name).file_size
    if size > os.path.getsize(path):
        raise CheckpointError(f"{path}: member {name} would inflate to {size} bytes, more than "
                              f"the whole file")
    return z.read(name)


MEMO_OPS = ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET")


def _check_pickle_sizes(path, data):
    """Bound what the C unpickler allocates by the pickle's size, before it runs. It trusts the
    numbers in the data: a memo index n makes it grow its memo table to 2n entries, zero-filled
    (4 bytes saying 2**28 would cost 4 GB), and a bytearray length is allocated before the bytes
    are read. pickletools walks the opcodes without executing them, refusing any length that
    runs past the end; memo indices are numbered in order, so none can exceed the opcode count."""
    for count, (op, arg, pos) in enumerate(pickletools.genops(data)):
        if op.name in MEMO_OPS and not 0 <= int(arg) <= count:
            raise CheckpointError(f"{path}: damaged pickle in data.pkl (memo index {arg} at "
                                  f"byte {pos}, after only {count} opcodes)")


def _archive_prefix(path, z):
    """'consolidated/': the top folder that holds data.pkl."""
    pkls = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pkls) != 1:
        raise CheckpointError(f"{path}: zip archive without exactly one data.pkl; "
                              f"not a torch.save checkpoint")
    return pkls[0][:-len("data.pkl")]


def _member_data(path, f, info):
    """(offset of the member's bytes in the file, their length, CRC-32). Storages must be stored
    uncompressed (torch.save does so), so the tensors can be read in place."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: member {info.filename} is compressed; torch.save stores "
                              f"tensor data uncompressed")
    # local file header: 30 fixed bytes (name and extra-field lengths at 26 and 28), name, extra
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: bad zip entry header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + info.file_size > os.path.getsize(path):
        raise CheckpointError(f"{path}: member {info.filename} runs past the end of the file "
                              f"(truncated?)")
    return offset, info.file_size, info.CRC

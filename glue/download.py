"""Fetch the official GLUE files into a local data folder, the way the classic
`download_glue_data.py` (Wang et al., the GLUE authors' script) lays them out:

    <data_dir>/CoLA/{train,dev,test}.tsv      <data_dir>/MNLI/{train,dev_matched,...}.tsv
    <data_dir>/MRPC/...   <data_dir>/diagnostic/diagnostic.tsv   ...

Every task but MRPC is one zip archive. MRPC may not be redistributed, so GLUE assembles it
from Microsoft's paraphrase corpus (msr_paraphrase_train.txt / _test.txt, as hosted by SentEval)
and GLUE's list of dev-set id pairs (mrpc_dev_ids.tsv): training pairs whose (#1 ID, #2 ID) is
on the list form dev.tsv, the rest train.tsv, both keeping the corpus header line (with its
byte-order mark); the test file becomes test.tsv with an `index` column in place of the label.

Downloads stream into a temporary folder inside the data folder, are checked for completeness,
and only then are moved into place, so an interrupted download leaves nothing behind.

Where files come from: URLS below (the current dl.fbaipublicfiles.com location first, the
original firebasestorage one as a fallback). Set GLUE_DOWNLOAD_URL to a base URL to fetch every
file by its name from there instead (a mirror, or a local test server).

    python -m glue.download CoLA MRPC RTE STS-B --data-dir data/glue
"""

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import requests

from bert.errors import InputError, folder_to_write
from bert.hub import DownloadProgress, offline_reason
from glue.data import default_data_dir
from glue.tasks import TASKS, get_task

_FIREBASE = "https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/data%2F"
_FBAI = "https://dl.fbaipublicfiles.com/glue/data/"
_SENTEVAL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"

# The file that holds each task (MRPC: three source files, see module docstring).
TASK_FILES = {
    "CoLA": ["CoLA.zip"], "SST-2": ["SST-2.zip"], "QQP": ["QQP-clean.zip"], "STS-B": ["STS-B.zip"],
    "MNLI": ["MNLI.zip"], "QNLI": ["QNLIv2.zip"], "RTE": ["RTE.zip"], "WNLI": ["WNLI.zip"],
    "AX": ["AX.tsv"],
    "MRPC": ["msr_paraphrase_train.txt", "msr_paraphrase_test.txt", "mrpc_dev_ids.tsv"],
}

# file name -> URLs to try in order
URLS = {
    "CoLA.zip": [_FBAI + "CoLA.zip", _FIREBASE + "CoLA.zip?alt=media&token=46d5e637-3411-4188-bc44-5809b5bfb5f4"],
    "SST-2.zip": [_FBAI + "SST-2.zip", _FIREBASE + "SST-2.zip?alt=media&token=aabc5f6b-e466-44a2-b9b4-cf6337f84ac8"],
    "QQP-clean.zip": [_FBAI + "QQP-clean.zip", _FIREBASE + "QQP-clean.zip?alt=media&token=11a647cb-ecd3-49c9-9d31-79f8ca8fe277"],
    "STS-B.zip": [_FBAI + "STS-B.zip", _FIREBASE + "STS-B.zip?alt=media&token=bddb94a7-8706-4e0d-a694-1109e12273b5"],
    "MNLI.zip": [_FBAI + "MNLI.zip", _FIREBASE + "MNLI.zip?alt=media&token=50329ea1-e339-40e2-809c-10c40afff3ce"],
    "QNLIv2.zip": [_FBAI + "QNLIv2.zip", _FIREBASE + "QNLIv2.zip?alt=media&token=6fdcf570-0fc5-4631-8456-9505272d1601"],
    "RTE.zip": [_FBAI + "RTE.zip", _FIREBASE + "RTE.zip?alt=media&token=5efa7e85-a0bb-4f19-8ea2-9e1840f077fb"],
    "WNLI.zip": [_FBAI + "WNLI.zip", _FIREBASE + "WNLI.zip?alt=media&token=068ad0a0-ded7-4bd7-99a5-5e00222e0faf"],
    "AX.tsv": [_FBAI + "AX.tsv"],
    "mrpc_dev_ids.tsv": [_FBAI + "mrpc_dev_ids.tsv", _FIREBASE + "mrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc"],
    "msr_paraphrase_train.txt": [_SENTEVAL + "msr_paraphrase_train.txt"],
    "msr_paraphrase_test.txt": [_SENTEVAL + "msr_paraphrase_test.txt"],
}

MIRROR_ENV = "GLUE_DOWNLOAD_URL"
TIMEOUT_S = 30


def urls_for(file_name: str) -> list[str]:
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return [mirror.rstrip("/") + "/" + file_name]
    return URLS[file_name]


def task_files_present(task: str, data_dir=None, splits=None) -> bool:
    """Whether the files of `splits` (default: every split of the task) are all there."""
    spec = get_task(task)
    folder = Path(data_dir or default_data_dir()) / spec.dir_name
    wanted = [spec.split_layout(s)[1] for s in splits] if splits else spec.splits.values()
    return all((folder / layout.file).is_file() for layout in wanted)


def ensure_task_data(task: str, data_dir=None, splits=None) -> Path:
    """Return <data_dir>/<task folder>, downloading the task's files first if any is missing.

    `splits` limits the check to the files a caller reads (training needs no test.tsv).

    For MRPC, msr_paraphrase_train.txt, msr_paraphrase_test.txt and mrpc_dev_ids.tsv (or
    dev_ids.tsv) already placed in <data_dir>/MRPC are used instead of downloading them.
    """
    spec = get_task(task)
    data_dir = Path(data_dir or default_data_dir())
    folder = data_dir / spec.dir_name
    if task_files_present(spec.name, data_dir, splits):
        return folder
    created = [d for d in (data_dir, *data_dir.absolute().parents) if not d.exists()]   # innermost first
    data_dir.mkdir(parents=True, exist_ok=True)
    # Work inside data_dir so that the final moves are renames on one file system.
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}-download-", dir=data_dir))
    done = False
    try:
        built = scratch / spec.dir_name                 # the finished task folder, moved at the end
        if spec.name in ("MRPC", "AX"):
            built.mkdir()
        if spec.name == "MRPC":
            sources = {name: _local_or_download(name, folder, scratch) for name in TASK_FILES["MRPC"]}
            build_mrpc(sources["msr_paraphrase_train.txt"], sources["msr_paraphrase_test.txt"],
                       sources["mrpc_dev_ids.tsv"], built)
        elif spec.name == "AX":
            _download("AX.tsv", built / "diagnostic.tsv",
                      by_hand=f"save it as {folder / 'diagnostic.tsv'}")
        else:
            archive = scratch / TASK_FILES[spec.name][0]
            _download(archive.name, archive, by_hand=f"unzip it into {data_dir} (giving "
                      f"{folder / spec.splits['train'].file}, ...)")
            built = _extract_task_folder(archive, scratch / "unzipped", spec)
        _move_into_place(built, folder)
        done = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not done:                     # a failed download leaves no empty folders behind
            for d in created:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
    print(f"{spec.name}: data ready in {folder}", file=sys.stderr)
    return folder


def _local_or_download(name: str, folder: Path, scratch: Path) -> Path:
    candidates = [folder / name] + ([folder / "dev_ids.tsv"] if name == "mrpc_dev_ids.tsv" else [])
    for path in candidates:
        if path.is_file():
            return path
    others = [f"{other} ({urls_for(other)[0]})" for other in TASK_FILES["MRPC"] if other != name]
    _download(name, scratch / name, by_hand=f"place it in {folder}/ together with "
                                            f"{' and '.join(others)}; MRPC is then built from them")
    return scratch / name


def _download(file_name: str, dest: Path, by_hand: str) -> None:
    """Stream the first URL that works into dest; else InputError saying how to do it by hand."""
    offline = offline_reason()
    if offline:
        raise InputError(f"{file_name} is missing and {offline} forbids downloading it: download "
                         f"{urls_for(file_name)[0]} elsewhere and {by_hand}")
    failures = []
    for url in urls_for(file_name):
        try:
            _stream(url, dest)
            return
        except (requests.RequestException, _Incomplete) as error:
            dest.unlink(missing_ok=True)
            failures.append(f"{url} ({_reason(error)})")
    raise InputError(f"could not download {file_name}: {'; '.join(failures)}. If this machine is "
                     f"offline, download {urls_for(file_name)[0]} elsewhere and {by_hand}")


class _Incomplete(Exception):
    pass


def _stream(url: str, dest: Path) -> None:
    with requests.get(url, stream=True, timeout=TIMEOUT_S) as response:
        response.raise_for_status()
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        progress = DownloadProgress(dest.name, total or None, 0)
        try:
            with open(dest, "wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    out.write(chunk)
                    done += len(chunk)
                    progress.update(len(chunk))
        finally:
            progress.close()
        if total and done != total:
            raise _Incomplete(f"got {done} of {total} bytes")


def _reason(error: Exception) -> str:
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code}"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off mid-download"
    if isinstance(error, requests.ConnectionError):
        return "connection failed"
    if isinstance(error, requests.Timeout):
        return "timed out"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _extract_task_folder(archive: Path, into: Path, spec) -> Path:
    """Unzip and return the folder inside that holds all of the task's files."""
    try:
        with zipfile.ZipFile(archive) as zip_file:
            zip_file.extractall(into)
    except zipfile.BadZipFile:
        raise InputError(f"{archive.name}: the download is not a valid zip archive") from None
    needed = [layout.file for layout in spec.splits.values()]
    for folder in sorted([into] + [p for p in into.rglob("*") if p.is_dir()]):
        if all((folder / name).is_file() for name in needed):
            return folder
    raise InputError(f"{archive.name}: no folder in the archive holds {', '.join(needed)}")


def _move_into_place(built: Path, folder: Path) -> None:
    """Rename the finished folder into place; into an existing folder, add only what is missing."""
    if not folder.exists():
        try:
            built.replace(folder)
            return
        except OSError:                  # another process moved its copy in first: merge below
            if not folder.is_dir():
                raise
    for item in built.iterdir():
        if not (folder / item.name).exists():
            item.replace(folder / item.name)


def build_mrpc(train_txt: Path, test_txt: Path, dev_ids_tsv: Path, out_dir: Path) -> None:
    """Write MRPC train.tsv, dev.tsv and test.tsv from the MSR paraphrase corpus, GLUE's way."""
    dev_ids = set()
    for line_number, line in _text_lines(dev_ids_tsv):
        if not line.strip():
            continue
        ids = line.strip().split("\t")
        if len(ids) != 2:
            raise InputError(f"{dev_ids_tsv}:{line_number}: expected '#1 ID<TAB>#2 ID', found {line!r}")
        dev_ids.add(tuple(ids))

    train_rows, dev_rows = [], []
    lines = _text_lines(train_txt)
    header = lines[0][1] if lines else ""
    for line_number, line in lines[1:]:
        label, id1, id2, s1, s2 = _msr_row(train_txt, line_number, line)
        target = dev_rows if (id1, id2) in dev_ids else train_rows
        target.append("\t".join((label, id1, id2, s1, s2)))
    if not train_rows or not dev_rows:
        raise InputError(f"{train_txt}: no {'dev' if train_rows else 'train'} rows after the "
                         f"split by {dev_ids_tsv.name}; are these the MSR paraphrase files?")

    test_rows = []
    for line_number, line in _text_lines(test_txt)[1:]:
        _, id1, id2, s1, s2 = _msr_row(test_txt, line_number, line)
        test_rows.append("\t".join((str(len(test_rows)), id1, id2, s1, s2)))
    if not test_rows:
        raise InputError(f"{test_txt}: no rows")

    _write_lines(out_dir / "train.tsv", [header] + train_rows)
    _write_lines(out_dir / "dev.tsv", [header] + dev_rows)
    _write_lines(out_dir / "test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"] + test_rows)


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """Lines as Python's text mode reads them ('\\r\\n' and '\\r' end a line too), BOM kept."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not valid UTF-8 ({error.reason})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return list(enumerate(lines, start=1))


def _msr_row(path: Path, line_number: int, line: str) -> list[str]:
    fields = line.strip().split("\t")
    if len(fields) != 5:
        raise InputError(f"{path}:{line_number}: expected 5 tab-separated columns "
                         f"(Quality, #1 ID, #2 ID, #1 String, #2 String), found {len(fields)}")
    return fields


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write("".join(line + "\n" for line in lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Download GLUE task data.")
    parser.add_argument("tasks", nargs="+", help=f"task names or 'all' ({', '.join(TASKS)})")
    parser.add_argument("--data-dir", default=None, help="default: $GLUE_DIR or data/glue")
    args = parser.parse_args(argv)
    names = list(TASKS) if [t.lower() for t in args.tasks] == ["all"] else args.tasks
    try:
        if args.data_dir is not None:
            folder_to_write(args.data_dir, "--data-dir")
        for name in names:
            print(ensure_task_data(name, args.data_dir))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

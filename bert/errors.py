"""One exception type for problems in what the user gave us, and the checks of path arguments.

A bad file, flag or model name should end a command with one clear line, not a traceback.
Library code raises `InputError("what is wrong, and where")`; the command-line entry points
(train.py, evaluate.py) catch it, print the message and exit with status 2.
"""
import os
import tempfile
from pathlib import Path


class InputError(Exception):
    """A problem with user input (a file, a flag, a model name) that one line can explain."""


def existing_folder(path, flag: str) -> Path:
    """A folder to read from: it must exist and be a folder. Reading never creates one."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{flag} {path}: is a file, not a folder")
    blocker = _file_above(path)
    if blocker is not None:
        raise InputError(f"{flag} {path}: {blocker} is a file, not a folder")
    raise InputError(f"{flag} {path}: no such folder")


def folder_to_write(path, flag: str) -> Path:
    """A folder to write into: a folder, or a path that can become one, where files can be made
    (nothing is left here: the caller creates the folder when it first writes)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder")
    blocker = _file_above(path)
    if blocker is not None:
        raise InputError(f"{flag} {path}: {blocker} is a file, not a folder")
    if path.is_dir():
        problem = _cannot_write_in(path)
        if problem:
            raise InputError(f"{flag} {path}: cannot write in this folder ({problem})")
        return path
    parent = _nearest_existing(path)
    problem = _cannot_write_in(parent)
    if problem:
        raise InputError(f"{flag} {path}: cannot create it in {_shown(parent)} ({problem})")
    return path


def _nearest_existing(path: Path) -> Path:
    """The nearest ancestor of `path` that exists (the root always does)."""
    return next(parent for parent in path.absolute().parents if parent.exists())


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (so nothing can be made
    below it), else None."""
    parent = _nearest_existing(path)
    return None if parent.is_dir() else _shown(parent)


def _cannot_write_in(folder: Path) -> str | None:
    """Why no file can be made in `folder`, or None when one can. Tried for real, with a file
    that is removed at once: the permission bits do not tell (root writes past them; a read-only
    or virtual file system, or an immutable folder, refuses root too)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(name)
    return None


def _shown(path: Path) -> Path:
    """`path` relative to the working folder when it is below it, as the user likely wrote it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path

"""One exception type for problems in what the user gave us, and the checks of path arguments.

A bad file, flag or model name should end a command with one clear line, not a traceback.
Library code raises `InputError("what is wrong, and where")`; the command-line entry points
(train.py, evaluate.py) catch it, print the message and exit with status 2.
"""
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
    """A folder to write into: a folder, or a path that can become one (nothing is created
    here; the caller creates it when it first writes)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder")
    blocker = _file_above(path)
    if blocker is not None:
        raise InputError(f"{flag} {path}: {blocker} is a file, not a folder")
    return path


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (so nothing can be made
    below it), else None."""
    for parent in path.absolute().parents:
        if parent.exists():
            if parent.is_dir():
                return None
            try:
                return parent.relative_to(Path.cwd())
            except ValueError:
                return parent
    return None

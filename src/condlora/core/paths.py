"""Output paths checked before the work that fills them: right kind, writable, known format."""

from __future__ import annotations

import os
import re
from pathlib import Path

from condlora.core.errors import CondloraError

FOLDER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a name that is one folder, in place


def check_folder_name(name: str, what: str) -> str:
    """A name that makes one folder in place: letters, digits, '_-.', not '.' or '..'."""
    if not isinstance(name, str) or not FOLDER_NAME.match(name) or name in (".", ".."):
        raise CondloraError(
            f"{what} must be letters, digits, '_-.' (one folder name, no path), got {name!r}"
        )
    return name


def default_run_folder(name: str) -> Path:
    """runs/<name> for a config's `name:` when no --out is given (the name checked)."""
    return Path("runs") / check_folder_name(name, "the config's name")


def nearest_existing(path: Path) -> Path:
    """`path` or the closest of its parents that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def first_missing(path: str | Path) -> Path | None:
    """The outermost folder on the way to `path` (or `path` itself) that does not exist yet:
    what making `path` creates, removed with it; None if `path` exists."""
    path = Path(path).absolute()
    top = nearest_existing(path)
    return None if top == path else top / path.relative_to(top).parts[0]


def check_output_folder(path: str | Path, what: str) -> Path:
    """A folder that exists or can be created, and whose files can be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CondloraError(f"{what} {path} is a file, not a folder")
    existing = nearest_existing(path.absolute())
    if not existing.is_dir():
        raise CondloraError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CondloraError(f"{what} {path} cannot be written: {existing} is not writable")
    return path


def check_output_file(path: str | Path, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A file path that can be written (its folder made), with one of `suffixes` if given."""
    path = Path(path)
    if path.is_dir():
        raise CondloraError(f"{what} {path} is a folder: give a file name in it")
    if suffixes and path.suffix.lower() not in suffixes:
        found = f"extension '{path.suffix}'" if path.suffix else "no extension"
        raise CondloraError(f"{what} {path} has {found}: use one of {', '.join(suffixes)}")
    check_output_folder(path.parent, f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise CondloraError(f"{what} {path} cannot be written (no permission)")
    return path

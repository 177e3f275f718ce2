"""Atomic file writes: a temporary file beside the target, then a rename, so a reader never
sees a half-written artefact (weights, configs, reports, run records); with `sync`, the
file and its folder are flushed to disk first, so a power cut keeps the old or the new.
Also the JSON-lines logs (metrics.jsonl): appended a line at a time, truncated on resume;
output paths checked before any work (not under a file, not a folder where a file goes);
folder names from configs checked like experiment names."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _sync_folder(folder: Path) -> None:
    """fsync a folder (the rename in it); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | Path, write: Callable[[Path], None], sync: bool = False) -> Path:
    """write(tmp) then rename tmp over `path`; on failure the old file is untouched and the
    temporary one removed. An OSError becomes a one-line CondloraError."""
    path = Path(path)
    if path.is_dir():
        raise CondloraError(f"cannot write {path}: it is a folder")
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync:
            _sync_folder(path.parent)
    except OSError as err:
        raise CondloraError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str, sync: bool = False) -> Path:
    """A text file (UTF-8) written atomically; `sync` for run records and checkpoints' kin."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), sync)


def read_json_record(path: str | Path) -> dict | None:
    """A JSON object that condlora wrote and can rebuild (metrics, run records): None if it
    is missing, or damaged (a warning names it, and the caller makes it again)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        record = err
    if isinstance(record, dict):
        return record
    why = record if isinstance(record, Exception) else "not a JSON object"
    print(f"condlora: warning: {path} is damaged ({why}); it is made again", file=sys.stderr)
    return None


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines log, one per step (a step logged twice: the last wins).

    A line that is not a record with a step (torn by a kill in mid-write) is skipped.
    """
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as a line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the records up to `step` (a resumed run redoes the steps after it)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


KEPT_BYTES = 16 * 2**20  # undone_on_error keeps copies of files up to this size


@contextmanager
def undone_on_error(folder: str | Path) -> Iterator[None]:
    """On an error inside the block, `folder` is put back as it was: what appeared in it (or
    it, when new) removed, the files it held restored (copies in memory, of files up to
    KEPT_BYTES: configs, statistics, logs; larger ones must not be rewritten by the block).
    Not for an interrupt, which keeps what a resume needs."""
    folder = Path(folder).absolute()
    new = first_missing(folder)
    held = sorted(folder.rglob("*")) if folder.is_dir() else []
    files = {p: p.read_bytes() for p in held if p.is_file() and p.stat().st_size <= KEPT_BYTES}
    try:
        yield
    except Exception:
        if new is None:
            _put_back(folder, set(held), files)
        else:  # the folder is new, and maybe some of its parents
            shutil.rmtree(new, ignore_errors=True)
        raise


def _put_back(folder: Path, held: set[Path], files: dict[Path, bytes]) -> None:
    """Remove from `folder` what is not in `held`; give `files` their old bytes again."""
    for path in sorted(folder.rglob("*"), reverse=True):  # what a folder holds before it
        if path in held:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for path, data in files.items():
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)

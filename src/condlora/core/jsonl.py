"""JSON-lines logs keyed by step (metrics.jsonl, curve.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path


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

"""What long runs show and their reports share: progress bars, mean +- std, Markdown tables
and provenance.

Every generated report (quickstart, experiment, synthesis demo, `synth eval`) and every
benchmark states where its figures come from with `provenance()`: commit (and whether the
tree had changes), date, machine, thread count and torch version. Every long stage shows a
tqdm bar with its ETA the same way (`progress_bar`).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

SOURCE = Path(__file__).resolve().parent


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    if any(math.isnan(v) for v in vals):  # statistics.stdev fails on NaN
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def plus_minus(mean: float | None, std: float | None, spec: str = ".3f") -> str:
    """'mean ± std' in the format `spec`; '-' when there is no mean, 'n/a' when it is NaN."""
    if mean is None:
        return "-"
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{spec}} ± {std or 0.0:{spec}}"


def fmt(values: Iterable[float | None], digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± std' of the values times `scale`, or '-' when there are none."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return plus_minus(mean * scale, std * scale, f".{digits}f")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=SOURCE, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str:
    """The source tree's commit, with "+changes" when tracked files differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+changes" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """Where figures come from: commit, date, CPU, cores, threads, torch version."""
    return {
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def provenance_line() -> str:
    """The provenance as one Markdown line for a report's head."""
    p = provenance()
    return (
        f"*Made by condlora at commit {p['commit']} on {p['date']}: {p['cpu']}, "
        f"{p['cores']} cores, {p['threads']} torch threads, torch {p['torch']}.*"
    )


def progress_bar(progress: bool | dict, **defaults: object) -> tqdm:
    """A tqdm bar: off for False, `defaults` for True, `defaults` updated by a dict of options
    (desc, position, leave ...). Shown only on a terminal (tqdm's disable=None), so logs and
    captured output get no bar lines. Use it as a context manager so that it is closed."""
    options = dict(defaults)
    if isinstance(progress, dict):
        options.update(progress)
    return tqdm(disable=None if progress else True, **options)

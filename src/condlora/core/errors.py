"""Error types that the CLI turns into one clear line instead of a traceback, and interrupts.

SIGTERM (what `kill`, service managers and schedulers send) is handled as Ctrl-C is.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class CondloraError(Exception):
    """A user mistake (bad config, bad path, bad option): reported as one line."""


class ConfigError(CondloraError, ValueError):
    """A config key, value or override that does not fit the schema."""


class LoRAError(CondloraError, ValueError):
    """A LoRA method, target pattern or file that cannot be used."""


class DataError(CondloraError, ValueError):
    """A data path that is missing or a file that is malformed."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt("SIGTERM"), once: a repeated SIGTERM
    is ignored, so the cleanup it starts can finish. Outside the main thread, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

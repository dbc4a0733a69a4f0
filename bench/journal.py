"""Results written as they are produced: an append-only JSON-lines journal, and what a run that must not
waste itself needs beside it — knowing an error that breaks the CUDA context, and a per-row watchdog.

The benchmark session (bench/conftest.py) and the CUDA correctness tier (bench/cuda_tier.py) both append
one line per finished row or case; a crash or a hang loses only what was in flight, and a fresh process
resumes after the rows already in the journal.
"""

from __future__ import annotations

import json
import os
import sys
import threading


class Journal:
    """Append-only JSON lines, each written with one ``os.write`` on an O_APPEND descriptor: lines of
    several processes never interleave, and each is in the file (the kernel's page cache, which outlives
    the process) before the next row starts. A journal without a path writes nothing."""

    def __init__(self, path: str | None):
        self.path = path or None
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    def __bool__(self) -> bool:
        return self.fd is not None

    def write(self, record: dict) -> None:
        if self.fd is not None:
            os.write(self.fd, (json.dumps(record, default=str) + "\n").encode())


def read_records(path: str | None) -> list[dict]:
    """The records of a journal (a line cut short by a crash is skipped)."""
    if not path or not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


# An error whose text holds one of these leaves the CUDA context unusable: every later CUDA call of the
# process fails, so the rest must run in a fresh process.
_BROKEN_CONTEXT = ("illegal memory access", "illegal instruction", "unspecified launch failure", "misaligned address",
                   "device-side assert", "acceleratorerror", "an illegal", "cuda error: unknown error",
                   "cuda error: launch timeout")


def broken_context(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the process's CUDA context unusable."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in _BROKEN_CONTEXT)


class Watchdog:
    """Calls ``on_expire()`` and ends the process with ``exit_code`` if ``cancel()`` does not come within
    ``seconds`` of ``start()``: the one way out of a kernel that never returns."""

    def __init__(self, seconds: float, on_expire, exit_code: int):
        self.seconds, self.on_expire, self.exit_code = seconds, on_expire, exit_code
        self.timer: threading.Timer | None = None

    def _expire(self) -> None:
        try:
            self.on_expire()
        finally:
            sys.stderr.flush()
            os._exit(self.exit_code)

    def start(self) -> None:
        self.timer = threading.Timer(self.seconds, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

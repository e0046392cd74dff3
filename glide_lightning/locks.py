"""One writer per directory: an exclusive ``flock`` on ``<dir>/.lock`` naming its holder.

A run directory (training) and a data recipe's output directory each have one writer at a time.
The lock is ``fcntl.flock`` on a file inside the directory: the kernel releases it when the holding
process ends, however it ends (a SIGKILLed run never leaves a stale lock). The file itself stays;
it holds the holder's pid, host, command and start time, which a refused process prints. Standard
library only, so that the data recipes can use it without importing torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
_HELD: dict[str, DirectoryLock] = {}  # locks this process holds, by directory (re-entrant per process)


class LockBusy(RuntimeError):
    """Another process holds the directory's lock."""


class DirectoryLock:
    """Exclusive lock of ``directory`` for this process; ``what`` names the directory in messages."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "directory") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise :class:`LockBusy` naming the holder; a lock this process already
        holds on the same directory is returned as is."""
        key = os.path.realpath(self.directory)
        held = _HELD.get(key)
        if held is not None and held._fd is not None:
            return held
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockBusy(busy_message(self.what, self.directory, holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder_info()).encode())
        os.fsync(fd)
        self._fd = fd
        _HELD[key] = self
        return self

    def release(self) -> None:
        """Give the lock up (also happens when the process ends)."""
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.directory), None)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_free(directory: str | os.PathLike[str], what: str = "directory") -> None:
    """Raise :class:`LockBusy` if another process holds ``directory``'s lock (a look, not a hold)."""
    path = Path(directory) / LOCK_NAME
    if _HELD.get(os.path.realpath(directory)) is not None or not path.is_file():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise LockBusy(busy_message(what, directory, _read_holder(fd))) from None
    finally:
        os.close(fd)


def release_lock(directory: str | os.PathLike[str]) -> None:
    """Release this process's lock on ``directory``, if it holds one."""
    held = _HELD.get(os.path.realpath(directory))
    if held is not None:
        held.release()


def holder_info() -> dict[str, Any]:
    """What a refused process is told about this one."""
    command = " ".join(getattr(sys, "orig_argv", sys.argv))  # as typed: `python -m glide_lightning data …`
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def busy_message(what: str, directory: str | os.PathLike[str], holder: dict[str, Any] | None) -> str:
    return (f"{what} {directory} is in use by {describe(holder)}: wait for it to end or stop it (its lock goes "
            "away with it), or use another directory")


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has just started: no holder recorded yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command')})")


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        text = os.pread(fd, 65536, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None

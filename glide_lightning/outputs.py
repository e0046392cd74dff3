"""One rule for every command that writes a folder: its output never mixes with an earlier one's.

A folder a command writes (``sample``'s ``--out``, a data recipe's ``--out``, one evaluation setting's folder
of ``fid`` / ``sweep``, the files of a ``compare`` report) that already holds something is refused before any
model is loaded or any image made, in one line naming the folder, what is in it and the fix. With
``--overwrite`` the command first removes what it owns there (:attr:`OutputFolder.owned`: the files it writes)
and nothing else: a file it does not write stays, and the message says so instead of deleting it. Entries
matching :attr:`OutputFolder.kept` (a lock, an image cache keyed by its content) are neither counted nor
removed. Standard library only: the data recipes use it too.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OutputFolder", "OutputNotEmpty", "OutputNotWritable"]

log = logging.getLogger(__name__)


class OutputNotEmpty(FileExistsError):
    """An output folder holds files of an earlier run (or others the command does not write): a user's
    mistake, which the front door prints as one ``error:`` line (exit status 2), naming the fix."""


class OutputNotWritable(PermissionError):
    """An output folder cannot be written (a read-only file system, no permission, a file in the way): said
    before the work, as one ``error:`` line, instead of after it with the results lost."""


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in patterns)


def _listed(paths: Sequence[Path], most: int = 3) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:most]) + (", …" if len(names) > most else "")


def _count(paths: Sequence[Path]) -> str:
    return f"{len(paths)} file{'' if len(paths) == 1 else 's'}"


@dataclass(frozen=True)
class OutputFolder:
    """A folder one command writes, and what of it that command owns."""

    path: Path
    command: str
    """The command, in messages (``sample``; empty: no prefix, as the data recipes print their own)."""
    owned: tuple[str, ...]
    """Regular expressions (whole names) of the top-level entries, files or folders, the command writes."""
    kept: tuple[str, ...] = ()
    """Entries that neither block nor are removed: a lock, a cache keyed by its content."""
    shared: bool = False
    """Others write here too (a folder of reports, a sweep's folder of settings): only owned entries block."""
    overwrite_flag: str = "--overwrite true"
    """The fix as the command parses it: ``python -m glide_lightning``'s typed bool (data recipes: ``--overwrite``)."""
    label: str = ""
    """How messages name the folder (default ``--out PATH``)."""
    writers: str = ""
    """Who writes the owned files, in messages (default: ``command``; ``fid or sweep`` for a shared format)."""

    def found(self) -> tuple[list[Path], list[Path]]:
        """(the entries the command owns, the others), ``kept`` ones left out; both empty when absent."""
        if not self.path.is_dir():
            return [], []
        entries = sorted(p for p in self.path.iterdir() if not _matches(p.name, self.kept))
        ours = [p for p in entries if _matches(p.name, self.owned)]
        return ours, [] if self.shared else [p for p in entries if p not in ours]

    def check(self, overwrite: bool) -> None:
        """Raise :class:`OutputNotEmpty` when the folder is not a folder, or holds entries (owned ones, and
        others unless ``shared``) and ``overwrite`` is off. Looks only: call it first, before the work."""
        where = (f"{self.command}: " if self.command else "") + (self.label or f"--out {self.path}")
        if self.path.exists() and not self.path.is_dir():
            raise OutputNotEmpty(f"{where} exists and is not a directory: choose another --out")
        self._check_writable(where)
        ours, others = self.found()
        if overwrite or not (ours or others):
            return
        writers = self.writers or self.command
        held = [f"the output of an earlier {writers}: {_count(ours)} ({_listed(ours)})"] if ours else []
        held += [f"{_count(others)} it does not write ({_listed(others)})"] if others else []
        stay = " (the other files stay)" if others else ""
        remedy = (f"pass {self.overwrite_flag} to delete that output first{stay}" if ours
                  else f"pass {self.overwrite_flag} to write there anyway (nothing is deleted)")
        raise OutputNotEmpty(f"{where} already holds {', and '.join(held)}; {remedy}, or choose another --out")

    def _check_writable(self, where: str) -> None:
        """Create (and at once lose: an unnamed temporary file) a file in the folder, or in its nearest existing
        parent when it does not exist yet: the one test that also holds for root and read-only mounts."""
        existing = self.path.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise OutputNotWritable(f"{where} cannot be created: {existing} is a file, not a folder; choose another "
                                    f"--out")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            raise OutputNotWritable(f"{where} cannot be written ({error.strerror or error} in {existing}): choose a "
                                    f"writable --out") from None

    def claim(self, overwrite: bool) -> Path:
        """:meth:`check`, then remove the entries the command owns and create the folder; returns its path.
        Call it just before writing (the removal is what ``overwrite`` asked for)."""
        self.check(overwrite)
        ours, others = self.found()
        for path in ours:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if ours:
            log.info("removed the output of an earlier %s from %s: %s%s", self.writers or self.command, self.path,
                     _count(ours), f" (kept {_count(others)} it does not write: {_listed(others)})" if others else "")
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

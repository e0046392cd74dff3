"""Path options that name inputs (a checkpoint, a run folder, a caption list, …): declared on a command's dataclass
field with ``field(..., metadata=input_path(hint))`` and checked in one place, :func:`missing_input`, which the
front door (:func:`glide_lightning.commands.main`) runs after parsing, before a command runs or loads anything.
A path that names nothing on disk is one line, ``--<option>: <path> does not exist``, with the folders or files
that do exist where it points and the field's hint (how such an input is made). Output paths (``--out``,
``--cache_dir``) and values that may be a name instead of a path (a hub name, a pretrained tag) are not inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["INPUT_PATH", "RUN_HINT", "InputPath", "input_path", "missing_input"]

INPUT_PATH = "glide_lightning.input_path"
"""The dataclass field metadata key of an input path option."""
RUN_HINT = "`make train EXP=<experiment>` creates runs/<experiment>"
"""How a run folder is made: the hint of the options that take one."""


@dataclass(frozen=True)
class InputPath:
    """An option whose value (a string, or each string of a list) must name an existing file or folder."""

    hint: str = ""
    """How such an input is made or where it is found, said after the paths that do exist."""
    run_folders: bool = False
    """The value is a run folder (``runs/<name>``): the hint lists the run folders beside it."""


def input_path(hint: str = "", *, run_folders: bool = False) -> dict[str, InputPath]:
    """The field metadata of an input path option: ``ckpt: str = field(metadata=input_path("how to make one"))``."""
    return {INPUT_PATH: InputPath(hint, run_folders)}


def missing_input(command: Any, declared: Mapping[str, InputPath] | None = None) -> str | None:
    """The error of the first input path option of the dataclass ``command`` that names nothing on disk
    (``--<option>: <path> does not exist (…)``), or None when every one exists (or is not given). The options
    are the fields with :func:`input_path` metadata, and ``declared`` (field name → :class:`InputPath`) for
    dataclasses that declare none themselves."""
    for f in dataclasses.fields(command):
        spec = f.metadata.get(INPUT_PATH) or (declared or {}).get(f.name)
        if spec is None:
            continue
        value = getattr(command, f.name)
        for path in [value] if isinstance(value, (str, Path)) else list(value or []):
            if str(path) and not Path(path).exists():
                hints = [h for h in (_what_is_there(Path(path), spec.run_folders), spec.hint) if h]
                return f"--{f.name}: {path} does not exist" + (f" ({'; '.join(hints)})" if hints else "")
    return None


def _what_is_there(path: Path, run_folders: bool, shown: int = 8) -> str:
    """What the nearest existing folder above ``path`` holds (its run folders for ``run_folders``); nothing for
    the file system's root or the working directory, whose listings would not help."""
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:  # (".": its own parent, even where cwd is gone)
        folder = folder.parent
    if folder in (Path("."), Path("/")) or folder.resolve() in (Path.cwd(), Path("/")):
        return ""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return ""
    if run_folders:
        runs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        return (f"the run folders in {folder}/ are {', '.join(runs[:shown])}{', …' if len(runs) > shown else ''}"
                if runs else f"{folder}/ holds no run folder")
    names = [e.name + ("/" if e.is_dir() else "") for e in entries if not e.name.startswith(".")]
    if not names:
        return f"{folder}/ is empty"
    return f"{folder}/ holds {', '.join(names[:shown])}{', …' if len(names) > shown else ''}"

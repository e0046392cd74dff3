"""wandb offline as a user without an API key has it, for the tests that write runs in their own process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def offline_wandb(root: Path, chdir: bool = False) -> Iterator[None]:
    """wandb offline and silent, its folders under ``root`` (``WANDB_DATA_DIR``: the Tables' staged artifacts, and
    the cache and config folders), ``root`` the working directory with ``chdir``. On leaving, wandb is torn down as
    at a process's end: its service has then written every run's file (wandb 0.31's ``finish()`` may return before
    an offline run's ``.wandb`` file is complete), so the runs can be read back."""
    import wandb

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            patch.setenv(var, str(root / var))
        if chdir:
            patch.chdir(root)
        try:
            yield
        finally:
            wandb.teardown()

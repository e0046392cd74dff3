"""The run's checkpoints: ``step<N>.ckpt`` every N optimizer steps and one ``last.ckpt``, always the
newest state.

Lightning's ModelCheckpoint refreshes ``last`` only when it saves a periodic checkpoint (and at the
end of training only if it saved nothing before), and versions it (``last-v1.ckpt``, …) when a file
of that name exists that it did not write. Here every stop (the end of ``max_steps``, ``max_epochs``,
``max_time``, a signal, see :class:`~glide_lightning.callbacks.GracefulInterrupt`) saves
``last.ckpt`` at the step the run reached, through this one callback, with the live weights and
the EMA as they are (before Lightning's EMA callback copies its average over the live weights at
the end of training), and ``last.ckpt`` is never versioned.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``<dirpath>/step<N>.ckpt`` every ``every_n_train_steps`` optimizer steps (all kept) and
    ``<dirpath>/last.ckpt`` at each of them and wherever training stops.

    ``resumed_from``: the checkpoint this session resumes from, if any. Lightning warns when ``dirpath``
    "exists and is not empty"; a run resumed from one of its own checkpoints writes on into their
    directory as it should, so that warning is kept only where this session did not come from there
    (a ``--ckpt_path`` elsewhere, e.g. another run's, with checkpoints of its own already here)."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int, resumed_from: str | Path | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="step{step:08d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_top_k=-1, save_last=True,
                         enable_version_counter=False)
        self._last_saved_step: int | None = None
        self._start_step: int | None = None
        self.resumes_here = resumed_from is not None and Path(resumed_from).resolve().parent == Path(dirpath).resolve()
        """Whether this session resumes from a checkpoint of ``dirpath`` itself."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        with quiet_about_own_checkpoints(self.resumes_here):
            super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step

    def save_last_now(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` at the current step unless it already holds it (every rank calls this)."""
        if trainer.fast_dev_run or trainer.global_step in (self._last_saved_step, self._start_step):
            return  # nothing new since the last save (or since the checkpoint this session started from)
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Where training stops (``max_steps``, ``max_epochs``, ``max_time``, a signal), save
        ``last.ckpt`` here, at the end of the last epoch, and not in ``on_train_end``: there
        Lightning's ``WeightAveraging`` has already copied the EMA weights over the live ones, and a
        run resumed from that checkpoint would go on training the EMA instead of its own weights."""
        super().on_train_epoch_end(trainer, pl_module)
        if fit_ends_after_this_epoch(trainer):
            self.save_last_now(trainer)


def fit_ends_after_this_epoch(trainer: L.Trainer) -> bool:
    """In ``on_train_epoch_end``: whether the fit loop stops after this epoch (Lightning's own check,
    ``fit_loop.done``, changes the loop's state when it answers, so it is not called here)."""
    loop = trainer.fit_loop
    max_steps, max_epochs = loop.max_steps, loop.max_epochs
    return (trainer.should_stop or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps)
            or (max_epochs is not None and max_epochs >= 0 and loop.epoch_progress.current.processed >= max_epochs))


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint keeping the ``save_top_k`` best checkpoints by ``monitor`` (e.g.
    ``val/loss``, the validation P2 loss; ``val/fid@5``), in ``<run dir>/checkpoints/best/`` unless
    ``dirpath`` says otherwise (the run's own directory, whatever ``run.root`` and ``run.name``; not
    among the checkpoints a resume picks from). Other arguments are ModelCheckpoint's."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", save_top_k: int = 1, dirpath: str | None = None,
                 filename: str | None = None) -> None:
        safe = monitor.replace("/", "_").replace("@", "_at_")
        super().__init__(dirpath=dirpath, monitor=monitor, mode=mode, save_top_k=save_top_k,
                         filename=filename or f"best_{safe}-step{{step:08d}}", auto_insert_metric_name=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        own_dir = self.dirpath is None
        if own_dir:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints" / "best")
        # the run's own best/ holds the best checkpoints of the run it resumes: not worth a warning
        resumes_here = own_dir and any(getattr(c, "resumes_here", False) for c in trainer.callbacks)
        with quiet_about_own_checkpoints(resumes_here):
            super().setup(trainer, pl_module, stage)


@contextmanager
def quiet_about_own_checkpoints(quiet: bool) -> Iterator[None]:
    """Where ``quiet``: without ModelCheckpoint.setup's "Checkpoint directory … exists and is not empty" (a
    resume writes on into the directory of the checkpoint it resumed from, by design)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        yield

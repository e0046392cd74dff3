"""Stop cleanly on SIGINT / SIGTERM: finish the optimizer step, skip validation, save, exit.

Ctrl-C would otherwise raise KeyboardInterrupt wherever the program is, possibly half-way through
an optimizer step, and Lightning's own SIGTERM handling stops after any micro-batch, possibly
half-way through a gradient accumulation. This callback takes both signals over while training
runs: the first one asks the run to stop after the current optimizer step (every rank at the same
step), without the validation Lightning runs when a run stops early and without sample grids;
``last.ckpt`` is then saved once, by the run's checkpoint callback when training ends (see
:class:`~glide_lightning.callbacks.checkpoint.RunCheckpoint`). A second signal interrupts at once.
Only the main process of rank 0 speaks: DataLoader workers forked from it inherit the handler and
ignore the signal (the main process ends them).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch

from glide_lightning.callbacks.steps import OptimizerStepCallback

log = logging.getLogger(__name__)


class GracefulInterrupt(OptimizerStepCallback):
    """On the first SIGINT or SIGTERM, stop after the current optimizer step; a second one aborts."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid: int | None = None
        self._speaks = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # installed here, after Lightning installs its SIGTERM handler, so that this one replaces it
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        self._pid, self._speaks = os.getpid(), trainer.is_global_zero
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker: the main process decides, and ends the workers
        if self.requested is not None:  # second signal: give up waiting
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = signum
        if self._speaks:
            log.warning("received %s: stopping after this optimizer step and saving last.ckpt, without validation "
                        "or samples (send it again to abort now)", signal.Signals(signum).name)

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        requested = torch.tensor(float(self.requested is not None), device=pl_module.device)
        if trainer.world_size > 1:  # every rank stops at the same step
            requested = trainer.strategy.reduce(requested, reduce_op="max")
        if requested.item():
            trainer.should_stop = True
            # Lightning validates a run that stops early; an interrupted run must not wait for that
            trainer.limit_val_batches = 0
            self.stopped_at = trainer.global_step
            if trainer.is_global_zero:
                log.warning("stopped at step %d", trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()  # after on_train_end, so that the final save is covered too

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

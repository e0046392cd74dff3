"""Stop cleanly on SIGINT / SIGTERM: finish the running step, save a resumable checkpoint, exit.

Lightning already turns SIGTERM into a stop between steps, but Ctrl-C raises KeyboardInterrupt
wherever the program is, possibly half-way through an optimizer step, and its checkpoint would then
hold a half-updated model. This callback catches the first SIGINT (and SIGTERM), lets the step
finish, writes ``last.ckpt`` and stops the trainer; a second signal interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class GracefulInterrupt(L.Callback):
    """On the first SIGINT or SIGTERM, save ``<dirpath>/last.ckpt`` after the current step and stop.

    Args:
        dirpath: directory of the checkpoint (the run's ``checkpoints/``).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # second signal: give up waiting
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = signum
        log.warning("received %s: finishing this step, then saving %s and stopping (send it again to abort now)",
                    signal.Signals(signum).name, self.dirpath / "last.ckpt")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        requested = torch.tensor(float(self.requested is not None), device=pl_module.device)
        if trainer.world_size > 1:  # every rank stops at the same step
            requested = trainer.strategy.reduce(requested, reduce_op="max")
        if requested.item():
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            log.warning("saved a resumable checkpoint at step %d: %s", trainer.global_step, self.dirpath / "last.ckpt")
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning stops on SIGTERM between steps by raising SIGTERMException (a SystemExit): if
        # that came before this step's on_train_batch_end, save here (the state is between steps)
        if self.requested is not None and isinstance(exception, SystemExit) and not trainer.should_stop:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

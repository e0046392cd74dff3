"""Stop cleanly on SIGINT / SIGTERM / SIGUSR1: finish the optimizer step, skip validation, save, exit.

Ctrl-C would otherwise raise KeyboardInterrupt wherever the program is, possibly half-way through
an optimizer step, and Lightning's own SIGTERM handling stops after any micro-batch, possibly
half-way through a gradient accumulation. This callback takes both signals over while training
runs: the first one asks the run to stop after the current optimizer step (every rank at the same
step), without the validation Lightning runs when a run stops early and without sample grids;
``last.ckpt`` is then saved once, by the run's checkpoint callback when training ends (see
:class:`~glide_lightning.callbacks.checkpoint.RunCheckpoint`). A second signal interrupts at once.
Only the main process of rank 0 speaks: DataLoader workers forked from it inherit the handler and
ignore the signal (the main process ends them).

**SLURM.** ``sbatch --signal=USR1@180`` sends the *requeue signal* (SIGUSR1) to every process of the
job some time before its time limit: the run stops and saves as above, then rank 0 requeues the job
(``scontrol requeue $SLURM_JOB_ID``, as Lightning's own SLURM handler does), and the requeued job's
``fit`` resumes from ``last.ckpt``. A stopped ``fit`` exits with ``128 + signal`` (130 after Ctrl-C), as a
command a signal ends does, so that a chained command (``make train && make fid``) does not run; a requeued one
exits 0. Taking the signal over keeps ``last.ckpt`` the one checkpoint a
run resumes from: Lightning's handler would save a separate ``hpc_ckpt_N.ckpt`` mid-step, which an
explicit resume path overrides. SIGTERM (preemption; ``scancel``) saves without requeueing: SLURM
requeues preempted jobs itself where the partition says so. See ``scripts/slurm_train.sbatch``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch

from glide_lightning.callbacks.steps import OptimizerStepCallback

log = logging.getLogger(__name__)


class GracefulInterrupt(OptimizerStepCallback):
    """On the first SIGINT, SIGTERM or SIGUSR1, stop after the current optimizer step; a second one
    aborts. After a SIGUSR1 (the requeue signal) under SLURM, rank 0 requeues the job once saved."""

    REQUEUE_SIGNAL = signal.SIGUSR1

    def __init__(self) -> None:
        self.requested: int | None = None
        self.stopped_at: int | None = None
        self.finished = False
        self.requeued = False
        self._original: dict[int, Any] = {}
        self._active = False
        self._pid: int | None = None
        self._speaks = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the DataLoader workers fork, so that they inherit this handler (and ignore the signal
        # rather than die of it while the main process finishes its step)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        self._pid, self._speaks, self._active = os.getpid(), trainer.is_global_zero, True
        # (installed before Lightning registers its SLURM requeue handler, which then leaves SIGUSR1 to us)
        for signum in (signal.SIGINT, signal.SIGTERM, self.REQUEUE_SIGNAL):
            self._original[signum] = signal.signal(signum, self._handle)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # again: Lightning has meanwhile wrapped this SIGTERM handler in its own, which stops after any
        # micro-batch (mid gradient accumulation); its teardown puts this one back
        if self._active:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker: the main process decides, and ends the workers
        if not self._active or self.requested is not None:  # after the fit, or a second signal: act at once
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
            self.finished = 0 < trainer.max_steps <= trainer.global_step  # the signal came in the last step
            if trainer.is_global_zero:
                log.warning("stopped at step %d", trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()  # after on_train_end, so that the final save is covered too
        if self.requested == self.REQUEUE_SIGNAL and trainer.is_global_zero:
            self.requeued = requeue_slurm_job()

    @property
    def interrupted(self) -> bool:
        """Whether a signal stopped the fit before ``max_steps`` (one that came in the last step did not)."""
        return self.stopped_at is not None and not self.finished

    @property
    def exit_status(self) -> int | None:
        """The exit status of rank 0's process after a fit this callback stopped (None: it did not, or another
        rank): ``128 + signal``, the shell's convention for a command a signal ended (130 for Ctrl-C, 143 for
        SIGTERM), so that ``make train && make fid`` stops there; 0 once the job is requeued (SLURM runs it again).
        The other ranks exit 0: under ``srun --kill-on-bad-exit`` one of them exiting first with an error would
        kill rank 0 before it requeues the job."""
        if not self.interrupted or self.requested is None or not self._speaks:
            return None
        return 0 if self.requeued else 128 + int(self.requested)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        # (Lightning's teardown after an exception may put this handler back: inactive, it passes signals on)
        self._active = False
        for signum, handler in self._original.items():
            signal.signal(signum, handler)


def requeue_slurm_job() -> bool:
    """Puts this SLURM job back in the queue (``scontrol requeue``; an array task by its
    ``<array job>_<task>`` id). Returns whether it was requeued; outside SLURM, or if ``scontrol``
    fails, it says so in the log and returns False (the run has saved ``last.ckpt`` either way)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job or not re.fullmatch(r"[0-9_]+", job):
        log.warning("received the requeue signal outside a SLURM job: stopped and saved last.ckpt, nothing to requeue")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("could not requeue SLURM job %s (%s): resubmit it to resume from last.ckpt", job, error)
        return False
    if result.returncode != 0:
        log.warning("`scontrol requeue %s` failed (%s): resubmit the job to resume from last.ckpt", job,
                    result.stderr.strip() or f"exit {result.returncode}")
        return False
    log.warning("requeued SLURM job %s: it resumes from last.ckpt when it starts again", job)
    return True

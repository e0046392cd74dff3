"""Progress a person can read in a log file: plain lines, not a progress bar.

Under ``nohup``, SLURM or ``| tee``, stdout is not a terminal and Lightning's progress bar writes carriage-return
frames that a log shows as one endless line (or nothing until the end). :class:`ProgressLog` writes one plain
line per interval instead::

    step 120/2000 (6.0%) · loss 0.0312 · 14.2 img/s · elapsed 0:02:10 · ETA 0:34:05

and, when training ends, which checkpoint holds the result and the commands to sample and evaluate it. The rate
and the ETA count this session's optimizer steps and images (a resumed run's earlier steps are not timed again).

On a terminal, :class:`StepProgressBar` is Lightning's rich bar counting what these runs count, optimizer steps out
of ``max_steps`` (Lightning's counts batches of an epoch, "Epoch 0/-2" for a run without ``max_epochs``), and
:class:`ModelSummary` Lightning's rich summary without the columns of example-input shapes.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from torch.nn.attention import SDPBackend, sdpa_kernel

from glide_lightning.callbacks.steps import OptimizerStepCallback

log = logging.getLogger("glide_lightning")

__all__ = ["ModelSummary", "ProgressLog", "StepProgressBar", "progress_line"]


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds))) if math.isfinite(seconds) else "?"


def progress_line(step: int, max_steps: int | None, loss: float | None, images_per_s: float | None,
                  elapsed_s: float, steps_per_s: float | None) -> str:
    """``step 120/2000 (6.0%) · loss 0.0312 · 14.2 img/s · elapsed 0:02:10 · ETA 0:34:05`` (parts left out when
    unknown: no ``max_steps``, no loss logged yet, no rate yet)."""
    parts = [f"step {step}/{max_steps} ({100 * step / max_steps:.1f}%)" if max_steps else f"step {step}"]
    if loss is not None and math.isfinite(loss):
        parts.append(f"loss {loss:.4g}")
    if images_per_s:
        parts.append(f"{images_per_s:.1f} img/s")
    parts.append(f"elapsed {_clock(elapsed_s)}")
    if max_steps and steps_per_s:
        parts.append(f"ETA {_clock((max_steps - step) / steps_per_s)}")
    return " · ".join(parts)


class ProgressLog(OptimizerStepCallback):
    """Logs :func:`progress_line` every ``every_s`` seconds of training (and at the first step), then a closing
    line naming the checkpoint to use and the ``make sample`` / ``make fid`` commands for it.

    Args:
        every_s: seconds between two lines (> 0).
        only_without_terminal: write the periodic lines only when stdout is not a terminal (the progress bar
            shows the same on one); the closing line is always written.
        run_dir: the run's directory (its ``checkpoints/last.ckpt`` is named at the end); None: not named.
        experiment: the experiment's name, for the ``make`` commands of the closing line.
    """

    def __init__(self, every_s: float = 30.0, only_without_terminal: bool = True, run_dir: str | None = None,
                 experiment: str | None = None) -> None:
        if every_s <= 0:
            raise ValueError(f"ProgressLog every_s must be > 0 seconds, got {every_s}")
        self.every_s, self.only_without_terminal = every_s, only_without_terminal
        self.run_dir, self.experiment = run_dir, experiment
        self._start: tuple[float, int, int] | None = None  # (time, step, images) when this session started
        self._last_line = -math.inf
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step, 0)
        self._images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if isinstance(batch, dict) and "image" in batch:
            self._images += int(batch["image"].shape[0]) * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or (self.only_without_terminal and sys.stdout.isatty()):
            return
        now = time.monotonic()
        if self._start is None or (now - self._last_line < self.every_s and trainer.global_step != 1 + self._start[1]):
            return
        self._last_line = now
        log.info("%s", self.line(trainer, now))

    def line(self, trainer: L.Trainer, now: float) -> str:
        """The progress line at ``now`` (``time.monotonic()``)."""
        assert self._start is not None
        started, step0, _ = self._start
        elapsed = max(now - started, 1e-9)
        steps = trainer.global_step - step0
        loss = trainer.callback_metrics.get("train/loss")
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return progress_line(trainer.global_step, max_steps, float(loss) if loss is not None else None,
                             self._images / elapsed if steps else None, elapsed, steps / elapsed if steps else None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._start is not None:
            log.info("%s", self.line(trainer, time.monotonic()))
        if self.run_dir is None:
            return
        last = Path(self.run_dir) / "checkpoints" / "last.ckpt"
        if any(getattr(c, "interrupted", False) for c in trainer.callbacks):  # GracefulInterrupt stopped it
            log.info("training interrupted at step %d of %s: its state is saved to %s; the same command resumes it",
                     trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else "?", last)
            return
        log.info("training stopped at step %d: %s. Sample it: make sample ARGS='--ckpt %s --prompt \"...\"'; "
                 "evaluate it: %s", trainer.global_step,
                 f"its weights are in {last}" if last.exists() else f"checkpoints in {last.parent}", last,
                 evaluate_command(Path(self.run_dir), self.experiment))


def evaluate_command(run_dir: Path, experiment: str | None) -> str:
    """The command that evaluates the run in ``run_dir``: ``make fid EXP=<experiment>`` (with ``RUN=`` the run's
    path under ``./runs`` where it is not ``runs/<experiment>``, e.g. an ablation's ``RUN=minig/hybrid_seed0``), or,
    for a run outside ``./runs`` (which ``make`` does not reach), ``python -m glide_lightning fid --run_dir``."""
    try:
        run = run_dir.resolve().relative_to(Path("runs").resolve()).as_posix()
    except ValueError:
        return f"python -m glide_lightning fid --run_dir {run_dir}"
    hint = f" RUN={run}" if experiment and run != experiment else ""
    return f"make fid EXP={experiment or '<experiment>'}{hint}"


class StepProgressBar(RichProgressBar):
    """One bar for the whole run: optimizer steps done out of ``max_steps`` (a resumed run starts where it
    stopped), rich's elapsed time and time remaining, and ``train/loss`` and images per second beside it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._started: tuple[float, int] | None = None  # (time, images) at this session's first batch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(total or float("inf"), "step")
        self.progress.update(self.train_progress_bar_id, total=total, completed=trainer.global_step)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        images = int(batch["image"].shape[0]) * trainer.world_size if isinstance(batch, dict) and "image" in batch else 0
        if self._started is None:
            self._started = (time.monotonic(), 0)
        else:
            self._started = (self._started[0], self._started[1] + images)
        if self.train_progress_bar_id is None:
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """``train/loss`` (and what else is logged to the bar) and ``img/s`` since this session's first batch;
        not Lightning's ``v_num``, which says nothing to a person."""
        metrics = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        if self._started is not None and self._started[1]:
            metrics["img/s"] = f"{self._started[1] / max(time.monotonic() - self._started[0], 1e-9):.1f}"
        return metrics


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary, whose FLOPs column counts one forward pass of the module's
    ``example_input_array`` (one image; attention included on the CPU too), without that input's "In sizes" /
    "Out sizes" columns."""

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        # torch's FLOP counter has no formula for the CPU's fused attention kernel (it would count no attention at
        # all): the summary's one forward pass runs attention as the plain matmuls it counts, on every device
        with sdpa_kernel(SDPBackend.MATH):
            return super()._summary(trainer, pl_module)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], *args: Any, **kwargs: Any) -> None:
        kept = [(name, values) for name, values in summary_data if name not in ("In sizes", "Out sizes")]
        RichModelSummary.summarize(kept, *args, **kwargs)

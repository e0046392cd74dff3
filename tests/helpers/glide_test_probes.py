"""Callbacks that tests attach to real CLI runs (in subprocesses) to observe what happened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class KeyRecorder(L.Callback):
    """Writes the sample keys of every training batch to ``<out_dir>/keys_rank<r>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.keys.append(list(batch["key"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"keys_rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


class StepClock(L.Callback):
    """Runs Lightning's Timer (``trainer.max_time``) on a clock that advances ``seconds_per_step`` at each
    training batch and stands still otherwise: a run then stops at the same step however fast the machine is
    (the step where ``max_time`` runs out, e.g. step 4 of 4 s steps for 15 s)."""

    def __init__(self, seconds_per_step: float) -> None:
        from types import SimpleNamespace

        from lightning.pytorch.callbacks import timer

        self.now = 0.0
        self.seconds_per_step = seconds_per_step
        timer.time = SimpleNamespace(monotonic=lambda: self.now)  # the Timer's one use of its `time` module

    def on_train_batch_start(self, *args: Any) -> None:
        self.now += self.seconds_per_step


class StateProbe(L.Callback):
    """At the start of training (after a resume has restored everything), saves the step, the model,
    the EMA model, the optimizer and (just before the first step) the RNG state to
    ``<out_dir>/start_<step>.pt``."""

    def __init__(self, out_dir: str, sleep_per_step: float = 0.0) -> None:
        self.out_dir = Path(out_dir)
        self.sleep_per_step = sleep_per_step
        self.pending: tuple[dict[str, Any], Path] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, L.pytorch.callbacks.WeightAveraging))
        state = {
            "global_step": trainer.global_step,
            "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "ema": {k: v.clone() for k, v in ema._average_model.module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pending = (state, self.out_dir / f"start_{trainer.global_step}.pt")

    def on_train_batch_start(self, *args: Any) -> None:
        if self.pending is not None:  # the RNG state the first step starts from
            state, path = self.pending
            torch.save({**state, "torch_rng": torch.get_rng_state()}, path)
            self.pending = None

    def on_train_batch_end(self, *args: Any) -> None:
        if self.sleep_per_step:
            import time

            time.sleep(self.sleep_per_step)  # widens the window in which the test interrupts the run


class StepKeys(L.Callback):
    """Appends ``{"step": <optimizer step about to run>, "keys": [...]}`` for every training batch to
    ``<out_file>`` (a JSON line each, flushed at once, so a killed run leaves what it trained on);
    ``{rank}`` in ``out_file`` becomes the global rank."""

    def __init__(self, out_file: str) -> None:
        self.out_file = out_file

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        out_file = Path(self.out_file.format(rank=trainer.global_rank))
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with out_file.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step + 1, "keys": list(batch["key"])}) + "\n")


class KillSwitch(L.Callback):
    """SIGKILLs its own process in the middle of optimizer step ``after_step + 1`` (after the forward
    pass, before the weights change): a preemption with no chance to save anything."""

    def __init__(self, after_step: int) -> None:
        self.after_step = after_step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        if trainer.global_step == self.after_step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class PoisonBatch(L.Callback):
    """Makes the images of optimizer step ``step`` (1-based) NaN on rank ``rank`` only (a corrupt batch)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            batch["image"][:] = float("nan")

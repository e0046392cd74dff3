"""Callbacks whose work is triggered by optimizer steps, not by micro-batches.

Lightning calls ``on_train_batch_end`` after every micro-batch: under
``accumulate_grad_batches: k`` that is k times per optimizer step, k - 1 of them with
``global_step`` unchanged and a gradient half accumulated. :class:`OptimizerStepCallback` calls
``on_optimizer_step_end`` once, after the micro-batch that completed an optimizer step.
"""

from __future__ import annotations

from typing import Any

import lightning as L


class OptimizerStepCallback(L.Callback):
    """Base of step-triggered callbacks: implement :meth:`on_optimizer_step_end`."""

    _step_at_batch_start: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._step_at_batch_start:  # this micro-batch completed an optimizer step
            self.on_optimizer_step_end(trainer, pl_module)

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called once per optimizer step, after its last micro-batch (``trainer.global_step`` counts it)."""

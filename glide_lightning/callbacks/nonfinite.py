"""Keep non-finite losses out of the weights and out of every checkpoint.

An optimizer step whose loss or gradients are not finite (NaN or ±inf, on any rank) is skipped, and
skipped everywhere a step leaves a trace in training: the weights and AdamW's moments and step count stay
as they were (the gradients are dropped), the LR schedule does not advance (its state and the optimizer's
LR are restored after Lightning steps it), and no EMA / weight-averaging callback averages (Lightning's
``WeightAveraging`` family, :class:`~glide_lightning.callbacks.WarmupEMA` included: no update, and its
warm-up count ``n_averaged`` does not move). A run that met a bad batch therefore holds, after its next
good steps, exactly the weights, optimizer, LR and EMA of a run that never saw that batch.

What does count a skipped step: Lightning's ``global_step`` (it counts optimizer steps attempted), hence
``trainer.max_steps``, the checkpoint cadence (``run.checkpoint_every_n_steps``), ``log_every_n_steps``
and the data stream, which moves past the bad batch. So a run with k skipped steps ends at ``max_steps``
having made ``max_steps − k`` updates.

Under ``16-mixed`` the GradScaler skips steps whose scaled gradients overflow, as part of calibrating
its scale (typically a few steps at the start): those are skipped everywhere in the same way, counted as
``train/overflow_steps``, and never stop the run; a non-finite *loss* is a non-finite step under every
precision. Skipped steps are logged as ``train/nonfinite_steps`` (a running total over the run). After
``max_in_a_row`` non-finite steps in a row the run stops with :class:`NonFiniteLossError`, naming the
steps, the loss terms and the timesteps, and writes nothing: the newest checkpoint stays the last good
one. A checkpoint whose weights are not finite is refused outright, whatever put them there.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

MAX_SHOWN = 16  # per-sample values shown per term in the error


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients for too many optimizer steps in a row."""


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with a non-finite loss or gradient; stop after ``max_in_a_row`` in a row.

    The module may expose ``step_terms`` (its last micro-batch's per-sample loss terms and ``t``)
    for the error message. :class:`~glide_lightning.module.GlideModule` adds this callback itself
    (``max_nonfinite_steps``), so that every Trainer that fits it has it.
    """

    def __init__(self, max_in_a_row: int = 5) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.total = 0  # skipped steps over the whole run (kept in checkpoints)
        self.in_a_row = 0
        self.first_in_row: int | None = None
        self.overflows = 0  # steps the 16-mixed GradScaler skipped over the whole run (kept in checkpoints)
        self._losses: list[tuple[Tensor, dict[str, Tensor]]] = []  # micro-batches since the last step
        self._held_schedules: list[tuple[Any, dict[str, Any], list[float]]] | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        terms = getattr(pl_module, "step_terms", None) or {}
        self._losses.append((loss.detach(), terms))  # no device sync here: checked once per step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        device = pl_module.device
        loss_finite = torch.stack([torch.isfinite(loss).all() for loss, _ in losses]).all().to(device) if losses \
            else torch.tensor(True, device=device)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads_finite = torch.isfinite(torch.nn.utils.get_total_norm(grads)).to(device) if grads else \
            torch.tensor(True, device=device)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # [non-finite loss or unscaled gradients, scaled gradients that overflowed (the scaler skips those itself)]
        flags = torch.stack([~loss_finite | (~grads_finite & (scaler is None)),
                             loss_finite & ~grads_finite & (scaler is not None)]).float()
        if trainer.world_size > 1:  # every rank skips the same steps, or their weights drift apart
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        bad, overflow = (bool(x) for x in flags.tolist())
        if bad:
            self.drop_update(trainer, optimizer, scaler)
            self.total += 1
            self.in_a_row += 1
            self.first_in_row = trainer.global_step + 1 if self.in_a_row == 1 else self.first_in_row
        else:
            self.in_a_row, self.first_in_row = 0, None
            self.overflows += overflow
        if bad or overflow:
            self.hold_schedules(trainer)
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False, batch_size=1)
        if scaler is not None:
            pl_module.log("train/overflow_steps", float(self.overflows), on_step=True, on_epoch=False, batch_size=1)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(self.report(trainer, losses))

    @staticmethod
    def drop_update(trainer: L.Trainer, optimizer: Any, scaler: Any) -> None:
        """Make the coming ``optimizer.step`` change nothing: parameters without gradients are left alone by
        AdamW (weights, moments and step count). A fused optimizer under a GradScaler checks the gradients
        inside its step instead (the scaler has not unscaled them yet): non-finite ones make it skip."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            for p in params:
                p.grad.fill_(float("nan"))
            return
        for p in params:
            p.grad = None

    def hold_schedules(self, trainer: L.Trainer) -> None:
        """Keep this (skipped) step out of the step-counted schedules: no weight-averaging callback averages at
        it, and the LR schedulers' state (restored in :meth:`on_train_batch_end`, after Lightning steps them)."""
        step_after = trainer.global_step + 1  # Lightning counts the attempted step once it returns
        for callback in trainer.callbacks:
            if isinstance(callback, WeightAveraging):
                # WeightAveraging averages at a global_step above the last one it averaged at: mark this one done
                callback._latest_update_step = max(callback._latest_update_step, step_after)
        self._held_schedules = [
            (config.scheduler, copy.deepcopy(config.scheduler.state_dict()),
             [group["lr"] for group in config.scheduler.optimizer.param_groups])
            for config in trainer.lr_scheduler_configs]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        held, self._held_schedules = self._held_schedules, None
        for scheduler, state, lrs in held or ():
            scheduler.load_state_dict(state)
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr

    def report(self, trainer: L.Trainer, losses: list[tuple[Tensor, dict[str, Tensor]]]) -> str:
        step = trainer.global_step + 1
        worst = next(((loss, terms) for loss, terms in losses if not torch.isfinite(loss).all()),
                     losses[-1] if losses else (None, {}))
        loss, terms = worst
        which = "its loss" if loss is not None and not torch.isfinite(loss).all() else "its gradients"
        lines = [(f"training stopped: optimizer steps {self.first_in_row}-{step} were all non-finite "
                  f"({self.in_a_row} in a row, model.max_nonfinite_steps={self.max_in_a_row}); step {step} "
                  f"({which} not finite on this rank's batch) had:")]
        lines += [f"  {name}: {_values(value)}" for name, value in terms.items()]
        if not terms and loss is not None:
            lines.append(f"  loss: {_values(loss)}")
        lines.append("Those steps were skipped and nothing was saved: the newest checkpoint holds the last finite "
                     "weights. Lower --model.optimizer.lr, set --trainer.gradient_clip_val, or check the data, "
                     "then resume.")
        return "\n".join(lines)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for key in ("state_dict", "current_model_state"):
            bad = [name for name, value in checkpoint.get(key, {}).items()
                   if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
            if bad:
                raise NonFiniteLossError(f"refusing to write a checkpoint at step {trainer.global_step}: {key} has "
                                         f"non-finite weights ({', '.join(bad[:5])}{', …' if len(bad) > 5 else ''})")

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "overflows": self.overflows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict.get("total", 0))
        self.overflows = int(state_dict.get("overflows", 0))


def _values(value: Tensor) -> str:
    """Per-sample values, the non-finite ones counted: ``[nan, 0.512, …] (1 of 4 non-finite)``."""
    flat = value.detach().float().flatten().cpu()
    shown = ", ".join(f"{v:.4g}" for v in flat[:MAX_SHOWN].tolist())
    more = ", …" if flat.numel() > MAX_SHOWN else ""
    bad = int((~torch.isfinite(flat)).sum())
    return f"[{shown}{more}]" + (f" ({bad} of {flat.numel()} non-finite)" if bad else "")

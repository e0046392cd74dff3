"""Keep non-finite losses out of the weights and out of every checkpoint.

An optimizer step whose loss or gradients are not finite (NaN or ±inf, on any rank) is skipped:
its gradients are dropped, so the weights, the optimizer state and the EMA stay as they were. The
step still counts as a step (``global_step``, the LR schedule and the data move on), like a step
that a mixed-precision gradient scaler skips. Skipped steps are logged as ``train/nonfinite_steps``
(a running total over the run). After ``max_in_a_row`` skipped steps in a row the run stops with
:class:`NonFiniteLossError`, naming the steps, the loss terms and the timesteps, and writes
nothing: the newest checkpoint stays the last good one. A checkpoint whose weights are not finite
is refused outright, whatever put them there.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
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
        self._losses: list[tuple[Tensor, dict[str, Tensor]]] = []  # micro-batches since the last step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        terms = getattr(pl_module, "step_terms", None) or {}
        self._losses.append((loss.detach(), terms))  # no device sync here: checked once per step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        finite = torch.stack([torch.isfinite(loss).all() for loss, _ in losses]).all() if losses else \
            torch.tensor(True, device=pl_module.device)
        if getattr(trainer.precision_plugin, "scaler", None) is None:  # a grad scaler skips inf grads itself
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        bad = (~finite).float().to(pl_module.device)
        if trainer.world_size > 1:  # every rank skips the same steps, or their weights drift apart
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        if bad.item():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # the optimizer skips parameters without gradients: the weights stay
            self.total += 1
            self.in_a_row += 1
            self.first_in_row = trainer.global_step + 1 if self.in_a_row == 1 else self.first_in_row
        else:
            self.in_a_row, self.first_in_row = 0, None
        pl_module.log("train/nonfinite_steps", float(self.total), on_step=True, on_epoch=False, batch_size=1)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(self.report(trainer, losses))

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
        return {"total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total = int(state_dict.get("total", 0))


def _values(value: Tensor) -> str:
    """Per-sample values, the non-finite ones counted: ``[nan, 0.512, …] (1 of 4 non-finite)``."""
    flat = value.detach().float().flatten().cpu()
    shown = ", ".join(f"{v:.4g}" for v in flat[:MAX_SHOWN].tolist())
    more = ", …" if flat.numel() > MAX_SHOWN else ""
    bad = int((~torch.isfinite(flat)).sum())
    return f"[{shown}{more}]" + (f" ({bad} of {flat.numel()} non-finite)" if bad else "")

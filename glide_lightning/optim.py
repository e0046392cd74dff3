"""The optimizer and its learning-rate schedule: AdamW, linear warm-up, then constant or cosine decay.

The schedule is one multiplier of the peak ``lr`` per optimizer step s (0-based; the LR the s-th
update uses), :func:`lr_factor`:

    warm-up   s < W:        (s + 1) / W
    constant  s ≥ W:        1
    cosine    W ≤ s < D:    m + (1 − m)·½·(1 + cos(π·(s − W)/(D − W)))
              s ≥ D:        m

with W = ``warmup_steps``, D = ``decay_steps`` (or the trainer's ``max_steps``) and m =
``min_lr_ratio`` (cosine decay: Loshchilov & Hutter 2017, SGDR, without restarts). It runs as one
:class:`torch.optim.lr_scheduler.LambdaLR` stepped once per optimizer step, whose state (the step
reached) Lightning keeps in checkpoints: a resumed run continues the schedule where it stopped.
With ``decay_steps`` unset, a resume with another ``max_steps`` decays towards the new end from the
step reached (:func:`sync_lr` applies it from the first resumed step, not one step late).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

log = logging.getLogger(__name__)

LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LRSchedule)
AdamWImplementation = Literal["auto", "fused", "foreach", "for_loop"]
ADAMW_IMPLEMENTATIONS: tuple[str, ...] = get_args(AdamWImplementation)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (see :mod:`glide_lightning.optim`)."""

    lr: float = 1e-4
    """Peak learning rate (miniGLIDE: 1e-4)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (β1, β2)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, applied to weight matrices and convolution kernels only: biases,
    normalisation scales and embeddings (token, positional, padding) are in a group without decay
    (:func:`parameter_groups`)."""
    implementation: AdamWImplementation = "auto"
    """The AdamW kernel, all with the same update: ``fused`` (one kernel for every parameter),
    ``foreach`` (a few multi-tensor kernels) or ``for_loop`` (a kernel per parameter and operation);
    ``auto``: fused where every parameter is a float tensor on a CPU or a GPU and the run does not clip
    gradients under mixed precision (the fewest kernel launches: the fastest step), else foreach.
    Lightning's ``bf16-mixed`` / ``16-mixed`` plugins refuse to clip the gradients of a fused optimizer (it
    unscales them inside its step), so ``fused`` with ``trainer.gradient_clip_val`` under those precisions
    is refused when the config is parsed."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from lr/warmup_steps to ``lr``."""
    lr_schedule: LRSchedule = "constant"
    """After the warm-up: ``constant`` (GLIDE, miniGLIDE) or ``cosine`` decay from ``lr`` to
    ``min_lr_ratio``·lr at ``decay_steps``, constant after that."""
    decay_steps: int | None = None
    """``cosine`` only: the optimizer step at which the decay ends, counted from the start of training
    (warm-up included); None: the trainer's ``max_steps``, which must then be set."""
    min_lr_ratio: float = 0.0
    """``cosine`` only: the final learning rate as a fraction of ``lr``, in [0, 1]."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"bad optimizer settings {self}: lr > 0, weight_decay >= 0, warmup_steps >= 0")
        if self.implementation not in ADAMW_IMPLEMENTATIONS:
            raise ValueError(f"unknown optimizer implementation {self.implementation!r}; choose one of "
                             f"{', '.join(ADAMW_IMPLEMENTATIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must be > warmup_steps ({self.warmup_steps}): the "
                             f"decay runs from the end of the warm-up to decay_steps")
        if self.lr_schedule == "constant" and (self.decay_steps is not None or self.min_lr_ratio != 0.0):
            raise ValueError("decay_steps and min_lr_ratio shape the cosine decay: set lr_schedule 'cosine' or "
                             "leave them unset")


def decay_end(config: OptimizerConfig, max_steps: int | None) -> int | None:
    """D of the cosine decay: ``decay_steps``, else the trainer's ``max_steps`` (None for ``constant``).

    Raises ``ValueError`` for ``cosine`` without either. A ``max_steps`` within the warm-up (a short test
    run) is allowed with a warning: such a run never reaches the peak LR."""
    if config.lr_schedule != "cosine":
        return None
    end = config.decay_steps if config.decay_steps is not None else (max_steps if max_steps and max_steps > 0 else None)
    if end is None:
        raise ValueError("optimizer.lr_schedule 'cosine' needs optimizer.decay_steps or trainer.max_steps: the "
                         "decay must know where it ends")
    if end <= config.warmup_steps:
        log.warning("trainer.max_steps %d ends within the LR warm-up (%d steps): this run never reaches "
                    "optimizer.lr, and the cosine decay has no steps (a later resume would start at min_lr_ratio)",
                    end, config.warmup_steps)
    return end


def lr_factor(step: int, config: OptimizerConfig, decay_steps: int | None = None) -> float:
    """The multiplier of ``config.lr`` at optimizer step ``step`` (module docstring's closed form);
    ``decay_steps`` is D for ``cosine`` (see :func:`decay_end`)."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    assert decay_steps is not None, "cosine needs its decay_steps"
    if decay_steps <= warmup:
        return config.min_lr_ratio
    progress = min(1.0, (step - warmup) / (decay_steps - warmup))
    m = config.min_lr_ratio
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))


def no_decay(name: str, parameter: torch.nn.Parameter, owner: torch.nn.Module) -> bool:
    """Whether weight decay leaves ``parameter`` alone: biases and normalisation scales (vectors),
    embedding tables (``nn.Embedding``) and learned embeddings held as plain parameters (GLIDE's
    ``positional_embedding``, ``padding_embedding``). Decaying them towards 0 shrinks scales and
    lookups rather than regularising a map (the usual practice, e.g. nanoGPT, timm)."""
    return parameter.ndim < 2 or isinstance(owner, torch.nn.Embedding) or name.endswith("embedding")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups of ``model``: ``decay`` (``weight_decay``) and ``no_decay`` (0; see
    :func:`no_decay`), each in the model's own order; shared parameters are listed once. Lightning's
    LearningRateMonitor logs their LR as ``lr-AdamW/decay`` and ``lr-AdamW/no_decay``."""
    groups: tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]] = ([], [])
    seen: set[int] = set()
    for _, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                groups[no_decay(name, parameter, module)].append(parameter)
    return [{"params": groups[0], "weight_decay": weight_decay, "name": "decay"},
            {"params": groups[1], "weight_decay": 0.0, "name": "no_decay"}]


class KernelPrecisionError(ValueError):
    """An AdamW kernel that the run's precision and gradient clipping cannot drive."""


def fused_clipping_conflict(implementation: str, amp_clipping: bool) -> str | None:
    """Why ``implementation`` cannot train a run that clips gradients under mixed precision (``amp_clipping``),
    or None when it can: Lightning's ``MixedPrecision`` plugin (``bf16-mixed``, ``16-mixed``) refuses to clip the
    gradients of a fused optimizer, which unscales them inside its own step, at the first optimizer step."""
    if implementation != "fused" or not amp_clipping:
        return None
    return ("model.optimizer.implementation 'fused' cannot clip gradients under mixed precision: Lightning's "
            "bf16-mixed / 16-mixed plugin refuses gradient clipping for an optimizer that unscales gradients inside "
            "its step. Set model.optimizer.implementation to auto or foreach, or train with trainer.precision "
            "32-true, or drop trainer.gradient_clip_val")


def adamw_kernel(config: OptimizerConfig, params: list[torch.nn.Parameter], amp_clipping: bool = False) -> dict[str, bool]:
    """``torch.optim.AdamW``'s keyword for the configured kernel. ``auto``: fused if every parameter is a float
    tensor on a CPU or a GPU and the run does not clip gradients under mixed precision (``amp_clipping``, see
    :func:`amp_clipping`), else foreach.

    Raises:
        KernelPrecisionError: ``fused`` asked for with ``amp_clipping`` (:func:`fused_clipping_conflict`)."""
    choice = config.implementation
    if choice == "auto":
        fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        choice = "fused" if params and fusable and not amp_clipping else "foreach"
    conflict = fused_clipping_conflict(choice, amp_clipping)
    if conflict:
        raise KernelPrecisionError(conflict)
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[choice]


def amp_clipping(trainer: Any) -> bool:
    """Whether ``trainer`` (a Lightning Trainer, or None) clips gradients under Lightning's ``MixedPrecision``
    plugin (``bf16-mixed``, ``16-mixed``, or the plugin given in ``trainer.plugins``)."""
    if trainer is None or not getattr(trainer, "gradient_clip_val", None):
        return False
    from lightning.pytorch.plugins.precision import MixedPrecision

    return isinstance(trainer.precision_plugin, MixedPrecision)


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig,
                    max_steps: int | None = None, trainer: Any = None) -> dict[str, Any]:
    """AdamW over ``model``'s parameters (decay and no-decay groups, :func:`parameter_groups`) with the kernel
    that ``trainer``'s precision and gradient clipping allow (:func:`adamw_kernel`), and its per-step LambdaLR,
    as Lightning's ``configure_optimizers`` returns them.

    Raises:
        KernelPrecisionError: ``implementation: fused`` in a run that clips gradients under mixed precision."""
    groups = parameter_groups(model, config.weight_decay)
    kernel = adamw_kernel(config, [p for group in groups for p in group["params"]], amp_clipping(trainer))
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, **kernel)
    end = decay_end(config, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, end))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def sync_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Set the optimizer's LR to what a LambdaLR ``scheduler`` says at the step it has reached.

    A restored optimizer keeps the LR of the session that saved it until the scheduler next steps:
    the first step of a resume whose schedule ends elsewhere (a new ``max_steps``) would use the old one."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)

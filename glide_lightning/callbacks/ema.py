"""EMA of the weights with a warm-up of its decay: Lightning's ``EMAWeightAveraging`` whose decay grows
with the number of updates, so that early averages are not dominated by the initial weights.

With a fixed decay d the average after n updates still holds d^n of the first weights (0.99^300 ≈ 5%,
0.9999^10000 ≈ 37%): a short run's EMA samples look like its first steps. With a warm-up, update n
(n ≥ 1 updates already averaged; the first update copies the weights) uses

    ``tf``      d_n = min(d, (1 + n)/(10 + n))                 (TensorFlow's ExponentialMovingAverage
                                                               with ``num_updates``)
    ``power``   d_n = min(d, 1 − (1 + n/inv_gamma)^(−power))   (the power warm-up of Karras-style EMA;
                                                               power 2/3 for short runs, 3/4 for long)
    ``none``    d_n = d                                        (Lightning's EMAWeightAveraging)

and averages w̄ ← d_n·w̄ + (1 − d_n)·w. n is the ``AveragedModel``'s ``n_averaged`` buffer, which
Lightning saves in the checkpoint (``averaging_state``) and restores on resume, so a resumed run
continues the warm-up where it stopped. Everything else (when to update, where the average lives in
checkpoints, swapping it in for validation) is Lightning's own.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor

EMAWarmup = Literal["tf", "power", "none"]
EMA_WARMUPS: tuple[str, ...] = get_args(EMAWarmup)


def ema_decay(n: int, decay: float, warmup: EMAWarmup = "tf", inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The decay d_n of the update made after ``n`` >= 1 earlier updates (module docstring)."""
    if warmup == "tf":
        return min(decay, (1 + n) / (10 + n))
    if warmup == "power":
        return min(decay, 1 - (1 + n / inv_gamma) ** -power)
    return decay


class WarmupEMAUpdate:
    """``AveragedModel``'s ``avg_fn``: w̄ ← d_n·w̄ + (1 − d_n)·w with d_n from :func:`ema_decay` (picklable)."""

    def __init__(self, decay: float, warmup: EMAWarmup, inv_gamma: float, power: float) -> None:
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        d = ema_decay(int(num_averaged), self.decay, self.warmup, self.inv_gamma, self.power)
        return torch.lerp(averaged, current, 1 - d) if averaged.is_floating_point() else current


class WarmupEMA(EMAWeightAveraging):
    """EMA weight averaging whose decay warms up (see :mod:`glide_lightning.callbacks.ema`).

    Select it in an experiment's ``trainer.callbacks`` in place of Lightning's EMAWeightAveraging::

        - class_path: glide_lightning.callbacks.WarmupEMA
          init_args: {decay: 0.999, warmup: tf}

    Args:
        decay: the decay d that the warm-up approaches (and the cap of d_n).
        warmup: ``tf`` (min(d, (1 + n)/(10 + n))), ``power`` (min(d, 1 − (1 + n/inv_gamma)^−power))
            or ``none`` (a constant d, as Lightning's EMAWeightAveraging).
        inv_gamma: ``power`` only: the number of updates that sets the warm-up's time scale (> 0).
        power: ``power`` only: its exponent (> 0; 2/3 suits runs of up to some 100k updates, 3/4 longer ones).
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch, device, use_buffers:
            Lightning's EMAWeightAveraging's own.
    """

    def __init__(self, decay: float = 0.999, warmup: EMAWarmup = "tf", inv_gamma: float = 1.0, power: float = 2 / 3,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, device: torch.device | str | int | None = None,
                 use_buffers: bool = True, **kwargs: Any) -> None:
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"unknown EMA warmup {warmup!r}; choose one of {', '.join(EMA_WARMUPS)}")
        if not 0.0 <= decay < 1.0 or inv_gamma <= 0 or power <= 0:
            raise ValueError(f"EMA needs 0 <= decay < 1, inv_gamma > 0 and power > 0; got decay {decay}, "
                             f"inv_gamma {inv_gamma}, power {power}")
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch, **kwargs)
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self._kwargs["avg_fn"] = WarmupEMAUpdate(decay, warmup, inv_gamma, power)  # the decay, nothing else

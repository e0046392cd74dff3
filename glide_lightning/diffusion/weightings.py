"""MSE weightings: one registry, :data:`WEIGHTINGS`, of per-timestep weights of the target MSE.

A weighting is a function ``(diffusion, t) -> [B]`` whose values multiply each sample's MSE of the prediction
target (ε or v, :func:`~glide_lightning.diffusion.losses.training_target`) in the loss; the VLB term of
``hybrid``, which trains only the variance, is never weighted. ``DiffusionConfig.weighting`` names the entry
(``none``, ``p2``, ``min_snr``); its knobs are ``DiffusionConfig`` fields. Each entry declares the prediction
targets its paper defines it for and the knobs it reads, and :func:`check_weighting` checks a config against
them when the config is made (the one place these rules live).

Adding a weighting: its function and its :class:`Weighting` entry here, its name in ``WeightingName`` and its
knobs (if any) as fields of :class:`~glide_lightning.diffusion.config.DiffusionConfig` (listed there in
``KEEPS_IMAGES``: a weighting changes training, not a checkpoint's images). Nothing else dispatches on it.

This module imports nothing of the package (the process is typed by what a weighting reads of it, :class:`Process`),
so that the config can check itself against the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

__all__ = ["WEIGHTINGS", "Process", "Weighting", "WeightingFn", "check_weighting", "min_snr_weight", "no_weight",
           "p2_weight"]


class Process(Protocol):
    """What a weighting reads of the process (a :class:`~glide_lightning.diffusion.GaussianDiffusion`): its
    config (the knobs, the prediction target) and SNR(t) = ᾱ_t / (1 − ᾱ_t)."""

    config: Any

    def snr(self, t: Tensor) -> Tensor: ...


WeightingFn = Callable[[Process, Tensor], Tensor]
"""``weights(diffusion, t) -> [B]`` (float32): the factor of each sample's target MSE at its step ``t``."""


def no_weight(diffusion: Process, t: Tensor) -> Tensor:
    """Ones: the plain MSE of the target (L_simple; Ho et al. 2020, Denoising Diffusion Probabilistic Models)."""
    return torch.ones_like(diffusion.snr(t))


def p2_weight(diffusion: Process, t: Tensor) -> Tensor:
    """P2 weighting (Choi et al. 2022, Perception Prioritized Training of Diffusion Models, eq. 8):
    1/(k + SNR(t))^γ with k = ``p2_k``, γ = ``p2_gamma`` (γ = 0: ones). Defined for the ε MSE only."""
    cfg = diffusion.config
    return (cfg.p2_k + diffusion.snr(t)) ** -cfg.p2_gamma


def min_snr_weight(diffusion: Process, t: Tensor) -> Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023, Efficient Diffusion Training via Min-SNR Weighting Strategy; the
    paper uses γ = 5), written for each target: min(SNR(t), γ)/SNR(t) for ε, min(SNR(t), γ)/(SNR(t) + 1) for v;
    both are min(SNR(t), γ) times the x_0 MSE, since ‖x_0 − x̂_0‖² = ‖ε − ε̂‖²/SNR = ‖v − v̂‖²/(SNR + 1).
    γ = ``min_snr_gamma``. The ε form is computed as min(1, γ/SNR), finite where SNR(t) → 0."""
    snr = diffusion.snr(t)
    gamma = diffusion.config.min_snr_gamma
    if diffusion.config.prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    return (gamma / snr).clamp(max=1.0)


@dataclass(frozen=True)
class Weighting:
    """An entry of :data:`WEIGHTINGS`: the weights and what they are defined for. Called like its function."""

    weights: WeightingFn
    paper: str
    """Where it comes from (for messages; the function's docstring cites it in full)."""
    predictions: tuple[str, ...]
    """The prediction targets (``DiffusionConfig.prediction``) the weighting is defined for."""
    knobs: tuple[str, ...] = ()
    """The ``DiffusionConfig`` fields it reads: each must be set (not None) when it is chosen, and one that is off
    (None) by default must stay off when another weighting is chosen."""

    def __call__(self, diffusion: Process, t: Tensor) -> Tensor:
        return self.weights(diffusion, t)


WEIGHTINGS: dict[str, Weighting] = {
    "none": Weighting(no_weight, "Ho et al. 2020", predictions=("eps", "v")),
    "p2": Weighting(p2_weight, "Choi et al. 2022", predictions=("eps",), knobs=("p2_gamma", "p2_k")),
    "min_snr": Weighting(min_snr_weight, "Hang et al. 2023", predictions=("eps", "v"), knobs=("min_snr_gamma",)),
}
"""The MSE weightings by name (``DiffusionConfig.weighting``)."""


def check_weighting(config: Any) -> None:
    """Refuse a config (a :class:`~glide_lightning.diffusion.config.DiffusionConfig`) whose ``weighting`` does not
    fit it: an unknown name, another weighting's knob that is off by default set, a knob of its own unset, or a
    ``prediction`` it is not defined for. Raises ValueError."""
    name = config.weighting
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
    entry = WEIGHTINGS[name]
    off_by_default = {f.name for f in fields(config) if f.default is None}
    for other, spec in WEIGHTINGS.items():
        stray = [k for k in spec.knobs if other != name and k in off_by_default and k not in entry.knobs
                 and getattr(config, k) is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} (weighting {other!r}) and weighting {name!r} both weight the MSE "
                             f"term: choose one weighting ({other!r} with {', '.join(stray)}, or {name!r} without)")
    missing = [k for k in entry.knobs if getattr(config, k) is None]
    if missing:
        raise ValueError(f"weighting {name!r} ({entry.paper}) needs {', '.join(missing)} set")
    if config.prediction not in entry.predictions:
        targets = " or ".join(f"prediction {p!r}" for p in entry.predictions)
        fits = [n for n, w in WEIGHTINGS.items() if n != "none" and config.prediction in w.predictions]
        raise ValueError(f"weighting {name!r} ({entry.paper}) is defined for {targets}: use {targets} with it"
                         + (f", or weighting {' or '.join(map(repr, fits))} with prediction {config.prediction!r}"
                            if fits else ""))

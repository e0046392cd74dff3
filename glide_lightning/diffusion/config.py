"""The diffusion process's configuration: the one place where its knobs have defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from glide_lightning.diffusion.schedules import SCHEDULES, ScheduleName

VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["simple", "hybrid", "p2"]
Prediction = Literal["eps", "v"]
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)


@dataclass(frozen=True)
class DiffusionConfig:
    """How images are noised, how the reverse process's variance is chosen and how it is trained."""

    steps: int = 1000
    """Number of diffusion steps T of the training process (miniGLIDE: 100; GLIDE, dogGLIDE: 1000)."""
    noise_schedule: ScheduleName = "cosine"
    """β schedule: ``cosine`` (Improved DDPM, GLIDE's base model) or ``linear`` (DDPM, GLIDE's upsampler)."""
    variance_type: VarianceType = "learned_range"
    """Reverse-process variance: ``fixed_small`` (β̃, the posterior variance), ``fixed_large`` (β), or
    ``learned_range`` (interpolated in log space between them by the model's extra output channels)."""
    loss_type: LossType = "hybrid"
    """``simple`` (ε MSE), ``hybrid`` (MSE + vlb_weight·L_vlb; needs ``learned_range``) or ``p2`` (ε MSE
    weighted by 1/(p2_k + SNR(t))^p2_gamma, plus the VLB term when the variance is learned)."""
    vlb_weight: float = 1e-3
    """λ of L_hybrid = L_simple + λ·L_vlb (Improved DDPM: 1/1000)."""
    p2_gamma: float = 1.0
    """γ of the P2 weighting 1/(k + SNR(t))^γ; 0 recovers ``simple``."""
    p2_k: float = 1.0
    """k of the P2 weighting 1/(k + SNR(t))^γ."""
    prediction: Prediction = "eps"
    """What the model's first C output channels predict: ``eps`` (the noise ε; DDPM, GLIDE and every
    released glide-text2im checkpoint) or ``v`` = α_t·ε − σ_t·x_0 with α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)
    (Salimans & Ho 2022, Progressive Distillation, §4), better behaved at high noise, where ε barely
    determines x_0. The MSE target of every loss follows it; samplers read x_0 and ε from it.
    Classifier-free guidance mixes v as it mixes ε: at fixed x_t and t, v = (ε − σ_t·x_t)/α_t is affine
    in ε, so the guided v is the v of the guided ε."""
    min_snr_gamma: float | None = None
    """γ of the min-SNR-γ weighting of the MSE term (Hang et al. 2023, Efficient Diffusion Training via
    Min-SNR Weighting Strategy; the paper uses 5), None: off. It is a weighting, not a loss of its own,
    so it composes with ``simple`` and ``hybrid`` (the VLB term of ``hybrid`` stays unweighted, as it
    trains only the variance): the per-sample MSE is weighted by min(SNR(t), γ)/SNR(t) for ``eps``
    and by min(SNR(t), γ)/(SNR(t) + 1) for ``v``, i.e. min(SNR(t), γ) times the x_0 MSE either way.
    Refused with ``p2``, which is another weighting of the same term."""

    def __post_init__(self) -> None:
        _choice("noise_schedule", self.noise_schedule, SCHEDULES)
        _choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("prediction", self.prediction, PREDICTIONS)
        if self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.loss_type == "hybrid" and self.variance_type != "learned_range":
            raise ValueError(
                "loss_type 'hybrid' trains a learned variance: set variance_type 'learned_range' "
                f"(got {self.variance_type!r}), or use loss_type 'simple' with a fixed variance"
            )
        if self.loss_type == "simple" and self.variance_type == "learned_range":
            raise ValueError(
                "loss_type 'simple' leaves a learned variance untrained: use variance_type "
                "'fixed_small' (or 'fixed_large'), or loss_type 'hybrid'"
            )
        if self.vlb_weight < 0 or self.p2_gamma < 0 or self.p2_k < 0:
            raise ValueError("vlb_weight, p2_gamma and p2_k must be non-negative")
        if self.min_snr_gamma is not None:
            if self.min_snr_gamma <= 0:
                raise ValueError(f"min_snr_gamma must be > 0 (Hang et al. 2023: 5), or null for no weighting; "
                                 f"got {self.min_snr_gamma}")
            if self.loss_type == "p2":
                raise ValueError("min_snr_gamma and loss_type 'p2' both weight the MSE term: use min_snr_gamma "
                                 "with loss_type 'simple' or 'hybrid', or p2 without min_snr_gamma")
        if self.loss_type == "p2" and self.prediction != "eps":
            raise ValueError("loss_type 'p2' weights the ε MSE (Choi et al. 2022): use prediction 'eps' with it, "
                             "or min_snr_gamma to weight a v-prediction loss")


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; choose one of {', '.join(choices)}")

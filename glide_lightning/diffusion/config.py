"""The diffusion process's configuration: the one place where its knobs have defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from glide_lightning.diffusion.schedules import SCHEDULES, ScheduleName
from glide_lightning.diffusion.weightings import check_weighting

VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["simple", "hybrid", "p2"]
"""``simple`` or ``hybrid``; ``p2`` is the old spelling of ``weighting: p2`` (:func:`modern_loss_spelling`)."""
WeightingName = Literal["none", "p2", "min_snr"]
"""The names of :data:`~glide_lightning.diffusion.weightings.WEIGHTINGS` (a test checks they agree)."""
Prediction = Literal["eps", "v"]
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
WEIGHTING_NAMES: tuple[str, ...] = get_args(WeightingName)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)


def modern_loss_spelling(values: dict[str, Any]) -> dict[str, Any]:
    """The loss fields of a config (or of a checkpoint's ``diffusion`` hyper-parameters) in the current spelling,
    where ``loss_type`` says whether the VLB term trains a learned variance and ``weighting`` how the MSE term is
    weighted. The old spellings, from before ``weighting`` existed, mean the same:

    - ``loss_type: p2`` → ``weighting: p2`` with ``loss_type: hybrid`` where ``variance_type`` is
      ``learned_range`` (p2 added the VLB term there) and ``simple`` otherwise;
    - ``min_snr_gamma: γ`` without a weighting → ``weighting: min_snr``.

    Returns a copy of ``values`` with ``loss_type`` and ``weighting`` so spelled (the current spelling comes back
    the same). Fields absent mean their defaults; contradictions other than two weightings at once are left for
    :class:`DiffusionConfig` to refuse. Used where a config is made (``DiffusionConfig.__post_init__``) and where
    a checkpoint's hyper-parameters are read (:mod:`glide_lightning.migrations`)."""
    out = dict(values)
    weighting = out.get("weighting", DiffusionConfig.weighting)
    if out.get("loss_type") == "p2":
        learned = out.get("variance_type", DiffusionConfig.variance_type) == "learned_range"
        out["loss_type"] = "hybrid" if learned else "simple"
        if weighting == "none":
            weighting = "p2"
        elif weighting != "p2":
            raise ValueError(f"loss_type 'p2' (the old spelling of weighting 'p2') and weighting {weighting!r} both "
                             f"weight the MSE term: use loss_type simple or hybrid with weighting {weighting!r}")
    if out.get("min_snr_gamma") is not None and weighting == "none":
        weighting = "min_snr"
    out["weighting"] = weighting
    return out


@dataclass(frozen=True)
class DiffusionConfig:
    """How images are noised, how the reverse process's variance is chosen and how it is trained."""

    CHANGES_IMAGES: ClassVar[frozenset[str]] = frozenset({"steps", "noise_schedule", "variance_type", "prediction"})
    """Fields that change what a checkpoint samples (the zero-shot FID image cache is keyed by them)."""
    KEEPS_IMAGES: ClassVar[frozenset[str]] = frozenset({"loss_type", "weighting", "vlb_weight", "p2_gamma", "p2_k",
                                                        "min_snr_gamma"})
    """Fields that only change training: a given checkpoint samples the same images whatever they are. Every field
    is in one of the two sets (a test checks it)."""

    steps: int = 1000
    """Number of diffusion steps T of the training process (miniGLIDE: 100; GLIDE, dogGLIDE: 1000)."""
    noise_schedule: ScheduleName = "cosine"
    """β schedule: ``cosine`` (Improved DDPM, GLIDE's base model) or ``linear`` (DDPM, GLIDE's upsampler)."""
    variance_type: VarianceType = "learned_range"
    """Reverse-process variance: ``fixed_small`` (β̃, the posterior variance), ``fixed_large`` (β), or
    ``learned_range`` (interpolated in log space between them by the model's extra output channels)."""
    loss_type: LossType = "hybrid"
    """``simple`` (the target's MSE, weighted by ``weighting``; needs a fixed variance) or ``hybrid`` (that plus
    vlb_weight·L_vlb, which trains the variance; needs ``learned_range``). ``p2``, the old spelling of
    ``weighting: p2``, is read as ``simple`` or ``hybrid`` (by ``variance_type``) with ``weighting: p2``."""
    weighting: WeightingName = "none"
    """The weighting of the MSE term (:data:`~glide_lightning.diffusion.weightings.WEIGHTINGS`): ``none``,
    ``p2`` (Choi et al. 2022: 1/(p2_k + SNR(t))^p2_gamma; ε only) or ``min_snr`` (Hang et al. 2023: by
    min(SNR(t), min_snr_gamma), for ε and v). The VLB term of ``hybrid`` is never weighted. Without it,
    ``min_snr_gamma`` set means ``min_snr`` (its old spelling)."""
    vlb_weight: float = 1e-3
    """λ of L_hybrid = L_simple + λ·L_vlb (Improved DDPM: 1/1000)."""
    p2_gamma: float = 1.0
    """γ of ``weighting: p2``, 1/(k + SNR(t))^γ; 0: no weighting."""
    p2_k: float = 1.0
    """k of ``weighting: p2``, 1/(k + SNR(t))^γ."""
    prediction: Prediction = "eps"
    """What the model's first C output channels predict: ``eps`` (the noise ε; DDPM, GLIDE and every
    released glide-text2im checkpoint) or ``v`` = α_t·ε − σ_t·x_0 with α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)
    (Salimans & Ho 2022, Progressive Distillation, §4), better behaved at high noise, where ε barely
    determines x_0. The MSE target of every loss follows it; samplers read x_0 and ε from it.
    Classifier-free guidance mixes v as it mixes ε: at fixed x_t and t, v = (ε − σ_t·x_t)/α_t is affine
    in ε, so the guided v is the v of the guided ε."""
    min_snr_gamma: float | None = None
    """γ of ``weighting: min_snr`` (Hang et al. 2023, Efficient Diffusion Training via Min-SNR Weighting
    Strategy; the paper uses 5), needed by it and None otherwise: the per-sample MSE is weighted by
    min(SNR(t), γ)/SNR(t) for ``eps`` and by min(SNR(t), γ)/(SNR(t) + 1) for ``v``, i.e. min(SNR(t), γ)
    times the x_0 MSE either way. Set without ``weighting`` (the old spelling), it means ``weighting: min_snr``."""

    def __post_init__(self) -> None:
        spelled = modern_loss_spelling({"loss_type": self.loss_type, "variance_type": self.variance_type,
                                        "weighting": self.weighting, "min_snr_gamma": self.min_snr_gamma})
        object.__setattr__(self, "loss_type", spelled["loss_type"])  # old spellings read as the current one
        object.__setattr__(self, "weighting", spelled["weighting"])
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
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 (Hang et al. 2023: 5), or null for no weighting; "
                             f"got {self.min_snr_gamma}")
        check_weighting(self)  # the weighting's own rules: its predictions and knobs


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; choose one of {', '.join(choices)}")

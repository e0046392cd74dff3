"""Pure diffusion math: schedules, the Gaussian process, losses, samplers and guidance.

No learnable weights and no Lightning here: the network is always an argument.
"""

from glide_lightning.diffusion.config import (
    LOSS_TYPES,
    PREDICTIONS,
    VARIANCE_TYPES,
    DiffusionConfig,
    LossType,
    Prediction,
    VarianceType,
)
from glide_lightning.diffusion.gaussian import GaussianDiffusion, dynamic_threshold, learned_range_log_variance
from glide_lightning.diffusion.guidance import classifier_free_guidance, classifier_guidance, condition_mean
from glide_lightning.diffusion.losses import (
    LOSSES,
    discretized_gaussian_log_likelihood,
    mean_flat,
    min_snr_weight,
    normal_kl,
    training_losses,
    training_target,
)
from glide_lightning.diffusion.samplers import (
    SAMPLERS,
    SamplerName,
    SamplerSpec,
    check_sampler_options,
    ddim_sample,
    ddpm_sample,
    get_sampler,
    sampler_names,
    sampler_options,
    sampler_spec,
)
from glide_lightning.diffusion.schedules import SCHEDULES, ScheduleName, get_named_beta_schedule, space_timesteps

__all__ = [
    "DiffusionConfig", "GaussianDiffusion", "LOSSES", "LOSS_TYPES", "LossType", "PREDICTIONS", "Prediction",
    "SAMPLERS", "SCHEDULES", "SamplerName", "SamplerSpec", "ScheduleName", "VARIANCE_TYPES", "VarianceType",
    "check_sampler_options", "classifier_free_guidance", "classifier_guidance", "condition_mean", "ddim_sample",
    "dynamic_threshold",
    "ddpm_sample", "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule", "get_sampler", "learned_range_log_variance", "mean_flat", "min_snr_weight",
    "normal_kl", "sampler_names", "sampler_options", "sampler_spec", "space_timesteps", "training_losses",
    "training_target",
]

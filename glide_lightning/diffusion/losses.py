"""Training losses by name, and :func:`training_losses`, the one dispatch from ``loss_type`` to them.

Each loss returns per-sample terms ([B] tensors); the caller reduces them. One signature for the
family: ``loss(diffusion, model_output, x_start, x_t, t, noise) -> terms``. ``loss_type`` travels
from the YAML to :class:`~glide_lightning.diffusion.config.DiffusionConfig` (a typed choice,
checked when parsed) to :data:`LOSSES` here.

Every loss's ``mse`` is the MSE of the model's first C channels against the config's prediction
target (:func:`training_target`: ε, or v), unweighted; its ``loss`` holds that MSE times the config's
``weighting`` (:data:`~glide_lightning.diffusion.weightings.WEIGHTINGS`: none, P2, min-SNR-γ), computed
on one path (:func:`weighted_mse`), plus, for ``hybrid``, the unweighted VLB term.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from glide_lightning.diffusion.gaussian import GaussianDiffusion, ModelFn
from glide_lightning.diffusion.weightings import WEIGHTINGS, min_snr_weight  # noqa: F401  (re-exported by the package)

LossFn = Callable[[GaussianDiffusion, Tensor, Tensor, Tensor, Tensor, Tensor], dict[str, Tensor]]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: [B, …] → [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) per element for images in [-1, 1] quantised to 256 levels (bin width 2/255), under
    N(means, e^{2·log_scales}); the end bins take the tails. Uses the exact normal CDF in log space
    (``torch.special.log_ndtr``), which stays finite far in the tails where a tanh approximation of
    the CDF underflows."""
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + 1.0 / 255)
    lower = inv_std * (x - means - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X ≤ x + δ)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > x - δ)
    # the bin's mass Φ(upper) - Φ(lower), from whichever tail keeps it precise:
    # log(a - b) = log a + log(1 - e^{log b - log a})
    from_cdf = log_cdf_upper + _log1mexp(torch.special.log_ndtr(lower) - log_cdf_upper)
    from_sf = log_sf_lower + _log1mexp(torch.special.log_ndtr(-upper) - log_sf_lower)
    log_mid = torch.where(lower > 0, from_sf, from_cdf)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - e^d) for d ≤ 0, floored at log(1e-12) for empty bins."""
    return torch.log((-torch.expm1(d)).clamp(min=1e-12))


def vb_terms_bpd(diffusion: GaussianDiffusion, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """L_t in bits per dimension, [B]: KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for t > 0 and the
    decoder's negative log-likelihood -log p(x_0|x_1) at t = 0."""
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    p = diffusion.mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_target(diffusion: GaussianDiffusion, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """What the model's first C channels learn, [B, C, H, W]: the noise ε (``prediction: eps``) or
    v = α_t·ε − σ_t·x_0 (``prediction: v``; Salimans & Ho 2022, §4)."""
    return diffusion.v_target(x_start, t, noise) if diffusion.config.prediction == "v" else noise


def _target_mse(diffusion: GaussianDiffusion, model_output: Tensor, x_start: Tensor, t: Tensor,
                noise: Tensor) -> Tensor:
    target = training_target(diffusion, x_start, t, noise)
    return mean_flat((target - model_output[:, : target.shape[1]]) ** 2)


def mse_weights(diffusion: GaussianDiffusion, t: Tensor) -> Tensor:
    """The weights of the target MSE at steps ``t``, [B]: the config's ``weighting``'s (ones for ``none``)."""
    return WEIGHTINGS[diffusion.config.weighting](diffusion, t)


def weighted_mse(diffusion: GaussianDiffusion, model_output: Tensor, x_start: Tensor, t: Tensor,
                 noise: Tensor) -> tuple[Tensor, Tensor]:
    """The target MSE, unweighted and weighted by the config's ``weighting`` (:func:`mse_weights`), [B] each: the
    one place a loss weights its MSE."""
    mse = _target_mse(diffusion, model_output, x_start, t, noise)
    return mse, mse_weights(diffusion, t).to(mse.dtype) * mse


def _frozen_mean_vb(diffusion: GaussianDiffusion, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The VLB term with ε behind a stop-gradient: it trains only the variance channels, so the
    mean is driven by the MSE alone (Improved DDPM, Sec. 3.1)."""
    c = x_start.shape[1]
    frozen = torch.cat([model_output[:, :c].detach(), model_output[:, c:]], dim=1)
    return vb_terms_bpd(diffusion, frozen, x_start, x_t, t)


def simple_loss(diffusion: GaussianDiffusion, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor,
                noise: Tensor) -> dict[str, Tensor]:
    """L_simple: ‖ε - ε_θ(x_t, t)‖² (or the v MSE) averaged over pixels, times the ``weighting``."""
    mse, weighted = weighted_mse(diffusion, model_output, x_start, t, noise)
    return {"loss": weighted, "mse": mse}


def hybrid_loss(diffusion: GaussianDiffusion, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor,
                noise: Tensor) -> dict[str, Tensor]:
    """L_hybrid = L_simple + λ·L_vlb. L_vlb = Σ_t L_t is estimated from one uniformly drawn t as
    T·L_t, so the per-sample loss is weighting·mse + λ·T·vb (λ = ``vlb_weight``): the MSE takes the
    ``weighting``, the VLB term, which trains only the variance, does not (as in P2's learned-Σ models)."""
    mse, weighted = weighted_mse(diffusion, model_output, x_start, t, noise)
    vb = _frozen_mean_vb(diffusion, model_output, x_start, x_t, t)
    weight = diffusion.config.vlb_weight * diffusion.num_timesteps
    return {"loss": weighted + weight * vb, "mse": mse, "vb": vb}


LOSSES: dict[str, LossFn] = {"simple": simple_loss, "hybrid": hybrid_loss}


def training_losses(diffusion: GaussianDiffusion, model: ModelFn, x_start: Tensor, t: Tensor,
                    model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample terms ([B] each) of ``diffusion.config.loss_type`` at steps ``t`` ([B], indices of
    ``diffusion``'s steps): ``loss`` (its MSE weighted by ``weighting``), ``mse`` and, where the variance
    is learned, ``vb`` (the VLB term L_t in bits per dimension). ``x_start`` [B, C, H, W] in [-1, 1];
    ``noise`` defaults to fresh N(0, I) draws; ``model(x_t, timesteps, **model_kwargs)`` is the network."""
    noise = torch.randn_like(x_start) if noise is None else noise
    x_t = diffusion.q_sample(x_start, t, noise)
    out = diffusion.call_model(model, x_t, t, model_kwargs)
    return LOSSES[diffusion.config.loss_type](diffusion, out, x_start, x_t, t, noise)

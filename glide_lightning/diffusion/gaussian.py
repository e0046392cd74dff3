"""The Gaussian diffusion process (DDPM, Improved DDPM), with the network as an argument.

Shapes: images ``x_start``, ``x_t``, ``noise`` are [B, C, H, W]; ``t`` is a LongTensor [B] of
indices into *this* process's steps. The model is any callable ``model(x_t, timesteps, **kw)``
returning its prediction (C channels: ε, or the velocity v = α_t·ε − σ_t·x_0 when the config's
``prediction`` is ``v``), followed by the learned-range interpolation value (C more channels) when
the variance is learned. :meth:`GaussianDiffusion.mean_variance_from_output` is the one place that
reads a model output as ``pred_xstart``, ``eps``, mean and variance. The model always receives the
*original* step indices (``timestep_map[t]``), so a respaced process drives a network trained on
the full schedule unchanged. The training losses, which use this process, live in
:mod:`glide_lightning.diffusion.losses`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from einops import rearrange
from torch import Tensor

from glide_lightning.diffusion.config import DiffusionConfig
from glide_lightning.diffusion.schedules import get_named_beta_schedule, respaced_betas, space_timesteps

ModelFn = Callable[..., Tensor]
DenoisedFn = Callable[[Tensor], Tensor]


class GaussianDiffusion:
    """Schedule constants (float64 on the CPU, float32 copies per device) and the process's math."""

    def __init__(self, betas: Tensor, config: DiffusionConfig, timestep_map: Tensor | None = None,
                 base_alphas_cumprod: Tensor | None = None) -> None:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.config = config
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map.long()
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # the unrespaced ᾱ, kept so that respacing always starts from the original process
        self.base_alphas_cumprod = alphas_cumprod if base_alphas_cumprod is None else base_alphas_cumprod
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        post_var = betas * (1 - prev) / (1 - alphas_cumprod)
        # β̃_0 = 0: clip its log to β̃_1 (the t = 0 term is a decoder likelihood, not a KL)
        post_var_clipped = torch.cat([post_var[1:2], post_var[1:]]) if self.num_timesteps > 1 else betas
        self._tables: dict[str, Tensor] = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_var_clipped.log(),
            "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
            "log_betas": betas.log(),
            # β with β_0 replaced by β̃_1, as Improved DDPM: a usable decoder variance at t = 0
            "fixed_large_log_variance": torch.cat([post_var_clipped[:1], betas[1:]]).log(),
            "snr": alphas_cumprod / (1 - alphas_cumprod),
        }
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: DiffusionConfig, respacing: str = "") -> GaussianDiffusion:
        """The process of ``config``, optionally respaced (see :func:`space_timesteps`)."""
        diffusion = cls(get_named_beta_schedule(config.noise_schedule, config.steps), config)
        return diffusion.respace(respacing) if respacing else diffusion

    def respace(self, spec: str) -> GaussianDiffusion:
        """A shorter process visiting the original steps that ``spec`` keeps (same ᾱ there)."""
        base_steps = int(self.base_alphas_cumprod.shape[0])
        kept = space_timesteps(base_steps, spec)
        betas = respaced_betas(self.base_alphas_cumprod, kept)
        return GaussianDiffusion(betas, self.config, torch.tensor(kept), self.base_alphas_cumprod)

    def table(self, name: str) -> Tensor:
        """A float64 schedule table by name (``alphas_cumprod``, ``posterior_variance``, …)."""
        return self._tables[name]

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table values at ``t`` in ``like``'s dtype, shaped [B, 1, 1, …] to broadcast against it."""
        key = (name, t.device)
        values = self._on_device.get(key)
        if values is None:
            values = self._on_device[key] = self._tables[name].to(device=t.device, dtype=torch.float32)
        return values[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    # ----------------------------------------------------------------------------- forward process
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        var = 1 - self._extract("alphas_cumprod", t, x_start)
        return mean, var.expand_as(x_start), var.log().expand_as(x_start)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        var = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_xstart_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = α_t·x_t − σ_t·v (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t); Salimans & Ho 2022, §4)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """ε = σ_t·x_t + α_t·v (the inverse of :meth:`v_target` given x_t)."""
        return (self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
                + self._extract("sqrt_alphas_cumprod", t, x_t) * v)

    def v_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The velocity v = α_t·ε − σ_t·x_0 of x_t = α_t·x_0 + σ_t·ε (Salimans & Ho 2022, §4), [B, C, H, W]."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at ``t``, shape [B]."""
        return self._tables["snr"].to(t.device)[t].float()

    # ----------------------------------------------------------------------------- reverse process
    def call_model(self, model: ModelFn, x_t: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """Run the network on original step indices and check its channel count. The output comes back in
        ``x_t``'s dtype (float32 for images) whatever the network computed in: every loss, ``p_mean_variance``,
        sampler and solver reads the network through here, so under ``torch.autocast`` (``bf16-mixed`` /
        ``16-mixed`` training, ``--sampling.precision bf16``) only the network runs in low precision."""
        key = ("timestep_map", t.device)
        if key not in self._on_device:  # one copy per device, not one per step
            self._on_device[key] = self.timestep_map.to(t.device)
        out = model(x_t, self._on_device[key][t], **(model_kwargs or {}))
        if out.is_floating_point() and out.dtype != x_t.dtype:
            # a network under autocast returns bf16/fp16: the process's arithmetic stays in x_t's dtype
            # (bf16's 8-bit mantissa rounds the learned-range interpolation by more than [log β̃, log β] is wide)
            out = out.to(x_t.dtype)
        channels = x_t.shape[1]
        needed = 2 * channels if self.config.variance_type == "learned_range" else channels
        if out.shape[:1] + out.shape[2:] != x_t.shape[:1] + x_t.shape[2:] or out.shape[1] < needed:
            raise ValueError(
                f"model output {tuple(out.shape)} does not fit x_t {tuple(x_t.shape)}: variance_type "
                f"{self.config.variance_type!r} needs {needed} channels (ε{' and v' if needed > channels else ''})"
            )
        return out

    def mean_variance_from_output(self, model_output: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool = True,
                                  denoised_fn: DenoisedFn | None = None) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output: ``mean``, ``variance``, ``log_variance``,
        ``pred_xstart`` (clipped to [-1, 1] when ``clip_denoised``) and the predicted ``eps`` (never
        clipped), both read from the first C channels as ``config.prediction`` says (ε itself, or v).
        With a fixed variance, channels after the first C are ignored (an untrained variance head is
        never used)."""
        channels = x_t.shape[1]
        prediction = model_output[:, :channels]
        if self.config.prediction == "v":
            eps = self.predict_eps_from_v(x_t, t, prediction)
            pred_xstart = self.predict_xstart_from_v(x_t, t, prediction)
        else:
            eps = prediction
            pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        vtype = self.config.variance_type
        if vtype == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            log_var = learned_range_log_variance(model_output[:, channels:2 * channels], min_log, max_log)
        elif vtype == "fixed_small":
            log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        else:
            log_var = self._extract("fixed_large_log_variance", t, x_t).expand_as(x_t)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": log_var.exp(), "log_variance": log_var,
                "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model: ModelFn, x_t: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None, *,
                        clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None) -> dict[str, Tensor]:
        """Run the model and return p(x_{t-1} | x_t) (see :meth:`mean_variance_from_output`)."""
        out = self.call_model(model, x_t, t, model_kwargs)
        return self.mean_variance_from_output(out, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)


def learned_range_log_variance(model_var_values: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """Improved DDPM's learned variance: log Σ = v·log β + (1 - v)·log β̃ with v = (output + 1) / 2,
    so a network output of -1 gives β̃ (``min_log``) and +1 gives β (``max_log``)."""
    frac = (model_var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def dynamic_threshold(pred_xstart: Tensor, percentile: float) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample, s is the ``percentile``-th
    quantile of ``|pred_xstart|`` (linear interpolation between order statistics, as ``numpy.percentile``),
    ``s = max(s, 1)``; ``pred_xstart`` is clipped to [-s, s] and divided by s. Pixels then lie in [-1, 1]
    without the saturation a hard clip gives at high guidance scales; with s = 1 it is the static clip.

    Args:
        pred_xstart: ``[B, ...]`` predicted x_0.
        percentile: p in (0, 1] (Imagen: 0.995; 1: s is the largest ``|pred_xstart|``).

    Returns:
        ``[B, ...]`` like ``pred_xstart``, in [-1, 1].

    Raises:
        ValueError: ``percentile`` outside (0, 1].
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic thresholding percentile must be in (0, 1], got {percentile}")
    flat = rearrange(pred_xstart.abs(), "b ... -> b (...)").float()  # [B, N]
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(pred_xstart.dtype)  # [B]
    s = s.reshape(-1, *([1] * (pred_xstart.ndim - 1)))  # [B, 1, ..., 1]
    return pred_xstart.clamp(-s, s) / s

"""Classifier-free guidance (Ho & Salimans 2021; GLIDE): the only place it lives.

Optionally limited to an interval of noise levels (Kynkäänniemi et al. 2024, "Applying Guidance in a
Limited Interval Improves Sample and Distribution Quality in Diffusion Models"): outside it the
conditional model runs alone, which both saves its unconditional forward passes and, reportedly,
improves FID (guidance at the noisiest steps collapses diversity, at the cleanest it does little).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from glide_lightning.diffusion.gaussian import ModelFn

__all__ = ["classifier_free_guidance", "edm_sigma"]


def edm_sigma(alphas_cumprod: Tensor) -> Tensor:
    """The noise level σ = √((1 - ᾱ_t) / ᾱ_t) of a variance-preserving process (EDM's σ: x_t / √ᾱ_t
    = x_0 + σ·ε), the unit of ``guidance_interval``; same shape as ``alphas_cumprod``."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def classifier_free_guidance(model: ModelFn, guidance_scale: float, uncond_kwargs: dict[str, Tensor], *,
                             interval: tuple[float, float] | None = None,
                             alphas_cumprod: Tensor | None = None) -> ModelFn:
    """Wrap ``model`` so that one batched forward of [conditional; unconditional] inputs returns

        ε̂ = ε_c + (s - 1)·(ε_c - ε_u)   (= ε_u + s·(ε_c - ε_u))

    on the ε channels (as many as x_t has), with any further channels (the learned variance) taken
    from the conditional half. ``uncond_kwargs`` replaces the conditioning keys for the
    unconditional half (typically ``tokens`` and ``mask`` of the empty caption, or its encoding
    ``xf_proj`` and ``xf_out``, batch 1 or B); keys absent from it (``low_res``, ``inpaint_image``…)
    are shared. The [conditional; unconditional] keyword tensors are concatenated once per sampling
    call (the first step) and reused while the sampler passes the same tensors. At
    ``guidance_scale == 1`` the conditional model is called alone: the result is exactly the
    conditional prediction, at half the cost.

    Args:
        interval: ``(σ_lo, σ_hi)``: guide only at steps whose noise level σ (:func:`edm_sigma`) lies
            in ``(σ_lo, σ_hi]``; elsewhere return the conditional model's output alone (one forward
            of batch B instead of 2B). The step is read from ``timesteps[0]`` (every sample of a
            sampler's batch is at the same step): a scalar read per step, free on the CPU, one
            synchronisation per step on a GPU. None: guide at every step.
        alphas_cumprod: ᾱ of the *original* process (``diffusion.base_alphas_cumprod``), indexed by
            the original step indices the model receives; required with ``interval``.
    """
    if guidance_scale == 1.0:
        return model
    guided_steps: list[bool] | None = None
    if interval is not None:
        if alphas_cumprod is None:
            raise ValueError("a guidance interval needs alphas_cumprod (the original process's ᾱ)")
        lo, hi = interval
        sigma = edm_sigma(alphas_cumprod.to(torch.float64))
        guided_steps = ((sigma > lo) & (sigma <= hi)).tolist()
    paired: dict[str, Any] = {"for": None, "kwargs": None}

    def pair(cond_kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
        """[cond; uncond] keyword tensors, made once for the tensors the sampler passes."""
        seen = paired["for"]
        if seen is not None and seen.keys() == cond_kwargs.keys() and all(
                seen[k] is v for k, v in cond_kwargs.items()):
            return paired["kwargs"]
        unknown = set(uncond_kwargs) - set(cond_kwargs)
        if unknown:
            raise ValueError(f"uncond_kwargs has keys the model is not called with: {sorted(unknown)}")
        kwargs = {
            key: value if value is None else torch.cat([value, _batched(uncond_kwargs.get(key, value), batch, key)])
            for key, value in cond_kwargs.items()
        }
        paired.update({"for": dict(cond_kwargs), "kwargs": kwargs})  # holds the tensors: ids stay valid
        return kwargs

    def guided(x_t: Tensor, timesteps: Tensor, **cond_kwargs: Any) -> Tensor:
        if guided_steps is not None and not guided_steps[int(timesteps[0])]:
            return model(x_t, timesteps, **cond_kwargs)
        batch = x_t.shape[0]
        kwargs = pair(cond_kwargs, batch)
        out = model(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), **kwargs)
        cond, uncond = rearrange(out, "(two b) c h w -> two b c h w", two=2)
        c = x_t.shape[1]
        eps_cond, eps_uncond = cond[:, :c], uncond[:, :c]
        eps = eps_cond + (guidance_scale - 1.0) * (eps_cond - eps_uncond)
        return torch.cat([eps, cond[:, c:]], dim=1)

    return guided


def _batched(value: Tensor, batch: int, key: str) -> Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"uncond_kwargs[{key!r}] has batch {value.shape[0]}, expected 1 or {batch}")

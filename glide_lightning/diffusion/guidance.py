"""Guidance: classifier-free guidance (Ho & Salimans 2021; GLIDE) and classifier / CLIP gradient
guidance (Dhariwal & Nichol 2021; GLIDE §2.3): the only place each lives.

Classifier-free guidance wraps the model (:func:`classifier_free_guidance`), so every sampler honours
it. Gradient guidance shifts the ancestral step's mean (:func:`condition_mean`) by Σ times the gradient
that a ``cond_fn`` returns (:func:`classifier_guidance` makes one from a differentiable score, e.g. a
noised CLIP's image-caption similarity); the samplers that take no such step refuse a ``cond_fn``.

Classifier-free guidance is optionally
limited to an interval of noise levels (Kynkäänniemi et al. 2024, "Applying Guidance in a
Limited Interval Improves Sample and Distribution Quality in Diffusion Models"): outside it the
conditional model runs alone, which both saves its unconditional forward passes and, reportedly,
improves FID (guidance at the noisiest steps collapses diversity, at the cleanest it does little).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from einops import rearrange
from torch import Tensor

from glide_lightning.diffusion.gaussian import ModelFn

__all__ = ["CondFn", "ScoreFn", "classifier_free_guidance", "classifier_guidance", "condition_mean", "edm_sigma"]

CondFn = Callable[[Tensor, Tensor], Tensor]
"""``cond_fn(x_t [B, C, H, W], timesteps [B])`` → the guidance gradient, shaped like ``x_t``; ``timesteps``
are the *original* process's step indices (as the model receives them)."""
ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score_fn(x_t, timesteps)`` → a differentiable score per sample ``[B]`` (a log-probability of the
condition, or CLIP's scaled image-caption similarity)."""


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
    conditional prediction, at half the cost. The combination is computed in ``x_t``'s dtype (float32)
    whatever the network's output dtype (bf16 under autocast).

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
        out = model(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), **kwargs).to(x_t.dtype)  # fp32 guidance
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


def classifier_guidance(score_fn: ScoreFn, scale: float) -> CondFn:
    """The ``cond_fn`` of gradient guidance: ``s · ∇_{x_t} score_fn(x_t, t)`` per sample.

    Dhariwal & Nichol 2021 (Algorithm 1) ascend ``s · ∇ log p_φ(y | x_t)``; GLIDE §2.3 replaces the
    classifier by a noised CLIP's ``f(x_t, t) · g(c)``. The samples are independent, so the gradient of
    the batch's summed score is each sample's own gradient. Gradients are taken with autograd enabled
    even inside the samplers' ``no_grad`` loop, on a detached copy of ``x_t``; the result is detached.

    Args:
        score_fn: a score per sample ``[B]`` of ``(x_t, timesteps)``.
        scale: the guidance scale s (0 turns guidance off: the gradient is then zero).
    """

    def cond_fn(x_t: Tensor, timesteps: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            score = score_fn(x, timesteps)
            if score.shape != x_t.shape[:1]:
                raise ValueError(f"score_fn must return one score per sample [{x_t.shape[0]}], got {tuple(score.shape)}")
            (grad,) = torch.autograd.grad(score.sum(), x)
        return scale * grad.detach()

    return cond_fn


def condition_mean(out: dict[str, Tensor], cond_fn: CondFn, x_t: Tensor, timesteps: Tensor) -> Tensor:
    """The guided mean of p(x_{t-1} | x_t): ``μ + Σ · cond_fn(x_t, t)`` (Dhariwal & Nichol 2021, Algorithm 1:
    μ + sΣ∇_{x_t} log p_φ(y | x_t), the scale s inside ``cond_fn``); ``out`` is
    :meth:`~glide_lightning.diffusion.gaussian.GaussianDiffusion.p_mean_variance`'s, ``timesteps`` the original
    step indices of ``x_t`` ``[B]``. Returns ``[B, C, H, W]``."""
    gradient = cond_fn(x_t, timesteps)
    if gradient.shape != x_t.shape:
        raise ValueError(f"cond_fn returned {tuple(gradient.shape)}, expected x_t's shape {tuple(x_t.shape)}")
    return out["mean"] + out["variance"] * gradient.to(out["mean"].dtype)

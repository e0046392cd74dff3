"""Samplers of the reverse process, with one signature and a registry by name.

``sampler(diffusion, model, shape, *, model_kwargs, noise, noise_scale, clip_denoised, denoised_fn,
progress, generator, device, cond_fn) -> x_0`` for every entry of :data:`SAMPLERS`; options particular to one
sampler (DDIM's ``eta``) are bound with :func:`get_sampler`. Guidance is not a sampler's business:
pass a guided model (see :mod:`glide_lightning.diffusion.guidance`). Gradient (classifier / CLIP)
guidance comes as ``cond_fn``, which the ancestral sampler hands to
:func:`~glide_lightning.diffusion.guidance.condition_mean` at every step; the others refuse it (their
steps have no Σ to scale a gradient by).

- ``ddpm``: ancestral sampling with the model's variance (Ho et al. 2020; Nichol & Dhariwal 2021).
- ``ddim``: DDIM (Song et al. 2021), deterministic at η = 0.
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
  Diffusion Probabilistic Models", multistep second order in the data prediction).
- ``unipc``: UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
  of Diffusion Models", B(h) = e^h - 1 ("bh2"), second order, data prediction).

The two multistep solvers integrate the probability-flow ODE from the model's x_0 prediction alone
(so a learned variance is simply not used) and take Hugging Face diffusers' schedulers as their
backend (:mod:`glide_lightning.diffusion.solvers`); their papers report near-converged samples in 10-25
steps, where ancestral sampling needs 100 or more.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable, Literal, Protocol, get_args

import torch
from torch import Tensor

from glide_lightning.diffusion.gaussian import DenoisedFn, GaussianDiffusion, ModelFn
from glide_lightning.diffusion.guidance import CondFn, condition_mean

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "unipc"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
StepFn = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, or one per sample (then sample i depends on its own generator only,
whatever else is in the batch: resumable and shardable generation)."""


class Sampler(Protocol):
    def __call__(self, diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], *,
                 model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None, noise_scale: float = 1.0,
                 clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None, progress: bool = False,
                 generator: Generators = None, device: torch.device | str | None = None,
                 cond_fn: CondFn | None = None) -> Tensor: ...


def ddpm_sample(diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], *,
                model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None, noise_scale: float = 1.0,
                clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None, progress: bool = False,
                generator: Generators = None, device: torch.device | str | None = None,
                cond_fn: CondFn | None = None) -> Tensor:
    """Ancestral sampling: x_{t-1} ~ N(μ_θ(x_t, t), Σ_θ(x_t, t)), no noise added at t = 0.

    ``noise`` is the initial x_T (drawn from ``generator`` if absent); ``noise_scale`` multiplies it
    (GLIDE's ``upsample_temp``). ``cond_fn`` (gradient guidance) shifts each step's mean by Σ times its
    gradient at x_t (:func:`~glide_lightning.diffusion.guidance.condition_mean`), called with the
    original step indices."""

    def step(x: Tensor, t: Tensor) -> Tensor:
        out = diffusion.p_mean_variance(model, x, t, model_kwargs, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        mean = out["mean"] if cond_fn is None else condition_mean(out, cond_fn, x, diffusion.timestep_map.to(t.device)[t])
        z = _randn_like(x, generator)
        return mean + _nonzero(t, x) * torch.exp(0.5 * out["log_variance"]) * z

    return _loop(diffusion, step, shape, noise, noise_scale, progress, generator, device)


def ddim_sample(diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], *,
                model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None, noise_scale: float = 1.0,
                clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None, progress: bool = False,
                generator: Generators = None, device: torch.device | str | None = None,
                eta: float = 0.0, cond_fn: CondFn | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at ``eta=0``; ``eta=1`` has DDPM's posterior
    variance. Usually run on a respaced process (``diffusion.respace("ddim50")``)."""
    _refuse_cond_fn("ddim", cond_fn)

    def step(x: Tensor, t: Tensor) -> Tensor:
        out = diffusion.p_mean_variance(model, x, t, model_kwargs, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = diffusion._extract("alphas_cumprod", t, x)
        abar_prev = diffusion._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * abar_prev.sqrt() + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
        if eta == 0:
            return mean
        return mean + _nonzero(t, x) * sigma * _randn_like(x, generator)

    return _loop(diffusion, step, shape, noise, noise_scale, progress, generator, device)


def dpmpp_2m_sample(diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], *,
                    model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None, noise_scale: float = 1.0,
                    clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None, progress: bool = False,
                    generator: Generators = None, device: torch.device | str | None = None,
                    cond_fn: CondFn | None = None) -> Tensor:
    """DPM-Solver++(2M): deterministic given x_T, one model evaluation per step of ``diffusion``
    (run it on a respaced process: ``diffusion.respace("20")``); see :mod:`~glide_lightning.diffusion.solvers`."""
    _refuse_cond_fn("dpmpp_2m", cond_fn)
    from glide_lightning.diffusion.solvers import multistep_step_fn

    step = multistep_step_fn("dpmpp_2m", diffusion, model, model_kwargs, clip_denoised, denoised_fn)
    return _loop(diffusion, step, shape, noise, noise_scale, progress, generator, device)


def unipc_sample(diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], *,
                 model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None, noise_scale: float = 1.0,
                 clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None, progress: bool = False,
                 generator: Generators = None, device: torch.device | str | None = None,
                 cond_fn: CondFn | None = None) -> Tensor:
    """UniPC (bh2, order 2): the predictor of each step is corrected with the next model evaluation,
    so it costs one evaluation per step of ``diffusion``, as DPM-Solver++; deterministic given x_T."""
    _refuse_cond_fn("unipc", cond_fn)
    from glide_lightning.diffusion.solvers import multistep_step_fn

    step = multistep_step_fn("unipc", diffusion, model, model_kwargs, clip_denoised, denoised_fn)
    return _loop(diffusion, step, shape, noise, noise_scale, progress, generator, device)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpmpp_2m": dpmpp_2m_sample,
                                              "unipc": unipc_sample}


def get_sampler(name: SamplerName, **options: Any) -> Sampler:
    """The sampler called ``name`` with its own options bound (``get_sampler("ddim", eta=0.0)``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return functools.partial(SAMPLERS[name], **options) if options else SAMPLERS[name]


def _refuse_cond_fn(name: str, cond_fn: CondFn | None) -> None:
    if cond_fn is not None:
        raise ValueError(f"sampler {name!r} cannot apply gradient (classifier / CLIP) guidance: it shifts the "
                         f"ancestral step's mean by Σ·∇; sample with sampler 'ddpm'")


def _loop(diffusion: GaussianDiffusion, step: StepFn, shape: tuple[int, ...], noise: Tensor | None, noise_scale: float,
          progress: bool, generator: Generators, device: torch.device | str | None) -> Tensor:
    if noise is None:
        x = _randn(shape, generator, torch.float32, device)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise if device is None else noise.to(device)
    x = x * noise_scale
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    # every step's t made once, before the loop: the loop itself allocates no index tensors
    all_t = torch.arange(diffusion.num_timesteps, device=x.device).unsqueeze(1).expand(-1, shape[0])  # [T, B]
    with torch.no_grad():
        for i in steps:
            x = step(x, all_t[i])
    return x


def _randn_like(x: Tensor, generator: Generators) -> Tensor:
    return _randn(tuple(x.shape), generator, x.dtype, x.device)


def _randn(shape: tuple[int, ...], generator: Generators, dtype: torch.dtype,
           device: torch.device | str | None) -> Tensor:
    """Standard normal noise from no generator, one generator, or one generator per sample."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device or generator.device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]).to(
        device or generator[0].device)


def _nonzero(t: Tensor, x: Tensor) -> Tensor:
    """1 where t > 0, 0 at the last step; shaped to broadcast against x."""
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

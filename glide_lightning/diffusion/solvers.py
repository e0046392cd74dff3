"""Multistep ODE solvers (DPM-Solver++(2M), UniPC) on our processes, with Hugging Face diffusers'
schedulers as the backend (``pip install 'glide_lightning[solvers]'``). They are samplers like the others
through their entries in :data:`~glide_lightning.diffusion.samplers.SAMPLERS` (backend ``DIFFUSERS``): this
module is the backend only, and names its solvers for itself.

How our process maps onto theirs: a diffusers scheduler is built on *this* process (for a respaced
process, the K kept steps of the original) with ``num_train_timesteps`` = K and
``timestep_spacing="trailing"``, so that its inference timesteps are exactly K - 1, …, 0: the indices
of our own sampler loop; it holds this process's float64 ᾱ table, not a ᾱ of its own re-derived from β
(see :func:`diffusers_scheduler`: float32 β near 1 lose ᾱ_T). The
network is called by :meth:`GaussianDiffusion.call_model` with the *original* step
``timestep_map[t]``, as every sampler does, and the scheduler receives our x_0 prediction
(``prediction_type="sample"``) from :meth:`GaussianDiffusion.p_mean_variance`: ε (and whatever the
model's output means, clipped to [-1, 1] with ``clip_denoised``, then ``denoised_fn``) is
interpreted there alone; a learned variance is not used. The last step goes to σ = 0
(``final_sigmas_type="zero"``): the result is a clean x_0 estimate, as DDIM's last step.

Sources: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (Algorithm 2, 2M); Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models" (UniPC-2 with B(h) = e^h - 1); diffusers' ``DPMSolverMultistepScheduler``
and ``UniPCMultistepScheduler`` documentation.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor

from glide_lightning.diffusion.gaussian import DenoisedFn, GaussianDiffusion, ModelFn

__all__ = ["SolverName", "diffusers_available", "diffusers_scheduler", "multistep_step_fn"]

SolverName = Literal["dpmpp_2m", "unipc"]


def diffusers_available() -> bool:
    """Whether the solvers' backend (diffusers) can be imported."""
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def diffusers_scheduler(name: SolverName, diffusion: GaussianDiffusion) -> Any:
    """A fresh diffusers scheduler for ``name`` whose inference timesteps are K - 1, …, 0, the steps of
    ``diffusion`` (K = ``diffusion.num_timesteps``), and whose ᾱ is ``diffusion``'s own float64 table.

    Raises:
        ImportError: diffusers is not installed (the message says how to install it).
    """
    try:
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"sampler {name!r} uses Hugging Face diffusers' schedulers: pip install "
                          f"'glide_lightning[solvers]' (or diffusers)") from error
    steps = diffusion.num_timesteps
    common = dict(num_train_timesteps=steps, trained_betas=diffusion.table("betas").tolist(), solver_order=2,
                  prediction_type="sample", timestep_spacing="trailing", final_sigmas_type="zero",
                  lower_order_final=True)
    if name == "dpmpp_2m":
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    elif name == "unipc":
        scheduler = UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **common)
    else:
        raise ValueError(f"unknown solver {name!r}; choose dpmpp_2m or unipc")
    _hold_alphas_cumprod(scheduler, diffusion.table("alphas_cumprod"))
    scheduler.set_timesteps(steps)
    if scheduler.timesteps.tolist() != list(range(steps - 1, -1, -1)):  # pragma: no cover - a diffusers change
        raise RuntimeError(f"diffusers' {type(scheduler).__name__} no longer visits every step of a {steps}-step "
                           f"process with trailing spacing: got {scheduler.timesteps.tolist()}")
    scheduler.set_begin_index(0)  # no search for the first step's index (a device sync on GPUs)
    return scheduler


def _hold_alphas_cumprod(scheduler: Any, alphas_cumprod: Tensor) -> None:
    """Make ``scheduler`` work with ``alphas_cumprod`` (float64, [K]) instead of the ᾱ it derived from β.

    Why: diffusers' ``__init__`` stores ``trained_betas`` as float32 and takes ᾱ = cumprod(1 - β) of
    them. A process respaced to few steps jumps over most of the schedule, so its last β comes close to
    1 (GLIDE's cosine, 1000 steps respaced to 5: β_T = 1 - 1.7e-8; float32 numbers below 1 are 6e-8
    apart): at 2 to 6 steps β_T rounds to 1, ᾱ_T = 0, σ_T = √((1 - ᾱ) / ᾱ) = inf and every sample is
    NaN; at 7 to 25 steps the rounding leaves ᾱ_T off by 0.2-62 % (7: 62 %, 10: 27 %, 15: 10 %). ᾱ
    itself (2.4e-9 at T) is well within float32's range: only the detour through β loses it. (The
    scheduler's config still lists those β: one rebuilt from that config has the problem again.)

    Where diffusers reads ᾱ: ``__init__`` derives ``alphas``, ``alphas_cumprod``, ``alpha_t``,
    ``sigma_t``, ``lambda_t`` and ``sigmas`` from β; ``set_timesteps`` recomputes ``sigmas`` (the only
    table its ``step`` uses, via α = 1 / √(1 + σ²), σ_t = σ α) from ``alphas_cumprod`` and reads
    ``lambda_t`` (DPM-Solver's ``lambda_min_clipped``). Replacing those attributes after ``__init__``
    therefore holds for every later ``set_timesteps`` call. ``set_timesteps`` then stores the visited σ
    as float32 (relative error ≤ 2⁻²⁴, ≈ 1.2e-7 in ᾱ) and ``step`` runs in float32: precise enough,
    since our float32 model output and x_t are what it combines; it is the float32 *β* that was not.
    """
    abar = alphas_cumprod.to(torch.float64).cpu()
    alphas = abar / torch.cat([abar.new_ones(1), abar[:-1]])  # 1 - β in float64, as the process has them
    scheduler.betas = 1 - alphas
    scheduler.alphas = alphas
    scheduler.alphas_cumprod = abar
    scheduler.alpha_t = abar.sqrt()
    scheduler.sigma_t = (1 - abar).sqrt()
    scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    scheduler.sigmas = ((1 - abar) / abar).sqrt()  # set_timesteps replaces it with the visited steps' σ


def multistep_step_fn(name: SolverName, diffusion: GaussianDiffusion, model: ModelFn,
                      model_kwargs: dict[str, Any] | None, clip_denoised: bool,
                      denoised_fn: DenoisedFn | None) -> Callable[[Tensor, Tensor], Tensor]:
    """The step ``(x_t [B, C, H, W], t [B]) -> x_{t-1}`` of solver ``name`` for the samplers' loop,
    which visits t = K - 1, …, 0 once each; the solver keeps its history (the previous x_0
    predictions) for one sampling call."""
    scheduler = diffusers_scheduler(name, diffusion)

    def step(x: Tensor, t: Tensor) -> Tensor:
        out = diffusion.p_mean_variance(model, x, t, model_kwargs, clip_denoised=clip_denoised,
                                        denoised_fn=denoised_fn)
        # the scheduler counts its own steps (set_begin_index): the timestep argument is not read
        return scheduler.step(out["pred_xstart"], 0, x).prev_sample

    return step


"""The multistep solvers (DPM-Solver++(2M), UniPC) on an analytic model, against the exact
probability-flow ODE solution and against diffusers' scheduler driven the standard way."""

import math

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, get_sampler
from glide_lightning.diffusion.solvers import diffusers_scheduler

pytest.importorskip("diffusers")

DATA_STD = 0.5


def gaussian_process() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(steps=1000, noise_schedule="cosine",
                                                         variance_type="fixed_small", loss_type="simple"))


def gaussian_data_eps(full: GaussianDiffusion, with_variance: bool = False):
    """The exact ε of data x_0 ~ N(0, s² I): E[ε | x_t] = √(1-ᾱ) x_t / (ᾱ s² + 1 - ᾱ); with
    ``with_variance`` three more (learned-range) channels follow, which the solvers must ignore."""
    abar = full.table("alphas_cumprod").float()

    def model(x_t, timesteps):
        a = abar[timesteps].reshape(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x_t / (a * DATA_STD**2 + 1 - a)
        return torch.cat([eps, torch.full_like(x_t, 0.7)], 1) if with_variance else eps

    return model


def exact_ode_solution(full: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE keeps x_t / std(x_t): from step T-1 to σ = 0, x_0 = x_T s / std_T."""
    a = full.table("alphas_cumprod")[-1].float()
    return x_T * DATA_STD / (a * DATA_STD**2 + 1 - a).sqrt()


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_solvers_converge_to_the_ode_solution_at_second_order(name):
    full = gaussian_process()
    model = gaussian_data_eps(full)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = exact_ode_solution(full, x_T)

    def error(sampler, steps):
        out = get_sampler(sampler)(full.respace(steps), model, x_T.shape, noise=x_T, clip_denoised=False)
        return (out - exact).abs().max().item()

    e100, e200 = error(name, "100"), error(name, "200")
    assert e200 < e100 / 3  # second order: error / 4 per halving (DDIM, first order: / 2)
    assert e100 < error("ddim", "100") / 3 and e200 < 3e-3


def test_dpmpp_2m_matches_diffusers_driven_on_the_original_process():
    """Our mapping (a scheduler on the respaced process's own β, trailing spacing, x_0 predictions
    from GaussianDiffusion) against the usual diffusers set-up: the 1000-step β, our kept steps as
    custom timesteps, the model's ε handed over as is."""
    from diffusers import DPMSolverMultistepScheduler

    full = gaussian_process()
    model = gaussian_data_eps(full)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in ("10", "25"):
        diffusion = full.respace(steps)
        ours = get_sampler("dpmpp_2m")(diffusion, model, x_T.shape, noise=x_T, clip_denoised=False)
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=full.table("betas").tolist(),
                                                algorithm_type="dpmsolver++", solver_order=2,
                                                prediction_type="epsilon", final_sigmas_type="zero")
        scheduler.set_timesteps(timesteps=diffusion.timestep_map.flip(0).tolist())
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(2)), t, x).prev_sample
        torch.testing.assert_close(ours, x, atol=1e-3, rtol=1e-3)  # float32 tables there, float64 here


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_solvers_use_eps_only_and_call_the_model_with_original_steps(name):
    full = gaussian_process()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=1000, noise_schedule="cosine"), "10")
    seen = []
    plain, learned = gaussian_data_eps(full), gaussian_data_eps(full, with_variance=True)

    def probe(x_t, timesteps):
        seen.append(timesteps[0].item())
        return learned(x_t, timesteps)

    x_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with_variance = get_sampler(name)(diffusion, probe, x_T.shape, noise=x_T)
    eps_only = get_sampler(name)(full.respace("10"), plain, x_T.shape, noise=x_T)
    torch.testing.assert_close(with_variance, eps_only, atol=0, rtol=0)
    assert seen == diffusion.timestep_map.flip(0).tolist()  # one evaluation per step, original indices


def closed_form_alphas_cumprod(schedule: str, base_steps: int) -> torch.Tensor:
    """ᾱ_0..ᾱ_{T-1} (float64) from the schedules' formulas, not from any β table: linear, the product
    of 1 - β_s with β from 0.1 / T to 20 / T; cosine, f(t + 1) / f(0) with
    f(s) = cos²((s / T + 0.008) / 1.008 · π / 2), except at the last step, whose β is capped at 0.999."""
    if schedule == "linear":
        return torch.cumprod(1 - torch.linspace(0.1 / base_steps, 20 / base_steps, base_steps, dtype=torch.float64), 0)
    f = lambda s: torch.cos((s / base_steps + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = f(torch.arange(1, base_steps + 1, dtype=torch.float64)) / f(torch.tensor(0.0, dtype=torch.float64))
    abar[-1] = abar[-2] * (1 - 0.999)
    return abar


@pytest.mark.parametrize("base_steps", [100, 1000])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_scheduler_alpha_bar_is_the_process_alpha_bar_at_every_visited_step(name, schedule, base_steps):
    """Few steps on a respaced process end on a β close to 1 (cosine, 1000 steps, 5 steps: 1 - 1.7e-8),
    which float32 rounds to 1: a scheduler that re-derives ᾱ from float32 β had ᾱ_T = 0 there (σ = inf,
    NaN samples) and ᾱ_T off by 0.2-62 % from 7 to 25 steps. Tolerances: the scheduler holds our float64
    ᾱ table as is; the σ = √((1 - ᾱ) / ᾱ) its steps use are stored in float32 by diffusers' set_timesteps
    (relative error ≤ 2⁻²⁴, so ≤ 2·2⁻²⁴ ≈ 1.2e-7 in ᾱ = 1 / (1 + σ²)), and the respaced float64 table
    differs from the closed form by ≤ 2e-8 (its β round trip near β = 1): 1e-6 bounds both with room."""
    exact_all = closed_form_alphas_cumprod(schedule, base_steps)
    for steps in (2, 3, 5, 7, 10, 15, 25):
        diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=base_steps, noise_schedule=schedule), str(steps))
        scheduler = diffusers_scheduler(name, diffusion)  # set_timesteps has run
        visited = scheduler.timesteps  # K - 1, ..., 0: indices of the respaced process
        exact = exact_all[diffusion.timestep_map[visited]]
        where = f"{name}, {schedule} {base_steps} steps respaced to {steps}"
        torch.testing.assert_close(scheduler.alphas_cumprod[visited].double(), exact, rtol=1e-6, atol=0,
                                   msg=lambda m: f"{where}, alphas_cumprod: {m}")
        abar_of_sigmas = 1 / (1 + scheduler.sigmas[:-1].double() ** 2)
        torch.testing.assert_close(abar_of_sigmas, exact, rtol=1e-6, atol=0, msg=lambda m: f"{where}, sigmas: {m}")
        assert scheduler.sigmas[-1] == 0, where  # final_sigmas_type="zero"

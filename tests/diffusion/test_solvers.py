"""The multistep solvers (DPM-Solver++(2M), UniPC) on an analytic model, against the exact
probability-flow ODE solution and against diffusers' scheduler driven the standard way."""

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, get_sampler

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

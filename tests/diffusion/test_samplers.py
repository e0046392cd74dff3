from typing import get_args

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, ddim_sample, ddpm_sample, get_sampler
from glide_lightning.diffusion.samplers import SAMPLERS
from glide_lightning.diffusion.solvers import SolverName


def make(variance="fixed_small", loss="simple", steps=100, schedule="cosine"):
    return GaussianDiffusion.from_config(DiffusionConfig(steps=steps, noise_schedule=schedule, variance_type=variance,
                                                         loss_type=loss))


def oracle(diffusion_full, target):
    """The exact ε for data that is a single point ``target``: ε = (x_t - √ᾱ_t x_0) / √(1 - ᾱ_t), with
    ᾱ at the original step the model receives. √ᾱ and √(1 - ᾱ) are taken in float64 (1 - ᾱ from a
    float32 ᾱ = 1 - 4e-5 would be off by 1e-3)."""
    abar = diffusion_full.table("alphas_cumprod")
    sqrt_abar, sqrt_one_minus_abar = abar.sqrt().float(), (1 - abar).sqrt().float()

    def model(x_t, timesteps):
        shape = (-1, 1, 1, 1)
        return (x_t - sqrt_abar[timesteps].reshape(shape) * target) / sqrt_one_minus_abar[timesteps].reshape(shape)

    return model


@pytest.mark.parametrize("spec", ["", "25", "ddim10"])
def test_samplers_recover_a_point_mass(spec):
    full = make()
    diffusion = full.respace(spec) if spec else full
    target = torch.tensor([0.5, -0.25, 0.75]).reshape(1, 3, 1, 1).expand(2, 3, 4, 4)
    model = oracle(full, target)
    for sample in (ddpm_sample, ddim_sample, get_sampler("ddim", eta=1.0), get_sampler("dpmpp_2m"),
                   get_sampler("unipc")):
        out = sample(diffusion, model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target, atol=2e-3, rtol=0)


@pytest.mark.parametrize("base_steps", [100, 1000])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_recovers_a_point_mass_in_few_steps_on_every_schedule(name, schedule, base_steps):
    """Every registered sampler, 2 to 25 steps, from x_T ~ N(0, I), with the exact ε of data that is the
    single point c; the oracle reads ᾱ from the unrespaced table at the original step the model receives.
    Every sampler's last step returns its x_0 prediction at step 0 (DDPM: posterior mean coefficients 1
    and 0 there, no noise; DDIM: ᾱ_prev = 1; the solvers: a first-order step to σ = 0), and for this
    oracle every x_0 prediction is c from whatever x_t, up to float32 rounding: 6e-8 measured (one ulp
    of 0.75) for all of them, so 1e-5 leaves a wide margin and fails any NaN or wrong sample."""
    if name in get_args(SolverName):
        pytest.importorskip("diffusers")
    full = make(steps=base_steps, schedule=schedule)
    target = torch.tensor([0.5, -0.25, 0.75]).reshape(1, 3, 1, 1).expand(2, 3, 4, 4)
    model = oracle(full, target)
    for steps in (2, 5, 7, 15, 25):
        out = get_sampler(name)(full.respace(str(steps)), model, (2, 3, 4, 4),
                                generator=torch.Generator().manual_seed(steps))
        assert torch.isfinite(out).all(), f"{name}: non-finite samples at {steps} steps"
        torch.testing.assert_close(out, target, atol=1e-5, rtol=0, msg=lambda m: f"{name} at {steps} steps: {m}")


def test_ddim_eta0_is_deterministic_given_the_initial_noise():
    diffusion = make().respace("ddim20")
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = lambda x, t: net(x) * 0.1
    noise = torch.randn(2, 3, 8, 8)
    a = ddim_sample(diffusion, model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(diffusion, model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = ddpm_sample(diffusion, model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    d = ddpm_sample(diffusion, model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d), "ancestral sampling must draw fresh noise at every step"


def test_seeded_sampling_is_reproducible_and_noise_scale_scales_x_T():
    diffusion = make(steps=1)  # one step: x_0 = mean(x_T) with clipping off, linear in x_T for this model
    model = lambda x, t: torch.zeros_like(x)
    kwargs = dict(clip_denoised=False)
    a = ddpm_sample(diffusion, model, (1, 3, 4, 4), generator=torch.Generator().manual_seed(3), **kwargs)
    b = ddpm_sample(diffusion, model, (1, 3, 4, 4), generator=torch.Generator().manual_seed(3), **kwargs)
    half = ddpm_sample(diffusion, model, (1, 3, 4, 4), generator=torch.Generator().manual_seed(3), noise_scale=0.5, **kwargs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(half, 0.5 * a)


def test_denoised_fn_is_applied_and_visits_every_step():
    diffusion = make().respace("10")
    calls = []

    def denoised_fn(x):
        calls.append(1)
        return torch.zeros_like(x)

    out = ddim_sample(diffusion, lambda x, t: torch.randn_like(x), (1, 3, 2, 2), denoised_fn=denoised_fn)
    assert len(calls) == 10
    assert out.abs().max() < 1e-6  # x_0 predictions forced to 0 → the last DDIM step returns 0


def test_learned_variance_model_samples_with_its_variance():
    diffusion = make("learned_range", "hybrid").respace("10")
    eps_then_v = lambda x, t: torch.cat([torch.zeros_like(x), torch.ones_like(x)], 1)
    out = ddpm_sample(diffusion, eps_then_v, (2, 3, 4, 4), progress=True)
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()


def test_unknown_sampler_lists_choices():
    with pytest.raises(ValueError, match="ddpm, ddim"):
        get_sampler("euler")  # type: ignore[arg-type]


def test_noise_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="noise has shape"):
        ddpm_sample(make(), lambda x, t: x, (2, 3, 4, 4), noise=torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("sampler", [ddpm_sample, get_sampler("ddim", eta=0.5), get_sampler("dpmpp_2m"),
                                     get_sampler("unipc")])
def test_per_sample_generators_make_each_sample_independent_of_its_batch(sampler):
    diffusion = make().respace("10")
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = lambda x, t: net(x) * 0.1
    seeds = [5, 6, 7]
    together = sampler(diffusion, model, (3, 3, 4, 4), generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = sampler(diffusion, model, (1, 3, 4, 4), generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sampler(diffusion, model, (3, 3, 4, 4), generator=[torch.Generator(), torch.Generator()])

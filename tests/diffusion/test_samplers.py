import dataclasses
import re
from typing import get_args, get_type_hints

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, ddim_sample, ddpm_sample, get_sampler
from glide_lightning.diffusion import samplers
from glide_lightning.diffusion.samplers import (
    DIFFUSERS,
    SAMPLERS,
    SamplerBackend,
    SamplerName,
    SamplerSpec,
    check_sampler_options,
    sampler_names,
    sampler_options,
)


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
    if SAMPLERS[name].backend is DIFFUSERS:
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


# ----------------------------------------------------------------------------------- the registry
def test_the_typed_choices_are_the_registry():
    """``SamplerName`` (the configs' and command line's choices) lists the registry, in its order; the upsampler
    stage's ``Literal`` lists ``auto`` and the samplers registered for that stage."""
    from glide_lightning.sampling.config import UPSAMPLE_SAMPLERS, SamplingConfig

    assert get_args(SamplerName) == tuple(SAMPLERS)
    upsample = get_args(get_type_hints(SamplingConfig)["upsample_sampler"])
    assert set(upsample) == set(UPSAMPLE_SAMPLERS) == {"auto", *sampler_names(upsample_stage=True)}


def test_get_sampler_binds_what_the_spec_declares_and_refuses_the_rest():
    assert get_sampler("ddim", eta=0.5).options == {"eta": 0.5}
    with pytest.raises(TypeError, match="sampler 'ddpm' takes no option 'eta' \\(its options: none\\)"):
        get_sampler("ddpm", eta=0.5)
    with pytest.raises(TypeError, match="sampler 'ddim' takes no option 'order' \\(its options: eta\\)"):
        get_sampler("ddim", order=2)
    with pytest.raises(ValueError, match="sampler 'ddim' cannot apply gradient .* sample with sampler 'ddpm'"):
        get_sampler("ddim", cond_fn=lambda x, t: x)  # refused when bound, as when called
    get_sampler("ddpm", cond_fn=lambda x, t: x)
    # an option given at the call overrides the bound one: DDIM at η = 1 draws noise, at η = 0 it does not
    diffusion, model = make().respace("5"), lambda x, t: torch.zeros_like(x)
    noise = torch.randn(1, 3, 4, 4)
    runs = [get_sampler("ddim", eta=1.0)(diffusion, model, noise.shape, noise=noise, eta=eta,
                                         generator=torch.Generator().manual_seed(seed)) for eta, seed in
            [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[2], runs[3])


def test_the_rules_come_from_the_specs(monkeypatch):
    """Each rule a config's sampler must keep is read from its spec: gradient guidance (CLIP guidance), the
    respacing forms (``ddimN``), the backend, ``eta``; the messages are the ones the configs always gave."""
    assert check_sampler_options("ddpm", clip_guidance_scale=3.0, steps="fast27") == []
    assert check_sampler_options("ddim", eta=1.0, steps="ddim50") == []
    assert check_sampler_options("ddim", clip_guidance_scale=3.0) == [
        "clip_guidance_scale 3.0 shifts the ancestral step's mean, but sampler is 'ddim': use sampler 'ddpm' or "
        "clip_guidance_scale 0"]
    assert check_sampler_options("unipc", steps="ddim50") == [
        "steps 'ddim50' is DDIM's stride spacing but sampler is 'unipc': use sampler 'ddim', or steps '50' for "
        "evenly spaced unipc steps"]
    assert check_sampler_options("ddpm", eta=0.5) == [
        "eta 0.5 is DDIM's noise level, but sampler is 'ddpm': use sampler 'ddim' or leave eta at 0"]
    assert check_sampler_options("ddim", eta=-1.0) == ["eta must be >= 0, got -1.0"]
    assert check_sampler_options("euler") == ["sampler 'euler' is unknown: choose one of ddpm, ddim, dpmpp_2m, unipc"]
    missing = SamplerBackend("diffusers", lambda: False, DIFFUSERS.install)
    monkeypatch.setitem(samplers.SAMPLERS, "unipc", dataclasses.replace(SAMPLERS["unipc"], backend=missing))
    assert check_sampler_options("unipc") == [
        "sampler 'unipc' needs Hugging Face diffusers: pip install 'glide_lightning[solvers]'"]


@pytest.fixture
def fake_sampler(monkeypatch):
    """A new stochastic sampler, ``fake``, registered in a copy of the registry (as adding one to
    :data:`SAMPLERS` would): DDIM's step, taking ``eta``; returns the etas its steps were made with."""
    seen: list[float] = []

    def step(context, *, eta=0.0):
        seen.append(eta)
        return SAMPLERS["ddim"].step(context, eta=eta)

    registry = {**SAMPLERS, "fake": SamplerSpec(step, "DDIM under another name (a test).", takes_eta=True)}
    monkeypatch.setattr(samplers, "SAMPLERS", registry)
    return seen


def test_a_new_stochastic_sampler_gets_its_eta_everywhere(fake_sampler, tiny_checkpoint):
    """The silent-drop bug class: a sampler added to the registry with ``takes_eta`` gets the config's eta from
    the config's validation, ``sample_batch``'s binding and the sweep's per-sampler options, with no other edit."""
    from glide_lightning.evaluation.fid_cli import SweepCommand
    from glide_lightning.sampling import SamplingConfig, load_checkpoint, sample_batch

    config = SamplingConfig(sampler="fake", eta=0.5, steps="3", guidance_scale=1.0)  # validation: accepted
    loaded, cpu = load_checkpoint(tiny_checkpoint), torch.device("cpu")
    fake = sample_batch(loaded, ["a red circle"], [0], config, cpu)
    assert fake_sampler == [0.5]
    ddim = sample_batch(loaded, ["a red circle"], [0], dataclasses.replace(config, sampler="ddim"), cpu)
    torch.testing.assert_close(fake, ddim, rtol=0, atol=0)  # DDIM's step at the same η from the same noise
    deterministic = sample_batch(loaded, ["a red circle"], [0], dataclasses.replace(config, eta=0.0), cpu)
    assert fake_sampler == [0.5, 0.0] and not torch.equal(fake, deterministic)
    sweep = SweepCommand(ckpt="m.ckpt", samplers=["fake", "ddpm", "ddim"], sampling=config)  # type: ignore[list-item]
    assert [(s.sampler, s.eta) for s in sweep.samplings()] == [("fake", 0.5), ("ddpm", 0.0), ("ddim", 0.5)]
    assert sampler_options("fake", eta=0.5) == {"eta": 0.5}


def test_a_sampler_without_eta_refuses_one(fake_sampler):
    """With ``fake`` registered, ``ddpm`` still refuses an eta, with the message it always had (now naming
    both samplers that take one), in the config, in :func:`sampler_options` and in :func:`get_sampler`."""
    from glide_lightning.sampling import SamplingConfig

    rule = "eta 0.5 is DDIM's noise level, but sampler is 'ddpm': use sampler 'ddim' or 'fake' or leave eta at 0"
    with pytest.raises(ValueError, match=re.escape(rule)):
        SamplingConfig(sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match=re.escape(rule)):
        sampler_options("ddpm", eta=0.5)
    with pytest.raises(TypeError, match="sampler 'ddpm' takes no option 'eta'"):
        get_sampler("ddpm", eta=0.5)
    assert sampler_options("ddpm", eta=0.0) == {}  # 0: the sampler's own noise, nothing to bind
    with pytest.raises(ValueError, match="steps 'ddim10' is DDIM's stride spacing but sampler is 'fake'"):
        SamplingConfig(sampler="fake", steps="ddim10")  # ddimN: only for the samplers that declare it


def test_model_evaluations_count_the_sampler_s_evaluations_per_step(monkeypatch):
    from glide_lightning.sampling import SamplingConfig, model_evaluations

    monkeypatch.setattr(samplers, "SAMPLERS", {**SAMPLERS, "heun": SamplerSpec(
        SAMPLERS["ddim"].step, "two evaluations per step (a test)", evaluations_per_step=2)})
    process = DiffusionConfig(steps=100)
    assert model_evaluations(SamplingConfig(sampler="ddim", steps="10"), process) == 20
    assert model_evaluations(SamplingConfig(sampler="heun", steps="10"), process) == 40
    assert model_evaluations(SamplingConfig(sampler="heun", steps="10", guidance_scale=1.0), process) == 20

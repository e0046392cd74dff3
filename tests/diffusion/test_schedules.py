import math

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, get_named_beta_schedule, space_timesteps


def test_linear_schedule_matches_ddpm_at_1000_and_scales_with_t():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    short = get_named_beta_schedule("linear", 100)
    assert short[0].item() == pytest.approx(1e-3) and short[-1].item() == pytest.approx(0.2)
    # scaled to T, the end of the process is about as noisy as at T = 1000
    abar_end = lambda b: torch.cumprod(1 - b, 0)[-1].item()
    assert math.log(abar_end(short)) == pytest.approx(math.log(abar_end(betas)), rel=0.15)


@pytest.mark.parametrize("steps", [100, 1000])
def test_cosine_schedule_follows_alpha_bar_formula(steps):
    betas = get_named_beta_schedule("cosine", steps)
    abar = torch.cumprod(1 - betas, 0)
    f = lambda s: math.cos((s / steps + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in [0, steps // 4, steps // 2, 3 * steps // 4]:
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max().item() <= 0.999


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match="linear, cosine"):
        get_named_beta_schedule("quadratic", 10)  # type: ignore[arg-type]


def test_space_timesteps_forms():
    assert space_timesteps(1000, "") == list(range(1000))
    hundred = space_timesteps(1000, "100")
    assert len(hundred) == 100 and hundred[0] == 0 and hundred[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(10, "10") == list(range(10))


def test_fast27_is_glides_preset():
    """GLIDE's fast27 on its 1000-step upsampler process: sections of 200 steps taking 10, 10, 3, 2, 2
    steps (strides 199/9, 199/9, 99.5 rounded half to even, 199, 199), then step 999 replaced by 997."""
    tens = [0, 22, 44, 66, 88, 111, 133, 155, 177, 199]
    expected = tens + [200 + t for t in tens] + [400, 500, 599, 600, 799, 800, 997]
    assert space_timesteps(1000, "fast27") == expected
    assert space_timesteps(1000, "10,10,3,2,2") == expected[:-1] + [999]


def reference_section_steps(size: int, count: int) -> list[int]:
    """Improved DDPM's rule, as its paper's code states it: a float position advanced by the stride
    and rounded (Python round) at every step."""
    stride = (size - 1) / (count - 1) if count > 1 else 1.0
    position, steps = 0.0, []
    for _ in range(count):
        steps.append(round(position))
        position += stride
    return steps


@pytest.mark.parametrize("num_timesteps", [100, 1000, 4000])
def test_every_count_keeps_the_reference_steps(num_timesteps):
    # includes counts whose stride lands on .5 (e.g. 3 of 1000: 499.5) and the many counts for which
    # j * stride and the accumulated position round differently (e.g. 15 of 100)
    for count in range(1, num_timesteps + 1):
        assert space_timesteps(num_timesteps, str(count)) == reference_section_steps(num_timesteps, count), count
    assert space_timesteps(1000, "3") == [0, 500, 999]  # 499.5 rounds half to even
    sections = space_timesteps(1000, "7,5,31")  # sections of 334, 333, 333 steps
    assert sections == (reference_section_steps(334, 7) + [334 + t for t in reference_section_steps(333, 5)]
                        + [667 + t for t in reference_section_steps(333, 31)])


@pytest.mark.parametrize("spec", ["ddim30", "abc", "0", "300", "10,x"])
def test_bad_respacing_is_explained(spec):
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(100, spec)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["10", "ddim25", "fast27"])
def test_respaced_alpha_bar_equals_base_at_kept_steps(schedule, spec):
    base = GaussianDiffusion.from_config(DiffusionConfig(steps=1000, noise_schedule=schedule))
    respaced = base.respace(spec)
    kept = respaced.timestep_map
    assert respaced.num_timesteps == len(kept) == len(space_timesteps(1000, spec))
    torch.testing.assert_close(respaced.table("alphas_cumprod"), base.table("alphas_cumprod")[kept], rtol=1e-8, atol=1e-15)
    # respacing a respaced process starts from the original one
    torch.testing.assert_close(respaced.respace("10").timestep_map, base.respace("10").timestep_map)


def test_respaced_process_hands_the_model_original_indices():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=1000, loss_type="simple", variance_type="fixed_small"), "10")
    seen = []

    def model(x, timesteps):
        seen.append(timesteps.clone())
        return torch.zeros_like(x)

    x = torch.zeros(3, 3, 4, 4)
    diffusion.p_mean_variance(model, x, torch.tensor([0, 5, 9]))
    assert seen[0].tolist() == [0, 555, 999]

"""Gradient (classifier / CLIP) guidance: the cond_fn's gradient, the shifted ancestral mean in closed
form on a lambda model, and the samplers that cannot honour it refusing it."""

import pytest
import torch

from glide_lightning.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    classifier_guidance,
    condition_mean,
    ddpm_sample,
    get_sampler,
)

TARGET = torch.tensor([0.5, -0.25, 0.75]).reshape(1, 3, 1, 1)


def quadratic_score(x_t, timesteps):
    """-½·(t + 1)·|x_t - c|² per sample: its gradient is (t + 1)·(c - x_t)."""
    weight = (timesteps.float() + 1).reshape(-1, 1, 1, 1)
    return -0.5 * (weight * (x_t - TARGET) ** 2).sum((1, 2, 3))


def test_classifier_guidance_returns_the_scaled_gradient_even_under_no_grad():
    x_t = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 9])
    with torch.no_grad():  # as inside the samplers' loop
        grad = classifier_guidance(quadratic_score, 2.5)(x_t, t)
    expected = 2.5 * (t.float() + 1).reshape(-1, 1, 1, 1) * (TARGET - x_t)
    torch.testing.assert_close(grad, expected)
    assert not grad.requires_grad


def test_gradients_flow_to_x_t_through_a_network():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(64, 1))
    score = lambda x_t, t: net(x_t).squeeze(-1)  # noqa: E731
    x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    net.double()
    grad = classifier_guidance(score, 1.0)(x_t, torch.tensor([1, 2]))
    assert grad.shape == x_t.shape and grad.abs().min() > 0, "every pixel of x_t receives a gradient"
    direction = torch.randn_like(x_t)
    numeric = (score(x_t + 1e-6 * direction, None) - score(x_t - 1e-6 * direction, None)) / 2e-6
    torch.testing.assert_close(numeric, (grad * direction).sum((1, 2, 3)))


def test_a_score_of_the_wrong_shape_is_explained():
    with pytest.raises(ValueError, match=r"one score per sample \[2\]"):
        classifier_guidance(lambda x, t: x.sum(), 1.0)(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))


def test_condition_mean_adds_variance_times_gradient():
    out = {"mean": torch.randn(2, 3, 4, 4), "variance": torch.rand(2, 3, 4, 4)}
    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([4, 4])
    cond_fn = classifier_guidance(quadratic_score, 3.0)
    torch.testing.assert_close(condition_mean(out, cond_fn, x_t, t),
                               out["mean"] + out["variance"] * 3.0 * 5 * (TARGET - x_t))


def model(x_t, timesteps):
    """A lambda network with a learned variance (Σ differs per pixel and step)."""
    return torch.cat([0.3 * x_t + 0.01 * timesteps.reshape(-1, 1, 1, 1), torch.tanh(x_t)], dim=1)


def test_ancestral_sampler_shifts_each_mean_by_sigma_times_the_gradient_in_closed_form():
    """Two respaced steps of a learned-variance process, recomputed by hand: x_{t-1} = μ + Σ·s·∇ + σ·z,
    with the cond_fn called on the original step indices (99, then 0)."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=100, variance_type="learned_range",
                                                              loss_type="hybrid"), "2")
    assert diffusion.timestep_map.tolist() == [0, 99]
    scale, shape = 0.7, (2, 3, 4, 4)
    seen = []

    def cond_fn(x_t, timesteps):
        seen.append(timesteps.tolist())
        return classifier_guidance(quadratic_score, scale)(x_t, timesteps)

    noise = torch.randn(shape)
    sampled = ddpm_sample(diffusion, model, shape, noise=noise, cond_fn=cond_fn,
                          generator=torch.Generator().manual_seed(0))
    assert seen == [[99, 99], [0, 0]]
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # the first step's noise
    x = noise
    for t, original in ((1, 99), (0, 0)):
        t_batch = torch.full((2,), t)
        out = diffusion.p_mean_variance(model, x, t_batch)
        gradient = scale * (original + 1) * (TARGET - x)
        x = out["mean"] + out["variance"] * gradient + (torch.exp(0.5 * out["log_variance"]) * z if t else 0)
    torch.testing.assert_close(sampled, x)
    unguided = ddpm_sample(diffusion, model, shape, noise=noise, generator=torch.Generator().manual_seed(0))
    assert (sampled - TARGET).abs().mean() < (unguided - TARGET).abs().mean(), "guidance pulls towards the target"


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc"])
def test_samplers_without_an_ancestral_mean_refuse_a_cond_fn(name):
    if name != "ddim":
        pytest.importorskip("diffusers")
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=10))
    with pytest.raises(ValueError, match=f"sampler '{name}' cannot apply gradient .* sample with sampler 'ddpm'"):
        get_sampler(name)(diffusion, model, (1, 3, 4, 4), cond_fn=lambda x, t: x)

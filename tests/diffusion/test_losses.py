import math

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, discretized_gaussian_log_likelihood, mean_flat
from glide_lightning.diffusion.losses import training_losses


def make(loss, variance, **kw):
    return GaussianDiffusion.from_config(DiffusionConfig(steps=50, loss_type=loss, variance_type=variance, **kw))


class Linear1x1(torch.nn.Module):
    """A tiny trainable model: 1x1 conv from x_t to ε (and v)."""

    def __init__(self, out_channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, out_channels, 1)

    def forward(self, x, timesteps):
        return self.conv(x)


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.01)), (-1.2, math.log(0.5)), (0.3, math.log(1e-3))]:
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert torch.isfinite(logp).all()
        assert logp.double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_discretized_likelihood_stays_finite_far_in_the_tails():
    x = torch.tensor([-1.0, 0.0, 1.0])
    logp = discretized_gaussian_log_likelihood(x, torch.tensor([1.0, 1.0, -1.0]), torch.full((3,), math.log(1e-3)))
    assert torch.isfinite(logp).all() and (logp < -100).all()


def test_simple_loss_is_the_eps_mse():
    diffusion = make("simple", "fixed_small")
    model = Linear1x1(3)
    x_start, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 1, 20, 49])
    terms = training_losses(diffusion, model, x_start, t, noise=noise)
    expected = ((model(diffusion.q_sample(x_start, t, noise), t) - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], expected)
    assert terms["loss"].shape == (4,) and set(terms) == {"loss", "mse"}


def test_hybrid_vb_term_trains_only_the_variance_channels():
    diffusion = make("hybrid", "learned_range")
    x_start, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 10, 40])
    x_t = diffusion.q_sample(x_start, t, noise)
    output = torch.randn(3, 6, 4, 4, requires_grad=True)
    terms = training_losses(diffusion, lambda x, ts: output, x_start, t, noise=noise)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0, "the VLB term must not reach the ε channels"
    assert grad_vb[:, 3:].abs().min() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad_mse[:, 3:].abs().max() == 0 and grad_mse[:, :3].abs().min() > 0
    # loss = mse + λ·T·vb with λ = 1/1000, T = 50
    torch.testing.assert_close(terms["loss"], terms["mse"] + 1e-3 * 50 * terms["vb"])
    assert torch.equal(x_t, diffusion.q_sample(x_start, t, noise))


def test_vb_is_small_for_the_true_posterior_and_large_otherwise():
    """With the true ε, fixed_small's mean equals the posterior mean: the KL is ~0 for t > 0."""
    diffusion = make("hybrid", "learned_range")
    x_start, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([5, 20, 40])
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)  # v = -1 → β̃, the true posterior variance
    vb = training_losses(diffusion, lambda x, ts: exact, x_start, t, noise=noise)["vb"]
    assert vb.abs().max() < 1e-3
    wrong = torch.cat([noise, torch.ones_like(noise)], 1)  # β instead of β̃
    assert (training_losses(diffusion, lambda x, ts: wrong, x_start, t, noise=noise)["vb"] > vb).all()


def test_p2_weighting():
    x_start, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 30, 49])
    model = Linear1x1(3)
    p2 = make("p2", "fixed_small", p2_gamma=1.0, p2_k=1.0)
    terms = training_losses(p2, model, x_start, t, noise=noise)
    snr = p2.table("snr")[t].float()
    torch.testing.assert_close(terms["loss"], terms["mse"] / (1 + snr))
    # γ = 0 gives L_simple
    flat = training_losses(make("p2", "fixed_small", p2_gamma=0.0), model, x_start, t, noise=noise)
    torch.testing.assert_close(flat["loss"], flat["mse"])
    # with a learned variance the VLB term is added
    learned = training_losses(make("p2", "learned_range"), Linear1x1(6), x_start, t, noise=noise)
    assert "vb" in learned


@pytest.mark.parametrize("loss,variance,channels", [("simple", "fixed_small", 3), ("hybrid", "learned_range", 6),
                                                    ("p2", "fixed_small", 3)])
def test_losses_fall_when_fitting_a_linear_model(loss, variance, channels):
    """A sanity check of the gradients' sign: optimising the loss on one batch lowers it."""
    torch.manual_seed(0)
    diffusion = make(loss, variance)
    model = Linear1x1(channels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x_start, noise = torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 3, 4, 4)
    t = torch.arange(8) * 6
    losses = []
    for _ in range(100):
        loss_value = mean_flat(training_losses(diffusion, model, x_start, t, noise=noise)["loss"]).mean()
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        losses.append(loss_value.item())
    assert losses[-1] < 0.7 * losses[0]

import math

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, discretized_gaussian_log_likelihood, mean_flat
from glide_lightning.diffusion.config import WEIGHTING_NAMES, modern_loss_spelling
from glide_lightning.diffusion.losses import mse_weights, training_losses, training_target
from glide_lightning.diffusion.weightings import WEIGHTINGS, min_snr_weight


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
    # with a learned variance the (unweighted) VLB term is added, as the paper's learned-Σ models do
    learned = training_losses(make("p2", "learned_range"), Linear1x1(6), x_start, t, noise=noise)
    torch.testing.assert_close(learned["loss"], learned["mse"] / (1 + snr) + 1e-3 * 50 * learned["vb"])


@pytest.mark.parametrize("loss,variance,channels,kw", [("simple", "fixed_small", 3, {}),
                                                       ("hybrid", "learned_range", 6, {}),
                                                    ("p2", "fixed_small", 3, {}),
                                                    ("simple", "fixed_small", 3, {"min_snr_gamma": 5.0}),
                                                    ("hybrid", "learned_range", 6, {"prediction": "v"})])
def test_losses_fall_when_fitting_a_linear_model(loss, variance, channels, kw):
    """A sanity check of the gradients' sign: optimising the loss on one batch lowers it."""
    torch.manual_seed(0)
    diffusion = make(loss, variance, **kw)
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


# ------------------------------------------------------------------------------------- min-SNR-γ, v-prediction
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_equal_the_closed_form(prediction):
    """Hang et al. 2023: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, from ᾱ_t directly."""
    diffusion = make("simple", "fixed_small", min_snr_gamma=5.0, prediction=prediction)
    t = torch.tensor([0, 5, 12, 25, 40, 49])
    abar = diffusion.table("alphas_cumprod")[t]
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(min_snr_weight(diffusion, t), expected.float())
    assert (expected[:2] < 1).all() and expected[0] < 0.1  # low noise (SNR ≫ γ) is down-weighted
    if prediction == "eps":
        assert (expected[-2:] == 1).all()  # SNR < γ: ε MSE unweighted
    # without a weighting, every weight is 1
    assert torch.equal(mse_weights(make("simple", "fixed_small"), t), torch.ones(6))


def test_min_snr_simple_loss_is_the_weighted_eps_mse_by_hand():
    diffusion = make("simple", "fixed_small", min_snr_gamma=5.0)
    model = Linear1x1(3)
    x_start, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 30, 49])
    terms = training_losses(diffusion, model, x_start, t, noise=noise)
    abar = diffusion.table("alphas_cumprod")[t].float()
    x_t = abar.sqrt()[:, None, None, None] * x_start + (1 - abar).sqrt()[:, None, None, None] * noise
    mse = ((model(x_t, t) - noise) ** 2).mean(dim=(1, 2, 3))
    snr = abar / (1 - abar)
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["loss"], torch.clamp(snr, max=5.0) / snr * mse)


def test_min_snr_hybrid_weights_the_mse_and_leaves_the_vlb_term_alone():
    diffusion = make("hybrid", "learned_range", min_snr_gamma=2.0)
    x_start, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([1, 20, 45])
    output = torch.randn(3, 6, 4, 4)
    terms = training_losses(diffusion, lambda x, ts: output, x_start, t, noise=noise)
    plain = training_losses(make("hybrid", "learned_range"), lambda x, ts: output, x_start, t, noise=noise)
    torch.testing.assert_close(terms["vb"], plain["vb"])
    torch.testing.assert_close(terms["mse"], plain["mse"])
    snr = diffusion.table("snr")[t].float()
    expected = torch.clamp(2.0 / snr, max=1.0) * terms["mse"] + 1e-3 * 50 * terms["vb"]
    torch.testing.assert_close(terms["loss"], expected)


def test_v_prediction_loss_targets_v_and_the_true_v_scores_zero():
    diffusion = make("hybrid", "learned_range", prediction="v", min_snr_gamma=5.0)
    x_start, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 25, 49])
    abar = diffusion.table("alphas_cumprod")[t].float()[:, None, None, None]
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x_start  # Salimans & Ho 2022, §4
    torch.testing.assert_close(training_target(diffusion, x_start, t, noise), v)
    exact = torch.cat([v, -torch.ones_like(v)], 1)  # and β̃, the true posterior variance
    terms = training_losses(diffusion, lambda x, ts: exact, x_start, t, noise=noise)
    assert terms["mse"].abs().max() < 1e-10
    assert terms["vb"][1:].abs().max() < 1e-3  # the VLB reads the mean through v: KL ~ 0 for t > 0
    eps_output = torch.cat([noise, -torch.ones_like(v)], 1)
    wrong = training_losses(diffusion, lambda x, ts: eps_output, x_start, t, noise=noise)
    torch.testing.assert_close(wrong["mse"], ((noise - v) ** 2).mean(dim=(1, 2, 3)))
    snr = abar.flatten() / (1 - abar.flatten())
    torch.testing.assert_close(wrong["loss"] - 1e-3 * 50 * wrong["vb"],
                               torch.clamp(snr, max=5.0) / (snr + 1) * wrong["mse"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="p2", variance_type="fixed_small", min_snr_gamma=5.0), "both weight the MSE"),
    (dict(loss_type="simple", variance_type="fixed_small", min_snr_gamma=0.0), "min_snr_gamma must be > 0"),
    (dict(loss_type="p2", variance_type="fixed_small", prediction="v"), "prediction 'eps'"),
    (dict(loss_type="simple", variance_type="fixed_small", prediction="x0"), "prediction 'x0'; choose one of eps"),
    # the current spelling: the same rules, from the registry's entries
    (dict(loss_type="simple", variance_type="fixed_small", weighting="p2", min_snr_gamma=5.0), "both weight the MSE"),
    (dict(loss_type="simple", variance_type="fixed_small", weighting="p2", prediction="v"), "prediction 'eps'"),
    (dict(loss_type="simple", variance_type="fixed_small", weighting="min_snr"), "needs min_snr_gamma"),
    (dict(loss_type="p2", variance_type="fixed_small", weighting="min_snr", min_snr_gamma=5.0), "both weight the MSE"),
    (dict(loss_type="simple", variance_type="fixed_small", weighting="snr"), "unknown weighting 'snr'; choose one of"),
    (dict(loss_type="simple", variance_type="learned_range", weighting="p2"), "leaves a learned variance untrained"),
])
def test_contradictory_weighting_and_target_fail_when_the_config_is_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)


# ----------------------------------------------------------------------------- the weighting registry, old spellings
def test_the_weighting_names_are_the_registry():
    assert WEIGHTING_NAMES == tuple(WEIGHTINGS) and DiffusionConfig().weighting == "none"
    for name, entry in WEIGHTINGS.items():
        assert entry.weights.__doc__ and entry.paper in entry.weights.__doc__, name  # each cites its paper


@pytest.mark.parametrize("name", list(WEIGHTINGS))
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_weighting_is_accepted_for_exactly_the_predictions_it_declares(name, prediction):
    def make_config():
        return DiffusionConfig(steps=50, loss_type="simple", variance_type="fixed_small", weighting=name,
                               prediction=prediction, min_snr_gamma=5.0 if name == "min_snr" else None)

    if prediction in WEIGHTINGS[name].predictions:
        diffusion = GaussianDiffusion.from_config(make_config())
        t = torch.tensor([0, 25, 49])
        weights = mse_weights(diffusion, t)
        assert weights.shape == (3,) and weights.dtype == torch.float32 and (weights > 0).all()
    else:
        with pytest.raises(ValueError, match=f"weighting '{name}' .* is defined for prediction"):
            make_config()


@pytest.mark.parametrize("old,new", [
    (dict(loss_type="p2", variance_type="fixed_small", p2_gamma=0.5),
     dict(loss_type="simple", variance_type="fixed_small", weighting="p2", p2_gamma=0.5)),
    (dict(loss_type="p2", variance_type="learned_range"), dict(loss_type="hybrid", weighting="p2")),
    (dict(loss_type="simple", variance_type="fixed_small", min_snr_gamma=5.0),
     dict(loss_type="simple", variance_type="fixed_small", weighting="min_snr", min_snr_gamma=5.0)),
    (dict(loss_type="hybrid", prediction="v", min_snr_gamma=2.0),
     dict(loss_type="hybrid", prediction="v", weighting="min_snr", min_snr_gamma=2.0)),
])
def test_the_old_spellings_make_the_same_config_and_loss(old, new):
    assert DiffusionConfig(**old) == DiffusionConfig(**new)
    assert DiffusionConfig(**old).loss_type in ("simple", "hybrid")
    assert modern_loss_spelling(old)["weighting"] == new["weighting"]
    assert modern_loss_spelling(new) == {**new, "weighting": new["weighting"]}  # the current spelling: as it is


def test_the_old_spellings_parse_from_yaml_as_the_cli_reads_them():
    """jsonargparse (LightningCLI's parser) reads a ``model.diffusion`` section of either spelling."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--diffusion", type=DiffusionConfig)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49

    def read(yaml: str) -> DiffusionConfig:
        return instantiate(parser.parse_string(f"diffusion:\n{yaml}")).diffusion

    old = read("  variance_type: fixed_small\n  loss_type: p2\n  p2_gamma: 0.5\n")
    assert old == read("  variance_type: fixed_small\n  loss_type: simple\n  weighting: p2\n  p2_gamma: 0.5\n")
    assert (old.loss_type, old.weighting) == ("simple", "p2")
    assert read("  min_snr_gamma: 5\n").weighting == "min_snr"
    with pytest.raises(Exception, match="weighting"):  # a typo fails at parse time
        parser.parse_string("diffusion:\n  weighting: p3\n")


# ----------------------------------------------------------------------------- mixed precision
AUTOCAST_CASES = [("hybrid", "learned_range", "eps"), ("simple", "fixed_small", "eps"), ("p2", "learned_range", "eps"),
                  ("simple", "fixed_small", "v"), ("hybrid", "learned_range", "v")]


@pytest.mark.parametrize("loss,variance,prediction", AUTOCAST_CASES)
def test_losses_and_their_gradients_under_bf16_autocast_match_fp32(loss, variance, prediction):
    """A network under bf16 autocast returns bf16; the losses must still do their arithmetic in fp32.

    Both paths see the same network output (bf16 values), so any difference is the loss arithmetic. The one
    rounding left is the network's own: the gradient reaching a bf16 output is bf16 (2^-9 relative per
    element), so the per-channel gradient cosine is ≥ 1 − 2^-16 up to summation; 0.999 leaves room and
    fails by far when the learned-range variance is computed in bf16 (cosine 0.1-0.9 at mid and large t)."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=1000, noise_schedule="cosine", loss_type=loss,
                                                              variance_type=variance, prediction=prediction))
    t = torch.tensor([0, 1, 50, 300, 600, 900, 999])
    b, channels = t.shape[0], 6 if variance == "learned_range" else 3
    generator = torch.Generator().manual_seed(0)
    x_start = torch.rand(b, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(b, 3, 8, 8, generator=generator)
    raw = torch.randn(b, channels, 8, 8, generator=generator)
    if channels == 6:
        raw[:, 3:] = torch.rand(b, 3, 8, 8, generator=generator) * 2 - 1  # the learned-range interpolation v
    raw = raw.bfloat16().float()  # values a bf16 network can return

    def run(autocast):
        out = raw.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            terms = training_losses(diffusion, lambda x, ts: out.to(torch.bfloat16) if autocast else out,
                                    x_start, t, noise=noise)
        terms["loss"].sum().backward()
        return terms, out.grad

    mixed, mixed_grad = run(True)
    exact, exact_grad = run(False)
    for name in exact:
        assert mixed[name].dtype == torch.float32, name
        torch.testing.assert_close(mixed[name], exact[name], rtol=1e-6, atol=0.0)
    # [B, C]; by hand in float64: F.cosine_similarity's eps (1e-8) swamps gradients of norm 1e-13 (vb at t = 999)
    a, e = mixed_grad.flatten(2).double(), exact_grad.flatten(2).double()
    cosine = (a * e).sum(2) / (a.norm(dim=2) * e.norm(dim=2))
    assert (cosine >= 0.999).all(), f"gradient cosine per (t, channel):\n{cosine}"


def test_the_process_reads_a_low_precision_network_in_fp32():
    """p_mean_variance (every sampler's and solver's view of the network) and classifier-free guidance get
    fp32 from a network that returns bf16 under autocast."""
    from glide_lightning.diffusion.guidance import classifier_free_guidance

    diffusion = make("hybrid", "learned_range")
    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([10, 40])

    def network(x, timesteps, tokens):
        return torch.cat([x, x.tanh()], dim=1).to(torch.bfloat16) * tokens.reshape(-1, 1, 1, 1)

    guided = classifier_free_guidance(network, 3.0, {"tokens": torch.zeros(1)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = diffusion.p_mean_variance(guided, x_t, t, {"tokens": torch.ones(2)})
    assert all(v.dtype == torch.float32 for v in out.values())
    cond = torch.cat([x_t, x_t.tanh()], 1).bfloat16().float()  # the conditional half; the unconditional one is 0
    exact = diffusion.p_mean_variance(lambda x, ts: torch.cat([3.0 * cond[:, :3], cond[:, 3:]], 1), x_t, t)
    for key in out:
        torch.testing.assert_close(out[key], exact[key], rtol=1e-6, atol=1e-6)

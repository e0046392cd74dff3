import math

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, learned_range_log_variance, normal_kl


def make(steps=100, schedule="cosine", variance="fixed_small", loss="simple", **kw):
    return GaussianDiffusion.from_config(
        DiffusionConfig(steps=steps, noise_schedule=schedule, variance_type=variance, loss_type=loss, **kw))


@pytest.mark.parametrize("t", [0, 10, 60, 99])
def test_q_sample_moments(t):
    diffusion = make()
    torch.manual_seed(0)
    x_start = torch.tensor([-0.8, 0.0, 0.5]).reshape(1, 3, 1, 1).expand(20000, 3, 1, 1)
    x_t = diffusion.q_sample(x_start, torch.full((20000,), t))
    abar = diffusion.table("alphas_cumprod")[t].item()
    mean = x_t.mean(0).flatten()
    var = x_t.var(0).flatten()
    torch.testing.assert_close(mean, math.sqrt(abar) * x_start[0].flatten(), atol=4 * math.sqrt((1 - abar) / 20000), rtol=0)
    torch.testing.assert_close(var, torch.full((3,), 1 - abar), rtol=0.05, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    diffusion = make(schedule=schedule)
    betas = diffusion.table("betas")
    abar = torch.cumprod(1 - betas, 0)
    x_start = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    x_t = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 2, 30, 70, 99])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x_start.float(), x_t.float(), t)
    for i, step in enumerate(t.tolist()):
        beta, abar_prev = betas[step], abar[step - 1]
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta  # from N(√ᾱ_{t-1} x0, 1-ᾱ_{t-1}) and N(√α_t x_{t-1}, β_t)
        expected_mean = (abar_prev.sqrt() * x_start[i] / (1 - abar_prev) + (1 - beta).sqrt() * x_t[i] / beta) / precision
        torch.testing.assert_close(mean[i].double(), expected_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var[i].double(), torch.full_like(x_t[i], 1 / precision.item()), rtol=1e-5, atol=0)
        torch.testing.assert_close(log_var[i].double(), torch.full_like(x_t[i], -math.log(precision.item())), rtol=1e-5, atol=1e-6)


def test_posterior_at_t0_returns_x_start():
    diffusion = make()
    x_start, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mean, var, _ = diffusion.q_posterior_mean_variance(x_start, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x_start)
    assert var.abs().max() == 0


def test_kl_of_equal_gaussians_is_zero_and_matches_closed_form():
    mean, logvar = torch.randn(10), torch.randn(10)
    assert normal_kl(mean, logvar, mean, logvar).abs().max() < 1e-6
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(math.log(2.0) + (1 + 1) / 8 - 0.5)


def test_learned_range_end_points():
    diffusion = make(variance="learned_range", loss="hybrid")
    t = torch.tensor([1, 50, 99])
    x_t = torch.randn(3, 3, 2, 2)
    for raw, table in [(-1.0, "posterior_log_variance_clipped"), (1.0, "log_betas")]:
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, raw)], 1)
        log_var = diffusion.mean_variance_from_output(out, x_t, t)["log_variance"]
        torch.testing.assert_close(log_var[:, 0, 0, 0], diffusion.table(table)[t].float())
    # v = 0 and v = 1 of the paper's formula v·log β + (1 - v)·log β̃ are outputs -1 and +1
    mid = learned_range_log_variance(torch.tensor(0.0), torch.tensor(-4.0), torch.tensor(-2.0))
    assert mid.item() == pytest.approx(-3.0)


def test_fixed_variances_ignore_extra_channels():
    t = torch.tensor([5, 40])
    x_t = torch.randn(2, 3, 2, 2)
    out = torch.cat([torch.randn_like(x_t), torch.randn_like(x_t)], 1)
    small = make().mean_variance_from_output(out, x_t, t)
    large = make(variance="fixed_large").mean_variance_from_output(out, x_t, t)
    torch.testing.assert_close(small["log_variance"][:, 0, 0, 0], make().table("posterior_log_variance_clipped")[t].float())
    torch.testing.assert_close(large["log_variance"][:, 0, 0, 0], make().table("log_betas")[t].float())
    torch.testing.assert_close(small["mean"], make().mean_variance_from_output(out[:, :3], x_t, t)["mean"])


def test_eps_and_xstart_predictions_invert_each_other():
    diffusion = make()
    x_start = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x_start)
    t = torch.tensor([0, 3, 50, 99])
    x_t = diffusion.q_sample(x_start, t, noise)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, noise), x_start, atol=2e-3, rtol=0)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x_start)[1:], noise[1:],
                               atol=1e-3, rtol=0)


def test_model_with_too_few_channels_is_rejected():
    diffusion = make(variance="learned_range", loss="hybrid")
    with pytest.raises(ValueError, match="needs 6 channels"):
        diffusion.p_mean_variance(lambda x, t: torch.zeros_like(x), torch.zeros(1, 3, 2, 2), torch.tensor([3]))


@pytest.mark.parametrize("field,value,match", [
    ("loss_type", "l1", "simple, hybrid, p2"),
    ("variance_type", "learned", "fixed_small, fixed_large, learned_range"),
    ("noise_schedule", "sqrt", "linear, cosine"),
])
def test_config_rejects_unknown_choices(field, value, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**{field: value})


def test_config_rejects_inconsistent_loss_and_variance():
    with pytest.raises(ValueError, match="learned_range"):
        DiffusionConfig(loss_type="hybrid", variance_type="fixed_small")
    with pytest.raises(ValueError, match="untrained"):
        DiffusionConfig(loss_type="simple", variance_type="learned_range")


# ------------------------------------------------------------------------------------- v-prediction
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_conversions_round_trip_exactly(schedule):
    """v = α_t ε − σ_t x_0 (Salimans & Ho 2022): x_0 and ε come back from (x_t, v), at every t."""
    diffusion = make(schedule=schedule, prediction="v")
    torch.manual_seed(0)
    x_start, noise = torch.rand(100, 3, 2, 2) * 2 - 1, torch.randn(100, 3, 2, 2)
    t = torch.arange(100)
    x_t = diffusion.q_sample(x_start, t, noise)
    v = diffusion.v_target(x_start, t, noise)
    abar = diffusion.table("alphas_cumprod").float()[:, None, None, None]
    torch.testing.assert_close(v, abar.sqrt() * noise - (1 - abar).sqrt() * x_start)
    torch.testing.assert_close(diffusion.predict_xstart_from_v(x_t, t, v), x_start, atol=1e-5, rtol=0)
    torch.testing.assert_close(diffusion.predict_eps_from_v(x_t, t, v), noise, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_an_oracle_v_model_gives_the_true_x_start_and_posterior(variance):
    """The one interpretation of model outputs: a model that outputs the true v yields pred_xstart == x_0
    (even at t = T-1, where ε would barely determine x_0), the true ε and the true posterior mean."""
    loss = "hybrid" if variance == "learned_range" else "simple"
    diffusion = make(variance=variance, loss=loss, prediction="v")
    x_start, noise = torch.rand(4, 3, 2, 2) * 2 - 1, torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 30, 70, 99])
    x_t = diffusion.q_sample(x_start, t, noise)
    v = diffusion.v_target(x_start, t, noise)
    output = torch.cat([v, torch.zeros_like(v)], 1) if variance == "learned_range" else v
    out = diffusion.p_mean_variance(lambda x, ts: output, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x_start, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["eps"], noise, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["mean"], diffusion.q_posterior_mean_variance(x_start, x_t, t)[0], atol=1e-5, rtol=0)
    # the same network output read as ε would be something else: the target decides
    as_eps = make(variance=variance, loss=loss).mean_variance_from_output(output, x_t, t, clip_denoised=False)
    assert (as_eps["pred_xstart"] - x_start).abs().max() > 0.1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_read_v_through_the_process(sampler):
    """A v model that knows x_0 drives both samplers to x_0: they take pred_xstart and ε from the process."""
    from glide_lightning.diffusion import get_sampler

    diffusion = make(prediction="v").respace("ddim20" if sampler == "ddim" else "20")
    x_start = torch.rand(2, 3, 4, 4) * 1.6 - 0.8

    def oracle(x_t, timesteps):  # timesteps are original indices; invert the respaced map
        t = torch.searchsorted(diffusion.timestep_map, timesteps)
        abar = diffusion.table("alphas_cumprod").float()[t][:, None, None, None]
        eps = (x_t - abar.sqrt() * x_start) / (1 - abar).sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x_start

    out = get_sampler(sampler)(diffusion, oracle, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x_start, atol=1e-4, rtol=0)


def test_dynamic_threshold_closed_form():
    """Imagen's dynamic thresholding: s = max(p-th percentile of |x0| per sample, 1); clip to [-s, s], divide by s."""
    from glide_lightning.diffusion import dynamic_threshold

    small = torch.linspace(-0.5, 0.9, 12).reshape(1, 3, 2, 2)  # |x| <= 0.9: s = 1, unchanged
    big = torch.arange(1.0, 13.0).reshape(1, 3, 2, 2) * torch.tensor([1.0, -1.0]).repeat(6).reshape(1, 3, 2, 2)
    x = torch.cat([small, big])  # sample 2: |x| = 1..12
    out = dynamic_threshold(x, 1.0)
    assert torch.equal(out[0], small[0])
    torch.testing.assert_close(out[1], big[0] / 12)  # p = 1: s = max |x|
    # p = 0.5: the median of 1..12 by linear interpolation is 6.5 (numpy.percentile's default)
    half = dynamic_threshold(x, 0.5)
    torch.testing.assert_close(half[1], big[0].clamp(-6.5, 6.5) / 6.5)
    assert half.abs().max() <= 1
    # p = 0.9: position 0.9 * 11 = 9.9 between the 10th and 11th order statistics, 10 and 11 -> 10.9
    torch.testing.assert_close(dynamic_threshold(x, 0.9)[1], big[0].clamp(-10.9, 10.9) / 10.9)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        dynamic_threshold(x, 0.0)


def test_dynamic_threshold_post_processes_pred_xstart_before_the_posterior():
    """Given as denoised_fn, it is applied where the static clip is: pred_xstart and the mean follow it."""
    from functools import partial

    from glide_lightning.diffusion import dynamic_threshold

    diffusion = make()
    x_t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.tensor([90, 90])
    eps = -torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    raw = diffusion.predict_xstart_from_eps(x_t, t, eps)
    assert raw.abs().max() > 1.5  # a prediction that a static clip would saturate
    out = diffusion.mean_variance_from_output(eps, x_t, t, denoised_fn=partial(dynamic_threshold, percentile=0.95))
    expected = dynamic_threshold(raw, 0.95)
    torch.testing.assert_close(out["pred_xstart"], expected)
    torch.testing.assert_close(out["mean"], diffusion.q_posterior_mean_variance(expected, x_t, t)[0])

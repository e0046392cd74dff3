import pytest
import torch

from glide_lightning.diffusion import classifier_free_guidance


class Conditional(torch.nn.Module):
    """Output channels 0..2 = ε depending on the caption embedding, 3..5 = v; counts forwards."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 3)
        self.calls = []

    def forward(self, x, timesteps, tokens=None, mask=None, low_res=None):
        self.calls.append(x.shape[0])
        cond = (self.embed(tokens) * mask[..., None]).sum(1)[:, :, None, None]
        eps = x * 0.5 + cond
        v = torch.tanh(x + cond + timesteps.reshape(-1, 1, 1, 1) + (0 if low_res is None else low_res))
        return torch.cat([eps, v], 1)


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    t = torch.tensor([3, 3, 7, 7])
    cond = dict(tokens=torch.randint(1, 10, (4, 5)), mask=torch.ones(4, 5, dtype=torch.bool))
    uncond = dict(tokens=torch.zeros(1, 5, dtype=torch.long), mask=torch.zeros(1, 5, dtype=torch.bool))
    return x, t, cond, uncond


def test_scale_one_is_exactly_the_conditional_prediction(inputs):
    x, t, cond, uncond = inputs
    model = Conditional()
    out = classifier_free_guidance(model, 1.0, uncond)(x, t, **cond)
    assert torch.equal(out, model(x, t, **cond))


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guided_output_combines_eps_and_keeps_conditional_variance(inputs, scale):
    x, t, cond, uncond = inputs
    model = Conditional()
    guided = classifier_free_guidance(model, scale, uncond)(x, t, **cond)
    assert model.calls == [8], "one batched forward of [cond; uncond]"
    c = model(x, t, **cond)
    u = model(x, t, **{k: v.expand(4, -1) for k, v in uncond.items()})
    torch.testing.assert_close(guided[:, :3], u[:, :3] + scale * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(guided[:, 3:], c[:, 3:])


def test_shared_kwargs_reach_both_halves(inputs):
    x, t, cond, uncond = inputs
    model = Conditional()
    low_res = torch.randn(4, 3, 2, 2)
    guided = classifier_free_guidance(model, 2.0, uncond)(x, t, low_res=low_res, **cond)
    torch.testing.assert_close(guided[:, 3:], model(x, t, low_res=low_res, **cond)[:, 3:])


def test_bad_uncond_kwargs_are_explained(inputs):
    x, t, cond, uncond = inputs
    with pytest.raises(ValueError, match="batch 2"):
        classifier_free_guidance(Conditional(), 3.0, {k: v.expand(2, -1) for k, v in uncond.items()})(x, t, **cond)
    with pytest.raises(ValueError, match="not called with"):
        classifier_free_guidance(Conditional(), 3.0, dict(uncond, extra=torch.zeros(1)))(x, t, **cond)


def test_guided_batch_encodings_are_concatenated_once_per_sampling_call(inputs):
    """The [cond; uncond] keyword tensors are made at the first step and reused while the sampler
    passes the same tensors; other tensors get their own pair."""
    x, t, cond, uncond = inputs
    seen = []

    def model(x_t, timesteps, tokens=None, mask=None):
        seen.append((tokens, mask))
        return Conditional.forward(net, x_t, timesteps, tokens, mask)

    net = Conditional()
    guided = classifier_free_guidance(model, 3.0, uncond)
    first, again = guided(x, t, **cond), guided(x * 2, t, **cond)
    assert seen[0][0] is seen[1][0] and seen[0][1] is seen[1][1]
    assert torch.equal(first, classifier_free_guidance(net, 3.0, uncond)(x, t, **cond))
    assert not torch.equal(first, again)
    other = dict(tokens=cond["tokens"].flip(0), mask=cond["mask"])
    guided(x, t, **other)
    assert torch.equal(seen[2][0][:4], other["tokens"])


def test_guidance_interval_guides_inside_and_runs_the_conditional_half_alone_outside(inputs):
    """σ(t) = √((1 - ᾱ_t)/ᾱ_t) picks the guided steps: outside (low, high] the output is the
    unguided conditional model's, from one forward of batch B; inside, the guided one from 2B."""
    from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
    from glide_lightning.diffusion.guidance import edm_sigma

    x, _, cond, uncond = inputs
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=10, variance_type="learned_range"))
    abar = diffusion.base_alphas_cumprod
    sigma = edm_sigma(abar)
    low, high = float(sigma[3]), float(sigma[6])  # guided steps: 4, 5, 6
    model = Conditional()
    limited = classifier_free_guidance(model, 4.0, uncond, interval=(low, high), alphas_cumprod=abar)
    always = classifier_free_guidance(model, 4.0, uncond)
    for step in range(10):
        t = torch.full((4,), step)
        model.calls.clear()
        out = limited(x, t, **cond)
        if step in (4, 5, 6):
            assert model.calls == [8] and torch.equal(out, always(x, t, **cond))
        else:
            assert model.calls == [4] and torch.equal(out, model(x, t, **cond))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        classifier_free_guidance(model, 4.0, uncond, interval=(0.1, 1.0))


def test_guidance_interval_counts_model_evaluations_in_a_sampler(inputs):
    """NFE of a 10-step guided DDIM run: 2 per guided step, 1 per step outside the interval."""
    from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, get_sampler
    from glide_lightning.diffusion.guidance import edm_sigma

    x, _, cond, uncond = inputs
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=10, variance_type="learned_range"))
    sigma = edm_sigma(diffusion.base_alphas_cumprod)
    model = Conditional()
    guided = classifier_free_guidance(model, 3.0, uncond, interval=(float(sigma[1]), float(sigma[7])),
                                      alphas_cumprod=diffusion.base_alphas_cumprod)
    get_sampler("ddim")(diffusion, guided, tuple(x.shape), model_kwargs=cond)
    assert sum(model.calls) // 4 == 6 * 2 + 4 * 1  # steps 2..7 guided

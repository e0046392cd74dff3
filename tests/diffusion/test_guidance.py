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

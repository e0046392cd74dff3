import pytest
import torch

from glide_lightning.diffusion.timesteps import LossAwareSampler, UniformSampler, build_timestep_sampler


def test_uniform_sampler_has_unit_weights_and_covers_all_steps():
    t, w = UniformSampler(10).sample(5000, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(10)) and torch.equal(w, torch.ones(5000))


def test_loss_aware_sampler_is_uniform_until_warm_then_favours_large_losses():
    sampler = LossAwareSampler(4, history=3)
    for _ in range(3):
        assert not sampler.warmed_up()
        sampler.update(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 7.0]))
    assert sampler.warmed_up()
    p = sampler.probabilities()
    assert p.sum().item() == pytest.approx(1.0)
    assert p[3].item() == pytest.approx(0.7 * 0.999 + 0.00025)
    t, w = sampler.sample(20000, generator=torch.Generator().manual_seed(0))
    assert (t == 3).float().mean().item() == pytest.approx(p[3].item(), abs=0.02)
    # importance weights keep the objective unbiased: E_p[w·L_t] = mean_t L_t
    losses = torch.tensor([1.0, 1.0, 1.0, 7.0])
    assert (w * losses[t]).mean().item() == pytest.approx(losses.mean().item(), rel=0.05)


def test_loss_aware_state_round_trip():
    a = LossAwareSampler(5, history=2)
    a.update(torch.tensor([0, 1, 1, 4]), torch.tensor([0.5, 1.0, 2.0, 3.0]))
    b = LossAwareSampler(5, history=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.losses, b.losses) and torch.equal(a.counts, b.counts)
    with pytest.raises(ValueError, match="expected"):
        LossAwareSampler(6, history=2).load_state_dict(a.state_dict())


def test_unknown_timestep_sampler():
    with pytest.raises(ValueError, match="uniform, loss_aware"):
        build_timestep_sampler("sorted", 10)  # type: ignore[arg-type]

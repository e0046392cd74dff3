"""Overfit one batch: the diffusion losses, the tiny GLIDE model and the optimiser work together."""

import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, training_losses
from glide_lightning.models import ModelConfig, build_model

TINY = ModelConfig(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=[8],
                   dropout=0.0, xf_width=32, xf_layers=1, xf_heads=2, text_ctx=8, n_vocab=64)


@pytest.mark.parametrize("loss_type,variance_type", [("simple", "fixed_small"), ("hybrid", "learned_range"),
                                                     ("p2", "fixed_small")])
def test_tiny_model_overfits_one_batch(loss_type, variance_type):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=100, loss_type=loss_type, variance_type=variance_type))
    model = build_model(TINY)
    # one batch of smooth images (blurred noise upsampled) with captions
    x_start = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")
    kwargs = dict(tokens=torch.randint(0, 64, (4, 8)), mask=torch.ones(4, 8, dtype=torch.bool))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        t = torch.randint(0, diffusion.num_timesteps, (4,))
        loss = training_losses(diffusion, model, x_start, t, kwargs)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, f"{loss_type}: loss went from {first:.4f} to {last:.4f}"

"""Training-step FLOPs (for MFU): counted on the meta device, linear in the batch, about 3x a forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from glide_lightning.models import ModelConfig, build_model
from glide_lightning.models.flops import training_step_flops

from conftest import TINY


def forward_flops(config: ModelConfig, batch: int) -> int:
    torch.manual_seed(0)
    model = build_model(config)
    size = config.image_size
    x, t = torch.randn(batch, 3, size, size), torch.zeros(batch, dtype=torch.long)
    tokens = torch.zeros(batch, config.text_ctx, dtype=torch.long)
    mask = torch.ones(batch, config.text_ctx, dtype=torch.bool)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, tokens=tokens, mask=mask)
    return counter.get_total_flops()


def test_training_flops_are_linear_in_the_batch_and_about_three_forward_passes() -> None:
    config = ModelConfig(**TINY)
    one, four = training_step_flops(config, 1), training_step_flops(config, 4)
    assert four == 4 * one
    # backward = 2x forward for every matmul/conv except the input gradient of the first layers; fused
    # attention's backward recomputes the scores (torch counts 5 batched matmuls against the forward's 2)
    forward = forward_flops(config, 4)
    assert 2.5 * forward < four <= 3.5 * forward


def test_the_first_convolution_alone_matches_its_closed_form() -> None:
    config = ModelConfig(**TINY)
    model = build_model(config)
    conv = model.input_blocks[0][0]
    batch, size = 2, config.image_size
    with FlopCounterMode(display=False) as counter:
        conv(torch.randn(batch, 3, size, size))
    # 2 FLOPs per multiply-add: B * H * W * C_out * C_in * 3 * 3
    assert counter.get_total_flops() == 2 * batch * size * size * config.model_channels * 3 * 9


@pytest.mark.parametrize("kind", ["upsample", "inpaint", "upsample_inpaint"])
def test_other_kinds_are_counted_with_their_extra_inputs(kind: str) -> None:
    config = ModelConfig(**{**TINY, "kind": kind})
    assert training_step_flops(config, 2) == 2 * training_step_flops(config, 1) > 0

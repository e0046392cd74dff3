"""Training-step FLOPs (for MFU) and a sampler's denoiser evaluation: counted on the meta device, linear in the
batch, about 3x a forward; a denoiser evaluation is a forward less its text transformer."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from glide_lightning.models import ModelConfig, build_model
from glide_lightning.models.flops import denoiser_flops, training_step_flops

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


def test_a_denoiser_evaluation_is_a_forward_pass_less_the_text_transformer() -> None:
    """Sampling encodes the caption once per call, so a step costs the forward pass without the text
    transformer: the difference is the transformer's own count. Counted on the meta device, as the
    library counts (there SDPA takes its math kernel, whose matmuls the counter sees; on the CPU its
    fused kernel goes uncounted)."""
    config = ModelConfig(**TINY)
    with torch.device("meta"), torch.no_grad():
        model = build_model(config)
        x, t = torch.empty(4, 3, config.image_size, config.image_size), torch.zeros(4, dtype=torch.long)
        tokens = torch.zeros(4, config.text_ctx, dtype=torch.long)
        mask = torch.ones(4, config.text_ctx, dtype=torch.bool)
        with FlopCounterMode(display=False) as counter:
            model.encode_text(tokens, mask)
        text = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model(x, t, tokens=tokens, mask=mask)
        forward = counter.get_total_flops()
    assert 0 < text < forward
    assert denoiser_flops(config, 4) == 4 * denoiser_flops(config, 1) == forward - text

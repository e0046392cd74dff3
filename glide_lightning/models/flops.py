"""FLOPs of a training step, counted by torch's FLOP counter on the meta device (no memory, no time).

Used for MFU (model FLOPs utilisation): Lightning's ``ThroughputMonitor`` divides the counted FLOPs per
second by the device's peak (its own table of GPUs) and logs ``train/device/mfu``.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from glide_lightning.models.config import ModelConfig, build_model


def training_step_flops(config: ModelConfig, batch_size: int) -> int:
    """FLOPs of one forward and backward pass of ``config``'s network on ``batch_size`` images of
    ``image_size`` pixels with ``text_ctx`` caption tokens (matmuls and convolutions, as torch's
    ``FlopCounterMode`` counts them: 2 per multiply-add; the backward pass about twice the forward).
    The diffusion loss, the optimizer and normalisations are not counted (a few per cent at most).
    The upsampler and inpainting kinds are counted with their extra inputs; a frozen text encoder (no
    backward pass, and run once per batch) is not counted."""
    return _count_flops(config, batch_size, backward=True)


def denoiser_flops(config: ModelConfig, batch_size: int) -> int:
    """FLOPs of one denoiser evaluation on ``batch_size`` images as a sampler makes it (two per step where
    guided), counted as :func:`training_step_flops` counts them: a forward pass with the caption's encoding
    given (the text transformer runs once per sampling call, not per step, and is not counted)."""
    return _count_flops(config, batch_size, backward=False)


def example_inputs(config: ModelConfig, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Zero inputs of ``config``'s network on the default device: ``x_t`` ``[B, 3, S, S]``, ``timesteps`` ``[B]`` and
    the keyword arguments its kind takes (caption tokens and mask, or a frozen encoder's ``text_emb`` and
    ``text_mask``; ``low_res`` ``[B, 3, S/4, S/4]`` and ``low_res_t`` for upsamplers; ``inpaint_image`` and
    ``inpaint_mask`` for inpainting kinds). What :func:`training_step_flops` counts, and Lightning's model summary
    runs (:attr:`~glide_lightning.module.GlideModule.example_input_array`)."""
    size = config.image_size
    x = torch.zeros(batch_size, 3, size, size)
    t = torch.zeros(batch_size, dtype=torch.long)
    kwargs: dict[str, torch.Tensor] = {"tokens": torch.zeros(batch_size, config.text_ctx, dtype=torch.long),
                                       "mask": torch.ones(batch_size, config.text_ctx, dtype=torch.bool)}
    if config.frozen_text_encoder:  # its embeddings: the frozen encoder's own forward is not counted
        kwargs = {"text_emb": torch.zeros(batch_size, config.text_ctx, int(config.text_encoder_dim or 0)),
                  "text_mask": kwargs["mask"]}
    if config.kind in ("upsample", "upsample_inpaint"):
        kwargs["low_res"] = torch.zeros(batch_size, 3, size // 4, size // 4)
        if config.low_res_noise_cond:
            kwargs["low_res_t"] = torch.zeros(batch_size, dtype=torch.long)
    if config.kind in ("inpaint", "upsample_inpaint"):
        kwargs["inpaint_image"] = torch.zeros(batch_size, 3, size, size)
        kwargs["inpaint_mask"] = torch.zeros(batch_size, 1, size, size)
    return x, t, kwargs


def _count_flops(config: ModelConfig, batch_size: int, backward: bool) -> int:
    with torch.device("meta"):
        model = build_model(config)
        x, t, kwargs = example_inputs(config, batch_size)
        if not backward and config.xf_width and not config.frozen_text_encoder:  # encoded once per sampling call
            kwargs = {**model.encode_caption(kwargs.pop("tokens"), kwargs.pop("mask")), **kwargs}
        with FlopCounterMode(display=False) as counter:
            out = model(x, t, **kwargs)
            if backward:
                out.sum().backward()
    return int(counter.get_total_flops())

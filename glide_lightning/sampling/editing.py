"""Text-guided editing (GLIDE's inpainting): regenerate the masked part of a picture from a prompt with an
inpainting model, optionally then with an inpainting upsampler; what ``python -m glide_lightning sample
--inpaint-image … --mask …`` runs. Known pixels are kept as :func:`edit` says."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from glide_lightning.data.images import to_uint8
from glide_lightning.diffusion.inpainting import keep_known
from glide_lightning.sampling.cascade import check_cascade, upsample_batch
from glide_lightning.sampling.checkpoints import SamplingModel
from glide_lightning.sampling.clip_guidance import GuidanceCLIP
from glide_lightning.sampling.config import SamplingConfig
from glide_lightning.sampling.batch import sample_conditioned

__all__ = ["edit", "resized", "resized_keep"]


@torch.no_grad()
def edit(base: SamplingModel, images: Tensor, keep: Tensor, prompts: list[str], seeds: list[int],
         config: SamplingConfig = SamplingConfig(), *, upsampler: SamplingModel | None = None,
         progress: bool = False, clip: GuidanceCLIP | None = None) -> Tensor:
    """Text-guided inpainting (GLIDE's editing): regenerate the pixels of ``images`` where ``keep`` is 0.

    Args:
        base: an inpainting model (kind ``inpaint``: ours or glide-text2im's ``base_inpaint.pt``).
        images: the pictures to edit, float in [-1, 1], ``[B, 3, H, W]`` (any size: each model gets them
            bicubically resized, antialiased, to its own size unless they have it already).
        keep: ``[B, 1, H, W]``, 1 where the pixel is kept, 0 where it is regenerated. Resized to a model's
            size, a pixel is kept only where it was wholly kept (area average == 1).
        prompts, seeds: one per image (image i depends on them alone, see
            :func:`~glide_lightning.sampling.batch.sample_generators`).
        config: guidance (the base stage only, as GLIDE; its default, 3, is text2im.ipynb's: glide-text2im's
            inpaint.ipynb edits at 5), sampler and steps; the upsampler stage is
            unguided, with ``upsample_steps``, ``upsample_temp`` and ``upsample_sampler_for("edit")``
            (ancestral by default, as glide-text2im's inpainting notebook).
        upsampler: optionally an inpainting upsampler (kind ``upsample_inpaint``, e.g.
            ``upsample_inpaint.pt``): low_res = the base stage's result, rounded to 8 bits.
        clip: the noised CLIP of CLIP guidance at ``config.clip_guidance_scale`` (base stage only).

    Returns:
        uint8 ``[B, 3, S, S]`` at the last model's size. Known pixels are kept at every step by replacing
        the known region of each step's ``pred_xstart`` with the original (glide-text2im's inpainting
        ``denoised_fn``; :func:`~glide_lightning.diffusion.inpainting.keep_known`), and pasted once more
        into the result, so that outside the mask it equals the (resized) original up to 8-bit rounding
        with any sampler.

    Raises:
        ValueError: models of the wrong kinds, or mismatched lengths and shapes.
    """
    check_cascade("editing needs an inpainting model", base, "inpaint", upsampler, "upsample_inpaint", config)
    if not (len(prompts) == len(seeds) == images.shape[0] == keep.shape[0]):
        raise ValueError(f"{images.shape[0]} images, {keep.shape[0]} masks, {len(prompts)} prompts, {len(seeds)} seeds")
    if keep.shape[1:] != (1, *images.shape[-2:]):
        raise ValueError(f"the mask must be [B, 1, H, W] of the image's size {tuple(images.shape[-2:])}, "
                         f"got {tuple(keep.shape)}")
    device = next(base.model.parameters()).device
    out = []
    for start in range(0, len(prompts), config.batch_size):
        part = slice(start, start + config.batch_size)
        batch_prompts, batch_seeds = prompts[part], seeds[part]
        source, known = resized(images[part], keep[part], base.image_size, device)
        result = sample_conditioned(base, batch_prompts, batch_seeds, config, image=source, keep=known,
                                    progress=progress, clip=clip)
        if upsampler is not None:
            source, known = resized(images[part], keep[part], upsampler.image_size, device)
            result = upsample_batch(upsampler, result, batch_prompts, batch_seeds, config, progress,
                                    dict(inpaint_image=source, inpaint_mask=known), keep_known(source, known),
                                    task="edit")
            result = keep_known(source, known)(result)
        out.append(to_uint8(result))
    return torch.cat(out)


def resized(images: Tensor, keep: Tensor, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``images`` ``[B, 3, H, W]`` (bicubic, antialiased, clamped to [-1, 1]) and ``keep`` ``[B, 1, H, W]`` (a pixel
    kept only where it was wholly kept: area average == 1) resized to ``size`` x ``size`` on ``device``;
    unchanged (but for the device) when they have that size already."""
    images, keep = images.float().to(device), keep.float().to(device)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
        keep = resized_keep(keep, (size, size))
    return images, keep


def resized_keep(keep: Tensor, size: tuple[int, int]) -> Tensor:
    """A keep-mask ``[B, 1, H, W]`` (1 = keep) resized to ``size`` (height, width): a pixel is kept only where the
    pixels it covers were all kept (area average == 1), so the regenerated region never shrinks."""
    if tuple(keep.shape[-2:]) == tuple(size):
        return keep
    return (F.interpolate(keep.float(), size=size, mode="area") > 1 - 1e-6).float()

"""The cascade (GLIDE's base model, then optionally its upsampler): :func:`generate`, the one text-to-image
entry behind ``python -m glide_lightning sample``, ``fid`` / ``sweep`` and the training callbacks; the
upsampler's stage (:func:`upsample_batch`); and the check that the models fit the task (:func:`check_cascade`),
which editing (:func:`~glide_lightning.sampling.editing.edit`, the inpainting cascade) shares. One model's batch is
:func:`~glide_lightning.sampling.batch.sample_batch`; both stages call their network through the one
:func:`~glide_lightning.sampling.batch.denoiser` (``compile``, ``precision``, ``memory_format``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from glide_lightning.conditioning import sampling_low_res_kwargs
from glide_lightning.data.images import to_uint8
from glide_lightning.diffusion import GaussianDiffusion, get_sampler
from glide_lightning.diffusion.samplers import sampler_options
from glide_lightning.models import ModelKind
from glide_lightning.sampling.checkpoints import SamplingModel, check_kind
from glide_lightning.sampling.clip_guidance import GuidanceCLIP
from glide_lightning.sampling.config import CascadeTask, SamplingConfig
from glide_lightning.sampling.batch import denoiser, sample_batch, sample_generators

__all__ = ["check_cascade", "generate", "upsample_batch"]


@torch.no_grad()
def generate(base: SamplingModel, prompts: list[str], seeds: list[int], config: SamplingConfig = SamplingConfig(), *,
             upsampler: SamplingModel | None = None, clip: GuidanceCLIP | None = None,
             progress: bool = False) -> Tensor:
    """Images for ``prompts`` (one per prompt, uint8 [N, 3, H, W]), guided at ``config.guidance_scale``.

    Image i depends on ``prompts[i]`` and ``seeds[i]`` only (see
    :func:`~glide_lightning.sampling.batch.sample_generators`), up to floating-point differences between batch sizes
    (a pixel level here and there). With ``upsampler``, the base samples are upsampled (conditioned on the
    prompt, unguided, GLIDE's ``fast27`` and temperature by default). ``clip``: the noised CLIP of CLIP guidance
    at ``config.clip_guidance_scale`` (base stage only). The upsampler stage runs
    ``config.upsample_sampler_for("text2im")`` (DDIM by default, as glide-text2im's text2im notebook). Raises ``ValueError`` for mismatched lengths or models
    of the wrong kind (inpainting models need images to fill, which this does not take), or a CLIP
    guidance scale without a CLIP.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    check_cascade("generate draws text-to-image samples", base, "base", upsampler, "upsample", config)
    device = next(base.model.parameters()).device
    out = []
    for start in range(0, len(prompts), config.batch_size):
        batch_prompts, batch_seeds = prompts[start:start + config.batch_size], seeds[start:start + config.batch_size]
        images = sample_batch(base, batch_prompts, batch_seeds, config, device, progress, clip=clip)
        if upsampler is not None:
            images = upsample_batch(upsampler, images, batch_prompts, batch_seeds, config, progress, task="text2im")
        out.append(to_uint8(images))
    size = (upsampler or base).image_size
    return torch.cat(out) if out else torch.empty(0, 3, size, size, dtype=torch.uint8)


def check_cascade(task: str, base: SamplingModel, base_kind: ModelKind, upsampler: SamplingModel | None,
                  upsampler_kind: ModelKind, config: SamplingConfig) -> None:
    """Raise ``ValueError`` when the models are not of the kinds ``task`` needs (the message starts with ``task``;
    :func:`~glide_lightning.sampling.checkpoints.check_kind`), or ``upsample_noise`` is set for an upsampler
    trained without noise augmentation."""
    check_kind(base, base_kind, f"{task}: the base model")
    if upsampler is not None:
        check_kind(upsampler, upsampler_kind, "the upsampler")
    if upsampler is not None and config.upsample_noise and not upsampler.model_config.low_res_noise_cond:
        raise ValueError(f"sampling.upsample_noise is {config.upsample_noise}, but the upsampler ({upsampler.source}) "
                         f"was not trained with noise augmentation of its low-res input: leave it at 0")


def upsample_batch(loaded: SamplingModel, low_res: Tensor, prompts: list[str], seeds: list[int],
                   config: SamplingConfig, progress: bool = False, image_kwargs: dict[str, Tensor] | None = None,
                   denoised_fn: Any = None, *, task: CascadeTask) -> Tensor:
    """The upsampler's stage of a cascade: ``low_res`` ``[B, 3, h, w]`` in [-1, 1] (a batch of base samples) to
    ``[B, 3, S, S]`` float in [-1, 1], unguided, from noise × ``config.upsample_temp`` with
    ``config.upsample_steps`` of the sampler :meth:`SamplingConfig.upsample_sampler_for` ``task`` names (by
    default glide-text2im's: DDIM with η = 0 for ``text2im``, ancestral for ``edit``); an upsampler trained with
    noise augmentation gets ``low_res`` noised at ``config.upsample_noise`` and told so. ``image_kwargs`` /
    ``denoised_fn``: an inpainting upsampler's inputs and its known pixels
    (:func:`~glide_lightning.sampling.editing.edit`).
    Image i's noise comes from ``seeds[i]``. The network runs as the base stage's does, through
    :func:`~glide_lightning.sampling.batch.denoiser` (``config.compile``, ``precision``, ``memory_format``)."""
    device = low_res.device
    size = loaded.image_size
    tokens, mask = (x.to(device) for x in loaded.tokenizer(prompts))
    encoded = loaded.model.encode_caption(tokens, mask)  # once, not at every step (xf_mask: a frozen encoder's)
    generators = sample_generators(seeds, offset=1)
    low_res_kwargs = sampling_low_res_kwargs(low_res, loaded.diffusion_config, config.upsample_noise,
                                             loaded.model_config.low_res_noise_cond, generators)
    model_kwargs = dict(**encoded, **low_res_kwargs, **(image_kwargs or {}))
    diffusion = GaussianDiffusion.from_config(loaded.diffusion_config, config.upsample_steps)
    name = config.upsample_sampler_for(task)
    sampler = get_sampler(name, **sampler_options(name, eta=0.0))  # η = 0 where the sampler has one (DDIM)
    with denoiser(loaded.model, config, device) as net:
        return sampler(diffusion, net, (len(prompts), 3, size, size), model_kwargs=model_kwargs,
                       noise_scale=config.upsample_temp, generator=generators, progress=progress, device=device,
                       denoised_fn=denoised_fn)

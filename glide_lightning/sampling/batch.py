"""One model's batch: :func:`sample_batch` (a base model, classifier-free guided) and :func:`sample_conditioned`
(a model of any kind, given the images its kind needs), the per-image generators, and :func:`denoiser`, the one
wrapper through which every stage (the base model's, the upsampler's, an edit's) calls its network under the
config's ``compile``, ``precision`` and ``memory_format``. Chaining models is :mod:`~glide_lightning.sampling.cascade`'s
and :mod:`~glide_lightning.sampling.editing`'s."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from glide_lightning.conditioning import sampling_low_res_kwargs
from glide_lightning.diffusion import GaussianDiffusion, classifier_free_guidance, dynamic_threshold, get_sampler
from glide_lightning.diffusion.samplers import sampler_options
from glide_lightning.diffusion.inpainting import keep_known
from glide_lightning.sampling.checkpoints import SamplingModel
from glide_lightning.sampling.clip_guidance import GuidanceCLIP
from glide_lightning.sampling.config import SamplingConfig

__all__ = ["denoiser", "sample_batch", "sample_conditioned", "sample_generators", "uses_channels_last"]


def sample_generators(seeds: list[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per image: image i's noise (initial and at every step) depends on seeds[i]
    alone, not on the batch it is drawn in, the device or the rank: a resumed or sharded FID run
    draws exactly the images an uninterrupted one would."""
    return [torch.Generator().manual_seed(seed * 2 + offset) for seed in seeds]


@torch.no_grad()
def sample_conditioned(loaded: SamplingModel, prompts: list[str], seeds: list[int], config: SamplingConfig, *,
                       low_res: Tensor | None = None, image: Tensor | None = None, keep: Tensor | None = None,
                       progress: bool = False, clip: GuidanceCLIP | None = None) -> Tensor:
    """One batch from a model of any kind, guided as ``config`` says, float ``[B, 3, S, S]`` in [-1, 1]:
    upsamplers from ``low_res`` ``[B, 3, s, s]`` in [-1, 1] (rounded to 8 bits as a saved image is; noised
    at ``config.upsample_noise`` where the model was trained so), inpainting models from ``image``
    ``[B, 3, S, S]`` and ``keep`` ``[B, 1, S, S]`` (1 = known; known pixels kept as
    :func:`~glide_lightning.sampling.editing.edit` says).
    The training sample grids of the upsampling and inpainting kinds draw with it, and so does
    :func:`~glide_lightning.sampling.editing.edit`.
    ``clip``: the noised CLIP of CLIP guidance at ``config.clip_guidance_scale`` (:func:`sample_batch`).
    Raises ``ValueError`` when an input the model's kind needs is missing."""
    kind = loaded.model_config.kind
    device = next(loaded.model.parameters()).device
    image_kwargs: dict[str, Tensor] = {}
    denoised_fn = None
    if kind.startswith("upsample"):
        if low_res is None:
            raise ValueError(f"a model of kind {kind!r} samples from a low-resolution image: pass low_res")
        image_kwargs.update(sampling_low_res_kwargs(low_res.to(device), loaded.diffusion_config, config.upsample_noise,
                                                    loaded.model_config.low_res_noise_cond,
                                                    sample_generators(seeds, offset=1)))
    if "inpaint" in kind:
        if image is None or keep is None:
            raise ValueError(f"a model of kind {kind!r} fills in an image: pass image and keep (1 = known pixel)")
        image, keep = image.to(device), keep.to(device)
        image_kwargs.update(inpaint_image=image, inpaint_mask=keep)
        denoised_fn = keep_known(image, keep)
    result = sample_batch(loaded, prompts, seeds, config, device, progress, image_kwargs, denoised_fn, clip=clip)
    return result if denoised_fn is None else denoised_fn(result)


@torch.no_grad()
def sample_batch(loaded: SamplingModel, prompts: list[str], seeds: list[int], config: SamplingConfig,
                 device: torch.device, progress: bool = False, image_kwargs: dict[str, Tensor] | None = None,
                 denoised_fn: Any = None, *, clip: GuidanceCLIP | None = None) -> Tensor:
    """One batch of base samples for ``prompts``, float in [-1, 1], ``[B, 3, H, W]`` (what
    :func:`~glide_lightning.sampling.cascade.generate` converts to uint8); ``image_kwargs`` are further inputs of the
    network, shared by the guided and unguided halves (an inpainting model's ``inpaint_image`` / ``inpaint_mask``), and
    ``denoised_fn`` is applied to each step's ``pred_xstart`` (:func:`~glide_lightning.sampling.editing.edit`), after
    ``config.dynamic_threshold``'s thresholding where that is set (so pasted known pixels stay exact).

    The captions and the empty caption (batch 1) go through the text encoder once, in one call,
    before the step loop; every step reuses the encodings (``xf_proj``, ``xf_out``, with a frozen encoder
    ``xf_mask``, in the model's keyword arguments), and the guided batch's [conditional; unconditional] encodings are
    concatenated once, at the first step (see :func:`classifier_free_guidance`). With
    ``config.clip_guidance_scale`` > 0, ``clip`` guides the ancestral steps (its ``cond_fn``)."""
    if config.clip_guidance_scale > 0 and clip is None:
        raise ValueError(f"clip_guidance_scale {config.clip_guidance_scale} needs a noised CLIP (clip=, which "
                         f"`sample --clip_dir DIR` passes; the fid / sweep commands and the training callbacks take "
                         f"none): set clip_guidance_scale 0 here")
    size = loaded.image_size
    tokens, mask = (x.to(device) for x in loaded.tokenizer(prompts))
    guided = config.guidance_scale != 1.0
    if guided:  # the empty caption, once per batch, in the same encoder call as the captions
        empty_tokens, empty_mask = (x.to(device) for x in loaded.tokenizer.empty(1))
        tokens, mask = torch.cat([tokens, empty_tokens]), torch.cat([mask, empty_mask])
    # xf_proj [B (+1), 4 * model_channels], xf_out [B (+1), W, L] (and a frozen encoder's xf_mask [B (+1), L])
    encoded = loaded.model.encode_caption(tokens, mask)
    batch = len(prompts)
    cond = {**{k: v[:batch] for k, v in encoded.items()}, **(image_kwargs or {})}
    uncond = {k: v[batch:] for k, v in encoded.items()}
    diffusion = GaussianDiffusion.from_config(loaded.diffusion_config, config.steps)
    cond_fn = None
    if clip is not None and config.clip_guidance_scale > 0:
        cond_fn = clip.cond_fn(prompts, diffusion.base_alphas_cumprod, config.clip_guidance_scale, device)
    with denoiser(loaded.model, config, device) as net:
        model = classifier_free_guidance(net, config.guidance_scale, uncond, interval=config.guidance_interval,
                                         alphas_cumprod=diffusion.base_alphas_cumprod)
        return _run_sampler(config, diffusion, model, (batch, 3, size, size), cond, seeds, progress, device,
                            cond_fn, denoised_fn)


def _run_sampler(config: SamplingConfig, diffusion: GaussianDiffusion, model: Any, shape: tuple[int, ...],
                 model_kwargs: dict[str, Any], seeds: list[int], progress: bool, device: torch.device,
                 cond_fn: Any = None, denoised_fn: Any = None) -> Tensor:
    # the registry binds what config.sampler takes (eta where it has one; cond_fn where it applies it), drops nothing
    sampler = get_sampler(config.sampler, **sampler_options(config.sampler, eta=config.eta, cond_fn=cond_fn))
    return sampler(diffusion, model, shape, model_kwargs=model_kwargs, generator=sample_generators(seeds),
                   progress=progress, device=device, denoised_fn=_denoised_fn(config, denoised_fn))


def _denoised_fn(config: SamplingConfig, denoised_fn: Any = None) -> Any:
    """The sampler's ``denoised_fn``: ``config.dynamic_threshold``'s thresholding (where set), then
    ``denoised_fn`` (an edit's known-pixel paste, last so those pixels stay exact); None when neither."""
    if config.dynamic_threshold is None:
        return denoised_fn
    threshold = functools.partial(dynamic_threshold, percentile=config.dynamic_threshold)
    if denoised_fn is None:
        return threshold
    return lambda pred_xstart: denoised_fn(threshold(pred_xstart))


def uses_channels_last(config: SamplingConfig, device: torch.device) -> bool:
    """Whether sampling under ``config`` on ``device`` runs the UNet channels-last (NHWC): the
    ``memory_format`` option, ``auto`` resolved as :attr:`SamplingConfig.memory_format` documents."""
    if config.memory_format != "auto":
        return config.memory_format == "channels_last"
    return device.type == "cpu" and not config.compile


@contextlib.contextmanager
def denoiser(model: nn.Module, config: SamplingConfig, device: torch.device) -> Iterator[Any]:
    """``model`` as the sampler calls it under ``config``'s ``compile``, ``precision`` and
    ``memory_format`` (the network's own memory format restored on exit); returns float32 outputs. The one
    wrapper of every stage: the base model's (:func:`sample_batch`), the upsampler's
    (:func:`~glide_lightning.sampling.cascade.upsample_batch`) and so an edit's two."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    channels_last = uses_channels_last(config, device)
    net: Any = model
    if config.compile and device.type == "cuda":
        net = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif config.compile:  # inductor's freezing: oneDNN convolutions fused with their pointwise neighbours
        net = torch.compile(model, dynamic=False, options={"freezing": True})
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        if not (bf16 or channels_last or config.compile):
            yield model
            return

        def denoise(x_t: Tensor, timesteps: Tensor, **kwargs: Any) -> Tensor:
            if channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            if device.type == "cuda" and config.compile:
                torch.compiler.cudagraph_mark_step_begin()  # the last output was consumed: its buffer may go
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(x_t, timesteps, **kwargs)
            return out.float().contiguous()

        yield denoise
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)

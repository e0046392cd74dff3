"""The image inputs each model kind is conditioned on, besides the caption: the one place that turns a data
batch into the network's keyword arguments (``low_res=``, ``low_res_t=``, ``inpaint_image=``,
``inpaint_mask=``), for training and validation (:class:`~glide_lightning.module.GlideModule`), and the
upsamplers' low-res input at sampling time, with the noise augmentation that sampling applies too.

Noise augmentation of the low-res input (cascaded diffusion models, Ho et al. 2021, §4.3 "conditioning
augmentation"; Imagen): the low-res image is replaced by ``q_sample(low_res, s)`` of the upsampler's own
training process at a timestep ``s`` drawn uniformly from ``{0, …, ⌊low_res_noise·(T − 1)⌋}`` per sample,
and ``s`` reaches the network as ``low_res_t`` (embedded like the timestep: the upsampler needs
``model.low_res_noise_cond``). At sampling time the base model's samples are noised at one fixed ``s``
(``SamplingConfig.upsample_noise``) and the network is told that ``s``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from glide_lightning.data.images import to_uint8
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion

__all__ = ["conditioning_kwargs", "noised_low_res", "sampling_low_res_kwargs"]


def noised_low_res(diffusion: GaussianDiffusion, low_res: Tensor, low_res_t: Tensor, noise: Tensor) -> Tensor:
    """``low_res`` ``[B, 3, h, w]`` noised to the upsampler process's (unrespaced) timesteps ``low_res_t``
    ``[B]`` by ``q_sample`` with ``noise`` (like ``low_res``): the augmentation of training and sampling."""
    return diffusion.q_sample(low_res, low_res_t.to(low_res.device), noise.to(low_res))


def sampling_low_res_kwargs(low_res: Tensor, diffusion: DiffusionConfig, upsample_noise: float, noise_cond: bool,
                            generators: list[torch.Generator]) -> dict[str, Tensor]:
    """An upsampler's image inputs at sampling time: ``low_res`` ``[B, 3, h, w]`` in [-1, 1] rounded to 8 bits (as
    GLIDE feeds it the saved base samples) and, for an upsampler trained with noise augmentation (``noise_cond``:
    ``model.low_res_noise_cond``), ``low_res`` noised at ``upsample_noise`` (a fraction of the upsampler's
    process ``diffusion``, unrespaced) with each image's noise drawn from its generator in ``generators``, and that
    level as ``low_res_t`` ``[B]``."""
    low_res = to_uint8(low_res).float().to(low_res.device) / 127.5 - 1
    if not noise_cond:
        return {"low_res": low_res}
    process = GaussianDiffusion.from_config(diffusion)
    level = round(upsample_noise * (process.num_timesteps - 1))
    low_res_t = torch.full((low_res.shape[0],), level, dtype=torch.long, device=low_res.device)
    noise = torch.stack([torch.randn(low_res.shape[1:], generator=g) for g in generators])
    return {"low_res": noised_low_res(process, low_res, low_res_t, noise), "low_res_t": low_res_t}


def conditioning_kwargs(kind: str, batch: dict[str, Any], *, diffusion: GaussianDiffusion | None = None,
                        low_res_noise: float = 0.0, noise_cond: bool = False,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The network's image-conditioning keyword arguments for a data batch of model ``kind``.

    Args:
        kind: ``base`` (none), ``upsample`` (``low_res``), ``inpaint`` (``inpaint_image``: the batch's
            images, which the network multiplies by the mask itself, and ``inpaint_mask``) or
            ``upsample_inpaint`` (all three).
        batch: the data module's batch (``image``; ``low_res`` and ``inpaint_mask`` for the kinds
            that need them, see :mod:`glide_lightning.data.conditioning`).
        diffusion: the training process (the augmentation's ``q_sample``); needed with ``noise_cond``.
        low_res_noise: the largest augmentation timestep as a fraction of the process (0: none).
        noise_cond: the upsampler takes ``low_res_t`` (``model.low_res_noise_cond``): then ``low_res`` is
            always noised and ``low_res_t`` passed (at ``low_res_noise`` 0: s = 0, the process's first step).
        generator: CPU generator of the augmentation's timesteps and noise (validation: fixed); None: the
            global RNG (training, whose state checkpoints keep).

    Raises:
        ValueError: the batch lacks an input the kind needs (the data module was not told the model's kind).
    """
    kwargs: dict[str, Tensor] = {}
    if kind.startswith("upsample"):
        if "low_res" not in batch:
            raise ValueError(f"a model of kind {kind!r} needs the batch's low_res: give the data module "
                             f"model_kind={kind!r} and low_res_size (the training CLI links model.model.kind)")
        low_res = batch["low_res"]
        if noise_cond:
            if diffusion is None:
                raise ValueError("noise augmentation of low_res needs the training process (diffusion=)")
            top = int(low_res_noise * (diffusion.num_timesteps - 1))
            low_res_t = torch.randint(0, top + 1, (low_res.shape[0],), generator=generator).to(low_res.device)
            noise = torch.randn(low_res.shape, generator=generator) if generator is not None \
                else torch.randn_like(low_res)
            low_res = noised_low_res(diffusion, low_res, low_res_t, noise)
            kwargs["low_res_t"] = low_res_t
        kwargs["low_res"] = low_res
    if "inpaint" in kind:
        if "inpaint_mask" not in batch:
            raise ValueError(f"a model of kind {kind!r} needs the batch's inpaint_mask: give the data module "
                             f"model_kind={kind!r} (the training CLI links model.model.kind)")
        kwargs["inpaint_image"] = batch["image"]
        kwargs["inpaint_mask"] = batch["inpaint_mask"]
    return kwargs

"""Classifier-free guidance (Ho & Salimans 2021; GLIDE): the only place it lives."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from glide_lightning.diffusion.gaussian import ModelFn


def classifier_free_guidance(model: ModelFn, guidance_scale: float, uncond_kwargs: dict[str, Tensor]) -> ModelFn:
    """Wrap ``model`` so that one batched forward of [conditional; unconditional] inputs returns

        ε̂ = ε_c + (s - 1)·(ε_c - ε_u)   (= ε_u + s·(ε_c - ε_u))

    on the ε channels (as many as x_t has), with any further channels (the learned variance) taken
    from the conditional half. ``uncond_kwargs`` replaces the conditioning keys for the
    unconditional half (typically ``tokens`` and ``mask`` of the empty caption, batch 1 or B); keys
    absent from it (``low_res``, ``inpaint_image``…) are shared. At ``guidance_scale == 1`` the
    conditional model is called alone: the result is exactly the conditional prediction, at half
    the cost.
    """
    if guidance_scale == 1.0:
        return model

    def guided(x_t: Tensor, timesteps: Tensor, **cond_kwargs: Any) -> Tensor:
        batch = x_t.shape[0]
        unknown = set(uncond_kwargs) - set(cond_kwargs)
        if unknown:
            raise ValueError(f"uncond_kwargs has keys the model is not called with: {sorted(unknown)}")
        kwargs = {
            key: value if value is None else torch.cat([value, _batched(uncond_kwargs.get(key, value), batch, key)])
            for key, value in cond_kwargs.items()
        }
        out = model(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), **kwargs)
        cond, uncond = rearrange(out, "(two b) c h w -> two b c h w", two=2)
        c = x_t.shape[1]
        eps_cond, eps_uncond = cond[:, :c], uncond[:, :c]
        eps = eps_cond + (guidance_scale - 1.0) * (eps_cond - eps_uncond)
        return torch.cat([eps, cond[:, c:]], dim=1)

    return guided


def _batched(value: Tensor, batch: int, key: str) -> Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"uncond_kwargs[{key!r}] has batch {value.shape[0]}, expected 1 or {batch}")

"""Small building blocks shared by the UNet and the text transformer.

- :func:`timestep_embedding`: the sinusoidal embedding of (raw, integer) diffusion timesteps.
- :class:`GroupNorm32` / :class:`LayerNorm`: normalisation computed in float32 and cast back to the
  input dtype, so fp16 / bf16 activations keep full-precision statistics.
- :func:`zero_module`: zero a module's parameters (ADM initialises every residual branch's last layer
  and the output convolution to zero, so a fresh model is the identity on each residual path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GroupNorm32", "LayerNorm", "normalization", "timestep_embedding", "zero_module"]

GROUPNORM_GROUPS = 32
"""Number of groups of every GroupNorm in the UNet (channel counts must be multiples of it)."""


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of diffusion timesteps (Transformer positional encoding, DDPM).

    Frequencies ``exp(-ln(max_period) * i / half)`` for ``i < half = dim // 2``; the result is
    ``cat([cos(t * f), sin(t * f)])`` (cosines first, as the released GLIDE weights expect), with a
    zero column appended when ``dim`` is odd.

    Args:
        timesteps: ``[B]`` timesteps (integer indices or floats).
        dim: embedding width.
        max_period: the longest period, controls the lowest frequency.

    Returns:
        ``[B, dim]`` float32 embedding.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2 * half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # [B, dim]
    return emb


def _float(p: Tensor | None) -> Tensor | None:
    return None if p is None else p.float()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (input and affine parameters), returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        y = F.group_norm(x.float(), self.num_groups, _float(self.weight), _float(self.bias), self.eps)
        return y.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (input and affine parameters), returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        y = F.layer_norm(x.float(), self.normalized_shape, _float(self.weight), _float(self.bias), self.eps)
        return y.to(x.dtype)


def normalization(channels: int, min_channels_per_group: int = 1) -> GroupNorm32:
    """The UNet's normalisation layer: :class:`GroupNorm32` over ``channels`` with
    ``min(32, channels // min_channels_per_group)`` groups.

    ``min_channels_per_group`` 1 gives ADM / GLIDE's 32 groups at every width. EDM (Karras et al.
    2022, their UNet's ``GroupNorm(min_channels_per_group=4)``) keeps at least 4 channels per group,
    so that narrow layers are not normalised per channel: a group of one channel is InstanceNorm, which
    subtracts each channel's per-image spatial mean and so hides from the layers after it the image's
    mean colour (the lowest-frequency content of x_t). Raises ``ValueError`` when ``channels`` is not a
    multiple of 32 (ADM's widths always are)."""
    if channels % GROUPNORM_GROUPS:
        raise ValueError(
            f"GroupNorm uses {GROUPNORM_GROUPS} groups: channel count {channels} is not a multiple "
            f"of {GROUPNORM_GROUPS} (use a model_channels that is a multiple of {GROUPNORM_GROUPS})"
        )
    if min_channels_per_group < 1 or GROUPNORM_GROUPS % min_channels_per_group:
        raise ValueError(f"min_channels_per_group must be a divisor of {GROUPNORM_GROUPS} (1, 2, 4, 8, 16 or 32), "
                         f"got {min_channels_per_group}")
    return GroupNorm32(min(GROUPNORM_GROUPS, channels // min_channels_per_group), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module
